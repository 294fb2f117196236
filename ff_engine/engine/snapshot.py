"""Session snapshots: everything a stream needs to continue, bit-identically, on any engine with the same model.

``snapshot_session`` (``Engine.snapshot``) captures one active session between blocks; ``restore_session``
(``Engine.restore``) admits it on another engine exactly as ``add_session`` would (same page reservation,
``BudgetError`` if it does not fit) and puts it back where it was: the next ``engine.step`` produces the block
the uninterrupted session would have produced, bit for bit (same model, dtype, sampler and attention backend).

What goes in (``tensors`` names; the rest is JSON in ``meta``):
  * the request: ``config.prompt``, ``config.initial_noise`` and ``config.step_noise`` [n, F, C, H, W] when
    given (float32, as the engine consumes them), ``config.actions`` (int64 per-frame action indices as the stream
    holds them, ``Engine.set_actions`` included) for an action-conditioned model, num_frames, seed, budget_frames,
    the policy as its registered name plus its dataclass init fields (``ff_engine.policies.POLICIES``);
  * progress: the block index, the retained ``latents`` [block * F - start, C, H, W] with their first frame
    ``latents_start_frame`` (all of them, start 0, unless the request set ``retain_frames``), the noise
    generator's state ``rng.generator`` (uint8) and the step-noise cursor;
  * the cache: ``cache.<layer>.{k,v,positions,log_mass}`` of every layer *in table order*.  Compaction permutes
    tokens and attention reduces in token order, so bit-identity needs that order: restore appends each layer's
    tokens in it (with any page size).  Page summaries are recomputed from storage by those appends; with the
    same page size they equal the original ones.  Importance cached in them is keyed by the policy's proxy
    version, which moves on every write pass, so none of it outlives a block and none is saved;
  * the policy's runtime state (``CachePolicy.state_dict``): tensors as ``policy.<key>``, numbers in meta.
The prompt's encoded state (cross-attention K/V) is not saved: ``model.encode_prompt`` recomputes it on restore
(deterministic; the tests check it is bit-identical).

Format: one safetensors blob whose header metadata holds the JSON meta under ``ff_engine.snapshot`` — no
pickle anywhere, so loading a snapshot cannot run code.  ``from_bytes`` refuses anything malformed with a
one-line ``SnapshotError``; ``restore`` refuses a snapshot of another model (geometry, config, dtype) or
sampler, because its session could not continue bit-identically there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ff_engine import checksum
from ff_engine.engine.session import Session, SessionConfig
from ff_engine.errors import FFEngineError, SnapshotError
from ff_engine.policies import POLICIES, make_policy, policy_params

if TYPE_CHECKING:
    from ff_engine.engine.engine import Engine

FORMAT = "ff-engine/session-snapshot"
FORMAT_VERSION = 3  # 3: a SHA-256 of meta + tensors; 2: retain_frames and latents_start_frame (1 kept every frame)
READABLE_VERSIONS = (1, 2, 3)
META_KEY = "ff_engine.snapshot"
#: SessionConfig fields a snapshot carries (a test keeps this in step with SessionConfig)
CONFIG_FIELDS = ("prompt", "num_frames", "seed", "policy", "budget_frames", "initial_noise", "step_noise", "session_id",
                 "retain_frames", "actions", "conditioning")
#: SessionConfig fields a snapshot need not carry: consumed at admission (the prefix's K/V are in the saved cache
#: and its frames in the saved latents, and a restored stream continues after them, never re-admits them)
ADMISSION_ONLY_FIELDS = ("prefix",)
_CACHE_PARTS = {"k": None, "v": None, "positions": torch.int32, "log_mass": torch.float32}  # None: model dtype
_JSON_SCALARS = (type(None), bool, int, float, str)


@dataclass
class SessionSnapshot:
    """One session between blocks: JSON-able ``meta`` and CPU ``tensors`` (names in the module docstring)."""

    meta: dict
    tensors: dict[str, torch.Tensor]

    def to_bytes(self) -> bytes:
        """safetensors bytes with the JSON meta in the header metadata."""
        import safetensors.torch  # here, not at the top: the engine imports this module, and must run without it

        meta = json.dumps(self.meta, sort_keys=True)
        return safetensors.torch.save(self.tensors, metadata={META_KEY: meta,
                                                              checksum.KEY: checksum.tensors_digest(self.tensors, meta)})

    @classmethod
    def from_bytes(cls, data: bytes) -> SessionSnapshot:
        """Parse and check ``to_bytes`` output; ``SnapshotError`` on anything malformed."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise SnapshotError(f"snapshot data must be bytes, got {type(data).__name__}")
        data = bytes(data)
        import safetensors.torch  # see to_bytes

        try:
            tensors = safetensors.torch.load(data)
            header_len = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + header_len])
            meta_json = header["__metadata__"][META_KEY]
            meta = json.loads(meta_json)
            digest = header["__metadata__"].get(checksum.KEY)
        except Exception as exc:  # noqa: BLE001 - every parse failure is the same user error
            raise SnapshotError(
                f"not an ff-engine session snapshot (safetensors + {META_KEY} metadata): {type(exc).__name__}: {exc}"
            ) from None
        version = meta.get("version") if isinstance(meta, dict) else None
        if digest is not None or not (isinstance(version, int) and version < 3):
            try:  # version 3 on: every byte of meta and tensors is checked (safetensors checks only structure)
                checksum.verify(tensors, digest, "snapshot", meta_json)
            except ValueError as exc:
                raise SnapshotError(str(exc)) from None
        snap = cls(meta, tensors)
        check_snapshot(snap)
        return snap

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a temporary file in the same folder, then ``os.replace``."""
        path = os.fspath(path)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".snapshot-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self.to_bytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> SessionSnapshot:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise SnapshotError(f"cannot read snapshot file {os.fspath(path)!r}: {exc.strerror}") from None
        try:
            return cls.from_bytes(data)
        except SnapshotError as exc:
            raise SnapshotError(f"snapshot file {os.fspath(path)!r}: {exc}") from None

    @property
    def nbytes(self) -> int:
        """Payload bytes: every tensor plus the JSON meta (the safetensors header adds a few hundred bytes)."""
        meta = len(json.dumps(self.meta, sort_keys=True).encode())
        return meta + sum(t.numel() * t.element_size() for t in self.tensors.values())


# ---- fingerprints -----------------------------------------------------------------------------------------
def _jsonable(x: Any) -> Any:
    """Tuples -> lists etc., so a fingerprint compares equal to itself after a JSON round trip."""
    return json.loads(json.dumps(x))


def model_fingerprint(engine: Engine) -> dict:
    """What must match for a session to continue bit-identically: geometry, model config (when the adapter has
    a dataclass ``cfg``), parameter dtype."""
    cfg = getattr(engine.model, "cfg", None)
    return _jsonable(
        {
            "class": type(engine.model).__name__,
            "geometry": dataclasses.asdict(engine.geometry),
            "config": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None,
            "dtype": str(engine.dtype).removeprefix("torch."),
        }
    )


def sampler_fingerprint(engine: Engine) -> dict:
    sch = engine.schedule
    return _jsonable(
        {
            "timesteps": [float(t) for t in sch.denoising_timesteps],
            "stochastic": sch.stochastic,
            "context_noise": engine.context_noise,
        }
    )


# ---- snapshot ---------------------------------------------------------------------------------------------
def policy_config(policy) -> dict:
    """The policy as JSON: its registered name and init fields (``SnapshotError`` if it cannot be rebuilt)."""
    if POLICIES.get(policy.name) is not type(policy):
        raise SnapshotError(
            f"policy {type(policy).__name__} is not registered in ff_engine.policies.POLICIES "
            f"under its name {policy.name!r}; only registered policies can be snapshotted"
        )
    fields = [f.name for f in dataclasses.fields(policy) if f.init and not f.name.startswith("_")]
    undeclared = sorted(set(fields) - set(policy_params(policy.name)))
    if undeclared:  # make_policy could not set them back: refuse now rather than restore another policy
        raise SnapshotError(f"policy {policy.name!r} parameters {undeclared} are not accepted by make_policy")
    params = {name: getattr(policy, name) for name in fields}
    bad = sorted(k for k, v in params.items() if not isinstance(v, _JSON_SCALARS))
    if bad:
        raise SnapshotError(f"policy {policy.name!r} parameters {bad} are not JSON scalars")
    return {"name": policy.name, "params": params}


def snapshot_session(engine: Engine, session_id: str, with_cache: bool = True) -> SessionSnapshot:
    """Capture active session ``session_id`` (between blocks); the session itself is not touched.
    ``with_cache=False``: everything but the K/V (a fork shares pages instead; an undo mark truncates), which
    ``restore`` refuses."""
    s = engine.sessions.get(session_id)
    if s is None:
        raise SnapshotError(f"session_id {session_id!r} is not active on this engine (finished, failed or unknown)")
    cfg = s.cfg
    tensors = {
        "config.prompt": _own(cfg.prompt),
        "rng.generator": s.generator.get_state(),
        "latents": torch.cat(s.latents) if s.latents else torch.zeros(0, *s.block_shape[1:]),
    }
    if s.actions:  # the stream's actions as they stand (set_actions included), not only the request's
        tensors["config.actions"] = torch.tensor(s.actions, dtype=torch.int64)
    if cfg.initial_noise is not None:
        tensors["config.initial_noise"] = _own(cfg.initial_noise.float())
    if cfg.step_noise is not None:
        tensors["config.step_noise"] = (
            torch.stack([n.float() for n in cfg.step_noise]) if cfg.step_noise else torch.zeros(0, *s.block_shape)
        )
    if with_cache:
        for layer, parts in enumerate(engine.cache.export_session(s.id)):
            tensors.update({f"cache.{layer}.{name}": t.cpu() for name, t in parts.items()})
    tensors.update(_adapter_tensors(s))  # small per-stream state: copied even for a fork
    numbers = {}
    for key, value in s.policy.state_dict().items():
        if isinstance(value, torch.Tensor):
            tensors[f"policy.{key}"] = _own(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers[key] = value
        else:
            raise SnapshotError(
                f"policy {s.policy.name!r} state {key!r} is a {type(value).__name__}, not a tensor, int or float"
            )
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": model_fingerprint(engine),
        "sampler": sampler_fingerprint(engine),
        "session": {
            "id": s.id,
            "num_frames": cfg.num_frames,
            "seed": cfg.seed,
            "budget_frames": cfg.budget_frames,
            "retain_frames": cfg.retain_frames,
            "block": s.block,
            "latents_start_frame": s.latents_start_frame,
            "step_noise_pos": s.step_noise_pos,
        },
        "policy": {**policy_config(s.policy), "state": numbers},
        "cache": {
            "page_size": engine.cache.page_size,
            "tokens": [engine.cache.num_tokens(s.id, layer) for layer in range(engine.geometry.num_layers)],
        },
    }
    return SessionSnapshot(meta, tensors)


def _adapter_tensors(s) -> dict[str, torch.Tensor]:
    """A session's adapter-declared state (``state.<name>``, bit for bit) and its conditioning as it stands
    (``conditioning.<name>``, ``Engine.set_conditioning`` included)."""
    out = {f"state.{k}": t.detach().cpu().clone() for k, t in (s.stream_state or {}).items()}
    out.update({f"conditioning.{k}": _own(t) for k, t in s.conditioning.items()})
    return out


def _restore_adapter_state(session, t: dict) -> None:
    """Copy ``state.*`` tensors into the state the engine allocated for ``session`` (same names, shapes, dtypes)."""
    saved = {k.removeprefix("state."): v for k, v in t.items() if k.startswith("state.")}
    own = session.stream_state or {}
    if set(saved) != set(own):
        raise SnapshotError(f"snapshot adapter state {sorted(saved)[:4]} does not match this model's {sorted(own)[:4]}")
    for name, buf in own.items():
        v = saved[name]
        if v.shape != buf.shape or v.dtype != buf.dtype:
            raise SnapshotError(f"snapshot adapter state {name} {tuple(v.shape)} {v.dtype} does not match "
                                f"{tuple(buf.shape)} {buf.dtype}")
        buf.copy_(v)


def _own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy that shares no memory with live state (safetensors refuses shared storage)."""
    return t.detach().to("cpu", copy=True).contiguous()


# ---- checks -----------------------------------------------------------------------------------------------
def _field(d: Any, key: str, kind, where: str, optional: bool = False):
    if not isinstance(d, dict) or key not in d:
        raise SnapshotError(f"snapshot meta {where} lacks {key!r}")
    v = d[key]
    if v is None and optional:
        return v
    if not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool):
        raise SnapshotError(f"snapshot meta {where}.{key} must be {getattr(kind, '__name__', kind)}, got {v!r}")
    return v


def _tensor(snap: SessionSnapshot, name: str, dtype: torch.dtype | None, dims: int) -> torch.Tensor:
    t = snap.tensors.get(name)
    if t is None:
        raise SnapshotError(f"snapshot lacks tensor {name!r}")
    if (dtype is not None and t.dtype != dtype) or t.dim() != dims:
        raise SnapshotError(f"snapshot tensor {name!r} must be {dims}-d {dtype}, got {t.dim()}-d {t.dtype}")
    return t


def _check_header(m: object) -> None:
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise SnapshotError(f"not an ff-engine session snapshot (meta format must be {FORMAT!r})")
    if m.get("version") not in READABLE_VERSIONS or isinstance(m.get("version"), bool):
        raise SnapshotError(f"snapshot format version {m.get('version')!r} is not supported (this reads "
                            f"{', '.join(map(str, READABLE_VERSIONS))})")


def _check_session_meta(sess: dict, version: int) -> tuple[int, int, int, int]:
    """The session fields; returns ``(num_frames, block, step_noise_pos, latents_start_frame)``."""
    _field(sess, "id", str, "session")
    num_frames = _field(sess, "num_frames", int, "session")
    _field(sess, "seed", int, "session")
    _field(sess, "budget_frames", int, "session", optional=True)
    block = _field(sess, "block", int, "session")
    pos = _field(sess, "step_noise_pos", int, "session")
    start = 0
    if version >= 2:
        retain = _field(sess, "retain_frames", int, "session", optional=True)
        start = _field(sess, "latents_start_frame", int, "session")
        if (retain is not None and retain < 0) or start < 0:
            raise SnapshotError(f"snapshot retain_frames {retain} and latents_start_frame {start} must be >= 0")
    return num_frames, block, pos, start


def _check_policy_meta(pol: dict) -> None:
    _field(pol, "name", str, "policy")
    params, state = _field(pol, "params", dict, "policy"), _field(pol, "state", dict, "policy")
    if any(not isinstance(v, _JSON_SCALARS) for v in params.values()):
        raise SnapshotError("snapshot meta policy.params must hold JSON scalars")
    if any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in state.values()):
        raise SnapshotError("snapshot meta policy.state must hold numbers")


def _check_cache_meta(cache: dict) -> list[int]:
    tokens = _field(cache, "tokens", list, "cache")
    if not tokens or any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in tokens):
        raise SnapshotError("snapshot meta cache.tokens must list a token count >= 0 per layer")
    return tokens


def _check_config_tensors(snap: SessionSnapshot, pos: int) -> tuple[torch.Tensor, int | None]:
    """Prompt, generator, latents and the optional config tensors; returns ``(latents, frames_per_block)``
    (``None`` without step noise)."""
    if not isinstance(snap.tensors.get("config.prompt"), torch.Tensor):
        raise SnapshotError("snapshot lacks tensor 'config.prompt'")
    _tensor(snap, "rng.generator", torch.uint8, 1)
    latents = _tensor(snap, "latents", torch.float32, 4)
    fpb = None
    if "config.step_noise" in snap.tensors:
        steps = _tensor(snap, "config.step_noise", torch.float32, 5)
        fpb = steps.shape[1]
        if not 0 <= pos <= steps.shape[0]:
            raise SnapshotError(f"snapshot step_noise_pos {pos} must lie in [0, {steps.shape[0]}]")
    elif pos:
        raise SnapshotError("snapshot step_noise_pos must be 0 without step_noise")
    if "config.initial_noise" in snap.tensors:
        _tensor(snap, "config.initial_noise", torch.float32, 4)
    if "config.actions" in snap.tensors:
        _tensor(snap, "config.actions", torch.int64, 1)
    return latents, fpb


def _check_cache_tensors(snap: SessionSnapshot, tokens: list[int]) -> set[str]:
    """Each layer's cache parts against its token count and ``k``; returns the names checked."""
    names = set()
    for layer, n in enumerate(tokens):
        k = _tensor(snap, f"cache.{layer}.k", None, 3)
        for part, dtype in _CACHE_PARTS.items():
            t = _tensor(snap, f"cache.{layer}.{part}", dtype or k.dtype, {"positions": 2, "log_mass": 1}.get(part, 3))
            if t.shape[0] != n or (part == "v" and t.shape != k.shape) or (part == "positions" and t.shape[1] != 3):
                raise SnapshotError(
                    f"snapshot tensor cache.{layer}.{part} {tuple(t.shape)} does not match "
                    f"{n} tokens of k {tuple(k.shape)}"
                )
            names.add(f"cache.{layer}.{part}")
    return names


def check_snapshot(snap: SessionSnapshot) -> None:
    """Structural checks that need no engine: format, meta fields and types, tensor names, ranks and dtypes,
    and the consistency between them.  ``SnapshotError`` on the first problem."""
    m = snap.meta
    _check_header(m)
    for key in ("model", "sampler"):
        _field(m, key, dict, "")
    sess, pol, cache = _field(m, "session", dict, ""), _field(m, "policy", dict, ""), _field(m, "cache", dict, "")
    num_frames, block, pos, start = _check_session_meta(sess, m["version"])
    _check_policy_meta(pol)
    tokens = _check_cache_meta(cache)
    latents, fpb = _check_config_tensors(snap, pos)
    if num_frames < 1 or block < 0:
        raise SnapshotError(f"snapshot num_frames {num_frames} must be >= 1 and block {block} >= 0")
    if fpb is not None and start + latents.shape[0] != block * fpb:
        raise SnapshotError(f"snapshot latents hold frames [{start}, {start + latents.shape[0]}), block {block} "
                            f"needs them to end at {block * fpb}")
    names = {"config.prompt", "rng.generator", "latents", "config.step_noise", "config.initial_noise", "config.actions"}
    names |= _check_cache_tensors(snap, tokens)
    extra = sorted(n for n in snap.tensors if n not in names and not n.startswith(("policy.", "state.", "conditioning.")))
    if extra:
        raise SnapshotError(f"snapshot has unexpected tensors {extra[:4]}")


def _check_compatible(engine: Engine, snap: SessionSnapshot) -> None:
    m = snap.meta
    for key, mine in (("model", model_fingerprint(engine)), ("sampler", sampler_fingerprint(engine))):
        if m[key] != mine:
            diff = sorted(k for k in set(mine) | set(m[key]) if mine.get(k) != m[key].get(k))
            raise SnapshotError(
                f"snapshot was taken on another {key} (differs in {diff}); restore it on an engine with the same {key}"
            )
    g, fpb = engine.geometry, engine.geometry.frames_per_block
    num_blocks = math.ceil(m["session"]["num_frames"] / fpb)
    if not m["session"]["block"] < num_blocks:
        raise SnapshotError(f"snapshot block {m['session']['block']} must be < {num_blocks} (a finished session)")
    if len(m["cache"]["tokens"]) != g.num_layers:
        raise SnapshotError(f"snapshot has {len(m['cache']['tokens'])} layers, the model {g.num_layers}")
    kept = m["session"]["block"] * fpb - m["session"].get("latents_start_frame", 0)
    if tuple(snap.tensors["latents"].shape) != (kept, g.latent_channels, *g.latent_hw):
        raise SnapshotError(
            f"snapshot latents {tuple(snap.tensors['latents'].shape)} do not fit block "
            f"{m['session']['block']} of this model"
        )
    for layer, n in enumerate(m["cache"]["tokens"]):
        k = snap.tensors[f"cache.{layer}.k"]
        if k.dtype != engine.dtype or tuple(k.shape[1:]) != (g.num_kv_heads, g.head_dim):
            raise SnapshotError(
                f"snapshot cache.{layer}.k is {k.dtype} {tuple(k.shape)}, this model keeps "
                f"{engine.dtype} [tokens, {g.num_kv_heads}, {g.head_dim}]"
            )
    try:
        torch.Generator().set_state(snap.tensors["rng.generator"])
    except RuntimeError as exc:
        raise SnapshotError(f"snapshot rng.generator is not a CPU generator state: {exc}") from None


# ---- restore ----------------------------------------------------------------------------------------------
def session_config(snap: SessionSnapshot, session_id: str | None) -> SessionConfig:
    m, t = snap.meta, snap.tensors
    pol = m["policy"]
    try:
        policy = make_policy(pol["name"], **pol["params"])
    except FFEngineError as exc:
        raise SnapshotError(f"snapshot policy cannot be rebuilt: {exc}") from None
    steps = t.get("config.step_noise")
    return SessionConfig(
        prompt=t["config.prompt"],
        num_frames=m["session"]["num_frames"],
        seed=m["session"]["seed"],
        policy=policy,
        budget_frames=m["session"]["budget_frames"],
        initial_noise=t.get("config.initial_noise"),
        step_noise=list(steps.unbind(0)) if steps is not None else None,
        session_id=m["session"]["id"] if session_id is None else session_id,
        retain_frames=m["session"].get("retain_frames"),  # version 1: kept every frame
        actions=t["config.actions"].tolist() if "config.actions" in t else None,
        conditioning={k.removeprefix("conditioning."): v for k, v in t.items() if k.startswith("conditioning.")} or None,
    )


def restore_session(engine: Engine, snap: SessionSnapshot, session_id: str | None = None) -> Session:
    """Admit ``snap`` on ``engine`` as session ``session_id`` (default: the snapshot's id) and restore its state;
    the next ``engine.step([id])`` continues it.  Pages are reserved exactly as ``add_session`` does
    (``BudgetError`` if they do not fit); on any failure nothing stays admitted."""
    if not isinstance(snap, SessionSnapshot):
        raise SnapshotError(f"restore needs a SessionSnapshot, got {type(snap).__name__}")
    check_snapshot(snap)
    _check_compatible(engine, snap)
    m, t = snap.meta, snap.tensors
    cfg = session_config(snap, session_id)
    layers = [{part: t[f"cache.{layer}.{part}"] for part in _CACHE_PARTS} for layer in range(len(m["cache"]["tokens"]))]
    session = engine.add_session(cfg)
    try:
        load_state(session, snap, engine.cache.device)
        engine.cache.import_session(session.id, layers)
    except BaseException:
        engine.cancel(session.id)
        raise
    return session


def load_state(session, snap: SessionSnapshot, dev) -> None:
    """Everything of a snapshot but its K/V into an admitted session: policy state, block cursor, latents, RNG,
    step-noise cursor, actions (restore, fork and rollback share it)."""
    m, t = snap.meta, snap.tensors
    state = {k.removeprefix("policy."): v.to(dev, copy=True) for k, v in t.items() if k.startswith("policy.")}
    state.update(m["policy"]["state"])
    session.policy.load_state_dict(state)
    session.block = m["session"]["block"]
    kept = t["latents"].split(session.frames_per_block) if t["latents"].shape[0] else ()
    session.latents = [b.to(dev, copy=True) for b in kept]
    session.latents_start_frame = m["session"].get("latents_start_frame", 0)
    session.generator.set_state(t["rng.generator"].clone())
    session.step_noise_pos = m["session"]["step_noise_pos"]
    session.actions = t["config.actions"].tolist() if "config.actions" in t else []
    _restore_adapter_state(session, t)
