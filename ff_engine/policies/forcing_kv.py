"""Forcing-KV (Ji et al. 2026, arXiv 2605.09681): keep the segments of the frames leaving the recent window that
changed most before the next frame.

Reference: github.com/zju-jiyicheng/Forcing-KV at 50ac1f454348e7f0a2e54bde71e1652b20c09fe6,
``wan/modules/causal_model_forcingkv.py``:
  * ``CausalWanSelfAttention.dynamic_compression`` (the scoring, checked in tests/test_forcing_kv.py): after each
    block's cache-writing pass, the ``temporal_context_length`` (T) recent frames kept before the block plus the
    block's first 3 - T frames (the 3 frames that leave the recent window now: the *candidates*) are each cut into
    ``num_frame_patch`` (P) segments of HW / P consecutive tokens in raster order.  A segment's score is the mean
    over its tokens of the cosine similarity between the token's key and the key at the same (h, w) in the next
    frame (the last candidate is compared with the first frame that stays in the window), the cosine taken over
    all dynamic heads' keys concatenated.  The ``dynamic_context_length * P`` *least* similar segments
    (``topk(largest=False)``) replace the dynamic cache; the static heads never see them.  Only layer 1 scores;
    every other grouped layer reuses its selection (``shared_dynamic_chunk_indices``); layer 0 is never grouped.
  * ``forward``: a static head attends to the sink, the ``spatial_context_length`` newest frames and the block; a
    dynamic head to the sink, the dynamic segments, the T newest frames and the block.
  * ``_load_offline_head_groups`` + ``configs_head/head_profile.py``: which heads are static is decided offline
    per model from profiled attention maps (a head is static when the last 4 key frames hold >= 0.8 of its
    attention past the first key frame) and read from a JSON file; defaults (configs/forcing-kv/*.yaml): sink 1
    frame, T = 1, spatial 1, dynamic_context_length 1, P = 6, sim_retention_ratio 0.33 (must equal
    dynamic_context_length / 3: it is a consistency check, not a knob).

What differs here, and why:
  * A paged cache keeps or evicts a token in every head at once, so there are no separate static / dynamic head
    caches: the kept set is the dynamic heads' one (sink + selected segments + T recent frames), and every head
    attends to it.  The segment similarity uses every kv head's keys (the reference's default for a layer absent
    from its head file); per-model head files are not a policy parameter.
  * The budget decides how many tokens stay: ``budget_frames`` = sink + T + dynamic_context_length reproduces the
    reference's sizes (P * dynamic_context_length segments).  With a larger budget, tokens of older frames (the
    reference drops the previous dynamic segments) fill the rest, newest first; they rank below every candidate.
  * The candidates are the ``frames_per_block`` frames before the T protected newest frames (the reference
    hard-codes 3-frame blocks).  A segment is compared over the token pairs present in the cache (all of them
    unless another policy or a merge removed some); a segment without any pair ranks with the older frames.
  * ``score_layer`` (default 1, as the reference) scores every layer with that layer's keys, read from the cache
    before it is compacted; layer 0 uses the same selection (the reference keeps its whole window).  -1 scores
    each layer with its own keys.  Segments are ``raster * P // HW`` (HW / P tokens each when P divides HW).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ff_engine.policies.base import CachePolicy, CompressContext, LayerTokens
from ff_engine.policies.params import param

#: older frames (left the candidate window in an earlier block) and segments without a comparable pair
_OLDER = -2.0
#: the recent frames: above every candidate (cosine scores lie in [-1, 1])
_RECENT = 3.0


def segment_similarity(frame_keys: torch.Tensor, present: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Forcing-KV's segment score.  ``frame_keys`` [C + 1, HW, Hkv, D]: C candidate frames and the frame after
    them, token ``r`` at raster index ``r``; ``present`` [C + 1, HW] bool.  Returns [C, num_segments]: the mean over
    a segment's tokens of cos(key in frame i, key at the same place in frame i + 1), over the heads concatenated;
    NaN for a segment without a present pair."""
    flat = frame_keys.float().flatten(2)
    cos = F.cosine_similarity(flat[:-1], flat[1:], dim=-1)  # [C, HW]
    pair = present[:-1] & present[1:]
    hw = flat.shape[1]
    seg = torch.arange(hw, device=flat.device) * num_segments // hw  # [HW]
    total = torch.zeros(cos.shape[0], num_segments, device=flat.device).index_add_(1, seg, cos * pair)
    count = torch.zeros_like(total).index_add_(1, seg, pair.float())
    return total / count  # 0 / 0 = NaN where no pair


@dataclass
class ForcingKV(CachePolicy):
    """Forcing-KV (zju-jiyicheng/Forcing-KV ``dynamic_compression``): the sink, the newest frames and, of the frames
    leaving that recent window, the segments whose keys changed most before the next frame."""

    name = "forcing-kv"
    sink_frames: int = param(1, ge=0, doc="latent frames at the start of the video that are never evicted (sink_size)")
    recent_frames: int = param(1, ge=1, le=65536, doc="newest frames kept whole (temporal_context_length)")
    num_frame_patch: int = param(6, ge=1, le=4096, doc="segments per frame, consecutive tokens in raster order")
    score_layer: int = param(1, ge=-1, le=4096,
                             doc="layer whose keys score the segments of every layer (-1: each layer its own)")
    protect_newest_block = False  # the newest block's older frames are candidates (the reference's 3 - T frames)
    _shared: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def protected(self, positions: torch.Tensor, ctx: CompressContext) -> torch.Tensor:
        """The sink and the ``recent_frames`` newest frames (as many as the budget holds after the sink)."""
        f = positions[:, 0]
        room = max(0, ctx.budget_tokens // ctx.tokens_per_frame - self.sink_frames)
        return (f < self.sink_frames) | (f > ctx.newest_frame - min(self.recent_frames, room))

    def candidate_frames(self, ctx: CompressContext) -> torch.Tensor:
        """The frames that left the recent window with the newest block, oldest first, and the frame after them."""
        last = ctx.newest_frame - self.recent_frames
        return torch.arange(last - ctx.frames_per_block + 1, last + 2)

    def segment_scores(self, tokens: LayerTokens, ctx: CompressContext) -> torch.Tensor:
        """[frames_per_block, num_frame_patch] cosine similarities of the candidates' segments (NaN: no pair)."""
        frames = self.candidate_frames(ctx).to(tokens.positions.device)
        pos = tokens.positions.long()
        gw = ctx.token_grid[1]
        slot = pos[:, 0, None] == frames[None]  # [N, C + 1]
        tok, fi = slot.nonzero(as_tuple=True)
        r = pos[tok, 1] * gw + pos[tok, 2]
        k = tokens.k
        grid = torch.zeros(frames.numel(), ctx.tokens_per_frame, *k.shape[1:], device=k.device, dtype=torch.float32)
        present = torch.zeros(frames.numel(), ctx.tokens_per_frame, dtype=torch.bool, device=k.device)
        grid[fi, r] = k[tok].float()
        present[fi, r] = True
        return segment_similarity(grid, present, self.num_frame_patch)

    def _scores_for_block(self, tokens: LayerTokens, ctx: CompressContext) -> torch.Tensor:
        if self.score_layer < 0:
            return self.segment_scores(tokens, ctx)
        layer = min(self.score_layer, ctx.view.num_layers - 1)
        key = (ctx.newest_frame, layer)
        if key not in self._shared:  # first layer compressed this block: read the scoring layer before it compacts
            src = tokens if layer == ctx.layer else LayerTokens(dataclasses.replace(ctx, view=ctx.view.other_layer(layer), scratch={}))
            self._shared = {key: self.segment_scores(src, ctx)}
        return self._shared[key]

    def score(self, tokens: LayerTokens, ctx: CompressContext) -> torch.Tensor:
        seg_scores = self._scores_for_block(tokens, ctx)  # [C, P]
        frames = self.candidate_frames(ctx)
        pos = tokens.positions.long()
        f = pos[:, 0]
        out = torch.full((tokens.num_tokens,), _OLDER, device=pos.device)
        cand = (f >= int(frames[0])) & (f < int(frames[-1]))
        seg = (pos[:, 1] * ctx.token_grid[1] + pos[:, 2]) * self.num_frame_patch // ctx.tokens_per_frame
        sim = seg_scores.to(pos.device)[(f - int(frames[0])).clamp(0, seg_scores.shape[0] - 1), seg]
        keep_sim = cand & ~torch.isnan(sim)
        out[keep_sim] = -sim[keep_sim]  # least similar to the next frame = most kept
        out[f > ctx.newest_frame - self.recent_frames] = _RECENT
        return out
