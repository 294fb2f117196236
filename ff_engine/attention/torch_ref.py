"""The torch reference backend: gather each sequence's pages, SDPA over [cache ; block] with log-mass bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ff_engine.attention.interface import AttentionBackend, AttentionBatch


def sdpa(q, k, v, scale, bias):
    """Dense attention of q [N, H, D] over k, v [M, Hkv, D] with an optional per-key additive bias [M]: the one
    dense SDPA of the library (the reference backend and LongLive's re-cache pass), so both compute alike."""
    # [N, H, D] -> [1, H, N, D]; the float mask adds log-mass per key (broadcast over heads and queries).
    mask = None if bias is None else bias.to(q.dtype)[None, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1)


def _gather_with_block(view, i, k, v):
    """[cache tokens of sequence i ; block tokens] as contiguous K, V and the log-mass bias (None if all 0).

    Gathers whole pages (one memcpy per page rather than per token) straight into the output buffers, but keeps
    only the first ``n`` slots before any arithmetic: a slot past ``seq_len`` never reaches the math (isolation).
    """
    n, nb = int(view.seq_lens[i]), k.shape[0]
    pages = view.block_table[i, : view.pages_for(n)].to(torch.int64)
    hkv, d = k.shape[1], k.shape[2]
    kk = k.new_empty((n + nb, hkv, d))
    vv = v.new_empty((n + nb, hkv, d))
    kk[:n] = view.key_cache.index_select(0, pages).view(-1, hkv, d)[:n]
    vv[:n] = view.value_cache.index_select(0, pages).view(-1, hkv, d)[:n]
    kk[n:], vv[n:] = k, v
    lm = view.log_mass.index_select(0, pages).view(-1)[:n]
    bias = torch.cat([lm, lm.new_zeros(nb)]) if bool((lm != 0).any()) else None
    return kk, vv, bias


class TorchReferenceBackend(AttentionBackend):
    name = "torch"

    def forward(self, batch: AttentionBatch) -> torch.Tensor:
        out = torch.empty_like(batch.q)
        view = batch.cache
        for i in range(batch.num_seqs):
            s = batch.seq(i)
            k, v = batch.k[s], batch.v[s]
            bias = None
            if view is not None and int(view.seq_lens[i]) > 0:
                k, v, bias = _gather_with_block(view, i, k, v)
            out[s] = sdpa(batch.q[s], k, v, batch.scale, bias)
        return out
