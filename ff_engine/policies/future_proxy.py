"""Future Forcing's query statistics: ``FutureQueryProxy`` (design.md §3, steps 1-2 of future_forcing.py).

Running first and second moments of the *pre-RoPE* queries of every layer and head (pre-RoPE query statistics
are stable over time, post-RoPE ones drift with position), with an exponential decay per block or an exact
window of recent blocks, rotated to the positions the next ``horizon`` frames will occupy (all spatial positions,
the adapter's 3D RoPE); and the Gaussian expected-attention terms of keys under them (``score_terms``).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch

from ff_engine.errors import ConfigError, SnapshotError
from ff_engine.policies.base import take_layer_state


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
    up = lambda x: x.repeat_interleave(2, 0).repeat_interleave(2, 1)
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
    covariance: use Sigma (False: mean only).  rotate: False skips the rotation (PostRopeExpectedAttention).
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
