"""The engine: admits streams under a page budget and runs the Self-Forcing block loop for many at once.

Per block, for the batch of active sessions (one transformer forward per denoising step for all of them):
  1. for each timestep of the schedule: flow = model(x_t) attending to [cache ; block] (the block's K/V are
     *not* kept), x0 = x_t - sigma(t) flow, re-noise x0 to the next timestep with fresh noise (or, for a
     deterministic schedule, with the noise the model implies: the Euler step);
  2. a pass on x0 (re-noised to timestep ``context_noise``, default 0 = clean) writes the block's post-RoPE
     K/V into the session's pages and shows the policy the pre-RoPE queries;
  3. the policy brings every layer back under the session's budget (evict / merge + compaction).
A session reserves ``layers * ceil((budget + block) / page_size)`` pages at admission (the peak between steps
2 and 3), or enough for its whole length when unbounded, so it can never run out of pages mid-stream.

Failure containment (a server runs strangers' streams side by side):
  * ``commit_block`` is the one place a block is finished (write -> compress -> advance); ``advance`` the one
    place a session's block index moves.
  * A batched phase that raises is undone for every session of the batch (``_Mark``: noise generator, step-noise
    cursor, and for the cache-writing pass each layer's token count and the policy) and re-run one session at a
    time, so a failing session ends alone with its error and every other session's state is exactly as if the
    failing one had never been batched with it.  Compression runs per session.  A failed session's pages go
    back to the pool at once; ``step`` always returns (it never leaves a batch half-advanced).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch

from ff_engine.attention import AttentionBackend, AttentionBatch, get_backend
from ff_engine.cache import PagedKVCache
from ff_engine.engine.branching import UndoHistory, fork_session
from ff_engine.engine.observer import AttentionCall, EngineObserver
from ff_engine.engine.recache import switch_prompt
from ff_engine.engine.sampler import FlowMatchSchedule
from ff_engine.engine.session import SESSION_ID_RE, Session, SessionConfig
from ff_engine.engine.snapshot import restore_session, snapshot_session
from ff_engine.errors import BudgetError, ConfigError, FFEngineError
from ff_engine.policies.base import CachePolicy, CompressContext
from model_adapters.base import StreamStates

log = logging.getLogger(__name__)
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed
MAX_STREAM_FRAMES = 2**31 - 2**16  # token positions are int32 (latent frame, h, w)


@dataclass
class BlockResult:
    session_id: str
    block: int
    latents: torch.Tensor | None  # [F, C, H, W]; None when the session failed
    done: bool
    error: str | None = None


def stream_pages(geometry, page_size: int, num_frames: int, budget_frames: int | None) -> int:
    """Pages a stream reserves: its peak (budget + one block, per layer) when bounded, or its whole length
    (rounded up to whole blocks) when ``budget_frames`` is None."""
    g = geometry
    if budget_frames is not None:
        frames = budget_frames + g.frames_per_block
    else:
        frames = math.ceil(num_frames / g.frames_per_block) * g.frames_per_block
    return g.num_layers * math.ceil(frames * g.tokens_per_frame / page_size)


def reservation_pages(geometry, page_size: int, cfg: SessionConfig) -> int:
    """``stream_pages`` of a session request (its policy decides whether the budget binds)."""
    return stream_pages(geometry, page_size, cfg.num_frames, cfg.budget_frames if cfg.policy.bounded else None)


def _step_noise(sessions: list[Session], dtype: torch.dtype) -> torch.Tensor:
    """Each session's next step noise (its own generator), stacked."""
    return torch.stack([s.step_noise() for s in sessions]).to(dtype)


class PagedSelfAttention:
    """The ``SelfAttentionFn`` the engine hands to adapters: attend through the paged cache; on the cache-writing
    pass also append the block's K/V and feed the policy the pre-RoPE queries."""

    def __init__(self, engine: Engine, sessions: list[Session], write: bool):
        self.engine, self.sessions, self.write = engine, sessions, write

    def __call__(self, layer, q, k, v, q_pre_rope, positions):
        e, n_seq = self.engine, len(self.sessions)
        n = q.shape[0] // n_seq
        cu = torch.arange(n_seq + 1, dtype=torch.int32) * n
        ids = [s.id for s in self.sessions]
        batch = AttentionBatch(q, k, v, cu, e.cache.view(ids, layer), 1.0 / math.sqrt(q.shape[-1]))
        out = e.backend.forward(batch)
        if e.observers:
            call = AttentionCall(layer, tuple(ids), batch, out, self.write, q_pre_rope, positions)
            for observer in e.observers:
                observer.on_attention(call)
        if self.write:
            for i, s in enumerate(self.sessions):
                sl = slice(i * n, (i + 1) * n)
                e.cache.append(s.id, layer, k[sl], v[sl], positions[sl])
                s.policy.observe(layer, q_pre_rope[sl], q[sl], positions[sl])
        return out


class _Mark:
    """What one batched phase may change in a session, recorded before it so the phase can be undone.

    Noise: the generator state and the step-noise cursor.  With ``cache=True`` (the cache-writing pass) also each
    layer's token count (the pass only appends, so truncating undoes it exactly) and a copy of the policy (the
    pass feeds it queries).  The policy copy is only taken for batches of more than one session."""

    def __init__(self, engine: Engine, session: Session, cache: bool):
        self.engine, self.session = engine, session
        self.rng = session.generator.get_state()
        self.noise_pos = session.step_noise_pos
        self.tokens = [engine.cache.num_tokens(session.id, layer) for layer in range(engine.geometry.num_layers)] \
            if cache else None
        self.policy = copy.deepcopy(session.policy) if cache else None
        self.state = clone_state(session.stream_state) if cache else None

    def restore(self) -> None:
        s, cache = self.session, self.engine.cache
        s.generator.set_state(self.rng)
        s.step_noise_pos = self.noise_pos
        if self.state is not None and s.stream_state is not None:
            for name, t in s.stream_state.items():
                t.copy_(self.state[name])
        if self.tokens is not None and cache.has_session(s.id):
            for layer, n in enumerate(self.tokens):
                cache.truncate(s.id, layer, n)
            s.policy = self.policy


def stream_state_spec(model) -> dict:
    """The model's declared per-stream state (``model.stream_state_spec()``: name -> spec with ``shape``, ``dtype``
    and ``nbytes``), {} for a model that keeps none."""
    spec = getattr(model, "stream_state_spec", None)
    return dict(spec()) if callable(spec) else {}


def clone_state(state: dict | None) -> dict | None:
    return {k: t.clone() for k, t in state.items()} if state is not None else None


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, FFEngineError) else f"{type(exc).__name__}: {exc}"


class Engine:
    def __init__(
        self,
        model,
        *,
        num_pages: int,
        page_size: int = 32,
        backend: str | AttentionBackend = "auto",
        schedule: FlowMatchSchedule | None = None,
        context_noise: float | None = None,
        device: str = "cpu",
        undo_blocks: int = 0,
    ):
        self.model = model
        self.geometry = g = model.geometry
        self.action_names: tuple[str, ...] = tuple(getattr(model.cfg, "actions", ()) or ())
        self.dtype = next(model.parameters()).dtype
        self.backend = get_backend(backend, device) if isinstance(backend, str) else backend
        if not isinstance(page_size, int) or page_size < 1:
            raise ConfigError(f"page_size must be an integer >= 1, got {page_size!r}")
        self.backend.validate(page_size, self.dtype, g.head_dim)
        self.cache = PagedKVCache(g.num_layers, g.num_kv_heads, g.head_dim, page_size, num_pages, self.dtype, device)
        self.schedule = schedule or FlowMatchSchedule.for_model(model)
        if context_noise is None:  # the model's own setting (its config), else Self-Forcing's 0
            context_noise = getattr(getattr(model, "cfg", None), "context_noise", 0.0)
        self.context_noise = float(context_noise)
        self.sessions: dict[str, Session] = {}
        self.observers: list[EngineObserver] = []
        if not isinstance(undo_blocks, int) or isinstance(undo_blocks, bool) or not 0 <= undo_blocks <= 64:
            raise ConfigError(f"undo_blocks must be an integer in [0, 64], got {undo_blocks!r}")
        self.history = UndoHistory(undo_blocks)  # rollback (branching.py); 0: no history kept
        self.state_spec = stream_state_spec(model)

    def add_observer(self, observer: EngineObserver) -> EngineObserver:
        """Call ``observer``'s hooks from now on (``observer.py``); returns it."""
        self.observers.append(observer)
        return observer

    def remove_observer(self, observer: EngineObserver) -> None:
        self.observers.remove(observer)

    # ---- admission ------------------------------------------------------------------------------
    def pages_needed(self, cfg: SessionConfig) -> int:
        return reservation_pages(self.geometry, self.cache.page_size, cfg)

    def pages_that_fit(self, cfg: SessionConfig) -> int:
        """``pages_needed`` of a validated request; ``BudgetError`` if even the empty pool could not hold it."""
        need = self.pages_needed(cfg)
        if need > self.cache.num_pages:
            raise BudgetError(f"stream needs {need} pages, more than the whole pool of {self.cache.num_pages} "
                              f"(num_pages); lower budget_frames or raise num_pages")
        return need

    def validate(self, cfg: SessionConfig) -> None:
        """Check a request completely without allocating anything; raises a one-line ``FFEngineError``.  (The
        prompt's shape is checked by the model when ``add_session`` encodes it; whether the reservation could ever
        fit the pool, by ``pages_that_fit``.)"""
        g = self.geometry
        if not isinstance(cfg, SessionConfig):
            raise ConfigError(f"a request must be a SessionConfig, got {type(cfg).__name__}")
        if isinstance(cfg.num_frames, bool) or not isinstance(cfg.num_frames, int) or cfg.num_frames <= 0:
            raise ConfigError(f"num_frames must be a positive integer, got {cfg.num_frames!r}")
        if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed <= MAX_SEED:
            raise ConfigError(f"seed must be an integer in [0, 2**63 - 1], got {cfg.seed!r}")
        if cfg.budget_frames is not None and (
            isinstance(cfg.budget_frames, bool) or not isinstance(cfg.budget_frames, int) or cfg.budget_frames < 0
        ):
            raise ConfigError(f"budget_frames must be a non-negative integer, got {cfg.budget_frames!r}")
        if cfg.retain_frames is not None and (
            isinstance(cfg.retain_frames, bool) or not isinstance(cfg.retain_frames, int) or cfg.retain_frames < 0
        ):
            raise ConfigError(f"retain_frames must be None (keep all) or an integer >= 0, got {cfg.retain_frames!r}")
        if not isinstance(cfg.prompt, torch.Tensor):
            raise ConfigError(f"prompt must be a tensor of text embeddings, got {type(cfg.prompt).__name__}")
        if not isinstance(cfg.policy, CachePolicy):
            raise ConfigError(f"policy must be a CachePolicy, got {type(cfg.policy).__name__}")
        if cfg.session_id is not None and (not isinstance(cfg.session_id, str)
                                           or not SESSION_ID_RE.fullmatch(cfg.session_id)):
            raise ConfigError(f"session_id must match {SESSION_ID_RE.pattern} (letters, digits, '.', '_', '-'), "
                              f"got {cfg.session_id!r}")
        cfg.policy.validate(cfg.budget_frames, g.frames_per_block)
        frames = math.ceil(cfg.num_frames / g.frames_per_block) * g.frames_per_block
        if frames > MAX_STREAM_FRAMES:  # no RoPE table limit: adapters compute angles for any frame (endless streams)
            raise ConfigError(f"num_frames must be at most {MAX_STREAM_FRAMES} (int32 token positions), got {frames}")
        self._validate_noise(cfg, frames)
        if cfg.actions is not None:
            self.validate_actions(cfg.actions)
        self.check_conditioning(cfg.conditioning, frames)
        if cfg.prefix is not None:
            self._validate_prefix(cfg.prefix, frames)

    def _validate_prefix(self, prefix, frames: int) -> None:
        g, fpb = self.geometry, self.geometry.frames_per_block
        shape = (g.latent_channels, *g.latent_hw)
        if not isinstance(prefix, torch.Tensor) or prefix.dim() != 4 or tuple(prefix.shape[1:]) != shape \
                or prefix.shape[0] % fpb or not prefix.shape[0] or not torch.isfinite(prefix).all():
            raise ConfigError(f"prefix must be finite latents [k * {fpb}, {', '.join(map(str, shape))}] (k >= 1)")
        if prefix.shape[0] >= frames:
            raise ConfigError(f"prefix: {prefix.shape[0]} frames leave nothing to generate of num_frames {frames}")

    def validate_actions(self, actions) -> None:
        """Per-frame action indices for this engine's model (one ``ConfigError`` naming the field otherwise)."""
        names = self.action_names
        if not names:
            raise ConfigError(f"actions: this model ({type(self.model).__name__}) takes no actions")
        if isinstance(actions, torch.Tensor):
            actions = actions.tolist() if actions.dim() == 1 and not actions.is_floating_point() else [None]
        if not isinstance(actions, (list, tuple)) or len(actions) > MAX_STREAM_FRAMES or any(
            isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < len(names) for a in actions
        ):
            raise ConfigError(f"actions must be a list of action indices in [0, {len(names)}) of {list(names)}, "
                              f"one per latent frame")

    def _validate_noise(self, cfg: SessionConfig, frames: int) -> None:
        g = self.geometry
        c, (h, w) = g.latent_channels, g.latent_hw
        if cfg.initial_noise is not None and (not isinstance(cfg.initial_noise, torch.Tensor)
                                              or tuple(cfg.initial_noise.shape) != (frames, c, h, w)):
            raise ConfigError(f"initial_noise must be a tensor [{frames}, {c}, {h}, {w}]")
        if cfg.step_noise is None:
            return
        shape = (g.frames_per_block, c, h, w)
        if not isinstance(cfg.step_noise, (list, tuple)) or any(
            not isinstance(n, torch.Tensor) or tuple(n.shape) != shape for n in cfg.step_noise
        ):
            raise ConfigError(f"step_noise must be a list of tensors {list(shape)}")
        blocks = frames // g.frames_per_block
        need = blocks * (len(self.schedule.denoising_timesteps) - 1) * self.schedule.stochastic
        need += (blocks - 1) * (self.context_noise > 0)
        if len(cfg.step_noise) < need:
            raise ConfigError(f"step_noise has {len(cfg.step_noise)} tensors; this stream consumes {need}")

    def add_session(self, cfg: SessionConfig) -> Session:
        """Validate, encode the prompt, reserve pages. Raises a one-line ``FFEngineError`` on bad input."""
        self.validate(cfg)
        if cfg.session_id is not None and cfg.session_id in self.sessions:
            raise ConfigError(f"session_id {cfg.session_id!r} is already active")
        with torch.no_grad():
            prompt_state = self.model.encode_prompt(cfg.prompt)
        session = Session(cfg, self.geometry, prompt_state, self.geometry.frames_per_block)
        session.conditioning = self.check_conditioning(cfg.conditioning, session.num_frames)
        self.cache.add_session(session.id, self.pages_that_fit(cfg))
        session.stream_state = self.allocate_stream_state()
        self.sessions[session.id] = session
        return session

    def cancel(self, session_id: str) -> None:
        """Stop a stream and return all its pages (a fork's shared pages stay with the fork) and its adapter
        state. Idempotent."""
        s = self.sessions.pop(session_id, None)
        if s is not None:
            s.stream_state = None
        self.cache.release_session(session_id)
        self.history.forget(session_id)

    # ---- branching (ff_engine/engine/branching.py) -------------------------------------------------
    def fork(self, session_id: str, fork_id: str | None = None) -> Session:
        """A second stream from the exact state of active session ``session_id`` (between blocks), sharing its
        pages copy-on-write; it reserves its own budget (``BudgetError`` if that does not fit).  Both continue
        as the source alone would; set the fork's actions (``set_actions``) to try another path."""
        return fork_session(self, session_id, fork_id)

    def rollback(self, session_id: str, blocks: int = 1) -> Session:
        """Return an active stream to its state before its last ``blocks`` blocks (at most ``undo_blocks``,
        the engine's setting); its next ``step`` regenerates from there."""
        return self.history.rollback(self, session_id, blocks)

    # ---- the block loop -------------------------------------------------------------------------
    def forward_block(self, sessions: list[Session], x: torch.Tensor, t: torch.Tensor, write: bool) -> torch.Tensor:
        """One model call for the current block of ``sessions``: x [S, F, C, H, W], t [S, F] -> flow."""
        attn = PagedSelfAttention(self, sessions, write)
        kw = {"actions": torch.stack([s.block_actions() for s in sessions])} if self.action_names else {}
        kw.update(self.adapter_inputs(sessions, write))
        with torch.no_grad():
            return self.model.forward(x.to(self.dtype), t, [s.prompt_state for s in sessions],
                                  [s.start_frame for s in sessions], attn, **kw)

    def set_actions(self, session_id: str, actions, from_frame: int | None = None) -> int:
        """Steer a running stream: frames ``from_frame ..`` (default: the next block's first frame) take
        ``actions`` (per-frame indices, the last one held).  Returns the block index from which they apply; a frame
        already generated cannot be changed (``ConfigError``)."""
        s = self.sessions.get(session_id)
        if s is None:
            raise ConfigError(f"session_id {session_id!r} is not active")
        self.validate_actions(actions)
        start = s.start_frame if from_frame is None else from_frame
        if isinstance(start, bool) or not isinstance(start, int) or start < s.start_frame:
            raise ConfigError(f"from_frame must be an integer >= {s.start_frame} (the next block's first frame)")
        s.set_actions(list(actions), start)
        return start // s.frames_per_block

    def write_context(self, sessions: list[Session], x0: torch.Tensor) -> None:
        """The cache-writing pass of a finished block: x0 re-noised to timestep ``context_noise`` (with the
        session's own noise, as Self-Forcing's ``context_noise`` does; 0 = clean), K/V appended."""
        t = torch.full(tuple(x0.shape[:2]), self.context_noise)
        if self.context_noise > 0:
            x0 = self.schedule.add_noise(x0, _step_noise(sessions, x0.dtype), t)
        self.forward_block(sessions, x0, t, write=True)

    def compress(self, session: Session) -> None:
        """Bring every layer of the session back under its budget (the policy decides what stays)."""
        g = self.geometry
        if not session.policy.bounded:
            return
        budgets = session.policy.layer_budgets(session.budget_tokens, g.num_layers, self.cache.page_size)
        newest = session.start_frame + session.frames_per_block - 1
        for layer in range(g.num_layers):
            session.policy.compress(CompressContext(
                self.cache.session_view(session.id, layer), budgets[layer], newest, g.frames_per_block, g.tokens_per_frame,
                g.token_grid, getattr(self.model, "rope", None)))
            for observer in self.observers:
                observer.on_compress(session, layer, self.cache.num_tokens(session.id, layer))

    def advance(self, session: Session, block: torch.Tensor | None) -> None:
        """The one place a session moves to its next block (``block``: its latents [F, C, H, W] to keep, or None
        when the caller does not record them, e.g. teacher-forced evaluation)."""
        if block is not None:
            session.record(block.float())
        session.block += 1

    def commit_block(self, sessions: list[Session], x0: torch.Tensor, record: bool = True) -> dict[str, str]:
        """The one way a block is finished: write its K/V (one batched clean pass, skipped for a stream's last
        block, which no later block attends to), compress each session under its budget, advance.

        x0 [S, F, C, H, W] in the order of ``sessions``.  Returns ``{session_id: error}`` for sessions that failed
        here; those are ended (pages freed) and not advanced; the others are as if they had run alone."""
        rows = {s.id: x0[i] for i, s in enumerate(sessions)}
        writers = [s for s in sessions if s.block + 1 < s.num_blocks]
        _, errors = self._contained(
            writers, lambda batch: self.write_context(batch, torch.stack([rows[s.id] for s in batch])), cache=True
        )
        for s in sessions:
            if s.id not in errors and s in writers:
                try:
                    self.compress(s)
                except Exception as exc:  # noqa: BLE001 - one stream's failure must not stop the others
                    errors[s.id] = _describe(exc)
            if s.id in errors:
                self._end(s, errors[s.id])
            else:
                self.advance(s, rows[s.id] if record else None)
        return errors

    def prefill(self, session_id: str, latents: torch.Tensor) -> None:
        """Video extension: write given latents [P, C, H, W] (P a multiple of the block) into the session's cache
        block by block with clean passes, as if it had generated them; generation continues after them."""
        s = self.sessions[session_id]
        fpb = s.frames_per_block
        if latents.dim() != 4 or latents.shape[0] % fpb or tuple(latents.shape[1:]) != s.block_shape[1:]:
            raise ConfigError(f"prefix latents must be [k * {fpb}, {', '.join(map(str, s.block_shape[1:]))}], "
                              f"got {tuple(latents.shape)}")
        if s.block + latents.shape[0] // fpb >= s.num_blocks:
            raise ConfigError("the prefix must leave at least one block to generate (num_frames)")
        for b in range(latents.shape[0] // fpb):
            error = self.commit_block([s], latents[b * fpb:(b + 1) * fpb][None].to(self.dtype)).get(s.id)
            if error:
                raise FFEngineError(f"session {s.id}: prefill failed: {error}")

    def denoise(self, sessions: list[Session]) -> torch.Tensor:
        """The denoising loop of the current block of ``sessions`` (one forward per step for all of them);
        returns x0 [S, F, C, H, W].  Nothing is written: ``step`` writes it, teacher-forced evaluation writes
        the ground truth instead."""
        steps = self.schedule.denoising_timesteps
        S, Fb = len(sessions), sessions[0].frames_per_block
        x = torch.stack([s.block_noise() for s in sessions])
        for i, t in enumerate(steps):
            tt = torch.full((S, Fb), float(t))
            flow = self.forward_block(sessions, x, tt, write=False)
            x0 = self.schedule.to_x0(x.to(flow.dtype), flow, tt)
            if i < len(steps) - 1:
                if self.schedule.stochastic:
                    noise = _step_noise(sessions, x0.dtype)
                else:  # the noise the model implies (flow = eps - x0): the deterministic Euler/DDIM step
                    noise = x0 + flow
                x = self.schedule.add_noise(x0, noise, torch.full((S, Fb), float(steps[i + 1])))
        return x0

    def step(self, session_ids: list[str] | None = None) -> list[BlockResult]:
        """Generate the next block of every given (default: every active) session in one batched loop.

        Never raises for a session's failure: a session that fails (an exception in any phase, or non-finite
        latents) comes back as a ``BlockResult`` with ``error`` set and ``done=True``, its pages freed."""
        ids = list(self.sessions) if session_ids is None else list(dict.fromkeys(session_ids))  # each once
        sessions = [self.sessions[i] for i in ids if i in self.sessions and not self.sessions[i].done]
        if not sessions:
            return []
        for s in sessions:
            self.history.record(self, s)
        x0, errors = self._contained(sessions, self.denoise, cache=False)
        for s in sessions:
            if s.id not in errors and not torch.isfinite(x0[s.id]).all():
                errors[s.id] = "non-finite latents (NaN/inf); session cancelled"
        ok = [s for s in sessions if s.id not in errors]
        blocks = {s.id: s.block for s in sessions}
        if ok:
            errors.update(self.commit_block(ok, torch.stack([x0[s.id] for s in ok])))
        results = []
        for s in sessions:
            if s.id in errors:
                self._end(s, errors[s.id])
                results.append(BlockResult(s.id, blocks[s.id], None, True, errors[s.id]))
            else:
                results.append(BlockResult(s.id, blocks[s.id], s.latents[-1], s.done))
                if s.done:
                    self.cancel(s.id)  # finished: pages go back to the pool
        for observer in self.observers:
            for r in results:
                observer.on_block(r)
        return results

    def _contained(self, sessions: list[Session], run, cache: bool) -> tuple[dict, dict[str, str]]:
        """Run ``run(batch)`` (returning a tensor with one row per session, or None) for the whole batch; if it
        raises, undo it for every session (``_Mark``) and run each session alone.  Returns ``({id: row}, {id:
        error})``: a session fails only if it fails on its own."""
        if not sessions:
            return {}, {}
        marks = [_Mark(self, s, cache and len(sessions) > 1) for s in sessions]
        try:
            out = run(sessions)
        except Exception as exc:  # contained per session below
            if len(sessions) == 1:
                log.warning("session %s failed: %s", sessions[0].id, _describe(exc), exc_info=True)
                return {}, {sessions[0].id: _describe(exc)}
            for m in marks:
                m.restore()
            rows, errors = {}, {}
            for s in sessions:
                r, e = self._contained([s], run, cache)
                rows.update(r)
                errors.update(e)
            return rows, errors
        return ({s.id: out[i] for i, s in enumerate(sessions)} if out is not None else {}), {}

    def _end(self, session: Session, error: str) -> None:
        """End a failed session: it leaves the engine and its pages return to the pool."""
        session.error = error
        self.cancel(session.id)

    def generate(self, cfg: SessionConfig, on_block=None) -> torch.Tensor:
        """Run one stream to the end; returns latents [num_frames, C, H, W]. ``on_block(result, engine)``."""
        if getattr(cfg, "retain_frames", None) is not None:
            raise ConfigError("retain_frames must be None for generate (it returns the whole video); stream with step")
        s = self.add_session(cfg)
        try:
            while s.id in self.sessions:
                for r in self.step([s.id]):
                    if r.error:
                        raise FFEngineError(f"session {r.session_id}: {r.error}")
                    if on_block:
                        on_block(r, self)
        finally:
            self.cancel(s.id)
        return torch.cat(s.latents)[: cfg.num_frames]

    # ---- adapter-declared per-stream state and conditioning (docs/adapters.md, "Caches an adapter declares") ----
    @property
    def state_bytes_per_stream(self) -> int:
        """Bytes of adapter-declared state each stream holds (reserved at admission, freed with the stream)."""
        return sum(spec.nbytes for spec in self.state_spec.values())

    def stream_state_bytes(self) -> int:
        """Bytes of adapter state held by the active sessions."""
        return sum(sum(t.numel() * t.element_size() for t in s.stream_state.values())
                   for s in self.sessions.values() if s.stream_state)

    def allocate_stream_state(self) -> dict | None:
        """A new stream's state: zeros of every declared shape and dtype on the cache's device (None if none)."""
        if not self.state_spec:
            return None
        return {name: torch.zeros(spec.shape, dtype=spec.dtype, device=self.cache.device)
                for name, spec in self.state_spec.items()}

    def check_conditioning(self, conditioning, num_frames: int) -> dict:
        """The model's check of a stream's conditioning (one ``ConfigError`` naming the field); {} for none."""
        if conditioning is None:
            return {}
        check = getattr(self.model, "check_conditioning", None)
        if check is None:
            raise ConfigError(f"conditioning: this model ({type(self.model).__name__}) takes none")
        return check(conditioning, num_frames)

    def adapter_inputs(self, sessions: list[Session], write: bool) -> dict:
        """The keyword arguments of ``model.forward`` for what an adapter declares: its per-stream state (changed
        only on the cache-writing pass) and the streams' conditioning."""
        kw = {}
        if self.state_spec:
            kw["stream_state"] = StreamStates([s.stream_state for s in sessions], write)
        if getattr(self.model, "check_conditioning", None) is not None:
            kw["conditioning"] = [s.conditioning for s in sessions]
        return kw

    def set_conditioning(self, session_id: str, from_pixel_frame: int | None = None, **fields) -> int:
        """Steer a running stream's per-frame conditioning (e.g. ``keyboard_cond=``, ``mouse_cond=``): rows from
        ``from_pixel_frame`` on (default: the end of what the stream holds) are replaced by the given ones; earlier
        rows stay.  Checked by the model as a whole (one ``ConfigError``, nothing changed).  Returns the new
        length of the first field."""
        s = self.sessions.get(session_id)
        if s is None:
            raise ConfigError(f"session_id {session_id!r} is not active")
        merged = dict(s.conditioning)
        length = 0
        for name, rows in fields.items():
            rows = torch.as_tensor(rows, dtype=torch.float32) if not isinstance(rows, torch.Tensor) else rows
            old = merged.get(name)
            start = (old.shape[0] if old is not None else 0) if from_pixel_frame is None else from_pixel_frame
            if isinstance(start, bool) or not isinstance(start, int) or start < 0 or \
                    (old is not None and start > old.shape[0]) or (old is None and start):
                raise ConfigError(f"{name}: from_pixel_frame must be an integer in [0, {0 if old is None else old.shape[0]}]")
            if old is not None and start and tuple(rows.shape[1:]) != tuple(old.shape[1:]):
                raise ConfigError(f"{name} rows must be [n, {', '.join(map(str, old.shape[1:]))}] like the stream's, "
                                  f"got {tuple(rows.shape)}")
            merged[name] = torch.cat([old[:start].to(rows.dtype), rows]) if old is not None and start else rows
            length = merged[name].shape[0]
        s.conditioning = self.check_conditioning(merged, s.num_frames)
        return length

    # ---- session snapshots (ff_engine/engine/snapshot.py owns them; snapshot.py never imports this module) --------------------------------------------
    def snapshot(self, session_id: str):
        """``SessionSnapshot`` of an active session between blocks: everything it needs to continue
        bit-identically on any engine with the same model (the session itself is not touched)."""
        return snapshot_session(self, session_id)

    def restore(self, snap, session_id: str | None = None) -> Session:
        """Admit a snapshotted session (pages reserved exactly as ``add_session``; ``BudgetError`` if they do not
        fit, ``SnapshotError`` for another model) where it stopped; continue it with ``step``."""
        return restore_session(self, snap, session_id)

    # ---- prompt switching (ff_engine/engine/recache.py) ----------------------------------------------------
    def switch_prompt(self, session_id: str, prompt: torch.Tensor, recache_frames: int | None = None) -> int:
        """LongLive's interactive prompt switch: the stream's next block (and every later one) is generated under
        ``prompt`` ([L, text_dim] text embeddings), and the K/V of its last ``recache_frames`` frames that the cache
        holds are re-computed under it first (None: LongLive's default, the frames a block attends = budget + one
        block, or every frame so far when unbounded; 0: switch without re-cache; sink frames keep theirs).  Call it
        between steps (the next block boundary); the page count and budget do not change.  Returns the number of
        frames re-cached.  ``ConfigError`` for an unknown or finished session or a bad prompt (nothing changed)."""
        return switch_prompt(self, session_id, prompt, recache_frames)
