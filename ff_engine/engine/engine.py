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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ff_engine.attention import AttentionBackend, AttentionBatch, get_backend
from ff_engine.cache import PagedKVCache
from ff_engine.engine.schedule import FlowMatchSchedule
from ff_engine.engine.session import Session, SessionConfig
from ff_engine.errors import BudgetError, ConfigError, FFEngineError
from ff_engine.policies.base import CompressContext


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

    def __init__(self, engine: "Engine", sessions: list[Session], write: bool):
        self.engine, self.sessions, self.write = engine, sessions, write

    def __call__(self, layer, q, k, v, q_pre_rope, positions):
        e, n_seq = self.engine, len(self.sessions)
        n = q.shape[0] // n_seq
        cu = torch.arange(n_seq + 1, dtype=torch.int32) * n
        view = e.cache.view([s.id for s in self.sessions], layer)
        out = e.backend.forward(AttentionBatch(q, k, v, cu, view, 1.0 / math.sqrt(q.shape[-1])))
        if self.write:
            for i, s in enumerate(self.sessions):
                sl = slice(i * n, (i + 1) * n)
                e.cache.append(s.id, layer, k[sl], v[sl], positions[sl])
                s.policy.observe(layer, q_pre_rope[sl], q[sl], positions[sl])
        return out


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
    ):
        self.model = model
        self.geometry = g = model.geometry
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

    # ---- admission ------------------------------------------------------------------------------
    def pages_needed(self, cfg: SessionConfig) -> int:
        return reservation_pages(self.geometry, self.cache.page_size, cfg)

    def add_session(self, cfg: SessionConfig) -> Session:
        """Validate, encode the prompt, reserve pages. Raises a one-line ``FFEngineError`` on bad input."""
        g = self.geometry
        if not isinstance(cfg.num_frames, int) or cfg.num_frames <= 0:
            raise ConfigError(f"num_frames must be a positive integer, got {cfg.num_frames!r}")
        if cfg.budget_frames is not None and (not isinstance(cfg.budget_frames, int) or cfg.budget_frames < 0):
            raise ConfigError(f"budget_frames must be a non-negative integer, got {cfg.budget_frames!r}")
        cfg.policy.validate(cfg.budget_frames, g.frames_per_block)
        frames = math.ceil(cfg.num_frames / g.frames_per_block) * g.frames_per_block
        if frames > g.max_frames:
            raise ConfigError(
                f"{frames} latent frames exceed the RoPE table of {g.max_frames} frames (num_frames / seconds)"
            )
        if cfg.session_id is not None and cfg.session_id in self.sessions:
            raise ConfigError(f"session_id {cfg.session_id!r} is already active")
        with torch.no_grad():
            prompt_state = self.model.encode_prompt(cfg.prompt)
        session = Session(cfg, g, prompt_state, g.frames_per_block)
        pages = self.pages_needed(cfg)
        if pages > self.cache.num_pages:
            raise BudgetError(
                f"session needs {pages} pages but the engine has {self.cache.num_pages} (num_pages); "
                f"lower budget_frames or raise num_pages"
            )
        self.cache.add_session(session.id, pages)
        self.sessions[session.id] = session
        return session

    def cancel(self, session_id: str) -> None:
        """Stop a stream and return all its pages. Idempotent."""
        self.sessions.pop(session_id, None)
        self.cache.release_session(session_id)

    # ---- the block loop -------------------------------------------------------------------------
    def forward_block(self, sessions: list[Session], x: torch.Tensor, t: torch.Tensor, write: bool) -> torch.Tensor:
        """One model call for the current block of ``sessions``: x [S, F, C, H, W], t [S, F] -> flow."""
        attn = PagedSelfAttention(self, sessions, write)
        with torch.no_grad():
            return self.model.forward(x.to(self.dtype), t, [s.prompt_state for s in sessions],
                                  [s.start_frame for s in sessions], attn)

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
                self.cache, session.id, layer, budgets[layer], newest, g.frames_per_block, g.tokens_per_frame,
                g.token_grid, getattr(self.model, "rope", None)))

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
            x = latents[b * fpb:(b + 1) * fpb][None].to(self.dtype)
            self.write_context([s], x)
            self.compress(s)
            s.latents.append(x[0].float())
            s.block += 1

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
        """Generate the next block of every given (default: every active) session in one batched loop."""
        ids = list(self.sessions) if session_ids is None else session_ids
        sessions = [self.sessions[i] for i in ids if i in self.sessions and not self.sessions[i].done]
        if not sessions:
            return []
        x0 = self.denoise(sessions)
        results, keep = [], []
        for i, s in enumerate(sessions):
            if not torch.isfinite(x0[i]).all():
                self.cancel(s.id)
                results.append(BlockResult(s.id, s.block, None, True, "non-finite latents (NaN/inf); session cancelled"))
                continue
            block = x0[i].float()
            s.latents.append(block)
            results.append(BlockResult(s.id, s.block, block, s.block + 1 >= s.num_blocks))
            if s.block + 1 < s.num_blocks:
                keep.append(i)
            else:
                s.block += 1
        if keep:  # the clean pass writes K/V only for sessions that will generate another block
            cont = [sessions[i] for i in keep]
            self.write_context(cont, x0[keep])
            for s in cont:
                self.compress(s)
                s.block += 1
        for s in sessions:
            if s.done and s.id in self.sessions:
                self.cancel(s.id)  # finished: pages go back to the pool
        return results

    def generate(self, cfg: SessionConfig, on_block=None) -> torch.Tensor:
        """Run one stream to the end; returns latents [num_frames, C, H, W]. ``on_block(result, engine)``."""
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
