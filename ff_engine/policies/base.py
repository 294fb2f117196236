"""The cache-policy interface (kvpress style): a small dataclass per policy with one ``score()``.

After every cache write the engine calls ``policy.compress(ctx)`` for every layer of the session.  The default
``compress`` keeps the ``budget`` highest-scoring tokens (protected tokens always survive, ties go to the
newer token) and compacts the survivors in place.  Policies that merge (Future Forcing) override ``compress``.
The engine never needs to know which policy runs; policies never touch model code (RoPE phases come from the
adapter's ``geometry.rope`` object, an interface).

A policy object is a *configuration*: the engine deep-copies it per session, so per-session state (query
statistics, accumulated attention) never leaks between streams.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ff_engine.cache import PagedKVCache
from ff_engine.errors import ConfigError, SnapshotError
from ff_engine.policies.params import check_params


@dataclass
class CompressContext:
    cache: PagedKVCache
    session_id: str
    layer: int
    budget_tokens: int
    newest_frame: int  # last latent frame written
    frames_per_block: int
    tokens_per_frame: int
    token_grid: tuple[int, int]
    rope: Any = None  # object with .phases(positions [N, 3]) -> angles [N, head_dim / 2] (float64)

    @property
    def num_tokens(self) -> int:
        return self.cache.num_tokens(self.session_id, self.layer)


class LayerTokens:
    """What a policy may read about one layer's cached tokens, in the table's current order.  Each field is
    gathered on first use, so a policy that scores by position never copies keys or values."""

    def __init__(self, ctx: CompressContext):
        self._ctx, self._slots = ctx, ctx.cache.slots(ctx.session_id, ctx.layer)
        self.layer, self.newest_frame, self.tokens_per_frame = ctx.layer, ctx.newest_frame, ctx.tokens_per_frame

    @classmethod
    def gather(cls, ctx: CompressContext) -> "LayerTokens":
        return cls(ctx)

    def _read(self, storage, *tail):
        return storage.view(-1, *tail)[self._slots] if tail else storage.view(-1)[self._slots]

    @property
    def k(self) -> torch.Tensor:  # [N, Hkv, D] post-RoPE
        c = self._ctx.cache
        return self._read(c.key_cache, c.num_kv_heads, c.head_dim)

    @property
    def v(self) -> torch.Tensor:
        c = self._ctx.cache
        return self._read(c.value_cache, c.num_kv_heads, c.head_dim)

    @property
    def positions(self) -> torch.Tensor:  # [N, 3] int32 (frame, h, w)
        return self._read(self._ctx.cache.positions, 3)

    @property
    def log_mass(self) -> torch.Tensor:  # [N]
        return self._read(self._ctx.cache.log_mass)

    @property
    def num_tokens(self) -> int:
        return self._slots.numel()


class CachePolicy:
    name: ClassVar[str] = "base"
    bounded: ClassVar[bool] = True
    #: frames at the start of the video that are never evicted (0 = none)
    sink_frames: int = 0
    #: the newest block is never evicted (its tokens have not been attended by any later block yet)
    protect_newest_block: ClassVar[bool] = True

    def __post_init__(self):
        """Every declared parameter (``params.param``) in its range: one ``ConfigError`` otherwise.  Subclasses
        with their own ``__post_init__`` call this first."""
        check_params(self)

    def validate(self, budget_frames: int | None, frames_per_block: int) -> None:
        if not self.bounded:
            return
        if budget_frames is None:
            raise ConfigError(f"policy {self.name!r} needs a budget (budget_frames)")
        # The reference rolling cache (Self-Forcing / LongLive) accepts any window that holds its sink and the
        # block being generated: local_attn_size >= sink_size + num_frame_per_block, i.e. budget >= sink.  When
        # the budget cannot hold the newest block as well, the newest frames that fit are kept (``protected``).
        if budget_frames < self.sink_frames:
            raise ConfigError(
                f"budget_frames {budget_frames} is below the {self.sink_frames} sink frames; it must be >= "
                f"{self.sink_frames} (local_attn_size >= sink_size + num_frame_per_block)"
            )

    def observe(self, layer: int, q_pre_rope: torch.Tensor, q: torch.Tensor, positions: torch.Tensor) -> None:
        """Queries [N, H, D] of the cache-writing pass, before and after RoPE (for policies with statistics)."""

    def layer_budgets(self, budget_tokens: int, num_layers: int, page_size: int) -> list[int]:
        """Per-layer token budgets for this block (default: the same for every layer)."""
        return [budget_tokens] * num_layers

    def score(self, tokens: LayerTokens, ctx: CompressContext) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def protected(self, positions: torch.Tensor, ctx: CompressContext) -> torch.Tensor:
        """Tokens that must survive: sink frames and (by default) the newest block, or as many of its newest
        frames as the budget holds after the sink (the reference's rolling cache with a window of sink + one
        block keeps none of it).  Never more than the budget when budget >= sink (``validate``)."""
        f = positions[:, 0]
        mask = f < self.sink_frames
        if self.protect_newest_block:
            room = max(0, ctx.budget_tokens // ctx.tokens_per_frame - self.sink_frames)
            mask |= f > ctx.newest_frame - min(ctx.frames_per_block, room)
        return mask

    def state_dict(self) -> dict[str, torch.Tensor | int | float]:
        """The policy's per-session runtime state, flat (name -> tensor or number): everything it learned while
        serving a stream (query statistics, accumulated attention...), *not* its configuration (the dataclass's
        init fields).  ``load_state_dict`` on a policy built from the same init fields makes it continue
        bit-identically (session snapshots).  Stateless policies keep this default: no state."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor | int | float]) -> None:
        """Restore ``state_dict()``'s output; raises ``SnapshotError`` on a key this policy does not keep."""
        if state:
            raise SnapshotError(f"policy {self.name!r} keeps no state, got keys {sorted(state)[:4]}")

    def on_compact(self, layer: int, survivors: torch.Tensor) -> None:
        """Stateful policies re-align per-token state: ``survivors[i]`` is the pre-compaction index of the token
        now at index i."""

    def compress(self, ctx: CompressContext) -> None:
        if not self.bounded or ctx.num_tokens <= ctx.budget_tokens:
            return
        tokens = LayerTokens.gather(ctx)
        scores = self.score(tokens, ctx).float().to(ctx.cache.device).clone()  # scores may come from the CPU
        scores[self.protected(tokens.positions, ctx)] = float("inf")
        keep = top_tokens(scores, ctx.budget_tokens)
        self.on_compact(ctx.layer, ctx.cache.compact(ctx.session_id, ctx.layer, keep))


def top_tokens(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, ties broken towards higher indices, returned in increasing order."""
    n = scores.numel()
    rev = torch.arange(n - 1, -1, -1, device=scores.device)
    order = rev[torch.sort(scores[rev], descending=True, stable=True).indices]
    return torch.sort(order[:k]).values


def layer_tensors_state(prefix: str, per_layer: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{layer: tensor}`` -> ``{f"{prefix}.{layer}": tensor}`` (a ``state_dict`` fragment)."""
    return {f"{prefix}.{layer}": t for layer, t in per_layer.items()}


def take_layer_state(prefix: str, state: dict, kind: type | tuple[type, ...] = torch.Tensor) -> dict[int, Any]:
    """Pop the ``f"{prefix}.{layer}"`` entries of ``state`` back into ``{layer: value}`` (inverse of
    ``layer_tensors_state``, also for per-layer numbers); ``SnapshotError`` on a layer that is not an integer or
    a value that is not a ``kind``."""
    out = {}
    for key in sorted(k for k in state if k.startswith(prefix + ".")):
        layer, value = key[len(prefix) + 1:], state.pop(key)
        if not layer.isdigit() or not isinstance(value, kind) or isinstance(value, bool):
            raise SnapshotError(f"policy state {key!r} must be {prefix}.<layer> holding a {kind}, got {type(value)}")
        out[int(layer)] = value
    return out
