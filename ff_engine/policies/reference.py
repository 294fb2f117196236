"""Self-Forcing / CausVid / LongLive inference settings, under the names their configs use, mapped exactly onto
ff-engine's budget and sink.

The reference ``CausalWanSelfAttention`` keeps a rolling cache of ``local_attn_size`` frames whose first
``sink_size`` frames never roll; before a block of ``num_frame_per_block`` frames is attended, the oldest
non-sink frames are evicted to make room for it, so a block attends ``local_attn_size`` frames *including
itself*.  ff-engine's ``budget_frames`` counts the cached frames a block attends *besides* itself, so
``budget_frames = local_attn_size - num_frame_per_block`` and ``sink_frames = sink_size``; ``local_attn_size = -1``
is the unbounded policy.  The full mapping is one table in ``docs/reference_settings.md``.

The reference accepts ``L >= S + F`` (its roll needs room for the sink and the block): so does ff-engine,
down to ``L = S + F``, where every block attends only the sink and itself (``budget_frames == sink_frames``).
Any other bounded policy takes the same budget and sink (``settings.policy(FutureForcing())``).  Checked
against a port of the reference rolling cache in ``tests/test_reference_settings.py``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ff_engine.errors import ConfigError
from ff_engine.policies.base import CachePolicy
from ff_engine.policies.window import SinkWindow, Unbounded, Window

GLOBAL = -1


def _int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


@dataclass(frozen=True)
class ReferenceSettings:
    """The reference's cache settings; ``budget_frames`` / ``sink_frames`` / ``policy()`` give ff-engine's."""

    local_attn_size: int = GLOBAL  # frames a block attends, itself included; -1 = global (no eviction)
    sink_size: int = 0  # first frames that never roll
    num_frame_per_block: int = 3  # latent frames per block
    context_noise: float = 0.0  # timestep of the cache-writing pass

    def __post_init__(self):
        _int("num_frame_per_block", self.num_frame_per_block, 1)
        _int("sink_size", self.sink_size, 0)
        if self.local_attn_size != GLOBAL:
            need = self.sink_size + self.num_frame_per_block
            if isinstance(self.local_attn_size, bool) or not isinstance(self.local_attn_size, int) \
                    or self.local_attn_size < need:
                raise ConfigError(
                    f"local_attn_size must be -1 (global) or an integer >= sink_size + num_frame_per_block = {need} "
                    f"(the window holds the sink and the block being generated), got {self.local_attn_size!r}")
        c = self.context_noise
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or not 0 <= c <= 1000:
            raise ConfigError(f"context_noise must be a number in [0, 1000], got {c!r}")

    @property
    def bounded(self) -> bool:
        return self.local_attn_size != GLOBAL

    @property
    def budget_frames(self) -> int | None:
        """Cached frames a block attends besides itself (None: unbounded)."""
        return self.local_attn_size - self.num_frame_per_block if self.bounded else None

    @property
    def sink_frames(self) -> int:
        return self.sink_size if self.bounded else 0

    def policy(self, base: CachePolicy | None = None) -> CachePolicy:
        """The reference's own policy (rolling window, with a sink when ``sink_size > 0``), or ``base`` with the
        sink set: any bounded policy can serve the reference's budget."""
        if not self.bounded:
            if base is not None and base.bounded:
                raise ConfigError(f"local_attn_size -1 (global attention) keeps everything; policy {base.name!r} "
                                  f"needs a bounded local_attn_size")
            return base or Unbounded()
        if base is None:
            return SinkWindow(sink_frames=self.sink_size) if self.sink_size else Window()
        if not base.bounded:
            raise ConfigError(f"local_attn_size {self.local_attn_size} bounds the cache; policy {base.name!r} "
                              f"is unbounded")
        if self.sink_size and "sink_frames" not in getattr(base, "__dataclass_fields__", {}):
            raise ConfigError(f"policy {base.name!r} has no sink; sink_size must be 0 for it")
        return dataclasses.replace(base, sink_frames=self.sink_size) if self.sink_size else base

    def check_model(self, geometry) -> None:
        """The model must generate ``num_frame_per_block`` frames per block (build it with that override)."""
        if geometry.frames_per_block != self.num_frame_per_block:
            raise ConfigError(f"num_frame_per_block {self.num_frame_per_block} differs from the model's "
                              f"frames_per_block {geometry.frames_per_block}; load the model with "
                              f"frames_per_block={self.num_frame_per_block}")

    def session_kwargs(self, base: CachePolicy | None = None) -> dict:
        """``policy`` and ``budget_frames`` of a ``SessionConfig`` (``SessionConfig(prompt=..., num_frames=...,
        **settings.session_kwargs())``)."""
        return {"policy": self.policy(base), "budget_frames": self.budget_frames}
