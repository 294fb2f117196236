"""Reading checkpoint files, whatever trained them: the architecture-free half of loading.

* files: ``.safetensors`` (safetensors), ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` (``torch.load(weights_only=True)``),
  or a folder holding a diffusers-style ``*.safetensors`` set (sharded or not) with its ``config.json``;
* training wrappers are peeled off: ``{'generator_ema' | 'generator' | 'model' | 'state_dict' | 'module': sd}``
  (EMA preferred, as Self-Forcing / CausVid / LongLive inference loads it), key prefixes ``model.`` /
  ``module.`` / ``_orig_mod.`` / ``base_model.model.`` and the FSDP / activation-checkpoint segments
  ``_fsdp_wrapped_module.`` / ``_checkpoint_wrapped_module.`` anywhere in a key (LongLive's training saves);
* PEFT LoRA is merged into the base weights (``W += scale * B @ A``), whether it sits in the same state dict
  (``<name>.base_layer.weight`` + ``<name>.lora_A[.<adapter>].weight``) or in a separate file (LongLive's
  ``{'generator_lora': {'base_model.model.<name>.lora_A.weight': ...}}``).  ``scale`` is ``lora_alpha / rank``:
  LongLive trains rank 256 with alpha 256, so 1.0 by default.

Which architecture a state dict belongs to, and how its names map onto the model, is the adapter's business
(``model_adapters.registry``).  Every defect is one ``CheckpointError`` line.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

import torch

from ff_engine.errors import CheckpointError

WRAPPERS = ("generator_ema", "generator", "model", "state_dict", "module")
LORA_WRAPPERS = ("generator_lora", "lora", "state_dict")
PREFIXES = ("model.", "module.", "_orig_mod.", "base_model.model.")
SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def config_doc(text: str, source: str) -> dict:
    """A JSON object (a config) or one ``CheckpointError``."""
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{source} is not valid JSON: {first_line(exc)}") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{source} must be a JSON object of config fields, got {type(doc).__name__}")
    return doc


def torch_load(path: Path):
    """``torch.load(weights_only=True)``: tensors and plain containers only.  A checkpoint that pickles other
    Python objects (a training script's ``args``, an optimizer class...) is refused rather than unpickled,
    because unpickling runs code chosen by whoever wrote the file."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"checkpoint {path} pickles Python objects besides tensors{what}; ff-engine refuses to unpickle them "
            f"because unpickling runs code from the file: save only the state_dict or convert it to .safetensors"
        ) from None
    except Exception as exc:  # noqa: BLE001 - empty, truncated or non-torch files raise many types
        raise CheckpointError(f"cannot read checkpoint {path}: {first_line(exc)}") from None


def _safetensors(path: Path) -> tuple[dict, str | None]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("ff_engine_config")
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for corrupt files
        raise CheckpointError(f"cannot read safetensors checkpoint {path}: {first_line(exc)}") from None
    return sd, raw


def read_tensors(path: str | Path) -> tuple[dict, dict]:
    """(raw object of the file, config found with it): safetensors metadata ``ff_engine_config``, else a
    ``config.json`` beside the file (or inside the folder); ``{'model': {...}}`` documents are unwrapped."""
    path = Path(path)
    meta: dict = {}
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"checkpoint folder {path} holds no .safetensors files")
        raw: dict = {}
        for f in files:  # diffusers shards: diffusion_pytorch_model-0000i-of-0000n.safetensors
            raw.update(_safetensors(f)[0])
        cfg_file = path / "config.json"
    elif path.is_file():
        if path.suffix == ".safetensors":
            raw, doc = _safetensors(path)
            if doc:
                meta = config_doc(doc, f"{path}: safetensors metadata 'ff_engine_config'")
        elif path.suffix in TORCH_SUFFIXES or path.suffix == "":
            raw = torch_load(path)
        else:
            raise CheckpointError(f"checkpoint {path}: unknown file type {path.suffix!r}; expected .safetensors, "
                                  f"{', '.join(TORCH_SUFFIXES)} or a diffusers folder")
        cfg_file = path.parent / "config.json"
    else:
        raise CheckpointError(f"checkpoint file not found: {path}")
    if not meta and cfg_file.is_file():
        try:
            text = cfg_file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"cannot read {cfg_file}: {first_line(exc)}") from None
        doc = config_doc(text, str(cfg_file))
        meta = doc.get("model", doc)
        if not isinstance(meta, dict):
            raise CheckpointError(f"{cfg_file}: 'model' must be an object of config fields, got {type(meta).__name__}")
    return raw, meta


# What a recorded config may say (a corrupt or hostile config.json must not reach a model as a ZeroDivisionError or
# a RoPE table of 10**12 rows): integers and tuple entries in [1, 65536], timesteps in [0, 1000], floats finite and
# > 0 (context_noise >= 0), strings among the allowed values.
META_INT = (1, 65536)


def _is_int(x, lo, hi) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


def config_value(config_cls, name: str, v, allowed: dict | None = None):
    """A recorded config value checked against the type of ``config_cls``'s default for that field."""
    default = config_cls.__dataclass_fields__[name].default
    if isinstance(default, bool):
        ok, want = isinstance(v, bool), "true or false"
    elif isinstance(default, int):
        ok, want = _is_int(v, *META_INT), f"an integer in {list(META_INT)}"
    elif isinstance(default, float):
        lo_ok = (lambda x: x >= 0) if name == "context_noise" else (lambda x: x > 0)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo_ok(v)
        want = "a finite number " + (">= 0" if name == "context_noise" else "> 0")
    elif isinstance(default, str):
        choices = tuple((allowed or {}).get(name, (default,)))
        ok, want = v in choices, f"one of {list(choices)}"
    elif name == "actions":
        ok = (isinstance(v, (list, tuple)) and len(v) <= 64 and len(set(v)) == len(v)
              and all(isinstance(x, str) and 0 < len(x) <= 32 and x.isprintable() for x in v))
        want = "a list of at most 64 distinct action names (1-32 printable characters)"
    elif name == "sample_steps":
        ok = isinstance(v, (list, tuple)) and 1 <= len(v) <= 64 and all(_is_int(x, 0, 1000) for x in v)
        want = "a list of 1 to 64 timesteps in [0, 1000]"
    else:  # fixed-length integer tuples: patch_size, latent_hw, vae_stride
        ok = isinstance(v, (list, tuple)) and len(v) == len(default) and all(_is_int(x, *META_INT) for x in v)
        want = f"a list of {len(default)} integers in {list(META_INT)}"
    if not ok:
        raise CheckpointError(f"checkpoint config field {name} must be {want}, got {v!r}")
    return tuple(v) if isinstance(v, list) else v


def recorded_config(config_cls, meta: dict, allowed: dict | None = None) -> dict:
    """The fields of a dataclass config found in a recorded config, each checked (unknown names are ignored)."""
    fields = config_cls.__dataclass_fields__
    return {k: config_value(config_cls, k, v, allowed) for k, v in meta.items() if k in fields}


def clean_key(key: str) -> str:
    """A parameter name without training wrappers: FSDP / checkpoint segments anywhere, known prefixes in front."""
    for seg in SEGMENTS:
        key = key.replace(seg, "")
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _tensor_dict(sd, wrappers, what: str, notes: list[str]) -> dict:
    if not isinstance(sd, dict):
        raise CheckpointError(f"{what} must hold a dict of tensors, got {type(sd).__name__}")
    while not any(isinstance(v, torch.Tensor) for v in sd.values()):
        key = next((k for k in wrappers if isinstance(sd.get(k), dict)), None)
        if key is None:
            raise CheckpointError(f"no state_dict found in {what} (top-level keys: {sorted(map(str, sd))[:8]})")
        others = sorted(str(k) for k in sd if k != key)
        notes.append(f"took {what} entry {key!r}" + (f" (ignored {', '.join(others[:4])})" if others else ""))
        sd = sd[key]
    return sd


def _clean(sd: dict, what: str, notes: list[str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    changed = 0
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            name = clean_key(str(k))
            changed += name != k
            if name in out:
                raise CheckpointError(f"{what}: two tensors map to {name!r} after removing training wrappers")
            out[name] = v
    if changed:
        notes.append(f"stripped training prefixes / FSDP segments from {changed} {what} keys")
    return out


def unwrap(sd, lora: dict | None = None, lora_scale: float = 1.0,
           notes: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint under clean names, LoRA (in the file or ``lora``, a separate LoRA state dict)
    merged into the base weights.  What was done is appended to ``notes`` (``convert`` reports it)."""
    notes = [] if notes is None else notes
    out = _clean(_tensor_dict(sd, WRAPPERS, "checkpoint", notes), "checkpoint", notes)
    if lora is not None:
        extra = _clean(_tensor_dict(lora, LORA_WRAPPERS, "LoRA checkpoint", notes), "LoRA", notes)
        bad = sorted(k for k in extra if not _LORA.match(k) and not k.endswith(".lora_scale"))
        if bad or not extra:
            raise CheckpointError(f"LoRA checkpoint holds non-LoRA keys: {', '.join(bad[:4]) or 'none at all'}")
        out.update(extra)
    return merge_lora(out, lora_scale, notes)


_LORA = re.compile(r"^(?P<name>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


def merge_lora(sd: dict[str, torch.Tensor], scale: float = 1.0, notes: list[str] | None = None
               ) -> dict[str, torch.Tensor]:
    """``<name>.weight += scale * lora_B @ lora_A`` for every PEFT pair (``<name>.base_layer.weight`` is the base
    when present); a per-layer ``<name>.lora_scale`` tensor overrides ``scale``."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    out = {}
    for k, v in sd.items():
        m = _LORA.match(k)
        if m:
            pairs.setdefault(m.group("name"), {})[m.group("ab")] = v
        elif not k.endswith(".lora_scale"):
            out[k] = v
    for name, ab in sorted(pairs.items()):
        base_key = f"{name}.base_layer.weight" if f"{name}.base_layer.weight" in out else f"{name}.weight"
        if set(ab) != {"A", "B"} or base_key not in out:
            raise CheckpointError(f"incomplete LoRA for {name}: need lora_A, lora_B and the base weight {name}.weight")
        a, b, w = ab["A"], ab["B"], out.pop(base_key)
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise CheckpointError(f"LoRA of {name}: B {tuple(b.shape)} @ A {tuple(a.shape)} does not match the "
                                  f"weight {tuple(w.shape)}")
        s = float(sd[f"{name}.lora_scale"]) if f"{name}.lora_scale" in sd else scale
        out[f"{name}.weight"] = (w.float() + s * (b.float() @ a.float())).to(w.dtype)
        if f"{name}.base_layer.bias" in out:
            out[f"{name}.bias"] = out.pop(f"{name}.base_layer.bias")
    if pairs and notes is not None:
        ranks = sorted({int(ab["A"].shape[0]) for ab in pairs.values()})
        notes.append(f"merged PEFT LoRA into {len(pairs)} weights (rank {'/'.join(map(str, ranks))}, scale {scale:g})")
    return out


def rename(sd: dict[str, torch.Tensor], table: tuple[tuple[str, str], ...]) -> dict[str, torch.Tensor]:
    """Apply ``(old, new)`` substring renames to every key in one pass per key, so swaps like norm2 <-> norm3
    work; where two olds match at the same place the longer one wins."""
    olds = sorted((old for old, _ in table), key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(old) for old in olds))
    lookup = dict(table)
    return {pattern.sub(lambda m: lookup[m.group(0)], k): v for k, v in sd.items()}


def mismatch(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], what: str) -> str | None:
    """One line naming the first missing / unexpected / wrong-shape keys of ``sd`` against a model's
    ``state_dict()`` (None when they match)."""
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k} {tuple(sd[k].shape)} != {tuple(own[k].shape)}" for k in set(own) & set(sd)
                    if sd[k].shape != own[k].shape)
    parts = []
    for name, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            parts.append(f"{name} ({len(items)}): {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}")
    return f"checkpoint does not match the {what} model: " + "; ".join(parts) if parts else None


def load_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """``model.load_state_dict`` that refuses any key or shape mismatch and non-finite weights with one line."""
    own = model.state_dict()
    problem = mismatch(own, sd, what)
    if problem:
        raise CheckpointError(problem)
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"checkpoint has NaN/inf in: {', '.join(bad[:4])}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})


def save_clean(sd: dict[str, torch.Tensor], path: str | Path, config: dict) -> None:
    """A safetensors file of contiguous CPU tensors with the model config in its metadata (what ``convert``
    writes and every loader reads back without a preset)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    save_file(tensors, str(path), metadata={"ff_engine_config": json.dumps(config)})
