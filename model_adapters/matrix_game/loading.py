"""Checkpoint loading for Matrix-Game 2.0: the released layout, under the reference's own key names.

The release (``base_distilled_model/base_distill.safetensors`` and the per-mode distilled files) is loaded upstream
into ``WanDiffusionWrapper``, so its keys carry the wrapper's ``model.`` prefix, which
``checkpoints.unwrap`` peels; a ``generator`` / ``generator_ema`` training wrapper is peeled the same way.  The
geometry is read from tensor shapes (dim, layers, FFN, channels, which blocks carry an ActionModule, keyboard /
mouse widths and hidden sizes); what shapes cannot tell (heads, action heads, the window ``local_attn_size``)
comes from the recorded config — the reference ``config.json`` (``action_config`` nested, its own names) or the
config ff-engine's ``convert`` writes — and then the preset.
"""

from __future__ import annotations

import math
import re

import torch

from ff_engine.errors import CheckpointError
from model_adapters import checkpoints
from model_adapters.matrix_game.config import MatrixGameConfig

#: the reference config.json's names -> MatrixGameConfig fields (``action_config`` entries prefixed ``action.``)
REFERENCE_FIELDS = {
    "num_heads": "num_heads", "local_attn_size": "local_attn_size", "eps": "eps",
    "action.heads_num": "action_heads", "action.windows_size": "windows_size",
    "action.vae_time_compression_ratio": "vae_time_compression_ratio", "action.rope_theta": "action_rope_theta",
    "action.mouse_qk_dim_list": "action_rope_dims",
}
#: fields the tensor shapes decide (a recorded value is ignored)
SHAPE_FIELDS = ("dim", "in_dim", "out_dim", "patch_size", "num_layers", "ffn_dim", "freq_dim", "img_dim",
                "action_blocks", "keyboard_dim", "mouse_dim", "keyboard_embed_dim", "keyboard_hidden_dim",
                "mouse_hidden_dim", "qkv_bias")


def is_matrix_game(keys) -> bool:
    return "img_emb.proj.1.weight" in keys and any(".action_model." in k for k in keys)


def reference_meta(meta: dict) -> dict:
    """A recorded config under MatrixGameConfig names (the reference's nested ``action_config`` flattened)."""
    flat = {k: v for k, v in meta.items() if k != "action_config"}
    for k, v in (meta.get("action_config") or {}).items():
        flat[f"action.{k}"] = v
    out = {ours: flat[theirs] for theirs, ours in REFERENCE_FIELDS.items() if theirs in flat}
    if "_class_name" not in meta:  # ff-engine's own recorded config: its names are ours
        out.update({k: v for k, v in meta.items() if k in MatrixGameConfig.__dataclass_fields__})
    if out.get("local_attn_size") == -1:
        raise CheckpointError("local_attn_size -1 (global attention) is not a served Matrix-Game setting")
    if flat.get("sink_size", 0) not in (0, None):
        raise CheckpointError(f"sink_size {flat['sink_size']} is not served (Matrix-Game 2.0 uses 0)")
    if flat.get("model_type", "i2v") != "i2v":
        raise CheckpointError(f"model_type {flat['model_type']!r}: Matrix-Game checkpoints are i2v")
    for k in SHAPE_FIELDS + ("sink_size",):
        out.pop(k, None)
    return out


def infer_config(sd: dict[str, torch.Tensor], base: MatrixGameConfig, meta: dict) -> MatrixGameConfig:
    try:
        pe = sd["patch_embedding.weight"]
        layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
        kw = {"dim": pe.shape[0], "in_dim": pe.shape[1], "patch_size": tuple(pe.shape[2:]),
              "num_layers": max(layers) + 1, "ffn_dim": sd["blocks.0.ffn.0.weight"].shape[0],
              "freq_dim": sd["time_embedding.0.weight"].shape[1], "img_dim": sd["img_emb.proj.1.weight"].shape[1]}
        kw["out_dim"] = sd["head.head.weight"].shape[0] // math.prod(kw["patch_size"])
        blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.action_model\.", k))})
        kw["action_blocks"] = tuple(blocks)
        a = f"blocks.{blocks[0]}.action_model." if blocks else None
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"not a Matrix-Game checkpoint: missing {exc.args[0]}") from None
    meta = checkpoints.recorded_config(MatrixGameConfig, reference_meta(meta))
    window = meta.get("windows_size", base.windows_size) * meta.get("vae_time_compression_ratio",
                                                                  base.vae_time_compression_ratio)
    if a is not None:
        kb, mo = sd.get(a + "keyboard_embed.0.weight"), sd.get(a + "mouse_mlp.0.weight")
        kw["keyboard_dim"] = kb.shape[1] if kb is not None else 0
        if kb is not None:
            kw["keyboard_embed_dim"] = kb.shape[0]
            kw["keyboard_hidden_dim"] = sd[a + "mouse_attn_q.weight"].shape[0]
        if mo is not None:
            extra = mo.shape[1] - kw["dim"]
            if extra <= 0 or extra % window:
                raise CheckpointError(f"{a}mouse_mlp.0.weight {tuple(mo.shape)} does not fit dim {kw['dim']} plus a "
                                      f"{window}-frame mouse window")
            kw["mouse_dim"], kw["mouse_hidden_dim"] = extra // window, mo.shape[0]
        else:
            kw["mouse_dim"] = 0
        kw["qkv_bias"] = (a + "t_qkv.bias") in sd or (a + "mouse_attn_q.bias") in sd
    for k, v in meta.items():
        kw.setdefault(k, v)
    if "num_heads" not in kw and base.dim != kw["dim"]:
        kw["num_heads"] = max(1, kw["dim"] // 128)
    return base.with_(**kw)


def adopt(sd: dict[str, torch.Tensor], meta: dict, base: MatrixGameConfig, notes: list[str]
          ) -> tuple[MatrixGameConfig, dict[str, torch.Tensor]]:
    """The registry's mapping step: reference names load unchanged; the config comes from shapes + recorded config."""
    if not is_matrix_game(sd):
        raise CheckpointError("not a Matrix-Game checkpoint: no img_emb.proj / action_model keys")
    return infer_config(sd, base, meta), sd
