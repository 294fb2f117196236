"""Checkpoint loading for causal Wan: Self-Forcing, CausVid, LongLive and plain (diffusers) Wan2.1 layouts.

File reading, training wrappers (``generator_ema`` / ``generator`` / ``model.`` / ``_fsdp_wrapped_module.``) and
PEFT LoRA merging are architecture-free (``model_adapters.checkpoints``); this module maps the cleaned tensors
onto ``CausalWanModel``:

* Wan / Self-Forcing / CausVid / LongLive names load unchanged;
* diffusers ``WanTransformer3DModel`` names (``condition_embedder.*``, ``blocks.{i}.attn1.to_q``,
  ``ffn.net.0.proj``, ``scale_shift_table``, ``proj_out``; its ``norm2`` is Wan's cross-attention ``norm3``) are
  renamed to Wan's, the inverse of diffusers' own conversion script;
* geometry is read from tensor shapes (dim, layers, ffn, text_dim, freq_dim, patch, channels); what shapes
  cannot tell (num_heads, text_len, latent grid) comes from the config recorded with the file (safetensors
  metadata, a ``config.json`` beside it, diffusers' field names included) or the preset.
A key or shape mismatch raises one ``CheckpointError`` naming the first offending keys.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict
from pathlib import Path

import torch

from ff_engine.errors import CheckpointError, ConfigError
from model_adapters import checkpoints
from model_adapters.causal_wan.model import PRESETS, CausalWanConfig, CausalWanModel
from model_adapters.wan_names import from_diffusers, is_diffusers_layout

#: diffusers config.json field -> CausalWanConfig field (the rest is read from tensor shapes)
DIFFUSERS_FIELDS = {"num_attention_heads": "num_heads", "rope_max_seq_len": "rope_frames", "eps": "eps",
                    "cross_attn_norm": "cross_attn_norm"}


def diffusers_meta(meta: dict) -> dict:
    """A diffusers config.json's fields under CausalWanConfig names (others are dropped)."""
    if "_class_name" not in meta and "num_attention_heads" not in meta:
        return meta
    return {ours: meta[theirs] for theirs, ours in DIFFUSERS_FIELDS.items() if theirs in meta}


def infer_config(sd: dict[str, torch.Tensor], base: CausalWanConfig, meta: dict | None = None) -> CausalWanConfig:
    """Geometry from tensor shapes; the rest from ``meta`` then ``base``."""
    try:
        pe = sd["patch_embedding.weight"]
        layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
        kw = {
            "dim": pe.shape[0], "in_dim": pe.shape[1], "patch_size": tuple(pe.shape[2:]),
            "num_layers": max(layers) + 1 if layers else 0,
            "ffn_dim": sd["blocks.0.ffn.0.weight"].shape[0],
            "text_dim": sd["text_embedding.0.weight"].shape[1],
            "freq_dim": sd["time_embedding.0.weight"].shape[1],
        }
        kw["out_dim"] = sd["head.head.weight"].shape[0] // math.prod(kw["patch_size"])
    except KeyError as exc:
        raise CheckpointError(f"not a causal-Wan checkpoint: missing key {exc.args[0]}") from None
    meta = checkpoints.recorded_config(CausalWanConfig, meta or {}, {"decoder": ("wan-vae", "world-codec")})
    for k, v in meta.items():  # every recorded field the tensor shapes did not already decide
        kw.setdefault(k, v)
    if "num_heads" not in kw and base.dim != kw["dim"]:
        kw["num_heads"] = max(1, kw["dim"] // 128)  # Wan uses 128-dim heads
    return base.with_(**kw)


def adopt(sd: dict[str, torch.Tensor], meta: dict, base: CausalWanConfig, notes: list[str]
          ) -> tuple[CausalWanConfig, dict[str, torch.Tensor]]:
    """The registry's mapping step: a cleaned state dict (any causal-Wan layout) -> (config, Wan-named tensors)."""
    if is_diffusers_layout(sd):
        sd, meta = from_diffusers(sd, notes), diffusers_meta(meta)
    return infer_config(sd, base, meta), sd


def read_checkpoint(path: str | Path, preset: str | CausalWanConfig = "wan-1.3b",
                    **overrides) -> tuple[CausalWanConfig, dict[str, torch.Tensor]]:
    """The config and Wan-named state_dict of a checkpoint, without building the model (so a caller can check
    sizes first); every defect of the file or its config is one ``CheckpointError``."""
    if isinstance(preset, str) and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    base = PRESETS[preset] if isinstance(preset, str) else preset
    raw, meta = checkpoints.read_tensors(path)
    cfg, sd = adopt(checkpoints.unwrap(raw), {k: v for k, v in meta.items() if k != "architecture"}, base, [])
    return (cfg.with_(**overrides) if overrides else cfg), sd


def load_causal_wan(path: str | Path, preset: str | CausalWanConfig = "wan-1.3b", **overrides) -> CausalWanModel:
    """Load a checkpoint into ``CausalWanModel``; strict about keys and shapes."""
    cfg, sd = read_checkpoint(path, preset, **overrides)
    model = CausalWanModel(cfg)
    load_into(model, sd)
    return model.eval()


def load_into(model: CausalWanModel, sd: dict[str, torch.Tensor]) -> None:
    checkpoints.load_strict(model, sd, "causal-Wan")


def save_checkpoint(model: CausalWanModel, path: str | Path) -> None:
    """safetensors with the config in its metadata, Wan key names."""
    checkpoints.save_clean(model.state_dict(), path, {"architecture": "causal-wan", **asdict(model.cfg)})
