"""Triton Expected-Attention scoring over paged keys: the functions of ``kernels.scoring_ref``, same signatures.

Why by hand: no library scores KV tokens under a Gaussian query proxy.  One launch reads every token's key and
value *once*, straight from the page storage through ``slots`` (no gather copy), and computes for all proxy
positions the mean-dot term, the low-rank quadratic form, the log-mass and the log value norm (``score_logits``);
two small launches normalise each head over its segment (``normalise``) and aggregate the heads
(``aggregate``).  Segments (layers) share the launches: the scoring of a whole session is three launches.

Precision: the ``tl.dot`` of keys with the eigenvectors is IEEE float32 (not TF32), so the kernel matches the
float32 reference to rounding.  Without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, see
``kernels/__init__.py``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK_N = 32


@triton.jit
def _logits_kernel(K, V, LM, SLOTS, SEG, MU, U, LAM, OUT, N, P, R, inv_sqrt_d, half_inv_d, log_p,
                   stride_k_slot, stride_k_head, stride_v_slot, stride_v_head,
                   H: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, VALUE_NORM: tl.constexpr):
    seg, blk, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, end = tl.load(SEG + seg), tl.load(SEG + seg + 1)
    rows = start + blk * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < end
    slot = tl.load(SLOTS + rows, mask=row_ok, other=0)
    g = h // REP
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    tile_ok = row_ok[:, None] & d_ok[None, :]
    k = tl.load(K + slot[:, None] * stride_k_slot + g * stride_k_head + d[None, :], mask=tile_ok, other=0.0)
    k = k.to(tl.float32)
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    for p in range(P):
        base = (seg * P + p) * H + h
        mu = tl.load(MU + base * D + d, mask=d_ok, other=0.0)
        lin = tl.sum(k * mu[None, :], axis=1) * inv_sqrt_d
        u = tl.load(U + base * D * R + d[:, None] * R + r[None, :], mask=d_ok[:, None] & r_ok[None, :], other=0.0)
        lam = tl.load(LAM + base * R + r, mask=r_ok, other=0.0)
        proj = tl.dot(k, u, input_precision="ieee")  # [BLOCK, BLOCK_R]
        z = lin + tl.sum(proj * proj * lam[None, :], axis=1) * half_inv_d
        m_new = tl.maximum(m, z)
        s = s * tl.exp(m - m_new) + tl.exp(z - m_new)
        m = m_new
    out = m + tl.log(s) - log_p + tl.load(LM + slot, mask=row_ok, other=0.0)
    if VALUE_NORM:
        v = tl.load(V + slot[:, None] * stride_v_slot + g * stride_v_head + d[None, :], mask=tile_ok, other=0.0)
        v = v.to(tl.float32)
        out += tl.log(tl.maximum(tl.sqrt(tl.sum(v * v, axis=1)), 1e-12))
    tl.store(OUT + h * N + rows, out, mask=row_ok)


@triton.jit
def _lse_kernel(LOGITS, SEG, EXTRA, LSE, N, H: tl.constexpr, HAS_EXTRA: tl.constexpr, BLOCK: tl.constexpr):
    seg, h = tl.program_id(0), tl.program_id(1)
    start, end = tl.load(SEG + seg), tl.load(SEG + seg + 1)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    for off in range(start, end, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        x = tl.load(LOGITS + h * N + cols, mask=cols < end, other=float("-inf"))
        m_new = tl.maximum(m, x)
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - safe) + tl.exp(x - safe)
        m = m_new
    top = tl.max(m, axis=0)
    safe_top = tl.where(top == float("-inf"), 0.0, top)
    lse = safe_top + tl.log(tl.sum(s * tl.exp(m - safe_top), axis=0))
    if HAS_EXTRA:
        e = tl.load(EXTRA + seg * H + h)
        hi = tl.maximum(lse, e)
        safe_hi = tl.where(hi == float("-inf"), 0.0, hi)
        lse = safe_hi + tl.log(tl.exp(lse - safe_hi) + tl.exp(e - safe_hi))
    tl.store(LSE + seg * H + h, lse)


@triton.jit
def _aggregate_kernel(LOGITS, LSE, SEG, OUT, N, H: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK: tl.constexpr,
                      MEAN: tl.constexpr):
    seg, blk = tl.program_id(0), tl.program_id(1)
    start, end = tl.load(SEG + seg), tl.load(SEG + seg + 1)
    cols = start + blk * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < end
    hh = tl.arange(0, BLOCK_H)
    h_ok = hh < H
    x = tl.load(LOGITS + hh[:, None] * N + cols[None, :], mask=h_ok[:, None] & col_ok[None, :], other=float("-inf"))
    lse = tl.load(LSE + seg * H + hh, mask=h_ok, other=0.0)
    p = tl.exp(x - lse[:, None])  # masked entries: exp(-inf) = 0
    if MEAN:
        out = tl.sum(p, axis=0) / H
    else:
        out = tl.max(p, axis=0)
    tl.store(OUT + cols, out, mask=col_ok)


def _pow2(x: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(int(x)))


def _max_segment(seg_starts: torch.Tensor) -> int:
    return int((seg_starts[1:] - seg_starts[:-1]).max()) if seg_starts.numel() > 1 else 0


def score_logits(key_cache, value_cache, log_mass, slots, seg_starts, mu, u, lam, value_norm: bool) -> torch.Tensor:
    n, (hkv, d), (nseg, p, h) = slots.numel(), key_cache.shape[1:], mu.shape[:3]
    r = u.shape[-1]
    out = torch.empty(h, n, dtype=torch.float32, device=key_cache.device)
    longest = _max_segment(seg_starts)
    if n == 0 or longest == 0:
        return out
    assert key_cache.stride(2) == 1 and value_cache.stride(2) == 1, "head_dim must be contiguous"
    grid = (nseg, triton.cdiv(longest, BLOCK_N), h)
    _logits_kernel[grid](
        key_cache, value_cache, log_mass.float().contiguous(), slots.contiguous(), seg_starts.contiguous(),
        mu.float().contiguous(), u.float().contiguous(), lam.float().contiguous(), out, n, p, r,
        1.0 / math.sqrt(d), 0.5 / d, math.log(p), key_cache.stride(0), key_cache.stride(1),
        value_cache.stride(0), value_cache.stride(1),
        H=h, REP=h // hkv, D=d, BLOCK=BLOCK_N, BLOCK_D=_pow2(d), BLOCK_R=_pow2(r), VALUE_NORM=bool(value_norm))
    return out


def normalise(logits: torch.Tensor, seg_starts: torch.Tensor, extra_lse: torch.Tensor | None = None) -> torch.Tensor:
    h, n = logits.shape
    nseg = seg_starts.numel() - 1
    lse = torch.empty(nseg, h, dtype=torch.float32, device=logits.device)
    extra = lse if extra_lse is None else extra_lse.float().contiguous()
    _lse_kernel[(nseg, h)](logits.contiguous(), seg_starts.contiguous(), extra, lse, n, H=h,
                           HAS_EXTRA=extra_lse is not None, BLOCK=256)
    return lse


def aggregate(logits: torch.Tensor, lse: torch.Tensor, seg_starts: torch.Tensor, aggregation: str) -> torch.Tensor:
    h, n = logits.shape
    out = torch.empty(n, dtype=torch.float32, device=logits.device)
    longest = _max_segment(seg_starts)
    if n == 0 or longest == 0:
        return out
    grid = (seg_starts.numel() - 1, triton.cdiv(longest, 128))
    _aggregate_kernel[grid](logits.contiguous(), lse.contiguous(), seg_starts.contiguous(), out, n, H=h,
                            BLOCK_H=_pow2(h, 1), BLOCK=128, MEAN=aggregation == "mean")
    return out


def expected_attention_scores(key_cache, value_cache, log_mass, slots, seg_starts, mu, u, lam, value_norm: bool,
                              aggregation: str, extra_lse: torch.Tensor | None = None):
    logits = score_logits(key_cache, value_cache, log_mass, slots, seg_starts, mu, u, lam, value_norm)
    lse = normalise(logits, seg_starts, extra_lse)
    return logits, lse, aggregate(logits, lse, seg_starts, aggregation)
