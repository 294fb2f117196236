"""The cache-policy interface (kvpress style): a small dataclass per policy with one ``score()``.

After every cache write the engine calls ``policy.compress(ctx)`` for every layer of the session.  ``compress`` is
one template, the same for every policy: when the layer is over budget, ``rank`` (which tokens compete and their
``score()``), then ``remove`` (bring the layer to budget: by default keep the ``budget`` highest-scoring tokens,
protected tokens always survive, ties go to the newer token, and compact the survivors in place), then
``on_compact``.  A *scorer* only writes ``score()``; wrappers in ``compose`` / ``merge`` / ``page_candidates`` /
``budget_split`` change one step around any scorer (merge instead of evict, pre-select candidates from page
summaries, split the budget over layers), and Future Forcing is a composition of them (docs/policies.md).
The engine never needs to know which policy runs; policies never touch model code (RoPE phases come from the
adapter's ``geometry.rope`` object, an interface).

A policy object is a *configuration*: the engine deep-copies it per session, so per-session state (query
statistics, accumulated attention) never leaks between streams.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import torch

from ff_engine.cache import SessionCacheView
from ff_engine.errors import ConfigError, SnapshotError
from ff_engine.policies.params import check_params


@dataclass
class CompressContext:
    """One compression of one layer of one session: the policy's view of that layer (``view``: read tokens, request
    merges and evictions) and what the engine knows about the block just written."""

    view: SessionCacheView
    budget_tokens: int
    newest_frame: int  # last latent frame written
    frames_per_block: int
    tokens_per_frame: int
    token_grid: tuple[int, int]
    rope: Any = None  # object with .phases(positions [N, 3]) -> angles [N, head_dim / 2] (float64)
    #: scratch for one ``compress`` call: what a policy derives from this context alone (Future Forcing's projected
    #: statistics) is computed once however many steps ask for it; it dies with the context
    scratch: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def session_id(self) -> str:
        return self.view.session_id

    @property
    def layer(self) -> int:
        return self.view.layer

    @property
    def num_tokens(self) -> int:
        return self.view.num_tokens


class LayerTokens:
    """What a policy may read about one layer's cached tokens: the whole layer in table order, or the subset at
    table indices ``index`` (increasing).  Each field is gathered on first use and kept, so a policy that scores by
    position never copies keys or values, and a wrapper that reads them after the scorer does not copy them again.

    ``outside_log_mass`` [H] (or None): set by ``PageCandidates`` when it hands a scorer only some of the removable
    tokens; the per-head log attention mass the scorer's own page estimates give the removable tokens left out.  A
    scorer whose scores are a softmax over the tokens it is given adds it to its normaliser (Future Forcing)."""

    def __init__(self, ctx: CompressContext, index: torch.Tensor | None = None,
                 outside_log_mass: torch.Tensor | None = None, layer_slots: torch.Tensor | None = None):
        self._ctx, self._index = ctx, index
        self._layer_slots = ctx.view.slots() if layer_slots is None else layer_slots
        self.slots = self._layer_slots if index is None else self._layer_slots[index]  # [N] flat page-storage slots
        self.layer, self.newest_frame, self.tokens_per_frame = ctx.layer, ctx.newest_frame, ctx.tokens_per_frame
        self.outside_log_mass = outside_log_mass

    @classmethod
    def gather(cls, ctx: CompressContext) -> LayerTokens:
        return cls(ctx)

    def subset(self, index: torch.Tensor, outside_log_mass: torch.Tensor | None = None) -> LayerTokens:
        """The tokens at table indices ``index`` [M] (int64, increasing, on the cache's device)."""
        return LayerTokens(self._ctx, index, outside_log_mass, self._layer_slots)

    @cached_property
    def index(self) -> torch.Tensor:  # [N] int64 table indices on the cache's device
        if self._index is not None:
            return self._index
        return torch.arange(self.slots.numel(), device=self.slots.device)

    @cached_property
    def k(self) -> torch.Tensor:  # [N, Hkv, D] post-RoPE
        return self._ctx.view.read("key_cache", self.slots)

    @cached_property
    def v(self) -> torch.Tensor:
        return self._ctx.view.read("value_cache", self.slots)

    @cached_property
    def positions(self) -> torch.Tensor:  # [N, 3] int32 (frame, h, w)
        return self._ctx.view.read("positions", self.slots)

    @cached_property
    def log_mass(self) -> torch.Tensor:  # [N]
        return self._ctx.view.read("log_mass", self.slots)

    @property
    def num_tokens(self) -> int:
        return self.slots.numel()


@dataclass
class Ranking:
    """One layer's tokens that compete for the budget and their scores (``CachePolicy.rank``).

    Invariants: ``tokens.index`` [M] increasing table indices; ``scores`` [M] float32 on the cache's device, higher =
    keep; ``protected`` [N] bool over the whole layer (N = tokens in the layer).  ``tokens`` may include protected
    tokens (scorers with ``scores_whole_layer``) or only removable ones; tokens outside ``tokens`` are kept."""

    tokens: LayerTokens
    scores: torch.Tensor
    protected: torch.Tensor

    @property
    def index(self) -> torch.Tensor:
        return self.tokens.index

    def removable(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(table indices [R], scores [R]) of the ranked tokens that are not protected."""
        free = ~self.protected[self.index]
        if bool(free.all()):
            return self.index, self.scores
        return self.index[free], self.scores[free]

    def keep_scores(self) -> torch.Tensor:
        """[N] scores over the whole layer: +inf for protected tokens and for tokens that were not ranked."""
        full = torch.full_like(self.protected, float("inf"), dtype=torch.float32)
        full[self.index] = self.scores
        full[self.protected] = float("inf")
        return full


class CachePolicy:
    name: ClassVar[str] = "base"
    bounded: ClassVar[bool] = True
    #: frames at the start of the video that are never evicted (0 = none)
    sink_frames: int = 0
    #: the newest block is never evicted (its tokens have not been attended by any later block yet)
    protect_newest_block: ClassVar[bool] = True
    #: True: ``score`` is handed every token of the layer, protected ones too (their scores are ignored), which is
    #: what per-token state indexed by table position needs (H2O's accumulator).  False: only the removable
    #: (unprotected) tokens, or a subset of them under ``PageCandidates``, and the scores may be relative to that
    #: set (Future Forcing normalises a softmax over it)
    scores_whole_layer: ClassVar[bool] = True

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
        """The scorer contract: importance of each of ``tokens``, higher = keep.

        Returns a float tensor [tokens.num_tokens] (any float dtype, on the CPU or the cache's device: the caller
        converts it to float32 on the cache's device), one score per token in the order of ``tokens``, no NaN.
        Called once per compression of a layer, and only when the layer is over budget (``ctx.num_tokens >
        ctx.budget_tokens``), after the write pass's ``observe`` of the same block.  ``tokens`` is the whole layer
        (``scores_whole_layer``, the default) or the removable tokens / a subset of them (``tokens.index``).
        Protected tokens (``protected``: sink frames, the newest block) are the caller's business: they survive
        whatever they score.  Stateful scorers may update state here and re-align it in ``on_compact``."""
        raise NotImplementedError

    @property
    def scorer(self) -> CachePolicy:
        """The policy whose ``score`` ranks tokens: itself; a wrapper answers its inner policy's scorer."""
        return self

    def rank(self, ctx: CompressContext) -> Ranking:
        """Score the tokens that compete for the budget (``scores_whole_layer`` says which) once."""
        tokens = LayerTokens(ctx)
        protected = self.protected(tokens.positions, ctx)
        if not self.scores_whole_layer:
            tokens = tokens.subset((~protected).nonzero().flatten())
        return Ranking(tokens, self.score(tokens, ctx).float().to(ctx.view.device), protected)

    def remove(self, ctx: CompressContext, ranking: Ranking) -> torch.Tensor:
        """Bring the layer to ``ctx.budget_tokens``: keep the highest-scoring tokens (protected and unranked ones
        always), evict the others.  Returns ``survivors`` (``SessionCacheView.keep``'s order) for ``on_compact``."""
        return ctx.view.keep(top_tokens(ranking.keep_scores(), ctx.budget_tokens))

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
        """The template every policy runs: over budget only, ``rank`` -> ``remove`` -> ``on_compact`` (wrappers
        change a step by overriding it and delegate the others, so the outermost object drives the chain)."""
        if not self.bounded or ctx.num_tokens <= ctx.budget_tokens:
            return
        self.on_compact(ctx.layer, self.remove(ctx, self.rank(ctx)))


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
