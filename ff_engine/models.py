"""Models, prompts and decoders, built the same way by every caller: the CLI, the server, Ray workers, benchmarks.

One module with typed functions (no argparse) so a served stream, a generated file and a benchmark run use the
same model for the same inputs, and no library code has to import the CLI to get one.  Architecture-specific
work stays in ``model_adapters.registry``; this module adds the defaults (the embedded world model), the
reference-setting overrides and the prompt file checks that every front end shares.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ff_engine.errors import ConfigError
from model_adapters import registry
from model_adapters.world import EMBEDDED_CHECKPOINT

#: the embedded default: the in-repo world model (trained on CPU, its own decoder; see README for what it can do)
DEFAULT_MODEL = str(EMBEDDED_CHECKPOINT)


def resolve_model(model: str = DEFAULT_MODEL, *, preset: str | None = None, random_weights: bool = False,
                  lora: str | Path | None = None, frames_per_block: int | None = None,
                  context_noise: float | None = None) -> tuple[Any, dict | None]:
    """(config, state_dict or None) of ``model`` without building it: a preset's config (with
    ``random_weights``), or a checkpoint of any supported layout read and checked (every defect of the file is one
    ``CheckpointError``); a checkpoint's recorded config wins over ``preset``.  The reference-setting overrides
    (``frames_per_block``, ``context_noise``) apply to either."""
    cfg, ckpt = registry.resolve(model, preset, random_weights, lora=lora)
    if context_noise is not None and not (math.isfinite(context_noise) and 0 <= context_noise <= 1000):
        raise ConfigError(f"--context-noise must be a timestep in [0, 1000], got {context_noise:g}")
    overrides = {k: v for k, v in (("frames_per_block", frames_per_block), ("context_noise", context_noise))
                 if v is not None}
    return (cfg.with_(**overrides) if overrides else cfg), (ckpt.state_dict if ckpt else None)


def build_model(cfg, state_dict: dict | None = None, *, seed: int | None = 0) -> torch.nn.Module:
    """The model of a resolved config: random weights seeded by ``seed`` (None: the global RNG as it is) without
    a state dict, else the checkpoint's (in eval mode either way)."""
    model = registry.build(cfg, seed=seed) if state_dict is None else registry.from_weights(cfg, state_dict)
    return model.eval()


def load_model(model: str = DEFAULT_MODEL, *, preset: str | None = None, random_weights: bool = False,
               seed: int = 0) -> torch.nn.Module:
    """``resolve_model`` then ``build_model``: what the server loads and what a Ray worker's ``ModelSpec`` calls."""
    cfg, sd = resolve_model(model, preset=preset, random_weights=random_weights)
    return build_model(cfg, sd, seed=seed)


def make_decoder(model_or_config, vae: str | Path | None = None):
    """The model's latents -> pixels decoder (``registry.make_decoder``: Wan's VAE from a folder, checked against
    the model's latent channels, else the architecture's own)."""
    return registry.make_decoder(model_or_config, vae)


def _read_prompt_file(p: Path):
    """The tensor a prompt file holds (its 'prompt_embeds' entry, or its first tensor), else a description of
    what it holds instead."""
    if p.stat().st_size == 0:
        return "an empty file"
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        t = load_file(str(p))
    else:
        t = torch.load(str(p), map_location="cpu", weights_only=True)
    if isinstance(t, dict):
        t = t.get("prompt_embeds", next((v for v in t.values() if isinstance(v, torch.Tensor)), "a dict without tensors"))
    return t if isinstance(t, (torch.Tensor, str)) else f"a {type(t).__name__}"


def _read_prompt(p: Path, text_dim: int, what: str):
    """The tensor of an existing prompt file, or one ``ConfigError`` whatever the file's defect."""
    try:
        t = _read_prompt_file(p)
    except Exception as exc:  # noqa: BLE001 - empty, corrupt or pickled files raise many types
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{what}: cannot read {p} as a tensor file (.pt with weights only, or "
                          f".safetensors): {reason[:200]}") from None
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"{what}: {p} must hold a tensor [L, {text_dim}] (or a dict with "
                          f"'prompt_embeds'), got {t}")
    return t


def load_prompt(model_or_config, path: str | Path | None = None, *, seed: int = 0,
                what: str = "--prompt-embeds") -> torch.Tensor:
    """A prompt file (or a prompt seeded by ``seed``) as [L, text_dim], checked against the model's text config
    (``model_or_config``: a model or its config).  ``what`` names the input in errors (the CLI's flag; the
    server's request field), so every front end reports the same defect the same way."""
    cfg = getattr(model_or_config, "cfg", model_or_config)
    if not cfg.conditional:
        if path is not None:
            raise ConfigError(f"{what}: this model was trained without text conditioning")
        return torch.zeros(1, cfg.text_dim)
    text_len = getattr(cfg, "text_len", None)
    if path is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(min(16, text_len or 16), cfg.text_dim, generator=g)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what}: file not found: {p}")
    t = _read_prompt(p, cfg.text_dim, what)
    if t.dim() == 3 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 2 or t.shape[1] != cfg.text_dim or not 1 <= t.shape[0] <= (text_len or t.shape[0]) \
            or not t.is_floating_point():
        raise ConfigError(f"{what}: {p} must be a float tensor [L, {cfg.text_dim}] with 1 <= L"
                          f"{f' <= {text_len}' if text_len else ''}, got {t.dtype} {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ConfigError(f"{what}: {p} contains NaN or inf")
    return t
