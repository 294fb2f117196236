"""Future Forcing: a training-free, future-aware KV policy for AR video (our reconstruction; design.md §3).

1. ``FutureQueryProxy`` (future_proxy.py) keeps running first and second moments of the *pre-RoPE* queries of
   every layer and head (pre-RoPE query statistics are stable over time, post-RoPE ones drift with position), with
   an exponential decay per block or an exact window of recent blocks.
2. It rotates them to the positions the next ``horizon`` frames will occupy (all spatial positions, the
   adapter's 3D RoPE): the *cheap* form averages the rotations (``Rbar = mean_p R_p``, ``mu_f = Rbar mu``,
   ``Sigma_f = Rbar Sigma Rbar^T``); the *exact* form keeps one (mu_p, Sigma_p) per sampled future position and
   averages the expected attention over them.
3. A cached post-RoPE key k with log-mass log m scores ``z = k.mu_f / sqrt(d) + k^T Sigma_f k / (2 d) + log m``,
   the log of the expected ``exp(q.k / sqrt d)`` under a Gaussian query; importance ``softmax(z) * ||v||``
   (value norm optional), aggregated over heads (mean or max): ``FutureForcingScorer`` (future_scorer.py).
4. Every unprotected token is scored exactly (default), or, with ``page_candidates``, pages are ranked by their
   summaries first — by the centroid's score, or by an upper bound of what any of their tokens could score
   (centroid and radius) — and tokens are scored exactly only inside the lowest-ranked candidate pages: O(cache)
   -> O(candidates) per compression, at a measured cost in what is kept (``PageCandidates``).
5. The lowest-importance tokens are merged into their nearest partner among the next-lowest survivors (as many
   as ``candidate_oversample`` x removed) in the proxy's affine subspace (span of mu_f and the top eigenvectors
   of Sigma_f) when keys and values are close, or evicted when nothing is close (``Merge``).  Merge modes:
   ``log-mass`` (mass-weighted mean, log-mass adds, attention applies it as a per-key bias) and ``affine`` (the
   merged key is projected onto the hyperplane whose proxy logit preserves the group's attention mass; no bias,
   so every attention kernel serves it).  The default is ``none`` (evict): on this repo's world models merging
   lost every measurement — it averages post-RoPE keys of different positions, which positional heads cannot
   read (docs/future_forcing.md, "Free rollouts on world model v4, the merge, and the default").
6. Per-layer budgets: uniform, or by each layer's importance spread (``BudgetSplit``).
7. The first ``sink_frames`` latent frames are never evicted (default 3: one Wan block, the frame sink LongLive
   keeps; the budget must hold them).  The scorer alone keeps recent tokens, and a causal video model trained on
   clips that start at frame 0 leans on the first frames: without them v4's free rollouts break down at small
   budgets (docs/future_forcing.md, "The sink default").
``FutureForcing`` is the registered configuration: its parameters build the composition
``BudgetSplit(Merge(PageCandidates(FutureForcingScorer)))`` (``PageCandidates`` only with ``page_candidates``).
Every choice is a named parameter; ``benchmarks/quality.py`` measures the ablations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ff_engine.policies.base import CachePolicy, CompressContext
from ff_engine.policies.budget_split import SPLITS, BudgetSplit
from ff_engine.policies.compose import PolicyWrapper
from ff_engine.policies.future_proxy import FutureQueryProxy, log_mean_exp, pair_matrix, rotation_average
from ff_engine.policies.future_scorer import (
    AGGREGATION,
    COV_RANK,
    FUSED,
    MERGE_RANK,
    PAGE_RANK,
    SINK_FRAMES,
    VALUE_NORM,
    FutureForcingScorer,
    log_expected_exp_bound,
)
from ff_engine.policies.merge import KEY_TOL, MODE, OVERSAMPLE, VALUE_TOL, Merge
from ff_engine.policies.page_candidates import PageCandidates
from ff_engine.policies.params import check_params, param

__all__ = ["FutureForcing", "FutureForcingScorer", "FutureQueryProxy", "log_expected_exp_bound", "log_mean_exp",
           "pair_matrix", "rotation_average"]


@dataclass
class FutureForcing(PolicyWrapper):
    """Future Forcing: a training-free, future-aware KV policy for AR video (our reconstruction; design.md §3).

    The registered configuration (``make_policy("future-forcing", ...)``): ``__post_init__`` builds
    ``inner = BudgetSplit(Merge(PageCandidates(FutureForcingScorer)))`` from the parameters once (``PageCandidates``
    only with ``page_candidates``) and every call goes to that chain.  Its state keys are those the monolithic
    policy kept: ``proxy.*`` (scorer), ``stats.*`` (Merge), ``layer_spread.*`` and ``min_tokens`` (BudgetSplit).
    Subclasses change the proxy (``_make_proxy``) or what ``observe`` feeds it (``PostRopeExpectedAttention``)."""

    name = "future-forcing"

    inner: CachePolicy = field(init=False, repr=False, compare=False)  # built from the parameters below
    # Upper bounds keep the proxy's own memory small: horizon x tokens/frame positions, ``samples`` dense [D, D]
    # rotations, ``window`` blocks of [H, D, D] sums per layer.
    horizon: int = param(6, ge=1, le=64, doc="future latent frames whose positions the query proxy covers")
    form: str = param("cheap", choices=("cheap", "moment", "exact"), doc="how the proxy is rotated to the future")
    samples: int = param(16, ge=1, le=1024, doc="sampled future positions of the exact form")
    decay: float = param(0.5, ge=0, lt=1, doc="weight of the past query statistics per block")
    window: int | None = param(None, ge=1, le=64, doc="keep exactly the last this many blocks (None: decay)")
    covariance: bool = param(True, doc="use the query covariance (False: the mean only)")
    cov_rank: int | None = param(16, **COV_RANK)
    value_norm: bool = param(True, **VALUE_NORM)
    aggregation: str = param("mean", **AGGREGATION)
    # 3 latent frames (one Wan block: LongLive's frame sink) since session 18: without them v4's free rollouts
    # break down at small budgets, with them the probe is unchanged (docs/future_forcing.md, "The sink default")
    sink_frames: int = param(3, **SINK_FRAMES)
    merge: str = param("none", **MODE)
    merge_rank: int = param(4, **MERGE_RANK)
    merge_key_tol: float = param(0.5, **KEY_TOL)
    merge_value_tol: float = param(1.0, **VALUE_TOL)
    budget_split: str = param("uniform", choices=SPLITS, doc="per-layer budgets")
    page_candidates: bool = param(False, doc="rank pages by their summaries before scoring tokens")
    page_rank: str = param("centroid", **PAGE_RANK)
    candidate_oversample: float = param(2.0, **OVERSAMPLE)
    fused_scoring: bool = param(False, **FUSED)

    def __post_init__(self):
        check_params(self)  # first: a bad parameter is one ConfigError naming it, before anything is built
        scorer = FutureForcingScorer(self._make_proxy(), self.cov_rank, self.value_norm, self.aggregation,
                                     self.sink_frames, self.merge_rank, self.page_rank, self.fused_scoring)
        policy = PageCandidates(scorer, self.candidate_oversample) if self.page_candidates else scorer
        policy = Merge(policy, self.merge, self.merge_key_tol, self.merge_value_tol, self.candidate_oversample)
        self.inner = BudgetSplit(policy, self.budget_split)
        super().__post_init__()

    def _make_proxy(self) -> FutureQueryProxy:
        return FutureQueryProxy(self.horizon, self.decay, self.window, self.form, self.samples, self.covariance)

    @property
    def proxy(self) -> FutureQueryProxy:
        """The scorer's query statistics (per session: the engine deep-copies the configuration)."""
        return self.scorer.proxy

    @property
    def stats(self) -> dict[str, int]:
        """The merge stage's decision counters: merged, evicted, candidates (tokens ranked), tokens."""
        return next(p for p in self.chain() if isinstance(p, Merge)).stats

    # what page candidates cost (benchmarks/page_candidates.py) ------------------------------------------
    def _candidates(self) -> PageCandidates:
        return PageCandidates(self.scorer, self.candidate_oversample)

    def candidate_recall(self, ctx: CompressContext) -> float:
        """Share of the tokens exact full scoring would remove that page-candidate selection also removes."""
        return self._candidates().recall(ctx)

    def candidate_regret(self, ctx: CompressContext) -> float:
        """Removed importance of page-candidate selection over that of exact scoring (``PageCandidates.regret``)."""
        return self._candidates().regret(ctx)
