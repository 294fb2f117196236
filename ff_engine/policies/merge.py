"""Merge instead of evict, around any scorer: each token the scorer ranks lowest is merged into its nearest partner
among the next-lowest survivors when their keys and values are close, and evicted when nothing is close.

Partners are the next ``partners x removed`` lowest-scoring removable tokens: merging into a low-importance token
perturbs little that the future queries need, and the nearest-partner search stays O(removed^2) instead of
O(removed x cache).  Nearness is measured in the scorer's *merge space* (``merge_space`` hook, ``MergeSpace``):
Future Forcing supplies the affine subspace of its future query proxy (span of mu_f and the top eigenvectors of
Sigma_f) and a query direction; a scorer without the hook gets the default, the keys themselves (every kv head's
key, concatenated) and no direction.  Modes:
  * ``log-mass``: mass-weighted mean key and value, log-masses add; attention applies ``log m`` as a per-key bias,
    so two identical tokens merged into one with log-mass log 2 leave attention unchanged;
  * ``affine``: the merged key is projected onto the hyperplane (normal: the scorer's query direction) whose logit
    equals the log-sum-exp of the group's, no bias, so every attention kernel serves it; needs a scorer that
    supplies a direction;
  * ``none``: evict (the removal Future Forcing's ablations and post-RoPE Expected Attention use).
Ties in the scores are broken by ``torch.argsort`` (Future Forcing's decisions, kept bit-identical).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ff_engine.errors import ConfigError, SnapshotError
from ff_engine.policies.base import CompressContext, LayerTokens, Ranking
from ff_engine.policies.compose import PolicyWrapper
from ff_engine.policies.params import param

#: the declared ranges, shared with Future Forcing's parameters of the same meaning (stated once)
MODE = {"choices": ("none", "log-mass", "affine"), "doc": "how removed tokens are merged"}
KEY_TOL = {"ge": 0, "doc": "largest key distance of a merge, relative to the keys' spread"}
VALUE_TOL = {"ge": 0, "doc": "largest value distance of a merge, relative to the spread"}
# more candidates than the cache holds is the same as all of them; the cap keeps ceil(x * n) finite
OVERSAMPLE = {"ge": 1, "le": 100, "doc": "candidates (and merge partners) per removed token"}
STATS = ("merged", "evicted", "candidates", "tokens")


@dataclass
class MergeSpace:
    """Where keys are compared: coordinates ``einsum(k, basis)`` per kv head, flattened over heads (``basis``
    [Hkv, D, R] float64, or None: the keys themselves); ``direction`` [Hkv, D] float64, the query direction of the
    ``affine`` mode (None: the scorer has none)."""

    basis: torch.Tensor | None = None
    direction: torch.Tensor | None = None


class MergeSpaceHook(Protocol):
    def merge_space(self, ctx: CompressContext, num_kv_heads: int) -> MergeSpace: ...


@dataclass
class Merge(PolicyWrapper):
    """Merge the lowest-scoring tokens into their nearest low-scoring survivor, or evict them (module docstring).
    Counts its decisions in ``stats`` (state ``stats.<name>``): merged, evicted, candidates (tokens ranked),
    tokens (in the layer at each compression)."""

    mode: str = param("log-mass", **MODE)
    key_tol: float = param(0.5, **KEY_TOL)
    value_tol: float = param(1.0, **VALUE_TOL)
    partners: float = param(2.0, **OVERSAMPLE)
    stats: dict = field(default_factory=lambda: dict.fromkeys(STATS, 0), init=False, repr=False, compare=False)

    def __post_init__(self):
        super().__post_init__()
        if self.mode == "affine" and not hasattr(self.scorer, "merge_space"):
            raise ConfigError(f"merge mode 'affine' needs a scorer with a query direction (merge_space); "
                              f"{type(self.scorer).__name__} has none: use 'log-mass' or 'none'")

    def space(self, ctx: CompressContext, num_kv_heads: int) -> MergeSpace:
        hook = getattr(self.scorer, "merge_space", None)
        return MergeSpace() if hook is None else hook(ctx, num_kv_heads)

    def merge(self, ctx: CompressContext, tokens: LayerTokens, victims: torch.Tensor, survivors: torch.Tensor):
        """``merge_into_partners`` of ``tokens`` (the removable ranked ones; victims and survivors index them)."""
        k = tokens.k
        return merge_into_partners(k, tokens.v, tokens.log_mass, victims, survivors, self.space(ctx, k.shape[1]),
                                   self.mode, self.key_tol, self.value_tol)

    def remove(self, ctx: CompressContext, ranking: Ranking) -> torch.Tensor:
        n = ctx.num_tokens
        n_remove = n - ctx.budget_tokens
        cand, imp = ranking.removable()
        if cand.numel() < n_remove:
            raise ConfigError(f"budget {ctx.budget_tokens} tokens is below the protected size "
                              f"{int(ranking.protected.sum())}")
        order = torch.argsort(imp)
        victims, survivors = order[:n_remove], order[n_remove:max(math.ceil(self.partners * n_remove), n_remove + 1)]
        assign = torch.full((victims.numel(),), -1, dtype=torch.long, device=victims.device)
        merged = None
        if self.mode != "none" and survivors.numel() and victims.numel():
            assign, merged = self.merge(ctx, ranking.tokens if cand is ranking.index else ranking.tokens.subset(cand),
                                        victims, survivors)
        self.stats["candidates"] += int(cand.numel())
        self.stats["tokens"] += n
        self.stats["merged"] += int((assign >= 0).sum())
        self.stats["evicted"] += int((assign < 0).sum())
        if merged is not None:
            targets, nk, nv, nl = merged
            ctx.view.merge(cand[targets], nk, nv, nl)
        drop = torch.zeros(n, dtype=torch.bool, device=cand.device)
        drop[cand[victims]] = True
        return ctx.view.keep((~drop).nonzero().flatten())

    def state_dict(self):
        """The inner policy's state and the decision counters (``stats.<name>``, integers)."""
        return {**super().state_dict(), **{f"stats.{k}": v for k, v in self.stats.items()}}

    def load_state_dict(self, state):
        state = dict(state)
        stats = {k[6:]: state.pop(k) for k in [k for k in state if k.startswith("stats.")]}
        if set(stats) != set(STATS) or not all(isinstance(v, int) and not isinstance(v, bool) for v in stats.values()):
            raise SnapshotError(f"merge stats must hold the integers {sorted(STATS)}")
        self.stats = stats
        super().load_state_dict(state)


def space_coords(k: torch.Tensor, space: MergeSpace) -> torch.Tensor:
    """[N, Hkv, D] keys -> [N, Hkv x R] coordinates in ``space`` (the keys themselves, flattened, without a basis)."""
    if space.basis is None:
        return k.float().flatten(1)
    return torch.einsum("nhd,hdr->nhr", k.float(), space.basis.float()).flatten(1)


def rms_spread(x: torch.Tensor) -> torch.Tensor:
    """Root-mean-square distance of rows [N, F] from their mean (the unit of the merge tolerances)."""
    return (x - x.mean(0)).norm(dim=1).pow(2).mean().sqrt().clamp_min(1e-12)


def merge_into_partners(k, v, lm, victims, partners, space: MergeSpace, mode: str, key_tol: float,
                        value_tol: float):
    """Assign each victim to its nearest partner in ``space`` when keys lie within ``key_tol`` x the partners' key
    spread and values within ``value_tol`` x their value spread; merge each receiving partner with its victims.

    k, v [M, Hkv, D] and lm [M] of the ranked tokens; victims, partners: indices into them (disjoint).  Returns
    (victim -> partner index or -1 [V], None or (targets [T], merged k [T, Hkv, D], v, log-mass [T]))."""
    hkv, d = k.shape[1], k.shape[2]
    assign = torch.full((victims.numel(),), -1, dtype=torch.long, device=victims.device)
    coords = space_coords(k, space)
    pc, vc = coords[partners], coords[victims]
    nn_d, nn_i = _nearest(vc, pc)
    spread = rms_spread(pc)
    pv = v[partners].float().flatten(1)
    vspread = rms_spread(pv)
    vdist = (v[victims].float().flatten(1) - pv[nn_i]).norm(dim=1)
    ok = (nn_d <= key_tol * spread) & (vdist <= value_tol * vspread)
    assign[ok] = partners[nn_i[ok]]
    if not ok.any():
        return assign, None
    # groups: each receiving partner with all victims assigned to it
    members = torch.cat([assign[ok], assign[ok].unique()])
    sources = torch.cat([victims[ok], assign[ok].unique()])
    targets, gid = members.unique(return_inverse=True)
    kk, vv, ll = k[sources].double(), v[sources].double(), lm[sources].double()
    f64 = {"dtype": torch.float64, "device": k.device}  # the merge arithmetic, on the cache's device
    w = torch.exp(ll - ll.max())
    wsum = torch.zeros(targets.numel(), **f64).index_add_(0, gid, w)
    if mode == "log-mass":
        nk = torch.zeros(targets.numel(), hkv, d, **f64).index_add_(0, gid, w[:, None, None] * kk)
        nv = torch.zeros_like(nk).index_add_(0, gid, w[:, None, None] * vv)
        nk, nv = nk / wsum[:, None, None], nv / wsum[:, None, None]
        nl = torch.log(wsum) + ll.max()
    elif mode == "affine":  # keep the group's logit mass on the hyperplane mu_g . k = c, no bias needed
        mu_g = space.direction
        zl = torch.einsum("nhd,hd->nh", kk, mu_g) / math.sqrt(d) + ll[:, None]  # [n, Hkv]
        zmax = torch.full((targets.numel(), hkv), float("-inf"), **f64).scatter_reduce_(
            0, gid[:, None].expand_as(zl), zl, "amax")
        ez = torch.exp(zl - zmax[gid])
        esum = torch.zeros(targets.numel(), hkv, **f64).index_add_(0, gid, ez)
        c = math.sqrt(d) * (torch.log(esum) + zmax)  # [T, Hkv]
        kbar = torch.zeros(targets.numel(), hkv, d, **f64).index_add_(0, gid, w[:, None, None] * kk)
        kbar = kbar / wsum[:, None, None]
        step = (c - torch.einsum("thd,hd->th", kbar, mu_g)) / mu_g.pow(2).sum(-1).clamp_min(1e-12)
        nk = kbar + step[..., None] * mu_g[None]
        att = ez / esum[gid]  # softmax within the group, per kv head
        nv = torch.zeros(targets.numel(), hkv, d, **f64).index_add_(0, gid, att[..., None] * vv)
        nl = torch.zeros(targets.numel(), **f64)
    else:
        raise AssertionError(f"merge mode {mode!r}")  # Merge and FutureForcing validate the mode
    return assign, (targets, nk.to(k.dtype), nv.to(v.dtype), nl.float())


def _nearest(a: torch.Tensor, b: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest row of b for every row of a (distance, index), in chunks of a to bound memory."""
    ds, ix = [], []
    for i in range(0, a.shape[0], chunk):
        d, j = torch.cdist(a[i:i + chunk], b).min(1)
        ds.append(d)
        ix.append(j)
    return torch.cat(ds), torch.cat(ix)
