"""Per-layer budgets, around any scorer: layers whose importance is spread over many tokens get more of the
session's pages, layers whose importance sits on a few get fewer.

At every compression the wrapper records, per layer, the *spread* of the scores of the removable tokens ranked —
the effective number of important tokens, ``exp(entropy(p))`` — and the number of protected tokens.  The next
block's ``layer_budgets`` (``split="importance"``) shares the session's pages (``num_layers x budget pages``)
between layers in proportion to their spread, whole pages each, never fewer than the pages the protected tokens
fill, and falls back to the uniform split when that floor does not fit or a layer has no spread yet (the first
block).  ``split="uniform"`` records but always splits uniformly (Future Forcing's default).

``p`` from the scores: non-negative scores (attention-like importance: Future Forcing, SnapKV, H2O) are read as
weights, ``p = s / sum(s)``; scores with a negative value (log-domain: key norm) as logits, ``p = softmax(s)``; a
layer whose weights sum to zero counts every ranked token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ff_engine.errors import SnapshotError
from ff_engine.policies.base import CompressContext, Ranking, layer_tensors_state, take_layer_state
from ff_engine.policies.compose import PolicyWrapper
from ff_engine.policies.params import param

SPLITS = ("uniform", "importance")


@dataclass
class BudgetSplit(PolicyWrapper):
    """Per-layer budgets by each layer's importance spread at the last compression (module docstring)."""

    split: str = param("importance", choices=SPLITS, doc="per-layer budgets")
    _spread: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _min_tokens: int = field(default=0, init=False, repr=False, compare=False)

    def rank(self, ctx: CompressContext) -> Ranking:
        ranking = self.inner.rank(ctx)
        self._min_tokens = int(ranking.protected.sum())
        _, scores = ranking.removable()
        self._spread[ctx.layer] = effective_tokens(scores)
        return ranking

    def layer_budgets(self, budget_tokens: int, num_layers: int, page_size: int) -> list[int]:
        if self.split == "uniform" or len(self._spread) < num_layers:
            return [budget_tokens] * num_layers
        total_pages = num_layers * (budget_tokens // page_size)
        w = torch.tensor([self._spread[i] for i in range(num_layers)], dtype=torch.float64)
        pages = torch.floor(w / w.sum() * total_pages).long()
        pages = pages.clamp_min(max(1, math.ceil(self._min_tokens / page_size)))
        if int(pages.sum()) > total_pages:
            return [budget_tokens] * num_layers
        return [int(p) * page_size for p in pages]

    def state_dict(self):
        """The inner policy's state, each layer's spread at the last compression (``layer_spread.<layer>``) and the
        protected tokens then (``min_tokens``, the floor of a layer's budget)."""
        own = {**layer_tensors_state("layer_spread", self._spread), "min_tokens": self._min_tokens}
        return {**super().state_dict(), **own}

    def load_state_dict(self, state):
        state = dict(state)
        self._spread = take_layer_state("layer_spread", state, float)
        min_tokens = state.pop("min_tokens", None)
        if not isinstance(min_tokens, int) or isinstance(min_tokens, bool):
            raise SnapshotError("budget split state needs an integer min_tokens")
        self._min_tokens = min_tokens
        super().load_state_dict(state)


def effective_tokens(scores: torch.Tensor) -> float:
    """``exp(entropy(p))`` of the scores read as a distribution (module docstring): 1 when one token holds all
    the importance, the number of tokens when it is uniform."""
    if bool((scores < 0).any()):
        p = torch.softmax(scores.float(), 0)
    else:
        total = scores.sum()
        if not bool(total > 0):
            return float(scores.numel())
        p = scores / total
    return float(torch.exp(-(p * torch.log(p + 1e-30)).sum()))
