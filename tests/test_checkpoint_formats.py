"""Every causal-Wan checkpoint layout loads through one call (``model_adapters.registry.load``): Self-Forcing
(``generator`` / ``generator_ema``, ``model.`` prefix), CausVid, LongLive (``_fsdp_wrapped_module.``, its rank-256 PEFT
LoRA merged at load, in the file or as its separate ``generator_lora`` file) and plain diffusers Wan; synthetic
checkpoints carry the real full key sets at small shapes.  A wrong file is one line naming the first bad keys;
``convert`` writes a clean safetensors file and reports what it mapped."""

import json

import pytest
import torch
from safetensors.torch import save_file
from tests_helpers import dense_attention

from ff_engine.errors import CheckpointError
from model_adapters import registry
from model_adapters.wan_names import to_diffusers

RANK = 256  # LongLive's LoRA rank (full rank at the tiny width 256, which is fine for a merge test)


@pytest.fixture(scope="module")
def wan():
    return registry.build(registry.get_preset("wan-tiny"), seed=0)


def state(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def outputs(model, sd=None):
    """One block forward (dense, block-only attention) with the weights ``sd`` (default: the model's own)."""
    if sd is not None:
        model = registry.build(registry.get_preset("wan-tiny"))
        model.load_state_dict(sd)
    x = torch.randn(1, 3, 16, 8, 12, generator=torch.Generator().manual_seed(1))
    prompt = torch.randn(4, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model.forward(x, torch.full((1, 3), 700.0), [model.encode_prompt(prompt)], [0], dense_attention)


def fsdp_name(key: str) -> str:
    """How LongLive's FSDP training names a parameter: the root and every block wrapped, blocks checkpointed."""
    parts = key.split(".")
    if parts[0] == "blocks":
        parts.insert(2, "_fsdp_wrapped_module._checkpoint_wrapped_module")
    return "_fsdp_wrapped_module.model." + ".".join(parts)


def block_linears(sd):
    return sorted(k[: -len(".weight")] for k, v in sd.items() if k.startswith("blocks.") and v.dim() == 2)


def lora_pairs(sd, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in block_linears(sd):
        w = sd[f"{name}.weight"]
        out[name] = (torch.randn(RANK, w.shape[1], generator=g) * 0.01, torch.randn(w.shape[0], RANK, generator=g) * 0.01)
    return out


def merged(sd, pairs, scale=1.0):
    out = dict(sd)
    for name, (a, b) in pairs.items():
        out[f"{name}.weight"] = sd[f"{name}.weight"] + scale * b @ a
    return out


def test_self_forcing_takes_the_ema_generator(wan, tmp_path):
    gen, ema = state(wan, 1), state(wan, 2)
    critic = {f"model.{k}": v for k, v in state(wan, 3).items() if "blocks.0" in k}
    torch.save({"generator": {f"model.{k}": v for k, v in gen.items()}, "critic": critic,
                "generator_ema": {f"model.{k}": v for k, v in ema.items()}}, tmp_path / "self_forcing_dmd.pt")
    m = registry.load(tmp_path / "self_forcing_dmd.pt", "wan-tiny")
    assert torch.equal(outputs(m), outputs(wan, ema))


def test_causvid_generator(wan, tmp_path):
    gen = state(wan, 4)
    torch.save({"generator": {f"model.{k}": v for k, v in gen.items()}}, tmp_path / "causvid.pt")
    assert torch.equal(outputs(registry.load(tmp_path / "causvid.pt", "wan-tiny")), outputs(wan, gen))


def test_longlive_fsdp_names_and_separate_lora_file(wan, tmp_path):
    base = state(wan, 5)
    pairs = lora_pairs(base, 6)
    assert len(pairs) == 2 * 10  # q, k, v, o of self- and cross-attention, ffn.0, ffn.2 in each of 2 blocks
    torch.save({"generator": {fsdp_name(k): v for k, v in base.items()}}, tmp_path / "longlive_base.pt")
    lora = {}
    for name, (a, b) in pairs.items():
        lora[f"base_model.model.{name}.lora_A.weight"], lora[f"base_model.model.{name}.lora_B.weight"] = a, b
    torch.save({"generator_lora": lora, "critic_lora": {}}, tmp_path / "lora.pt")
    ckpt = registry.read_checkpoint(tmp_path / "longlive_base.pt", "wan-tiny", lora=tmp_path / "lora.pt")
    assert any("LoRA into 20 weights (rank 256" in n for n in ckpt.notes)
    m = registry.instantiate(ckpt)
    assert (outputs(m) - outputs(wan, merged(base, pairs))).abs().max() <= 1e-5


def test_longlive_peft_model_state_dict_in_one_file(wan, tmp_path):
    """A PEFT-wrapped model saved whole: base weights under ``base_layer``, adapters under ``lora_A.default``."""
    base = state(wan, 7)
    pairs = lora_pairs(base, 8)
    sd = {}
    for k, v in base.items():
        name = k[: -len(".weight")]
        sd[f"base_model.model.{name}.base_layer.weight" if name in pairs else f"base_model.model.{k}"] = v
    for name, (a, b) in pairs.items():
        bias = sd.pop(f"base_model.model.{name}.bias")
        sd[f"base_model.model.{name}.base_layer.bias"] = bias
        sd[f"base_model.model.{name}.lora_A.default.weight"] = a
        sd[f"base_model.model.{name}.lora_B.default.weight"] = b
    save_file(sd, str(tmp_path / "longlive_peft.safetensors"))
    m = registry.load(tmp_path / "longlive_peft.safetensors", "wan-tiny", lora_scale=0.5)
    assert (outputs(m) - outputs(wan, merged(base, pairs, 0.5))).abs().max() <= 1e-5


def test_plain_diffusers_wan_folder_equals_diffusers_forward(wan, tmp_path):
    """diffusers' own WanTransformer3DModel at the tiny shape: its key set maps exactly, and its forward on one
    block equals ours (the norm2 / norm3 swap and every rename are right)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    conf = {"patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 128, "in_channels": 16,
            "out_channels": 16, "text_dim": 256, "freq_dim": 256, "ffn_dim": 512, "num_layers": 2,
            "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024}
    ref = WanTransformer3DModel(**conf).eval()
    folder = tmp_path / "transformer"
    folder.mkdir()
    sd = ref.state_dict()
    keys = sorted(sd)
    save_file({k: sd[k].contiguous() for k in keys[: len(keys) // 2]},
              str(folder / "diffusion_pytorch_model-00001-of-00002.safetensors"))
    save_file({k: sd[k].contiguous() for k in keys[len(keys) // 2:]},
              str(folder / "diffusion_pytorch_model-00002-of-00002.safetensors"))
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel", **conf}))
    m = registry.load(folder, "wan-tiny")
    assert m.cfg.num_heads == 2
    x = torch.randn(1, 3, 16, 8, 12)
    prompt = torch.randn(16, 256)
    with torch.no_grad():
        ours = m.forward(x, torch.full((1, 3), 700.0), [m.encode_prompt(prompt)], [0], dense_attention)
        theirs = ref(x.permute(0, 2, 1, 3, 4), torch.tensor([700.0]), prompt[None], return_dict=False)[0]
    assert (ours - theirs.permute(0, 2, 1, 3, 4)).abs().max() <= 1e-4


def test_convert_writes_a_clean_file_and_reports(wan, tmp_path):
    gen = state(wan, 9)
    torch.save({"generator_ema": {f"model.{k}": v for k, v in gen.items()}}, tmp_path / "in.pt")
    ckpt = registry.convert(tmp_path / "in.pt", tmp_path / "out.safetensors", "wan-tiny")
    assert any("generator_ema" in n for n in ckpt.notes) and any("prefix" in n for n in ckpt.notes)
    back = registry.load(tmp_path / "out.safetensors")  # no preset: the config travels in the metadata
    assert back.cfg == wan.cfg and torch.equal(outputs(back), outputs(wan, gen))
    diffusers_names = to_diffusers(gen)
    save_file({k: v.contiguous() for k, v in diffusers_names.items()}, str(tmp_path / "d.safetensors"))
    again = registry.convert(tmp_path / "d.safetensors", tmp_path / "d_clean.safetensors", "wan-tiny")
    assert any("diffusers keys to Wan2.1" in n for n in again.notes)


@pytest.mark.parametrize("break_it,needle", [
    (lambda sd: sd.pop("head.modulation"), "missing (1): head.modulation"),
    (lambda sd: sd.update({"blocks.0.ffn.0.weight": torch.zeros(3, 3)}), "blocks.0.ffn.0.weight (3, 3)"),
    (lambda sd: sd.update({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 7)}), "LoRA"),
    (lambda sd: sd.update({"extra.weight": torch.zeros(1)}), "unexpected (1): extra.weight"),
])
def test_a_wrong_file_is_one_line_naming_the_first_bad_keys(wan, tmp_path, break_it, needle):
    sd = dict(wan.state_dict())
    break_it(sd)
    torch.save({"generator": {f"model.{k}": v for k, v in sd.items()}}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as ei:
        registry.load(tmp_path / "bad.pt", "wan-tiny")
    assert "\n" not in str(ei.value) and needle in str(ei.value)


def test_unknown_keys_name_no_architecture(tmp_path):
    save_file({"encoder.conv.weight": torch.zeros(2, 2)}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match="no registered architecture .* first keys: encoder.conv.weight"):
        registry.load(tmp_path / "vae.safetensors")


def test_convert_command(wan, tmp_path, capsys):
    from ff_engine import cli

    torch.save({"generator": {f"model.{k}": v for k, v in wan.state_dict().items()}}, tmp_path / "causvid.pt")
    assert cli.main(["convert", str(tmp_path / "causvid.pt"), str(tmp_path / "c.safetensors"), "--preset",
                     "wan-tiny"]) == 0
    out = capsys.readouterr().out
    assert "causal-wan, 69 tensors" in out and "took checkpoint entry 'generator'" in out
    assert torch.equal(outputs(registry.load(tmp_path / "c.safetensors")), outputs(wan))
    torch.save({"generator": {"model.patch_embedding.weight": torch.zeros(1)}}, tmp_path / "bad.pt")
    assert cli.main(["convert", str(tmp_path / "bad.pt"), str(tmp_path / "d.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "first keys: patch_embedding.weight" in err[0] and not (tmp_path / "d.safetensors").exists()
