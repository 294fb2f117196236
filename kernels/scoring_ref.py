"""Plain-torch reference of Expected-Attention scoring over paged keys (Future Forcing's and kvpress EA's score).

For every cached token (flat ``slots`` into the page storage) and query head ``h`` (kv head ``h // rep``):

    logit = log mean_p exp( k.mu_p / sqrt d  +  sum_r lam_pr (k.u_pr)^2 / (2 d) )  +  log m  [+ log ||v||]

-- the log of E[exp(q.k / sqrt d)] under the Gaussian query proxy (mu_p, Sigma_p = U diag(lam) U^T), plus the
token's log-mass, plus the log value norm.  Each head is then normalised over its segment's tokens (LSE, plus the
mass ``extra_lse`` of tokens not scored) and the heads are aggregated (mean or max) into one importance per token.

Tokens come in *segments* (``seg_starts``, cumulative, like ``cu_seqlens``): segment ``l`` has its own proxy
``mu[l]``, ``u[l]``, ``lam[l]`` and its own normaliser, so all layers of a session are scored in one call.

``kernels.scoring_triton`` has the same functions with the same signatures; this module is their oracle, and
``tests/test_kernels.py`` checks both against ``FutureForcing.head_logits`` / ``aggregate`` on the same inputs.
"""

from __future__ import annotations

import math

import torch


def proxy_factors(sigma_f: torch.Tensor, cov_rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigma_f [P, H, D, D] -> (u [P, H, D, R], lam [P, H, R]) float32 with ``k^T Sigma k = sum_r lam_r (k.u_r)^2``.

    ``cov_rank`` r < D keeps the top r eigenpairs with eigenvalues clamped at 0 (as ``score_terms`` does); None or
    >= D keeps all D pairs unclamped (the exact quadratic form)."""
    evals, evecs = torch.linalg.eigh(sigma_f.double())  # ascending
    d = sigma_f.shape[-1]
    if cov_rank is None or cov_rank >= d:
        return evecs.float().contiguous(), evals.float().contiguous()
    return evecs[..., -cov_rank:].float().contiguous(), evals[..., -cov_rank:].clamp_min(0).float().contiguous()


def score_logits(key_cache, value_cache, log_mass, slots, seg_starts, mu, u, lam, value_norm: bool) -> torch.Tensor:
    """Per-head logits [H, N] float32.

    key_cache, value_cache: [slots_total, Hkv, D] (any float dtype; the page storage viewed flat); log_mass:
    [slots_total] float32; slots: int64 [N]; seg_starts: int64 [L + 1]; mu: [L, P, H, D]; u: [L, P, H, D, R];
    lam: [L, P, H, R] (float32)."""
    n, (hkv, d), h = slots.numel(), key_cache.shape[1:], mu.shape[2]
    out = torch.empty(h, n, dtype=torch.float32, device=key_cache.device)
    for seg in range(seg_starts.numel() - 1):
        a, b = int(seg_starts[seg]), int(seg_starts[seg + 1])
        s = slots[a:b]
        k = key_cache[s].float().transpose(0, 1).repeat_interleave(h // hkv, dim=0)  # [H, n, D]
        lin = torch.einsum("hnd,phd->phn", k, mu[seg].float()) / math.sqrt(d)
        proj = torch.einsum("hnd,phdr->phnr", k, u[seg].float())
        quad = (proj.pow(2) * lam[seg].float()[:, :, None, :]).sum(-1) / (2 * d)
        z = torch.logsumexp(lin + quad, 0) - math.log(mu.shape[1]) + log_mass[s].float()[None]
        if value_norm:
            vn = value_cache[s].float().norm(dim=-1).transpose(0, 1).repeat_interleave(h // hkv, dim=0)
            z = z + torch.log(vn.clamp_min(1e-12))
        out[:, a:b] = z
    return out


def normalise(logits: torch.Tensor, seg_starts: torch.Tensor, extra_lse: torch.Tensor | None = None) -> torch.Tensor:
    """Per-segment, per-head log normaliser [L, H]: LSE of the segment's logits, log-added to ``extra_lse`` [L, H]
    (the estimated mass of tokens not scored) when given."""
    nseg = seg_starts.numel() - 1
    lse = torch.full((nseg, logits.shape[0]), float("-inf"), dtype=torch.float32, device=logits.device)
    for seg in range(nseg):
        a, b = int(seg_starts[seg]), int(seg_starts[seg + 1])
        if b > a:
            lse[seg] = torch.logsumexp(logits[:, a:b], 1)
    return lse if extra_lse is None else torch.logaddexp(lse, extra_lse.float())


def aggregate(logits: torch.Tensor, lse: torch.Tensor, seg_starts: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Importance [N]: per head ``exp(logit - lse)`` (a probability), then the mean or max over heads."""
    out = torch.empty(logits.shape[1], dtype=torch.float32, device=logits.device)
    for seg in range(seg_starts.numel() - 1):
        a, b = int(seg_starts[seg]), int(seg_starts[seg + 1])
        p = torch.exp(logits[:, a:b] - lse[seg][:, None])
        out[a:b] = p.mean(0) if aggregation == "mean" else p.max(0).values
    return out


def expected_attention_scores(key_cache, value_cache, log_mass, slots, seg_starts, mu, u, lam, value_norm: bool,
                              aggregation: str, extra_lse: torch.Tensor | None = None):
    """(logits [H, N], lse [L, H], importance [N]): the three steps above in a row."""
    logits = score_logits(key_cache, value_cache, log_mass, slots, seg_starts, mu, u, lam, value_norm)
    lse = normalise(logits, seg_starts, extra_lse)
    return logits, lse, aggregate(logits, lse, seg_starts, aggregation)
