"""Page candidates, around a scorer with page estimates: rank the layer's pages from their summaries first, then
score tokens only inside the lowest-ranked pages, enough of them to hold ``oversample x removed`` removable tokens:
O(cache) -> O(candidates) per compression, at a measured cost in what is kept (docs/future_forcing.md).

A page summary (centroid key, key radius, log total mass; ``PagedKVCache.page_summaries``) says nothing about a
scorer's own criterion, so ranking pages *needs* the scorer: it must offer ``page_estimates(ctx) ->
PageEstimate`` (Future Forcing scores each page's centroid, or bounds what any key of the page could score) and
accept any subset of its removable tokens in ``score`` (``scores_whole_layer = False``).  Wrapping a scorer without
them is a ``ConfigError`` at construction.  The scorer is also told the estimated per-head log attention mass of
the removable pages it was not handed (``LayerTokens.outside_log_mass``), so a softmax over the candidates is
normalised as if every removable token were there: normalising over page estimates alone (centroids, which by
Jensen underestimate a page's mass, the more so the more its keys spread) reweights the heads and, on the world
model, cost more of the returning subjects' tokens than the candidate choice itself.

``recall`` and ``regret`` measure the cost: what these candidates would remove against exact scoring of every
removable token (the scorer's own ``rank``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from ff_engine.errors import ConfigError
from ff_engine.policies.base import CompressContext, LayerTokens, Ranking
from ff_engine.policies.compose import PolicyWrapper
from ff_engine.policies.merge import OVERSAMPLE
from ff_engine.policies.params import param


@dataclass
class PageEstimate:
    """A scorer's view of the layer's pages (in the layer's page order, P pages): ``rank`` [P] float, lower =
    offered for eviction first; ``log_mass`` [H, P] or None, each page's estimated per-head log attention mass
    (the normaliser of pages left out; None: the scorer's scores are not a softmax over tokens)."""

    rank: torch.Tensor
    log_mass: torch.Tensor | None = None


class PageEstimator(Protocol):
    def page_estimates(self, ctx: CompressContext) -> PageEstimate: ...


@dataclass
class PageCandidates(PolicyWrapper):
    """Score only the removable tokens of the lowest-ranked pages (module docstring).  Wraps the scorer itself:
    it changes which tokens the scorer sees, so other wrappers go around it."""

    oversample: float = param(2.0, **OVERSAMPLE)

    def __post_init__(self):
        super().__post_init__()
        who = type(self.inner).__name__
        if isinstance(self.inner, PolicyWrapper):
            raise ConfigError(f"PageCandidates wraps the scorer itself (it changes which tokens the scorer sees), "
                              f"got the wrapper {who}: put {who} around PageCandidates instead")
        if not hasattr(self.inner, "page_estimates") or self.inner.scores_whole_layer:
            raise ConfigError(f"PageCandidates needs a scorer with page estimates (page_estimates) that scores any "
                              f"subset of its removable tokens (scores_whole_layer = False); {who} is not one")

    def rank(self, ctx: CompressContext) -> Ranking:
        tokens = LayerTokens(ctx)
        protected = self.inner.protected(tokens.positions, ctx)
        cand, outside = self.candidates(ctx, protected, self.inner.page_estimates(ctx))
        tokens = tokens.subset(cand, outside)
        return Ranking(tokens, self.inner.score(tokens, ctx).float().to(ctx.view.device), protected)

    def candidates(self, ctx: CompressContext, protected: torch.Tensor, pages: PageEstimate):
        """Table indices [M] of every removable token of the lowest-ranked pages holding ``oversample x removed``
        of them, and the per-head log mass [H] of the removable pages not chosen (None if none or no estimate)."""
        n = protected.numel()
        dev = protected.device
        free_per_page = torch.zeros(pages.rank.numel(), dtype=torch.long, device=dev)
        page_of = torch.arange(n, device=dev) // ctx.view.page_size
        free_per_page.index_add_(0, page_of, (~protected).long())
        est = pages.rank.masked_fill(free_per_page == 0, float("inf"))
        order = torch.argsort(est)
        need = math.ceil(self.oversample * (ctx.num_tokens - ctx.budget_tokens))
        cum = torch.cumsum(free_per_page[order], 0)
        take = int(torch.searchsorted(cum, torch.tensor(min(need, int(cum[-1])), device=dev))) + 1
        chosen = torch.zeros(est.numel(), dtype=torch.bool, device=dev)
        chosen[order[:take]] = True
        cand = (chosen[page_of] & ~protected).nonzero().flatten()
        rest = ~chosen & (free_per_page > 0)
        if pages.log_mass is None or not rest.any():
            return cand, None
        return cand, torch.logsumexp(pages.log_mass[:, rest], 1)

    # what the candidates cost -------------------------------------------------------------------------------
    def victims(self, ctx: CompressContext, exact: bool) -> torch.Tensor:
        """Table indices (sorted) of the ``num_tokens - budget_tokens`` lowest-scoring candidates, without touching
        the cache: of these page candidates, or (``exact``) of every removable token."""
        cand, imp = (self.inner.rank(ctx) if exact else self.rank(ctx)).removable()
        return lowest(cand, imp, ctx)

    def recall(self, ctx: CompressContext) -> float:
        """Share of the tokens exact scoring would remove that page-candidate selection also removes."""
        exact = set(self.victims(ctx, exact=True).tolist())
        if not exact:
            return 1.0
        return len(exact & set(self.victims(ctx, exact=False).tolist())) / len(exact)

    def regret(self, ctx: CompressContext) -> float:
        """Importance (exact scores) of the tokens page-candidate selection removes over that of the tokens exact
        scoring removes: 1 is as good as exact, 2 removes twice the attention the future queries would pay.
        Recall counts a near-tie miss like a disaster; this weighs what is lost."""
        cand, imp = self.inner.rank(ctx).removable()
        full = torch.zeros(ctx.num_tokens, device=imp.device)
        full[cand] = imp
        exact = full[lowest(cand, imp, ctx)].sum()
        return float(full[self.victims(ctx, exact=False)].sum() / exact.clamp_min(1e-30))


def lowest(cand: torch.Tensor, imp: torch.Tensor, ctx: CompressContext) -> torch.Tensor:
    """The ``num_tokens - budget_tokens`` candidates of lowest score, sorted by table index (ties: argsort's)."""
    return torch.sort(cand[torch.argsort(imp)[: ctx.num_tokens - ctx.budget_tokens]]).values
