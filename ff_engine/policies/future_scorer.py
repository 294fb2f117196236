"""Future Forcing's scorer: the expected attention the next frames' queries will pay each cached token.

A cached post-RoPE key k with log-mass log m scores ``z = k.mu_f / sqrt(d) + k^T Sigma_f k / (2 d) + log m``, the
log of the expected ``exp(q.k / sqrt d)`` under the Gaussian future query proxy (``FutureQueryProxy.projected``);
importance ``softmax(z) * ||v||`` (value norm optional) over the tokens it is handed (the removable ones, plus the
mass ``LayerTokens.outside_log_mass`` of those page candidates left out), aggregated over heads (mean or max).

Besides ``score`` it offers the hooks the wrappers ask a scorer for: ``page_estimates`` (``PageCandidates``: each
page's centroid score, or an upper bound of what any of its keys could score) and ``merge_space`` (``Merge``: the
proxy's affine subspace and mean query direction).  Every hook reads the same projected statistics, computed once
per compression (``CompressContext.scratch``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ff_engine.policies.base import CachePolicy, CompressContext, LayerTokens
from ff_engine.policies.future_proxy import FutureQueryProxy, log_mean_exp
from ff_engine.policies.merge import MergeSpace
from ff_engine.policies.page_candidates import PageEstimate
from ff_engine.policies.params import param
from kernels import expected_attention_scores, proxy_factors

#: the declared ranges, shared with ``FutureForcing``'s parameters (stated once)
COV_RANK = {"ge": 1, "doc": "top eigenpairs of the covariance used for scoring (None: all)"}
VALUE_NORM = {"doc": "weigh a token's importance by its value norm"}
AGGREGATION = {"choices": ("mean", "max"), "doc": "how importance is combined over heads"}
SINK_FRAMES = {"ge": 0, "doc": "latent frames at the start of the video that are never evicted"}
MERGE_RANK = {"ge": 0, "doc": "covariance eigenvectors spanning the merge subspace"}
PAGE_RANK = {"choices": ("centroid", "bound"), "doc": "how candidate pages are ranked"}
FUSED = {"doc": "score through the fused kernel (Triton on CUDA, its torch reference else)"}


@dataclass
class FutureForcingScorer(CachePolicy):
    """Scores the removable tokens by their expected future attention (module docstring); ``proxy`` holds the
    per-session query statistics (state ``proxy.*``).  Invariant: a layer is scored only after ``observe`` fed it
    (the engine's write pass precedes every compression)."""

    name = "future-forcing-scorer"
    scores_whole_layer = False

    proxy: FutureQueryProxy = field(default_factory=FutureQueryProxy, repr=False)
    cov_rank: int | None = param(16, **COV_RANK)
    value_norm: bool = param(True, **VALUE_NORM)
    aggregation: str = param("mean", **AGGREGATION)
    sink_frames: int = param(0, **SINK_FRAMES)
    merge_rank: int = param(4, **MERGE_RANK)
    page_rank: str = param("centroid", **PAGE_RANK)
    fused_scoring: bool = param(False, **FUSED)

    def observe(self, layer, q_pre_rope, q, positions):
        self.proxy.update(layer, q_pre_rope)

    def state_dict(self):
        """The proxy's statistics (``proxy.*``).  The page importance cache (``page_estimates``) is keyed by the
        proxy version, which moves on every write pass, so none of it outlives a block and it needs no saving."""
        return {**super().state_dict(), **{f"proxy.{k}": v for k, v in self.proxy.state_dict().items()}}

    def load_state_dict(self, state):
        state = dict(state)
        self.proxy.load_state_dict({k[6:]: state.pop(k) for k in [k for k in state if k.startswith("proxy.")]})
        super().load_state_dict(state)

    # the statistics -------------------------------------------------------------------------------------
    def projected(self, ctx: CompressContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu_f [P, H, D], Sigma_f [P, H, D, D]) for this compression, computed once per context and proxy
        version (``ctx.scratch``)."""
        if not self.proxy.has(ctx.layer):
            raise AssertionError(f"Future Forcing scores layer {ctx.layer} before observe() fed it queries "
                                 f"(compress must follow the block's cache-writing pass)")
        key = ("future-forcing.projected", id(self.proxy), ctx.layer)
        version = self.proxy.version[ctx.layer]
        memo = ctx.scratch.get(key)
        if memo is None or memo[0] is not self.proxy or memo[1] != version:
            memo = (self.proxy, version, self.proxy.projected(ctx.layer, ctx.newest_frame, ctx.token_grid, ctx.rope))
            ctx.scratch[key] = memo
        return memo[2]

    # importance -----------------------------------------------------------------------------------------
    def head_logits(self, k, v, log_mass, mu_f, sigma_f) -> torch.Tensor:
        """Per-head log importance (unnormalised) [H, N]: z + log m (+ log ||v||)."""
        z = FutureQueryProxy.log_expected_exp(k, mu_f, sigma_f, self.cov_rank) + log_mass.float()[None]
        if self.value_norm:
            h = z.shape[0]
            vn = v.float().norm(dim=-1).repeat_interleave(h // v.shape[1], dim=1).T  # [H, N]
            z = z + torch.log(vn.clamp_min(1e-12))
        return z

    def aggregate(self, logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """[H, N] logits and per-head log normalisers [H] -> aggregated importance [N] (a probability)."""
        p = torch.exp(logits - lse[:, None])
        return p.mean(0) if self.aggregation == "mean" else p.max(0).values

    def score(self, tokens: LayerTokens, ctx: CompressContext) -> torch.Tensor:
        """Importance [N] float32 on the cache's device of the tokens handed in (removable ones): each head
        normalised over them plus ``tokens.outside_log_mass``, then aggregated."""
        mu_f, sigma_f = self.projected(ctx)
        rest = tokens.outside_log_mass
        if self.fused_scoring:
            return self.fused_importance(ctx.view, tokens.slots, mu_f, sigma_f, rest)
        logits = self.head_logits(tokens.k, tokens.v, tokens.log_mass, mu_f, sigma_f)
        lse = torch.logsumexp(logits, 1)
        return self.aggregate(logits, lse if rest is None else torch.logaddexp(lse, rest))

    def fused_importance(self, view, slots, mu_f, sigma_f, rest=None) -> torch.Tensor:
        """``aggregate(head_logits(...))`` of the tokens at ``slots`` (of ``view``, a ``SessionCacheView``) through
        ``kernels.expected_attention_scores``: keys and values read in place from the page storage, one launch for
        all terms (Triton on CUDA)."""
        u, lam = proxy_factors(sigma_f, self.cov_rank)
        dev = view.device
        seg = torch.tensor([0, slots.numel()], device=dev)
        return expected_attention_scores(
            view.flat("key_cache"), view.flat("value_cache"), view.flat("log_mass"),
            slots.to(dev), seg, mu_f.float()[None].to(dev), u[None].to(dev), lam[None].to(dev), self.value_norm,
            self.aggregation, None if rest is None else rest[None].to(dev))[2]

    # hooks of the wrappers ------------------------------------------------------------------------------
    def page_estimates(self, ctx: CompressContext) -> PageEstimate:
        """Per-page rank [P] for candidate selection, refreshed lazily (pages whose stored importance carries the
        current proxy version are not recomputed): with ``page_rank="bound"`` the most any token of the page
        could score (``log_expected_exp_bound`` from centroid and radius), so a page holding one important
        token among unimportant ones is not picked for eviction; with ``"centroid"`` the score of the page's
        mean key, which averages such a token away.  Also each page's estimated log attention mass per head
        [H, P] (its centroid's score plus its log total mass), for the normaliser of pages not scored."""
        mu_f, sigma_f = self.projected(ctx)
        summ = ctx.view.page_summaries()
        lin, quad = FutureQueryProxy.score_terms(summ["centroid"], mu_f, sigma_f, self.cov_rank)
        z = log_mean_exp(lin + quad)  # [H, P] at centroids
        page_mass = z + summ["log_mass"][None]
        lse = torch.logsumexp(page_mass, 1)
        if self.page_rank == "bound":
            z = log_expected_exp_bound(lin, quad, summ["radius"], mu_f, sigma_f)
        version = self.proxy.version.get(ctx.layer, 0)
        agg = self.aggregate(z, lse)
        return PageEstimate(self.page_importance(ctx).lookup(summ["pages"], summ["epoch"], version, agg), page_mass)

    def page_importance(self, ctx: CompressContext) -> PageImportance:
        """This session's page importance cache (made on first use, sized to the cache's pages).  A plain attribute,
        not a dataclass field: it is derived data, not configuration or state to snapshot."""
        cached = self.__dict__.get("_page_importance")
        if cached is None:
            cached = self.__dict__["_page_importance"] = PageImportance(ctx.view.num_pages, ctx.view.device)
        return cached

    def forget_page_importance(self) -> None:
        """Drop the cached page importance (a benchmark that re-ranks the same pages under other settings)."""
        self.__dict__.pop("_page_importance", None)

    def merge_space(self, ctx: CompressContext, num_kv_heads: int) -> MergeSpace:
        """The proxy's affine subspace per kv head and its mean query direction (``merge_subspace``)."""
        mu_g, basis = merge_subspace(*self.projected(ctx), num_kv_heads, self.merge_rank)
        return MergeSpace(basis, mu_g)


class PageImportance:
    """Page importance under the scorer's query proxy, per page id, with the proxy version and page epoch
    (``PageSummaries.epoch``) it was computed for: a page is recomputed only when either moved.  Kept by the
    scorer, not the cache: it is the policy's derived data; the cache only says when a page changed."""

    def __init__(self, num_pages: int, device: torch.device):
        self.value = torch.zeros(num_pages + 1, dtype=torch.float32, device=device)
        self.version = torch.full((num_pages + 1,), -1, dtype=torch.int64, device=device)
        self.epoch = torch.full((num_pages + 1,), -1, dtype=torch.int64, device=device)

    def lookup(self, ids: torch.Tensor, epoch: torch.Tensor, version: int, fresh: torch.Tensor) -> torch.Tensor:
        """Importance of pages ``ids``: the cached value where still current, else ``fresh`` (stored)."""
        stale = (self.version[ids] != version) | (self.epoch[ids] != epoch)
        self.value[ids[stale]] = fresh[stale]
        self.version[ids[stale]] = version
        self.epoch[ids[stale]] = epoch[stale]
        return self.value[ids]


def merge_subspace(mu_f, sigma_f, hkv: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per kv head: mean proxy direction mu_g [Hkv, D] and basis [Hkv, D, rank+1] of the affine subspace spanned
    by mu_g and the top ``rank`` eigenvectors of the group's mean Sigma_f (float64)."""
    h, d = mu_f.shape[1], mu_f.shape[2]
    mu_g = mu_f.mean(0).reshape(hkv, h // hkv, d).mean(1)
    sig_g = sigma_f.mean(0).reshape(hkv, h // hkv, d, d).mean(1)
    basis = (mu_g / mu_g.norm(dim=-1, keepdim=True).clamp_min(1e-12))[..., None]  # [Hkv, D, 1]
    if rank:
        evecs = torch.linalg.eigh(sig_g).eigenvectors  # columns, ascending eigenvalues
        basis = torch.cat([basis, evecs[..., -rank:]], dim=2)
    return mu_g, basis


def log_expected_exp_bound(lin: torch.Tensor, quad: torch.Tensor, radius: torch.Tensor, mu_f: torch.Tensor,
                           sigma_f: torch.Tensor) -> torch.Tensor:
    """[H, N] upper bound of ``log_expected_exp`` over every key within ``radius`` [N, Hkv] of a centre (N pages:
    each page's centroid and key radius), from the centre's ``score_terms`` (lin, quad [P, H, N]): for
    ||k - c|| <= r, Cauchy-Schwarz gives ``k.mu <= c.mu + r ||mu||`` and ``sqrt(k^T Sigma k) <= sqrt(c^T Sigma c)
    + r sqrt(lambda_max)``, so ``z(k) <= lin(c) + r ||mu|| / sqrt d + (sqrt(2 d quad(c)) + r sqrt(lambda_max))^2
    / (2 d)`` per (mu, Sigma) — the Quest idea (bound a page's best score from a summary) for the Gaussian
    expected-attention score."""
    h, d = mu_f.shape[1], mu_f.shape[2]
    r = radius.float().repeat_interleave(h // radius.shape[1], dim=1).T  # [H, N]
    lam = torch.linalg.eigvalsh(sigma_f)[..., -1].clamp_min(0).float()[..., None]  # [P, H, 1]
    mu_norm = mu_f.norm(dim=-1).float()[..., None]  # [P, H, 1]
    return log_mean_exp(lin + r * mu_norm / math.sqrt(d)
                        + (torch.sqrt(2 * d * quad.clamp_min(0)) + r * lam.sqrt()).pow(2) / (2 * d))
