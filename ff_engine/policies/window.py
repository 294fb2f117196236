"""The eviction baselines that need no statistics: keep everything, a rolling window, a frame sink + window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ff_engine.policies.base import CachePolicy, CompressContext, LayerTokens
from ff_engine.policies.params import param


@dataclass
class Unbounded(CachePolicy):
    """CausVid / Self-Forcing global cache: never evicts (reserves pages for the whole requested length)."""

    name = "unbounded"
    bounded = False

    def score(self, tokens: LayerTokens, ctx: CompressContext) -> torch.Tensor:
        return torch.zeros(tokens.positions.shape[0])


@dataclass
class Window(CachePolicy):
    """Self-Forcing rolling cache: keep the most recent ``budget`` tokens (whole frames when the budget is)."""

    name = "window"

    def score(self, tokens: LayerTokens, ctx: CompressContext) -> torch.Tensor:
        return tokens.positions[:, 0].float()


@dataclass
class SinkWindow(CachePolicy):
    """LongLive frame sink: the first ``sink_frames`` frames never roll, the rest is a rolling window."""

    name = "sink-window"
    sink_frames: int = param(3, ge=0, doc="latent frames at the start of the video that are never evicted")

    def score(self, tokens: LayerTokens, ctx: CompressContext) -> torch.Tensor:
        return tokens.positions[:, 0].float()
