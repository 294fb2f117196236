"""Future Forcing: a training-free, future-aware KV policy for AR video (our reconstruction; design.md §3).

1. ``FutureQueryProxy`` keeps running first and second moments of the *pre-RoPE* queries of every layer and
   head (pre-RoPE query statistics are stable over time, post-RoPE ones drift with position), with an
   exponential decay per block or an exact window of recent blocks.
2. It rotates them to the positions the next ``horizon`` frames will occupy (all spatial positions, the
   adapter's 3D RoPE): the *cheap* form averages the rotations (``Rbar = mean_p R_p``, ``mu_f = Rbar mu``,
   ``Sigma_f = Rbar Sigma Rbar^T``); the *exact* form keeps one (mu_p, Sigma_p) per sampled future position and
   averages the expected attention over them.
3. A cached post-RoPE key k with log-mass log m scores ``z = k.mu_f / sqrt(d) + k^T Sigma_f k / (2 d) + log m``,
   the log of the expected ``exp(q.k / sqrt d)`` under a Gaussian query; importance ``softmax(z) * ||v||``
   (value norm optional), aggregated over heads (mean or max).
4. Every unprotected token is scored exactly (default), or, with ``page_candidates``, pages are ranked by their
   summaries first — by the centroid's score, or by an upper bound of what any of their tokens could score
   (centroid and radius) — and tokens are scored exactly only inside the lowest-ranked candidate pages: O(cache)
   -> O(candidates) per compression, at a measured cost in what is kept (README, "Page candidates").
5. The lowest-importance tokens are merged into their nearest partner among the next-lowest survivors (as many
   as ``candidate_oversample`` x removed) in the proxy's affine subspace (span of mu_f and the top eigenvectors
   of Sigma_f) when keys and values are close, or evicted when nothing is close.  Merge modes: ``log-mass``
   (mass-weighted mean, log-mass adds, attention applies it as a per-key bias) and ``affine`` (the merged key is projected onto the hyperplane
   whose proxy logit preserves the group's attention mass; no bias, so every attention kernel serves it).
Every choice is a named parameter; ``benchmarks/quality.py`` measures the ablations.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch

from ff_engine.errors import ConfigError, SnapshotError
from ff_engine.policies.base import CachePolicy, CompressContext, LayerTokens, take_layer_state
from ff_engine.policies.params import param
from kernels import expected_attention_scores, proxy_factors


# ---- rotations --------------------------------------------------------------------------------------
def pair_matrix(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Dense [D, D] block-diagonal matrix of 2x2 blocks [[c, -s], [s, c]] acting on adjacent pairs, float64 on
    ``cos``'s device."""
    d2 = cos.numel()
    m = torch.zeros(2 * d2, 2 * d2, dtype=torch.float64, device=cos.device)
    i = torch.arange(d2, device=cos.device)
    m[2 * i, 2 * i], m[2 * i, 2 * i + 1] = cos, -sin
    m[2 * i + 1, 2 * i], m[2 * i + 1, 2 * i + 1] = sin, cos
    return m


def rotation_average(angles: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``mean_p R_p M R_p^T`` for the RoPE rotations of angles [P, D/2] and matrices m [..., D, D], in
    O(P D^2 + D^2) instead of P dense products: each 2x2 rotation is ``cos I + sin J`` (J the quarter turn), so
    block (i, j) of the mean is ``E[c_i c_j] M_ij - E[c_i s_j] M_ij J + E[s_i c_j] J M_ij - E[s_i s_j] J M_ij J``
    and only the four [D/2, D/2] products of cosines and sines over positions are needed."""
    c, s = torch.cos(angles).double(), torch.sin(angles).double()
    n = angles.shape[0]
    up = lambda x: x.repeat_interleave(2, 0).repeat_interleave(2, 1)  # noqa: E731  [D/2, D/2] -> [D, D]
    cc, cs, sc, ss = (up(a.T @ b / n) for a, b in ((c, c), (c, s), (s, c), (s, s)))
    j = pair_matrix(torch.zeros_like(c[0]), torch.ones_like(c[0]))
    m = m.double()
    return cc * m - cs * (m @ j) + sc * (j @ m) - ss * (j @ m @ j)


@dataclass
class FutureQueryProxy:
    """Per-layer pre-RoPE query moments and their projection onto future positions.

    horizon: future frames whose positions the proxy covers (>= 1).  decay: weight of the past per block in
    [0, 1) (0: latest block only).  window: keep exactly the last ``window`` blocks instead (overrides decay).
    form: ``cheap`` (mean rotation applied to mu and Sigma), ``moment`` (the mean and covariance of the future
    query mixture over positions: ``mu_f = Rbar mu``, ``Sigma_f = mean_p R_p (Sigma + mu mu^T) R_p^T - mu_f
    mu_f^T``, which keeps the spread the rotations add) or ``exact`` (``samples`` sampled future positions).
    covariance: use Sigma (False: mean only).  rotate: False skips the rotation (ExpectedAttention on post-RoPE queries).
    """

    horizon: int = 6
    decay: float = 0.5
    window: int | None = None
    form: str = "cheap"
    samples: int = 16
    covariance: bool = True
    rotate: bool = True
    seed: int = 0
    _sums: dict = field(default_factory=dict, repr=False)
    version: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not isinstance(self.horizon, int) or self.horizon < 1:
            raise ConfigError(f"horizon must be an integer >= 1 (future frames), got {self.horizon!r}")
        if not 0.0 <= self.decay < 1.0:
            raise ConfigError(f"decay must be in [0, 1), got {self.decay}")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ConfigError(f"window must be None or an integer >= 1 (blocks), got {self.window!r}")
        if self.form not in ("cheap", "moment", "exact"):
            raise ConfigError(f"form must be 'cheap', 'moment' or 'exact', got {self.form!r}")
        if self.samples < 1:
            raise ConfigError(f"samples must be >= 1, got {self.samples}")

    # statistics
    def update(self, layer: int, q: torch.Tensor) -> None:
        """q [N, H, D] (pre-RoPE) of one block's cache-writing pass."""
        q = q.double()
        new = (float(q.shape[0]), q.sum(0), torch.einsum("nhd,nhe->hde", q, q))
        if self.window is not None:
            self._sums.setdefault(layer, deque(maxlen=self.window)).append(new)
        else:
            old = self._sums.get(layer)
            self._sums[layer] = new if old is None else tuple(self.decay * o + n for o, n in zip(old, new))
        self.version[layer] = self.version.get(layer, 0) + 1

    def has(self, layer: int) -> bool:
        return layer in self._sums

    def state_dict(self) -> dict[str, torch.Tensor | int | float]:
        """The running sums per layer (``sums.<layer>.{w,s1,s2}``; with a window one set per kept block,
        ``sums.<layer>.<i>.{w,s1,s2}`` oldest first) and each layer's statistics version (``version.<layer>``)."""
        out: dict[str, torch.Tensor | int | float] = {f"version.{layer}": v for layer, v in self.version.items()}
        for layer, sums in self._sums.items():
            entries = list(sums) if self.window is not None else [sums]
            for i, (w, s1, s2) in enumerate(entries):
                key = f"sums.{layer}.{i}" if self.window is not None else f"sums.{layer}"
                out.update({f"{key}.w": w, f"{key}.s1": s1, f"{key}.s2": s2})
        return out

    def load_state_dict(self, state: dict) -> None:
        """Inverse of ``state_dict`` for a proxy built with the same parameters; ``SnapshotError`` if malformed."""
        state = dict(state)
        self.version = take_layer_state("version", state, int)
        sums: dict[int, dict[str, dict[str, object]]] = {}  # layer -> entry ("" without a window) -> part
        for key in list(state):
            parts = key.split(".")
            ok = len(parts) == (4 if self.window is not None else 3) and parts[0] == "sums" and parts[-1] in (
                "w", "s1", "s2") and all(p.isdigit() for p in parts[1:-1])
            if not ok:
                raise SnapshotError(f"unexpected Future Forcing proxy state key {key!r}")
            entry = parts[2] if self.window is not None else ""
            sums.setdefault(int(parts[1]), {}).setdefault(entry, {})[parts[-1]] = state.pop(key)
        self._sums = {}
        for layer, entries in sums.items():
            order = sorted(entries, key=lambda e: int(e) if e else 0)
            if self.window is not None and (order != [str(i) for i in range(len(order))] or len(order) > self.window):
                raise SnapshotError(f"proxy window state of layer {layer} must hold entries 0..n-1, n <= {self.window}")
            triples = []
            for e in order:
                part = entries[e]
                if set(part) != {"w", "s1", "s2"} or not isinstance(part["w"], float) or not all(
                        isinstance(part[n], torch.Tensor) and part[n].dtype == torch.float64 for n in ("s1", "s2")):
                    raise SnapshotError(f"proxy sums of layer {layer} need a float w and float64 s1, s2")
                triples.append((part["w"], part["s1"], part["s2"]))
            self._sums[layer] = deque(triples, maxlen=self.window) if self.window is not None else triples[0]

    def moments(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """mu [H, D], Sigma [H, D, D] (float64)."""
        s = self._sums[layer]
        if self.window is not None:
            s = tuple(sum(x[i] for x in s) for i in range(3))
        w, s1, s2 = s
        mu = s1 / w
        sigma = s2 / w - torch.einsum("hd,he->hde", mu, mu)
        if not self.covariance:
            sigma = torch.zeros_like(sigma)
        return mu, sigma

    def future_positions(self, newest_frame: int, token_grid: tuple[int, int], max_frames: int | None = None
                         ) -> torch.Tensor:
        """The next ``horizon`` frames' token positions [horizon * gh * gw, 3]; frames past a RoPE table of
        ``max_frames`` (where every stream ends) are clamped to its last frame."""
        gh, gw = token_grid
        frames = torch.arange(newest_frame + 1, newest_frame + 1 + self.horizon)
        if max_frames is not None:
            frames = frames.clamp(max=max_frames - 1)
        f, h, w = torch.meshgrid(frames,
                                 torch.arange(gh), torch.arange(gw), indexing="ij")
        return torch.stack([f, h, w], -1).reshape(-1, 3).to(torch.int32)

    def projected(self, layer: int, newest_frame: int, token_grid, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu_f [P, H, D], Sigma_f [P, H, D, D]) float64: P = 1 for the cheap form, ``samples`` for exact."""
        mu, sigma = self.moments(layer)
        if not self.rotate or rope is None:
            return mu[None], sigma[None]
        positions = self.future_positions(newest_frame, token_grid, getattr(rope, "max_frames", None))
        angles = rope.phases(positions).to(mu.device)  # [M, D/2]; the adapter's RoPE table lives on the CPU
        if self.form in ("cheap", "moment"):  # the mean rotation Rbar
            mats = pair_matrix(torch.cos(angles).mean(0), torch.sin(angles).mean(0))[None]
        else:
            g = torch.Generator().manual_seed(self.seed + 7919 * newest_frame)
            pick = torch.randperm(angles.shape[0], generator=g)[: self.samples].to(mu.device)
            mats = torch.stack([pair_matrix(torch.cos(a), torch.sin(a)) for a in angles[pick]])
        mu_f = torch.einsum("pde,he->phd", mats, mu)
        if self.form != "moment":
            return mu_f, torch.einsum("pde,hef,pgf->phdg", mats, sigma, mats)
        if not self.covariance:
            return mu_f, torch.zeros_like(sigma)[None]
        second = rotation_average(angles, sigma + torch.einsum("hd,he->hde", mu, mu))
        return mu_f, (second - torch.einsum("hd,he->hde", mu_f[0], mu_f[0]))[None]

    @staticmethod
    def log_expected_exp(k: torch.Tensor, mu_f: torch.Tensor, sigma_f: torch.Tensor,
                         cov_rank: int | None = None) -> torch.Tensor:
        """z [H, N] = log mean_p E_q[exp(q.k / sqrt d)] for keys k [N, Hkv, D] (GQA-aware)."""
        lin, quad = FutureQueryProxy.score_terms(k, mu_f, sigma_f, cov_rank)
        return log_mean_exp(lin + quad)

    @staticmethod
    def score_terms(k: torch.Tensor, mu_f: torch.Tensor, sigma_f: torch.Tensor,
                    cov_rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The linear ``k.mu / sqrt d`` and quadratic ``k^T Sigma k / (2 d)`` terms [P, H, N] of
        ``log E_q[exp(q.k / sqrt d)]`` for each of the P (mu, Sigma) of the proxy, keys k [N, Hkv, D].

        ``cov_rank`` r keeps the top r eigenpairs of Sigma_f for the quadratic term: O(N H D r) instead of
        O(N H D^2) (None: exact)."""
        n, hkv, d = k.shape
        h, rep = mu_f.shape[1], mu_f.shape[1] // hkv
        # float32 over the keys (the O(N) part), float64 only for the small per-head statistics
        kk = k.float().transpose(0, 1)  # [Hkv, N, D]; query head j reads kv head j // rep
        lins, quads = [], []
        for p in range(mu_f.shape[0]):  # one (mu, Sigma) at a time keeps memory at O(N H D)
            mu = mu_f[p].float().reshape(hkv, rep, d)
            lin = torch.matmul(kk, mu.transpose(1, 2)).permute(0, 2, 1).reshape(h, n) / math.sqrt(d)
            if cov_rank is None or cov_rank >= d:
                sig = sigma_f[p].float().reshape(hkv, rep, d, d)
                quad = torch.einsum("gnd,grde,gne->grn", kk, sig, kk).reshape(h, n) / (2 * d)
            else:
                evals, evecs = torch.linalg.eigh(sigma_f[p])  # ascending
                lam = evals[:, -cov_rank:].clamp_min(0).float().reshape(hkv, rep, 1, cov_rank)
                u = evecs[..., -cov_rank:].float().reshape(hkv, rep, d, cov_rank)
                proj = torch.matmul(kk[:, None], u)  # [Hkv, rep, N, r]
                quad = (proj.pow(2) * lam).sum(-1).reshape(h, n) / (2 * d)
            lins.append(lin)
            quads.append(quad)
        return torch.stack(lins), torch.stack(quads)


def log_mean_exp(z: torch.Tensor) -> torch.Tensor:
    """log of the mean of exp(z) over the proxy's P positions (dim 0), float32."""
    return (torch.logsumexp(z, 0) - math.log(z.shape[0])).float()


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


def _nearest(a: torch.Tensor, b: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest row of b for every row of a (distance, index), in chunks of a to bound memory."""
    ds, ix = [], []
    for i in range(0, a.shape[0], chunk):
        d, j = torch.cdist(a[i:i + chunk], b).min(1)
        ds.append(d)
        ix.append(j)
    return torch.cat(ds), torch.cat(ix)


# ---- the policy ---------------------------------------------------------------------------------------
@dataclass
class FutureForcing(CachePolicy):
    name = "future-forcing"

    # Upper bounds keep the proxy's own memory small: horizon x tokens/frame positions, ``samples`` dense [D, D]
    # rotations, ``window`` blocks of [H, D, D] sums per layer.
    horizon: int = param(6, ge=1, le=64, doc="future latent frames whose positions the query proxy covers")
    form: str = param("cheap", choices=("cheap", "moment", "exact"), doc="how the proxy is rotated to the future")
    samples: int = param(16, ge=1, le=1024, doc="sampled future positions of the exact form")
    decay: float = param(0.5, ge=0, lt=1, doc="weight of the past query statistics per block")
    window: int | None = param(None, ge=1, le=64, doc="keep exactly the last this many blocks (None: decay)")
    covariance: bool = param(True, doc="use the query covariance (False: the mean only)")
    cov_rank: int | None = param(16, ge=1, doc="top eigenpairs of the covariance used for scoring (None: all)")
    value_norm: bool = param(True, doc="weigh a token's importance by its value norm")
    aggregation: str = param("mean", choices=("mean", "max"), doc="how importance is combined over heads")
    sink_frames: int = param(0, ge=0, doc="latent frames at the start of the video that are never evicted")
    merge: str = param("log-mass", choices=("none", "log-mass", "affine"), doc="how removed tokens are merged")
    merge_rank: int = param(4, ge=0, doc="covariance eigenvectors spanning the merge subspace")
    merge_key_tol: float = param(0.5, ge=0, doc="largest key distance of a merge, relative to the keys' spread")
    merge_value_tol: float = param(1.0, ge=0, doc="largest value distance of a merge, relative to the spread")
    budget_split: str = param("uniform", choices=("uniform", "importance"), doc="per-layer budgets")
    page_candidates: bool = param(False, doc="rank pages by their summaries before scoring tokens")
    page_rank: str = param("centroid", choices=("centroid", "bound"), doc="how candidate pages are ranked")
    # more candidates than the cache holds is the same as all of them; the cap keeps ceil(x * n) finite
    candidate_oversample: float = param(2.0, ge=1, le=100, doc="candidates (and merge partners) per removed token")
    fused_scoring: bool = param(False, doc="score through the fused kernel (Triton on CUDA, its torch reference else)")
    proxy: FutureQueryProxy = field(init=False, repr=False)
    stats: dict = field(default_factory=lambda: {"merged": 0, "evicted": 0, "candidates": 0, "tokens": 0},
                        init=False, repr=False)

    def __post_init__(self):
        super().__post_init__()
        self.proxy = self._make_proxy()
        self._layer_spread: dict[int, float] = {}  # effective number of important tokens per layer (last block)
        self._min_tokens = 0  # protected tokens per layer at the last compression (a floor for budget splits)

    def _make_proxy(self) -> FutureQueryProxy:
        return FutureQueryProxy(self.horizon, self.decay, self.window, self.form, self.samples, self.covariance)

    def observe(self, layer, q_pre_rope, q, positions):
        self.proxy.update(layer, q_pre_rope)

    def state_dict(self):
        """The proxy's statistics (``proxy.*``), the last block's per-layer spread and protected floor (what
        ``budget_split="importance"`` reads) and the counters in ``stats``.  Importance cached in the page
        summaries is keyed by the proxy version, which moves on every write pass, so none of it outlives a
        block and it needs no saving."""
        out = {f"proxy.{k}": v for k, v in self.proxy.state_dict().items()}
        out.update({f"layer_spread.{layer}": s for layer, s in self._layer_spread.items()})
        out.update({f"stats.{k}": v for k, v in self.stats.items()})
        return {**out, "min_tokens": self._min_tokens}

    def load_state_dict(self, state):
        state = dict(state)
        self.proxy.load_state_dict({k[6:]: state.pop(k) for k in [k for k in state if k.startswith("proxy.")]})
        self._layer_spread = take_layer_state("layer_spread", state, float)
        stats = {k[6:]: state.pop(k) for k in [k for k in state if k.startswith("stats.")]}
        if set(stats) != set(self.stats) or not all(isinstance(v, int) for v in stats.values()):
            raise SnapshotError(f"Future Forcing stats must hold the integers {sorted(self.stats)}")
        self.stats = stats
        min_tokens = state.pop("min_tokens", None)
        if not isinstance(min_tokens, int) or isinstance(min_tokens, bool):
            raise SnapshotError("Future Forcing state needs an integer min_tokens")
        self._min_tokens = min_tokens
        super().load_state_dict(state)

    # importance ---------------------------------------------------------------------------------------
    def _proxy(self, ctx: CompressContext):
        return self.proxy.projected(ctx.layer, ctx.newest_frame, ctx.token_grid, ctx.rope)

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
        """Exact importance of every token (used without page candidates, and by tests)."""
        if not self.proxy.has(ctx.layer):
            return tokens.positions[:, 0].float()
        mu_f, sigma_f = self._proxy(ctx)
        logits = self.head_logits(tokens.k, tokens.v, tokens.log_mass, mu_f, sigma_f)
        return self.aggregate(logits, torch.logsumexp(logits, 1))

    # page candidates ------------------------------------------------------------------------------------
    def page_estimates(self, ctx: CompressContext, mu_f, sigma_f) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-page rank [P] for candidate selection, refreshed lazily (pages whose stored importance carries the
        current proxy version are not recomputed): with ``page_rank="bound"`` the most any token of the page
        could score (``log_expected_exp_bound`` from centroid and radius), so a page holding one important
        token among unimportant ones is not picked for eviction; with ``"centroid"`` the score of the page's
        mean key, which averages such a token away.  Also returns each page's estimated log attention mass per
        head [H, P] (its centroid's score plus its log total mass), for the normaliser of pages not scored."""
        cache = ctx.cache
        summ = cache.page_summaries(ctx.session_id, ctx.layer)
        ids = summ["pages"]
        lin, quad = FutureQueryProxy.score_terms(summ["centroid"], mu_f, sigma_f, self.cov_rank)
        z = log_mean_exp(lin + quad)  # [H, P] at centroids
        page_mass = z + summ["log_mass"][None]
        lse = torch.logsumexp(page_mass, 1)
        if self.page_rank == "bound":
            z = log_expected_exp_bound(lin, quad, summ["radius"], mu_f, sigma_f)
        version = self.proxy.version.get(ctx.layer, 0)
        agg = self.aggregate(z, lse)
        stale = summ["importance_version"] != version
        cache.page_importance[ids[stale], 0] = agg[stale]
        cache.page_importance[ids[stale], 1] = agg[stale] * summ["valid"][stale].float()
        cache.page_importance_version[ids[stale]] = version
        return cache.page_importance[ids, 0], page_mass

    def candidates(self, ctx: CompressContext, protected: torch.Tensor, n_remove: int, mu_f, sigma_f,
                   use_pages: bool | None = None):
        """Token indices to score exactly: all unprotected tokens of the lowest-ranked pages, enough to hold
        ``candidate_oversample * n_remove`` of them (every unprotected token when page candidates are off).
        Returns (indices, per-head log attention mass of the unprotected pages *not* chosen, estimated from their
        summaries, or None).  The caller normalises each head over the candidates' exact scores plus that
        estimate: normalising over page estimates alone (centroids, which by Jensen underestimate a page's
        mass, the more so the more its keys spread) reweights the heads and, on the world model, cost
        more of the returning subjects' tokens than the candidate choice itself."""
        ps = ctx.cache.page_size
        n = protected.numel()
        if not (self.page_candidates if use_pages is None else use_pages):
            return (~protected).nonzero().flatten(), None
        est, page_mass = self.page_estimates(ctx, mu_f, sigma_f)
        dev = protected.device
        free_per_page = torch.zeros(est.numel(), dtype=torch.long, device=dev)
        page_of = torch.arange(n, device=dev) // ps
        free_per_page.index_add_(0, page_of, (~protected).long())
        est = est.masked_fill(free_per_page == 0, float("inf"))
        order = torch.argsort(est)
        need = math.ceil(self.candidate_oversample * n_remove)
        cum = torch.cumsum(free_per_page[order], 0)
        take = int(torch.searchsorted(cum, torch.tensor(min(need, int(cum[-1])), device=dev))) + 1
        chosen = torch.zeros(est.numel(), dtype=torch.bool, device=dev)
        chosen[order[:take]] = True
        cand = (chosen[page_of] & ~protected).nonzero().flatten()
        rest = ~chosen & (free_per_page > 0)
        return cand, torch.logsumexp(page_mass[:, rest], 1) if rest.any() else None

    # merging ---------------------------------------------------------------------------------------------
    def _subspace(self, mu_f, sigma_f, hkv) -> tuple[torch.Tensor, torch.Tensor]:
        """Per kv head: mean proxy direction mu_g [Hkv, D] and basis [Hkv, D, r+1] of the affine subspace."""
        h, d = mu_f.shape[1], mu_f.shape[2]
        mu_g = mu_f.mean(0).reshape(hkv, h // hkv, d).mean(1)
        sig_g = sigma_f.mean(0).reshape(hkv, h // hkv, d, d).mean(1)
        basis = (mu_g / mu_g.norm(dim=-1, keepdim=True).clamp_min(1e-12))[..., None]  # [Hkv, D, 1]
        if self.merge_rank:
            evecs = torch.linalg.eigh(sig_g).eigenvectors  # columns, ascending eigenvalues
            basis = torch.cat([basis, evecs[..., -self.merge_rank:]], dim=2)
        return mu_g, basis

    def _merge(self, k, v, lm, victims, partners_pool, mu_f, sigma_f):
        """Return (victim -> partner assignment or -1, merged k/v/log-mass of partners that received merges)."""
        hkv, d = k.shape[1], k.shape[2]
        assign = torch.full((victims.numel(),), -1, dtype=torch.long, device=victims.device)
        if self.merge == "none" or partners_pool.numel() == 0 or victims.numel() == 0:
            return assign, None
        mu_g, basis = self._subspace(mu_f, sigma_f, hkv)
        coords = torch.einsum("nhd,hdr->nhr", k.float(), basis.float()).flatten(1)
        pc, vc = coords[partners_pool], coords[victims]
        nn_d, nn_i = _nearest(vc, pc)
        spread = (pc - pc.mean(0)).norm(dim=1).pow(2).mean().sqrt().clamp_min(1e-12)
        pv = v[partners_pool].float().flatten(1)
        vspread = (pv - pv.mean(0)).norm(dim=1).pow(2).mean().sqrt().clamp_min(1e-12)
        vdist = (v[victims].float().flatten(1) - pv[nn_i]).norm(dim=1)
        ok = (nn_d <= self.merge_key_tol * spread) & (vdist <= self.merge_value_tol * vspread)
        assign[ok] = partners_pool[nn_i[ok]]
        if not ok.any():
            return assign, None
        # groups: each receiving partner with all victims assigned to it
        members = torch.cat([assign[ok], assign[ok].unique()])
        sources = torch.cat([victims[ok], assign[ok].unique()])
        targets, gid = members.unique(return_inverse=True)
        kk, vv, ll = k[sources].double(), v[sources].double(), lm[sources].double()
        f64 = {"dtype": torch.float64, "device": k.device}  # the merge arithmetic, on the cache's device
        if self.merge == "log-mass":
            w = torch.exp(ll - ll.max())
            wsum = torch.zeros(targets.numel(), **f64).index_add_(0, gid, w)
            nk = torch.zeros(targets.numel(), hkv, d, **f64).index_add_(0, gid, w[:, None, None] * kk)
            nv = torch.zeros_like(nk).index_add_(0, gid, w[:, None, None] * vv)
            nk, nv = nk / wsum[:, None, None], nv / wsum[:, None, None]
            nl = torch.log(wsum) + ll.max()
        else:  # affine: keep the group's proxy logit mass on the hyperplane mu_g . k = c, no bias needed
            zl = torch.einsum("nhd,hd->nh", kk, mu_g) / math.sqrt(d) + ll[:, None]  # [n, Hkv]
            zmax = torch.full((targets.numel(), hkv), float("-inf"), **f64).scatter_reduce_(
                0, gid[:, None].expand_as(zl), zl, "amax")
            ez = torch.exp(zl - zmax[gid])
            esum = torch.zeros(targets.numel(), hkv, **f64).index_add_(0, gid, ez)
            c = math.sqrt(d) * (torch.log(esum) + zmax)  # [T, Hkv]
            w = torch.exp(ll - ll.max())
            wsum = torch.zeros(targets.numel(), **f64).index_add_(0, gid, w)
            kbar = torch.zeros(targets.numel(), hkv, d, **f64).index_add_(0, gid, w[:, None, None] * kk)
            kbar = kbar / wsum[:, None, None]
            step = (c - torch.einsum("thd,hd->th", kbar, mu_g)) / mu_g.pow(2).sum(-1).clamp_min(1e-12)
            nk = kbar + step[..., None] * mu_g[None]
            att = ez / esum[gid]  # softmax within the group, per kv head
            nv = torch.zeros(targets.numel(), hkv, d, **f64).index_add_(0, gid, att[..., None] * vv)
            nl = torch.zeros(targets.numel(), **f64)
        return assign, (targets, nk.to(k.dtype), nv.to(v.dtype), nl.float())

    # budgets ---------------------------------------------------------------------------------------------
    def layer_budgets(self, budget_tokens: int, num_layers: int, page_size: int) -> list[int]:
        if self.budget_split == "uniform" or len(self._layer_spread) < num_layers:
            return [budget_tokens] * num_layers
        total_pages = num_layers * (budget_tokens // page_size)
        w = torch.tensor([self._layer_spread[i] for i in range(num_layers)], dtype=torch.float64)
        pages = torch.floor(w / w.sum() * total_pages).long()
        pages = pages.clamp_min(max(1, math.ceil(self._min_tokens / page_size)))
        if int(pages.sum()) > total_pages:
            return [budget_tokens] * num_layers
        return [int(p) * page_size for p in pages]

    # compression -----------------------------------------------------------------------------------------
    def _rank(self, ctx: CompressContext, use_pages: bool | None = None):
        """Score the candidates of one layer: (candidate indices, their k, v, log-mass, aggregated importance,
        protected mask, mu_f, sigma_f).  Shared by ``compress`` and ``victims`` so both rank identically."""
        cache = ctx.cache
        slots = cache.slots(ctx.session_id, ctx.layer)
        protected = self.protected(cache.positions.view(-1, 3)[slots], ctx)
        mu_f, sigma_f = self._proxy(ctx)
        cand, rest = self.candidates(ctx, protected, ctx.num_tokens - ctx.budget_tokens, mu_f, sigma_f, use_pages)
        s = slots[cand]
        hkv, d = cache.num_kv_heads, cache.head_dim
        k, v = cache.key_cache.view(-1, hkv, d)[s], cache.value_cache.view(-1, hkv, d)[s]
        lm = cache.log_mass.view(-1)[s]
        if self.fused_scoring:
            imp = self.fused_importance(cache, s, mu_f, sigma_f, rest)
        else:
            logits = self.head_logits(k, v, lm, mu_f, sigma_f)
            lse_cand = torch.logsumexp(logits, 1)
            imp = self.aggregate(logits, lse_cand if rest is None else torch.logaddexp(lse_cand, rest))
        return cand, k, v, lm, imp, protected, mu_f, sigma_f

    def fused_importance(self, cache, slots, mu_f, sigma_f, rest=None) -> torch.Tensor:
        """``aggregate(head_logits(...))`` of the tokens at ``slots`` through ``kernels.expected_attention_scores``:
        keys and values read in place from the page storage, one launch for all terms (Triton on CUDA)."""
        hkv, d = cache.num_kv_heads, cache.head_dim
        u, lam = proxy_factors(sigma_f, self.cov_rank)
        dev = cache.key_cache.device
        seg = torch.tensor([0, slots.numel()], device=dev)
        return expected_attention_scores(
            cache.key_cache.view(-1, hkv, d), cache.value_cache.view(-1, hkv, d), cache.log_mass.view(-1),
            slots.to(dev), seg, mu_f.float()[None].to(dev), u[None].to(dev), lam[None].to(dev), self.value_norm,
            self.aggregation, None if rest is None else rest[None].to(dev))[2]

    def victims(self, ctx: CompressContext, use_pages: bool) -> torch.Tensor:
        """Token indices this policy would remove now (merge or evict), without touching the cache: with page
        candidates, or by exact scoring of every unprotected token.  ``candidate_recall`` compares the two."""
        cand, _, _, _, imp, *_ = self._rank(ctx, use_pages)
        return self._lowest(cand, imp, ctx)

    @staticmethod
    def _lowest(cand, imp, ctx: CompressContext) -> torch.Tensor:
        """The ``num_tokens - budget_tokens`` candidates of lowest importance, sorted by index."""
        return torch.sort(cand[torch.argsort(imp)[: ctx.num_tokens - ctx.budget_tokens]]).values

    def candidate_recall(self, ctx: CompressContext) -> float:
        """Share of the tokens exact full scoring would remove that page-candidate selection also removes."""
        exact = set(self.victims(ctx, use_pages=False).tolist())
        if not exact:
            return 1.0
        return len(exact & set(self.victims(ctx, use_pages=True).tolist())) / len(exact)

    def candidate_regret(self, ctx: CompressContext) -> float:
        """Importance (exact scores) of the tokens page-candidate selection removes over that of the tokens exact
        scoring removes: 1 is as good as exact, 2 removes twice the attention the future queries would pay.
        Recall counts a near-tie miss like a disaster; this weighs what is lost."""
        cand, _, _, _, imp, *_ = self._rank(ctx, use_pages=False)
        full = torch.zeros(ctx.num_tokens, device=imp.device)
        full[cand] = imp
        exact = full[self._lowest(cand, imp, ctx)].sum()
        return float(full[self.victims(ctx, use_pages=True)].sum() / exact.clamp_min(1e-30))

    def compress(self, ctx: CompressContext) -> None:
        cache, n = ctx.cache, ctx.num_tokens
        n_remove = n - ctx.budget_tokens
        if n_remove <= 0:
            return
        if not self.proxy.has(ctx.layer):
            return super().compress(ctx)  # no statistics yet: recency (cannot happen after a write pass)
        sid, layer = ctx.session_id, ctx.layer
        cand, k, v, lm, imp, protected, mu_f, sigma_f = self._rank(ctx)
        self._min_tokens = int(protected.sum())
        if n - self._min_tokens < n_remove:
            raise ConfigError(f"budget {ctx.budget_tokens} tokens is below the protected size {self._min_tokens}")
        self._layer_spread[layer] = float(torch.exp(-(imp / imp.sum() * torch.log(imp / imp.sum() + 1e-30)).sum()))
        order = torch.argsort(imp)
        # merge partners: the next-lowest survivors, as many as page candidates would offer; merging into a
        # low-importance token perturbs little that the future queries need, and the nearest-partner search stays
        # O(removed^2) instead of O(removed x cache) when every token is scored
        partners = math.ceil(self.candidate_oversample * n_remove)
        victims_local, survivors_local = order[:n_remove], order[n_remove:max(partners, n_remove + 1)]
        assign, merged = self._merge(k, v, lm, victims_local, survivors_local, mu_f, sigma_f)
        self.stats["candidates"] += int(cand.numel())
        self.stats["tokens"] += n
        self.stats["merged"] += int((assign >= 0).sum())
        self.stats["evicted"] += int((assign < 0).sum())
        if merged is not None:
            targets, nk, nv, nl = merged
            cache.update(sid, layer, cand[targets], nk, nv, nl)
        drop = torch.zeros(n, dtype=torch.bool, device=cand.device)
        drop[cand[victims_local]] = True
        keep = (~drop).nonzero().flatten()
        self.on_compact(layer, cache.compact(sid, layer, keep))
