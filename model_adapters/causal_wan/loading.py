"""Checkpoint loading for causal Wan: Wan2.1 / Self-Forcing / CausVid / LongLive layouts.

* files: ``.safetensors`` (safetensors) or ``.pt``/``.pth``/``.bin`` (``torch.load(weights_only=True)``);
* distilled checkpoints wrap the state_dict as ``{'generator_ema' | 'generator' | 'model' | 'state_dict': sd}``
  (EMA preferred) and prefix keys with ``model.`` (also ``module.`` / ``_orig_mod.``);
* LongLive-style LoRA on the block Linears (peft naming: ``<name>.base_layer.weight``, ``<name>.lora_A.weight``,
  ``<name>.lora_B.weight``) is merged into the base weight (``W += scale * B @ A``; scale from ``lora_scale``);
* geometry is read from tensor shapes (dim, layers, ffn, text_dim, freq_dim, patch, channels); what shapes
  cannot tell (num_heads, text_len, latent grid) comes from a ``config.json`` beside the file, the file's
  safetensors metadata, or the preset.
A key or shape mismatch raises one ``CheckpointError`` listing the offending keys.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from ff_engine.errors import CheckpointError, ConfigError
from model_adapters.causal_wan.model import PRESETS, CausalWanConfig, CausalWanModel

_WRAPPERS = ("generator_ema", "generator", "model", "state_dict", "module")
_PREFIXES = ("model.", "module.", "_orig_mod.", "base_model.model.")
_CONFIG_FIELDS = {f for f in CausalWanConfig.__dataclass_fields__}


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Raw tensors and any config found with the file (safetensors metadata or a config.json beside it)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    meta: dict = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                raw = (f.metadata() or {}).get("ff_engine_config")
        except Exception as exc:
            raise CheckpointError(f"cannot read safetensors checkpoint {path}: {exc}") from None
        if raw:
            meta = json.loads(raw)
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot read checkpoint {path} with torch.load(weights_only=True): {exc}") from None
    cfg_file = path.parent / "config.json"
    if not meta and cfg_file.is_file():
        doc = json.loads(cfg_file.read_text())
        meta = doc.get("model", doc) if isinstance(doc, dict) else {}
    return sd, meta


def unwrap(sd) -> dict[str, torch.Tensor]:
    """Strip wrapper dicts and key prefixes; merge peft-style LoRA into base weights."""
    if not isinstance(sd, dict):
        raise CheckpointError(f"checkpoint must hold a dict of tensors, got {type(sd).__name__}")
    while not any(isinstance(v, torch.Tensor) for v in sd.values()):
        inner = next((sd[k] for k in _WRAPPERS if isinstance(sd.get(k), dict)), None)
        if inner is None:
            raise CheckpointError(f"no state_dict found in checkpoint (top-level keys: {sorted(sd)[:8]})")
        sd = inner
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        for p in _PREFIXES:
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return _merge_lora(out)


def _merge_lora(sd: dict[str, torch.Tensor], scale: float | None = None) -> dict[str, torch.Tensor]:
    lora_a = {k[: -len(".lora_A.weight")]: v for k, v in sd.items() if k.endswith(".lora_A.weight")}
    if not lora_a:
        return sd
    out = {k: v for k, v in sd.items() if ".lora_A." not in k and ".lora_B." not in k}
    for name, a in lora_a.items():
        b = sd.get(f"{name}.lora_B.weight")
        base_key = f"{name}.base_layer.weight" if f"{name}.base_layer.weight" in sd else f"{name}.weight"
        if b is None or base_key not in sd:
            raise CheckpointError(f"incomplete LoRA for {name}: need lora_A, lora_B and the base weight")
        s = scale if scale is not None else float(sd.get(f"{name}.lora_scale", torch.tensor(1.0)))
        out[f"{name}.weight"] = sd[base_key] + s * (b.float() @ a.float()).to(sd[base_key].dtype)
        out.pop(f"{name}.base_layer.weight", None)
        if f"{name}.base_layer.bias" in out:
            out[f"{name}.bias"] = out.pop(f"{name}.base_layer.bias")
    return out


def infer_config(sd: dict[str, torch.Tensor], base: CausalWanConfig, meta: dict | None = None) -> CausalWanConfig:
    """Geometry from tensor shapes; the rest from ``meta`` then ``base``."""
    try:
        pe = sd["patch_embedding.weight"]
        layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
        kw = dict(
            dim=pe.shape[0], in_dim=pe.shape[1], patch_size=tuple(pe.shape[2:]),
            num_layers=max(layers) + 1 if layers else 0,
            ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0],
            text_dim=sd["text_embedding.0.weight"].shape[1],
            freq_dim=sd["time_embedding.0.weight"].shape[1],
        )
        kw["out_dim"] = sd["head.head.weight"].shape[0] // math.prod(kw["patch_size"])
    except KeyError as exc:
        raise CheckpointError(f"not a causal-Wan checkpoint: missing key {exc.args[0]}") from None
    meta = {k: (tuple(v) if isinstance(v, list) else v) for k, v in (meta or {}).items() if k in _CONFIG_FIELDS}
    for k, v in meta.items():  # every recorded field the tensor shapes did not already decide
        kw.setdefault(k, v)
    if "num_heads" not in kw and base.dim != kw["dim"]:
        kw["num_heads"] = max(1, kw["dim"] // 128)  # Wan uses 128-dim heads
    return base.with_(**kw)


def load_causal_wan(path: str | Path, preset: str | CausalWanConfig = "wan-1.3b", **overrides) -> CausalWanModel:
    """Load a checkpoint into ``CausalWanModel``; strict about keys and shapes."""
    base = PRESETS[preset] if isinstance(preset, str) else preset
    if isinstance(preset, str) and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    raw, meta = read_state_dict(path)
    sd = unwrap(raw)
    cfg = infer_config(sd, base, meta).with_(**overrides) if overrides else infer_config(sd, base, meta)
    model = CausalWanModel(cfg)
    load_into(model, sd)
    return model.eval()


def load_into(model: CausalWanModel, sd: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k} {tuple(sd[k].shape)} != {tuple(own[k].shape)}" for k in set(own) & set(sd)
                    if sd[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        parts = []
        for name, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if items:
                parts.append(f"{name} ({len(items)}): {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}")
        raise CheckpointError("checkpoint does not match the causal-Wan model: " + "; ".join(parts))
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"checkpoint has NaN/inf in: {', '.join(bad[:6])}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})


def save_checkpoint(model: CausalWanModel, path: str | Path) -> None:
    """safetensors with the config in its metadata, Wan key names."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata={"ff_engine_config": json.dumps(asdict(model.cfg))})
