"""Plain-torch attention with a per-key additive bias and its log-sum-exp, plus exact LSE combination.

Why by hand: SDPA returns no LSE, and combining partial attention results (cache part, block part, groups of
keys with different bias) exactly needs it.  This is the oracle every backend is tested against.
"""

from __future__ import annotations

import torch


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked attention of ``q`` [Nq, H, D] over ``k``/``v`` [Nk, Hkv, D] (GQA: H % Hkv == 0).

    ``bias`` [Nk] is added to every logit of key j (a merged token's ``log m``).  Returns the output
    [Nq, H, D] in q's dtype and the LSE [Nq, H] in float32 (``-inf`` rows when Nk == 0).
    """
    nq, h, _d = q.shape
    nk, hkv = k.shape[0], k.shape[1]
    if nk == 0:
        return torch.zeros_like(q), torch.full((nq, h), float("-inf"), dtype=torch.float32, device=q.device)
    rep = h // hkv
    qf = q.float().transpose(0, 1)  # [H, Nq, D]
    kf = k.float().repeat_interleave(rep, dim=1).transpose(0, 1)  # [H, Nk, D]
    vf = v.float().repeat_interleave(rep, dim=1).transpose(0, 1)
    logits = torch.matmul(qf, kf.transpose(1, 2)) * scale  # [H, Nq, Nk]
    if bias is not None:
        logits = logits + bias.float()[None, None, :]
    lse = torch.logsumexp(logits, dim=-1)  # [H, Nq]
    out = torch.matmul(torch.exp(logits - lse[..., None]), vf)
    return out.transpose(0, 1).to(q.dtype), lse.transpose(0, 1).contiguous()


def combine_lse(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly combine attention results over disjoint key sets: ``sum_i exp(lse_i - lse) * out_i``."""
    outs = torch.stack([o.float() for o, _ in parts])  # [P, Nq, H, D]
    lses = torch.stack([l.float() for _, l in parts])  # [P, Nq, H]
    lse = torch.logsumexp(lses, dim=0)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w = torch.exp(lses - safe[None])  # parts with -inf lse get weight 0
    out = (w[..., None] * outs).sum(0)
    return out.to(parts[0][0].dtype), lse
