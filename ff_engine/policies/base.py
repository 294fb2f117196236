"""The cache-policy interface (kvpress style): a small dataclass per policy with one ``score()``.

After every cache write the engine calls ``policy.compress(...)`` for every layer of the session.  The default
``compress`` keeps the ``budget`` highest-scoring tokens (protected tokens always survive, ties go to the
newer token) and compacts the survivors in place.  Policies that merge (Future Forcing) override ``compress``.
The engine never needs to know which policy runs; policies never touch model code.

A policy object is a *configuration*: the engine deep-copies it per session, so per-session state (query
statistics, accumulated attention) never leaks between streams.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ff_engine.cache import PagedKVCache
from ff_engine.errors import ConfigError


@dataclass
class LayerTokens:
    """What a policy may read about one layer's cached tokens (contiguous copies, generation order)."""

    k: torch.Tensor  # [N, Hkv, D] post-RoPE
    v: torch.Tensor
    positions: torch.Tensor  # [N, 3] int32 (frame, h, w)
    log_mass: torch.Tensor  # [N]
    layer: int
    newest_frame: int
    tokens_per_frame: int


class CachePolicy:
    name: ClassVar[str] = "base"
    bounded: ClassVar[bool] = True
    #: frames at the start of the video that are never evicted (0 = none)
    sink_frames: int = 0

    def validate(self, budget_frames: int | None, frames_per_block: int) -> None:
        if not self.bounded:
            return
        if budget_frames is None:
            raise ConfigError(f"policy {self.name!r} needs a budget (budget_frames)")
        need = frames_per_block + self.sink_frames
        if budget_frames < need:
            raise ConfigError(
                f"budget_frames {budget_frames} is below one block ({frames_per_block} frames) plus "
                f"{self.sink_frames} sink frames; it must be >= {need}"
            )

    def observe(self, layer: int, q_pre_rope: torch.Tensor, positions: torch.Tensor) -> None:
        """Pre-RoPE queries [N, H, D] of the cache-writing pass (for policies that keep query statistics)."""

    def score(self, tokens: LayerTokens) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def protected(self, tokens: LayerTokens) -> torch.Tensor:
        """Tokens that must survive: sink frames."""
        return tokens.positions[:, 0] < self.sink_frames

    def compress(self, cache: PagedKVCache, session_id: str, layer: int, budget_tokens: int, newest_frame: int,
                 tokens_per_frame: int) -> None:
        n = cache.num_tokens(session_id, layer)
        if not self.bounded or n <= budget_tokens:
            return
        g = cache.gather(session_id, layer)
        tokens = LayerTokens(g["k"], g["v"], g["positions"], g["log_mass"], layer, newest_frame, tokens_per_frame)
        scores = self.score(tokens).float().clone()
        scores[self.protected(tokens)] = float("inf")
        cache.compact(session_id, layer, top_tokens(scores, budget_tokens))


def top_tokens(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, ties broken towards newer tokens, returned in increasing order."""
    n = scores.numel()
    rev = torch.arange(n - 1, -1, -1)
    order = rev[torch.sort(scores[rev], descending=True, stable=True).indices]
    return torch.sort(order[:k]).values
