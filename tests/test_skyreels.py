"""SkyReels-V2 diffusion forcing (diffusers' SkyReelsV2Transformer3DModel) through the paged engine: equal to the
unmodified diffusers module run on the whole sequence with its block-causal mask (history clean at timestep 0, the
current block noisy), its real checkpoint layouts load, and its real sizes plan.  (Every policy and the rest of the
adapter contract: tests/test_adapters_conformance.py.)"""

import json

import pytest
import torch
from safetensors.torch import save_file

from ff_engine.engine import Engine, SessionConfig
from ff_engine.engine.sampler import FlowMatchSchedule
from ff_engine.errors import CheckpointError, ConfigError
from ff_engine.plan import plan
from ff_engine.policies import Unbounded
from model_adapters import registry
from model_adapters.wan_names import from_diffusers

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def model():
    m = registry.build(registry.get_preset("skyreels-v2-tiny"), seed=0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def reference_generate(model, prompt, init):
    """Diffusion forcing as diffusers runs it, one causal block at a time: the unmodified transformer over
    [finished blocks at timestep 0 ; the current block at t], its block-causal mask on, the current block's
    prediction taken; Euler steps on the model's schedule (what the engine does)."""
    cfg = model.cfg
    ref = diffusers.SkyReelsV2Transformer3DModel(**cfg.diffusers_config()).eval()
    ref.load_state_dict(model.transformer.state_dict())
    sched, fpb = FlowMatchSchedule.for_model(model), cfg.frames_per_block
    text = torch.zeros(1, cfg.text_len, cfg.text_dim)
    text[0, : prompt.shape[0]] = prompt  # the pipeline's zero padding to text_len
    done = []
    steps = sched.denoising_timesteps
    for b in range(init.shape[0] // fpb):
        x = init[b * fpb:(b + 1) * fpb][None]
        for i, t in enumerate(steps):
            past = len(done) * fpb
            seq = torch.cat([*done, x[0]]).permute(1, 0, 2, 3)[None]
            ts = torch.tensor([[0.0] * past + [float(t)] * fpb])
            flow = ref(seq, timestep=ts, encoder_hidden_states=text, enable_diffusion_forcing=True, fps=[cfg.fps_id],
                       return_dict=False)[0][:, :, past:].permute(0, 2, 1, 3, 4)
            tt = torch.full((1, fpb), float(t))
            x0 = sched.to_x0(x, flow, tt)
            if i < len(steps) - 1:
                x = sched.add_noise(x0, x0 + flow, torch.full((1, fpb), float(steps[i + 1])))
        done.append(x0[0])
    return torch.cat(done)


def test_unbounded_engine_equals_diffusers_block_causal_forward(model):
    cfg = model.cfg
    prompt = torch.randn(5, cfg.text_dim, generator=torch.Generator().manual_seed(1))
    init = torch.randn(3 * cfg.frames_per_block, cfg.in_channels, *cfg.latent_hw,
                       generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = reference_generate(model, prompt, init)
    e = Engine(model, num_pages=64, page_size=16, backend="torch")
    out = e.generate(SessionConfig(prompt=prompt, num_frames=init.shape[0], policy=Unbounded(), initial_noise=init))
    assert (out - ref).abs().max() <= 1e-4
    assert (out[-cfg.frames_per_block:] - init[-cfg.frames_per_block:]).abs().max() > 0.1  # it did generate


def test_self_attention_processor_runs_only_inside_the_adapter(model):
    cfg = model.cfg
    x = torch.randn(1, cfg.in_channels, cfg.frames_per_block, *cfg.latent_hw)
    with pytest.raises(ConfigError, match="inside the adapter"):
        model.transformer(x, timestep=torch.zeros(1, cfg.frames_per_block),
                          encoder_hidden_states=torch.zeros(1, 4, cfg.text_dim), enable_diffusion_forcing=True,
                          fps=[1])


def test_diffusers_folder_and_original_release_layouts_load(model, tmp_path):
    cfg, sd = model.cfg, model.transformer.state_dict()
    folder = tmp_path / "transformer"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    conf = {"_class_name": "SkyReelsV2Transformer3DModel", **cfg.diffusers_config(), "patch_size": [1, 2, 2]}
    (folder / "config.json").write_text(json.dumps(conf))
    a = registry.load(folder, "skyreels-v2-tiny")
    # SkyReels' own release: Wan2.1 names plus fps_embedding / fps_projection.{0,2}
    save_file({k: v.contiguous() for k, v in from_diffusers(sd).items()}, str(tmp_path / "model.safetensors"))
    ckpt = registry.read_checkpoint(tmp_path / "model.safetensors", "skyreels-v2-tiny")
    assert ckpt.architecture.name == "skyreels-v2" and any("diffusers names" in n for n in ckpt.notes)
    b = registry.instantiate(ckpt)
    for m in (a, b):
        assert m.cfg == cfg
        assert all(torch.equal(v, sd[k]) for k, v in m.transformer.state_dict().items())


def test_image_to_video_and_wrong_files_are_one_line(model, tmp_path):
    sd = model.transformer.state_dict()
    folder = tmp_path / "i2v"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"_class_name": "SkyReelsV2Transformer3DModel", "image_dim": 1280}))
    with pytest.raises(CheckpointError, match="image-to-video"):
        registry.load(folder)
    broken = {k: v for k, v in sd.items() if not k.startswith("blocks.1.attn1")}
    save_file({k: v.contiguous() for k, v in broken.items()}, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing \(10\): blocks.1.attn1") as ei:
        registry.load(tmp_path / "broken.safetensors", "skyreels-v2-tiny")
    assert "\n" not in str(ei.value)


def test_real_sizes_plan():
    cfg = registry.get_preset("skyreels-v2-df-1.3b-540p")
    g = cfg.geometry()
    assert (g.tokens_per_frame, g.frames_per_block, g.num_layers, g.num_kv_heads, g.head_dim) == (2040, 5, 30, 12, 128)
    assert 1.40e9 < registry.param_count(cfg) < 1.45e9  # SkyReels-V2-DF-1.3B
    assert 14.0e9 < registry.param_count(registry.get_preset("skyreels-v2-df-14b-720p")) < 14.5e9
    r = plan(g, gpu_mem_bytes=80 * 2**30, budget_frames=20, seconds=60, weights_bytes=2 * registry.param_count(cfg))
    assert r["latent_frames"] == 360 and r["bounded_streams"] > r["unbounded_streams"]
