"""Triton slot copies for compaction and merge-in-place: ``kernels.compaction_ref``'s functions, same signatures.

Why by hand: ``t[dst] = t[src]`` in torch gathers into a temporary and scatters it back (twice the traffic, one
allocation per tensor); compaction moves survivors within one storage tensor, which a row-copy kernel does in a
single read and write per row.  One launch per storage tensor (key, value, positions, log-mass); rows are copied
as they are stored (any dtype).  Same precondition as the reference: ``src`` and ``dst`` disjoint, ``dst`` unique.
Without CUDA the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, see ``kernels/__init__.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 16


@triton.jit
def _copy_rows_kernel(SRC, DST, SRC_IDX, DST_IDX, M, W, stride_src, stride_dst, BLOCK_M: tl.constexpr,
                      BLOCK_W: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = rows < M
    s = tl.load(SRC_IDX + rows, mask=ok, other=0)
    d = tl.load(DST_IDX + rows, mask=ok, other=0)
    for w0 in range(0, W, BLOCK_W):
        cols = w0 + tl.arange(0, BLOCK_W)
        m = ok[:, None] & (cols < W)[None, :]
        x = tl.load(SRC + s[:, None] * stride_src + cols[None, :], mask=m)
        tl.store(DST + d[:, None] * stride_dst + cols[None, :], x, mask=m)


def copy_rows(src: torch.Tensor, src_idx: torch.Tensor, dst: torch.Tensor, dst_idx: torch.Tensor) -> None:
    """dst.view(rows, -1)[dst_idx[i]] = src.view(rows, -1)[src_idx[i]] (each row contiguous)."""
    m = src_idx.numel()
    if m == 0:
        return
    s2, d2 = src.reshape(src.shape[0], -1), dst.reshape(dst.shape[0], -1)
    assert d2.data_ptr() == dst.data_ptr() and s2.stride(1) == 1 and d2.stride(1) == 1, "rows must be contiguous"
    w = s2.shape[1]
    _copy_rows_kernel[(triton.cdiv(m, BLOCK_ROWS),)](
        s2, d2, src_idx.contiguous(), dst_idx.contiguous(), m, w, s2.stride(0), d2.stride(0),
        BLOCK_M=BLOCK_ROWS, BLOCK_W=min(256, triton.next_power_of_2(w)))


def move_slots(key_cache, value_cache, positions, log_mass, src: torch.Tensor, dst: torch.Tensor) -> None:
    for t in (key_cache, value_cache, positions, log_mass):
        copy_rows(t, src, t, dst)


def write_slots(key_cache, value_cache, log_mass, slots: torch.Tensor, k, v, lm) -> None:
    rows = torch.arange(slots.numel(), device=slots.device)
    copy_rows(k.to(key_cache.dtype).contiguous(), rows, key_cache, slots)
    copy_rows(v.to(value_cache.dtype).contiguous(), rows, value_cache, slots)
    copy_rows(lm.float().contiguous().reshape(-1, 1), rows, log_mass.reshape(-1, 1), slots)
