"""The torch reference backend: gather each sequence's pages, SDPA over [cache ; block] with log-mass bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ff_engine.attention.interface import AttentionBackend, AttentionBatch


def _sdpa(q, k, v, scale, bias):
    # [N, H, D] -> [1, H, N, D]; the float mask adds log-mass per key (broadcast over heads and queries).
    mask = None if bias is None else bias.to(q.dtype)[None, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1)


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
                slots = view.slots(i)
                hkv, d = k.shape[1], k.shape[2]
                ck = view.key_cache.view(-1, hkv, d)[slots]
                cv = view.value_cache.view(-1, hkv, d)[slots]
                lm = view.cache.log_mass.view(-1)[slots]
                if bool((lm != 0).any()):
                    bias = torch.cat([lm, lm.new_zeros(k.shape[0])])
                k, v = torch.cat([ck, k]), torch.cat([cv, v])
            out[s] = _sdpa(batch.q[s], k, v, batch.scale, bias)
        return out
