"""Policies as composition (kvpress's design): a wrapper is a small dataclass around any scorer policy that
changes one step of ``CachePolicy.compress`` and hands every other call to the policy inside it.

    BudgetSplit(Merge(PageCandidates(scorer)))      # Future Forcing is this, built from its parameters

``compress`` is the base class's template (over budget: ``rank`` -> ``remove`` -> ``on_compact``) run on the
outermost object, so each wrapper's override is reached whatever the nesting.  Invariants of a chain:
  * exactly one scorer, innermost (``policy.scorer``), with ``PageCandidates`` (if any) directly around it, since
    it changes which tokens the scorer sees; ``score``, ``protected``, ``validate``, ``observe``,
    ``on_compact`` and the scorer's optional hooks (``page_estimates``, ``merge_space``) are the scorer's;
  * state: ``state_dict()`` is the union of the scorer's and each wrapper's own keys, so a wrapper type appears at
    most once in a chain (two would write the same keys: ``ConfigError``); ``load_state_dict`` takes each
    wrapper's keys and hands the rest inwards, so ``load_state_dict(state_dict())`` on a chain built from the same
    configuration continues bit-identically;
  * wrappers hold no per-token state: ``on_compact`` is handed down to the scorer unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ff_engine.errors import ConfigError
from ff_engine.policies.base import CachePolicy, CompressContext, LayerTokens, Ranking


@dataclass
class PolicyWrapper(CachePolicy):
    """Delegates every step to ``inner``; subclasses override the one they change (and ``state_dict`` /
    ``load_state_dict`` for their own state, calling these).  ``inner`` is any bounded policy."""

    inner: CachePolicy

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.inner, CachePolicy):
            raise ConfigError(f"{type(self).__name__} wraps a CachePolicy, got {type(self.inner).__name__}")
        if not self.inner.bounded:
            raise ConfigError(f"{type(self).__name__} needs a bounded policy; {self.inner.name!r} never evicts")
        if type(self) in {type(p) for p in self.chain()[1:]}:
            raise ConfigError(f"{type(self).__name__} appears twice in one policy chain (their state would collide)")

    def chain(self) -> list[CachePolicy]:
        """This wrapper, then every policy inside it, the scorer last."""
        inner = self.inner.chain() if isinstance(self.inner, PolicyWrapper) else [self.inner]
        return [self, *inner]

    @property
    def name(self) -> str:  # a registered composition (Future Forcing) declares its own
        return f"{type(self).__name__.lower()}({self.inner.name})"

    @property
    def sink_frames(self) -> int:
        return self.inner.sink_frames

    @property
    def scores_whole_layer(self) -> bool:
        return self.inner.scores_whole_layer

    @property
    def scorer(self) -> CachePolicy:
        return self.inner.scorer

    def validate(self, budget_frames, frames_per_block):
        self.inner.validate(budget_frames, frames_per_block)

    def protected(self, positions: torch.Tensor, ctx: CompressContext) -> torch.Tensor:
        return self.inner.protected(positions, ctx)

    def observe(self, layer, q_pre_rope, q, positions):
        self.inner.observe(layer, q_pre_rope, q, positions)

    def score(self, tokens: LayerTokens, ctx: CompressContext) -> torch.Tensor:
        return self.inner.score(tokens, ctx)

    def rank(self, ctx: CompressContext) -> Ranking:
        return self.inner.rank(ctx)

    def remove(self, ctx: CompressContext, ranking: Ranking) -> torch.Tensor:
        return self.inner.remove(ctx, ranking)

    def on_compact(self, layer, survivors):
        self.inner.on_compact(layer, survivors)

    def layer_budgets(self, budget_tokens: int, num_layers: int, page_size: int) -> list[int]:
        return self.inner.layer_budgets(budget_tokens, num_layers, page_size)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)
