"""Prompt switching with LongLive's KV re-cache.

When a stream's prompt changes, LongLive re-computes the K/V of its most recent frames under the new prompt
(``_recache_after_switch``: the last ``min(local_attn_size, frames so far)`` frames, global attention: all of them,
at timestep ``context_noise``, block-causally), so the next block does not attend to K/V that still carry the old
prompt through cross-attention; frame-sink frames keep their K/V (LongLive's ``global_sink``).

ff-engine does the same on its paged cache, in place:

* frames ``[start, now)`` are re-run block by block (the stream's own block grid) from the latents the session
  generated, with the new prompt, at timestep ``context_noise`` (clean input, as LongLive feeds it);
* block c of the re-cache attends to every cached token older than it (sink and earlier frames as cached,
  earlier re-cached frames already updated) plus itself, like the block's original pass;
* each cached token of the re-cached frames gets its new K/V through ``PagedKVCache.update`` (positions,
  page table, order and per-token policy state unchanged), so the page count and the budget are exactly what
  they were; tokens the policy evicted stay evicted, merged tokens (log-mass != 0, several originals) keep theirs.

Cost: one forward per re-cached block (LongLive's default at local_attn_size 12: four 3-frame passes) plus an
O(cached tokens) gather per layer and block; it runs once per switch.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ff_engine.attention.torch_ref import sdpa
from ff_engine.errors import ConfigError, FFEngineError


def longlive_default_frames(session) -> int:
    """LongLive's re-cache length: the frames a block attends (local_attn_size = budget + one block), or every
    frame so far under global attention; never more than the stream has generated."""
    frames = retain_for_recache(session.cfg, session.frames_per_block)
    return session.start_frame if frames is None else min(frames, session.start_frame)


def retain_for_recache(cfg, frames_per_block: int) -> int | None:
    """The ``retain_frames`` a stream needs for LongLive's default re-cache: budget + one block under a bounded
    policy, None (every frame) under global attention (whose pages hold the whole stream anyway)."""
    if cfg.policy.bounded and cfg.budget_frames is not None:
        return cfg.budget_frames + frames_per_block
    return None


def streaming_config(cfg, frames_per_block: int):
    """``cfg`` for a service that hands every block to its consumers as it comes: with ``retain_frames`` (when the
    request left it None) just what the default re-cache needs, so an endless stream's host memory stays bounded."""
    if cfg.retain_frames is not None:
        return cfg
    return dataclasses.replace(cfg, retain_frames=retain_for_recache(cfg, frames_per_block))


class RecacheAttention:
    """The ``SelfAttentionFn`` of one re-cache pass over frames ``[first, end)`` of one session: attend to the
    cached tokens older than ``first`` plus the pass's own tokens, then overwrite the K/V of the pass's frames that
    the cache holds (exact originals only)."""

    def __init__(self, cache, session_id: str, first: int, end: int, geometry):
        self.cache, self.sid, self.first, self.end = cache, session_id, first, end
        self.tokens_per_frame, self.grid_w = geometry.tokens_per_frame, geometry.token_grid[1]

    def _key(self, pos: torch.Tensor) -> torch.Tensor:
        pos = pos.long()
        return (pos[:, 0] - self.first) * self.tokens_per_frame + pos[:, 1] * self.grid_w + pos[:, 2]

    def __call__(self, layer, q, k, v, q_pre_rope, positions):
        c = self.cache
        h, d = c.num_kv_heads, c.head_dim
        slots = c.slots(self.sid, layer)
        pos, lm = c.positions.view(-1, 3)[slots], c.log_mass.view(-1)[slots]
        older = slots[pos[:, 0] < self.first]
        kk = torch.cat([c.key_cache.view(-1, h, d)[older], k.to(c.dtype)])
        vv = torch.cat([c.value_cache.view(-1, h, d)[older], v.to(c.dtype)])
        past_lm = c.log_mass.view(-1)[older]
        bias = torch.cat([past_lm, past_lm.new_zeros(k.shape[0])]) if bool((past_lm != 0).any()) else None
        out = sdpa(q.to(c.dtype), kk, vv, 1.0 / math.sqrt(q.shape[-1]), bias).to(q.dtype)
        mine = ((pos[:, 0] >= self.first) & (pos[:, 0] < self.end) & (lm == 0)).nonzero().flatten()
        if mine.numel():
            index = torch.full((int(self._key(positions).max()) + 1,), -1, dtype=torch.long, device=k.device)
            index[self._key(positions)] = torch.arange(positions.shape[0], device=k.device)
            rows = index[self._key(pos[mine])]
            assert bool((rows >= 0).all()), "a cached token of a re-cached frame has no counterpart in the pass"
            c.update(self.sid, layer, mine, k[rows].to(c.dtype), v[rows].to(c.dtype), torch.zeros(mine.numel()))
        return out


def _check(engine, session_id, prompt, recache_frames):
    if session_id not in engine.sessions:
        raise ConfigError(f"session_id {session_id!r} is not an active session")
    s = engine.sessions[session_id]
    if s.done:
        raise ConfigError(f"session {session_id!r} has finished; there is no next block to switch the prompt for")
    if not isinstance(prompt, torch.Tensor):
        raise ConfigError(f"prompt must be a tensor of text embeddings, got {type(prompt).__name__}")
    if recache_frames is not None and (isinstance(recache_frames, bool) or not isinstance(recache_frames, int)
                                       or recache_frames < 0):
        raise ConfigError(f"recache_frames must be None (LongLive's default) or an integer >= 0, got {recache_frames!r}")
    return s


def switch_prompt(engine, session_id: str, prompt: torch.Tensor, recache_frames: int | None = None) -> int:
    """See ``Engine.switch_prompt``.  Returns how many frames were re-cached."""
    s = _check(engine, session_id, prompt, recache_frames)
    with torch.no_grad():
        state = engine.model.encode_prompt(prompt)  # a bad prompt raises here, before anything changes
    now, fpb = s.start_frame, s.frames_per_block
    frames = longlive_default_frames(s) if recache_frames is None else min(recache_frames, now)
    first = max(now - frames, s.policy.sink_frames)  # sink frames keep their K/V (LongLive's global sink)
    if first < now:
        kept = (s.latents_start_frame, s.latents_start_frame + sum(b.shape[0] for b in s.latents))
        if kept[0] > first or kept[1] < now:
            most = now - kept[0] if kept[1] == now else 0  # the largest recache_frames the kept window covers
            raise ConfigError(
                f"recache_frames: session {session_id!r} keeps latents for frames [{kept[0]}, {kept[1]}) only "
                f"(retain_frames={s.cfg.retain_frames}; unrecorded blocks keep none) but re-caching needs "
                f"[{first}, {now}); pass recache_frames <= {most} or submit with retain_frames >= {now - first}"
            )
        video = torch.cat(s.latents)
    s.prompt_state = state
    s.cfg = dataclasses.replace(s.cfg, prompt=prompt)  # snapshots restore the prompt in force
    try:
        start = first
        while start < now:
            end = min(now, (start // fpb + 1) * fpb)  # the stream's own block grid
            x = video[start - s.latents_start_frame : end - s.latents_start_frame][None].to(engine.dtype)
            t = torch.full((1, end - start), float(engine.context_noise))
            attention = RecacheAttention(engine.cache, s.id, start, end, engine.geometry)
            with torch.no_grad():
                engine.model.forward(x, t, [state], [start], attention)
            start = end
    except Exception as exc:  # noqa: BLE001 - a half re-cached stream cannot continue: end it, report one line
        why = str(exc) if isinstance(exc, FFEngineError) else f"{type(exc).__name__}: {exc}"
        s.error = f"prompt switch failed: {why}"
        engine.cancel(s.id)
        raise FFEngineError(f"session {s.id}: {s.error}") from None
    return max(0, now - first)
