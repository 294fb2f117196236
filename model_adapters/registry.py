"""The model registry: every AR video architecture ff-engine runs, with its presets, loader, decoder and geometry.

ff-engine's CLI (``generate`` / ``plan`` / ``analyze`` / ``convert``), the server and the benchmarks reach models
only through this module, so they hold no architecture-specific code.  An architecture registers one
``Architecture`` (see ``model_adapters/causal_wan/arch.py`` and ``model_adapters/skyreels_v2/arch.py``); adding
a preset means adding one entry to its ``presets`` dict.  ``docs/adapters.md`` walks through a new architecture.

Invariants (checked at registration): preset names are unique across architectures; every preset's config is an
instance of the architecture's ``config_type`` and has a ``geometry()``; the architecture's ``test_preset`` is
one of its presets (the conformance test runs it).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import torch

from ff_engine.errors import CheckpointError, ConfigError
from model_adapters import checkpoints

#: modules that register the built-in architectures (imported on first use of the registry)
BUILTIN = ("model_adapters.causal_wan.arch", "model_adapters.skyreels_v2.arch", "model_adapters.matrix_game.arch")


@dataclass(frozen=True)
class Architecture:
    """One family of AR video transformers, as the engine and CLI need to know it.

    build(config) -> model with random weights (deterministic under ``torch.manual_seed``), in eval mode.
    adopt(state_dict, recorded_config, base_config, notes) -> (config, state_dict in the model's own names):
        maps a cleaned checkpoint (``checkpoints.unwrap``) onto the model, the geometry read from tensor shapes
        where it can be; raises ``CheckpointError`` naming the first bad keys.
    claims(keys, recorded_config) -> whether a cleaned key set (with the config found beside it) is this
        architecture's, in any of its layouts.
    param_count(config) -> parameters of a model of that config, without building it (``plan``, memory checks).
    forward_flops(config, query_tokens, cached_tokens) -> matmul FLOPs (2 per multiply-add) of one forward pass
        of one stream's block: ``query_tokens`` rows attending to ``cached_tokens`` cached ones plus themselves
        (``ff-engine plan --limits``); None where the architecture does not say.
    decoder(config, vae_folder | None) -> an object with ``streaming: bool`` and ``decode(latents [F, C, H, W]) ->
        uint8 frames [T, H', W', 3]`` (``model_adapters.decoders`` has the Wan VAE, world codec and latent preview).
    """

    name: str
    summary: str
    config_type: type
    presets: Mapping[str, Any]
    test_preset: str
    build: Callable[[Any], torch.nn.Module]
    adopt: Callable[[dict, dict, Any, list], tuple[Any, dict]]
    claims: Callable[[set, dict], bool]
    param_count: Callable[[Any], int]
    decoder: Callable[[Any, Any], Any]
    default_preset: str | None = None  # the base config of a checkpoint when no preset is named
    forward_flops: Callable[[Any, int, int], int] | None = None
    #: the submodule whose ``state_dict`` names are the checkpoint names (default: the model itself)
    weights_module: Callable[[torch.nn.Module], torch.nn.Module] = lambda model: model

    def preset(self, name: str):
        return self.presets[name]


_REGISTRY: dict[str, Architecture] = {}
_loaded = False


def register(arch: Architecture) -> Architecture:
    """Add an architecture (idempotent for the same object); one ``ConfigError`` for a clash or a bad preset."""
    if _REGISTRY.get(arch.name) is arch:
        return arch
    if arch.name in _REGISTRY:
        raise ConfigError(f"architecture {arch.name!r} is registered twice")
    taken = {p: a.name for a in _REGISTRY.values() for p in a.presets}
    for name, cfg in arch.presets.items():
        if name in taken:
            raise ConfigError(f"preset {name!r} of {arch.name!r} is already a preset of {taken[name]!r}")
        if not isinstance(cfg, arch.config_type) or not callable(getattr(cfg, "geometry", None)):
            raise ConfigError(f"preset {name!r} of {arch.name!r} must be a {arch.config_type.__name__}")
    if arch.test_preset not in arch.presets:
        raise ConfigError(f"test_preset {arch.test_preset!r} of {arch.name!r} is not one of its presets")
    _REGISTRY[arch.name] = arch
    return arch


def _ensure_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN:
            importlib.import_module(module)


def architectures() -> dict[str, Architecture]:
    _ensure_builtins()
    return dict(_REGISTRY)


def all_presets() -> dict[str, Architecture]:
    """preset name -> the architecture it belongs to."""
    return {p: a for a in architectures().values() for p in a.presets}


def preset_names() -> list[str]:
    return sorted(all_presets())


def get_preset(name: str):
    """The config of a preset by name (any architecture); ``ConfigError`` listing them all otherwise."""
    arch = all_presets().get(name) if isinstance(name, str) else None
    if arch is None:
        raise ConfigError(f"unknown preset {name!r}; choose one of {preset_names()}")
    return arch.presets[name]


def architecture(name: str) -> Architecture:
    archs = architectures()
    if name not in archs:
        raise ConfigError(f"unknown architecture {name!r}; choose one of {sorted(archs)}")
    return archs[name]


def architecture_of(config_or_model) -> Architecture:
    """The architecture of a config (or of a model, through its ``cfg``)."""
    cfg = getattr(config_or_model, "cfg", config_or_model)
    for arch in architectures().values():
        if isinstance(cfg, arch.config_type):
            return arch
    raise ConfigError(f"no registered architecture has configs of type {type(cfg).__name__}")


def config_dict(cfg) -> dict:
    """A config as the JSON ``ff_engine_config`` metadata every loader reads back (with its architecture)."""
    doc = asdict(cfg) if is_dataclass(cfg) else dict(vars(cfg))
    return {"architecture": architecture_of(cfg).name, **doc}


# ---- building and loading ---------------------------------------------------------------------------------
def build(cfg, seed: int | None = None) -> torch.nn.Module:
    """A model of ``cfg`` with random weights (seeded when ``seed`` is given), in eval mode."""
    if seed is not None:
        torch.manual_seed(seed)
    return architecture_of(cfg).build(cfg).eval()


def param_count(cfg) -> int:
    return int(architecture_of(cfg).param_count(cfg))


def forward_flops(cfg, query_tokens: int, cached_tokens: int) -> int:
    """``Architecture.forward_flops`` of a config's architecture; ``ConfigError`` where it has none."""
    arch = architecture_of(cfg)
    if arch.forward_flops is None:
        raise ConfigError(f"architecture {arch.name!r} does not state its FLOPs per forward pass")
    return int(arch.forward_flops(cfg, query_tokens, cached_tokens))


def make_decoder(model_or_config, vae: str | Path | None = None):
    """The one latents -> pixels factory: the decoder of a model's (or a config's) architecture; Wan's VAE when a
    folder is given, refused before anything is generated when its latent channels are not the model's.  It takes
    a config so the CLI can load and check a VAE before building the model."""
    cfg = getattr(model_or_config, "cfg", model_or_config)
    return architecture_of(cfg).decoder(cfg, vae)


@dataclass
class Checkpoint:
    """A checkpoint read, mapped and checked, before any model is built (so callers can size memory first)."""

    architecture: Architecture
    config: Any
    state_dict: dict[str, torch.Tensor]
    notes: list[str]  # what loading did: wrapper taken, prefixes stripped, LoRA merged, keys renamed

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.state_dict.values())


def _pick_architecture(sd: dict, meta: dict, base_preset: str | None) -> Architecture:
    """The architecture named by the preset, else by the recorded config, else the one that claims the keys."""
    keys = set(sd)
    if base_preset is not None:
        return all_presets()[base_preset] if isinstance(base_preset, str) else architecture_of(base_preset)
    recorded = meta.get("architecture")
    if isinstance(recorded, str) and recorded in architectures():
        return architectures()[recorded]
    claimed = [a for a in architectures().values() if a.claims(keys, meta)]
    if len(claimed) == 1:
        return claimed[0]
    first = ", ".join(sorted(keys)[:4]) or "no tensors"
    if not claimed:
        raise CheckpointError(f"no registered architecture ({', '.join(sorted(architectures()))}) recognises this "
                              f"checkpoint's keys; first keys: {first}")
    raise CheckpointError(f"checkpoint keys fit several architectures ({', '.join(a.name for a in claimed)}); "
                          f"name a preset to choose")


def read_checkpoint(path: str | Path, preset: str | Any | None = None, *, lora: str | Path | None = None,
                    lora_scale: float = 1.0, **overrides) -> Checkpoint:
    """Read any supported checkpoint layout of any registered architecture (see ``checkpoints``), map it onto
    the model's names, infer the config; ``preset`` (a name or a config) supplies what the tensors cannot tell
    (heads, text length, latent grid), a config recorded with the file wins over the preset, ``overrides`` win
    over both.  ``lora``: a separate PEFT LoRA file merged into the weights (LongLive)."""
    if isinstance(preset, str):
        get_preset(preset)  # unknown name -> ConfigError listing the presets
    if not math.isfinite(lora_scale):
        raise ConfigError(f"lora_scale must be a finite number, got {lora_scale}")
    notes: list[str] = []
    raw, meta = checkpoints.read_tensors(path)
    lora_raw = checkpoints.read_tensors(lora)[0] if lora is not None else None
    sd = checkpoints.unwrap(raw, lora_raw, lora_scale, notes)
    arch = _pick_architecture(sd, meta, preset)
    base = (arch.presets[preset] if isinstance(preset, str) else preset) if preset is not None else \
        arch.presets[arch.default_preset or arch.test_preset]
    meta = {k: v for k, v in meta.items() if k != "architecture"}
    cfg, sd = arch.adopt(sd, meta, base, notes)
    if overrides:
        unknown = sorted(k for k in overrides if not hasattr(cfg, k))
        if unknown:
            raise ConfigError(f"{arch.name} configs have no field(s) {unknown}")
        cfg = cfg.with_(**overrides)
    return Checkpoint(arch, cfg, sd, notes)


def instantiate(ckpt: Checkpoint) -> torch.nn.Module:
    """The model of a read checkpoint, weights loaded strictly (one ``CheckpointError`` naming the first bad keys)."""
    arch = ckpt.architecture
    model = arch.build(ckpt.config)
    checkpoints.load_strict(arch.weights_module(model), ckpt.state_dict, arch.name)
    return model.eval()


def from_weights(cfg, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A model of ``cfg`` with ``state_dict`` (in the architecture's checkpoint names) loaded strictly."""
    arch = architecture_of(cfg)
    return instantiate(Checkpoint(arch, cfg, state_dict, []))


def load(path: str | Path, preset: str | Any | None = None, *, lora: str | Path | None = None,
         lora_scale: float = 1.0, **overrides) -> torch.nn.Module:
    """Every checkpoint format of every registered architecture through one call."""
    return instantiate(read_checkpoint(path, preset, lora=lora, lora_scale=lora_scale, **overrides))


def convert(src: str | Path, dst: str | Path, preset: str | None = None, *, lora: str | Path | None = None,
            lora_scale: float = 1.0) -> Checkpoint:
    """Write ``src`` (any supported layout) as a clean safetensors file in the model's own names with its config
    in the metadata; the weights are checked against the model first.  Returns what was mapped."""
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise ConfigError(f"convert: output {str(dst)!r} must end in .safetensors")
    if dst.exists() and dst.is_dir():
        raise ConfigError(f"convert: output {str(dst)!r} is a folder")
    ckpt = read_checkpoint(src, preset, lora=lora, lora_scale=lora_scale)
    arch = ckpt.architecture
    own = arch.weights_module(arch.build(ckpt.config)).state_dict()
    problem = checkpoints.mismatch(own, ckpt.state_dict, ckpt.architecture.name)
    if problem:
        raise CheckpointError(problem)
    dst.parent.mkdir(parents=True, exist_ok=True)
    checkpoints.save_clean(ckpt.state_dict, dst, config_dict(ckpt.config))
    return ckpt


def resolve(model: str, preset: str | None = None, random_weights: bool = False, lora: str | Path | None = None,
            ) -> tuple[Any, Checkpoint | None]:
    """(config, checkpoint or None) of a CLI ``--model`` value: a preset name (needs ``random_weights``) or a
    checkpoint path (``lora``: a separate LoRA file to merge) read and checked without building the model."""
    if model in all_presets():
        if not random_weights:
            raise ConfigError(f"--model {model} is a preset without weights; pass --random-weights or a checkpoint path")
        return all_presets()[model].presets[model], None
    if not Path(model).exists():
        raise ConfigError(f"--model: {model!r} is neither a preset ({', '.join(preset_names())}) nor a file")
    ckpt = read_checkpoint(model, preset, lora=lora)
    return ckpt.config, ckpt
