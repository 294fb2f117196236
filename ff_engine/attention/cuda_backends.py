"""CUDA backends: flash-attn's paged path (vLLM's bundled build or the flash-attn package) and xformers.

Paged flash-attn reads the canonical ``[pages, page_size, kv_heads, head_dim]`` cache directly through the
int32 block table.  The block's own K/V are a second (contiguous, varlen) flash-attn call; the two partial
results are combined exactly by their LSE.  flash-attn has no per-key bias: when the cache holds merged
tokens (log-mass != 0) the batch is served by the FlexAttention backend (per-key bias through ``score_mod``, same
page table); ``fallbacks`` counts those batches.

Isolation: the paged call may load the last page of a sequence whole, past ``seqused_k``.  flash-attn masks those
keys before the softmax, and ``PagedKVCache`` keeps every slot that holds no live token at zero (its isolation
invariant), so nothing another stream wrote can be read there; xformers gathers live slots only.
"""

from __future__ import annotations

import importlib

import torch

from ff_engine.attention.flex import FlexAttentionBackend
from ff_engine.attention.interface import AttentionBackend, AttentionBatch
from kernels.attention_ref import combine_lse


def _cuda_module(name: str):
    """The imported module when CUDA and the package are both there, else None."""
    if not torch.cuda.is_available():
        return None
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 -- a broken CUDA extension raises anything on import: not available
        return None


def _lse_to_rows(lse: torch.Tensor, n: int) -> torch.Tensor:
    # flash-attn's varlen LSE is [H, total_q]; ours is [total_q, H].
    return lse[:, :n].transpose(0, 1).float()


class _FlashBase(AttentionBackend):
    devices = ("cuda",)
    supports_bias = False
    module = ""  # where flash_attn_varlen_func lives

    @classmethod
    def available(cls) -> bool:
        return _cuda_module(cls.module) is not None

    def __init__(self):
        self.fallbacks = 0
        self._bias_backend = FlexAttentionBackend()

    def _varlen(self):  # pragma: no cover - CUDA only
        return _cuda_module(self.module).flash_attn_varlen_func

    def forward(self, batch: AttentionBatch) -> torch.Tensor:  # pragma: no cover - CUDA only
        view = batch.cache
        if view is not None and view.has_bias():
            self.fallbacks += 1
            return self._bias_backend.forward(batch)
        fn = self._varlen()
        q, k, v = batch.q, batch.k, batch.v
        cu = batch.cu_seqlens.to(device=q.device, dtype=torch.int32)
        max_q = int((cu[1:] - cu[:-1]).max())
        out_l, lse_l = fn(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_q, max_seqlen_k=max_q,
                          softmax_scale=batch.scale, causal=False, return_softmax_lse=True)[:2]
        parts = [(out_l, _lse_to_rows(lse_l, q.shape[0]))]
        if view is not None and int(view.seq_lens.max()) > 0:
            seqused = view.seq_lens.to(device=q.device, dtype=torch.int32)
            out_c, lse_c = fn(q, view.key_cache, view.value_cache, cu_seqlens_q=cu, seqused_k=seqused,
                              max_seqlen_q=max_q, max_seqlen_k=int(seqused.max()), softmax_scale=batch.scale,
                              causal=False, block_table=view.block_table.to(q.device),
                              return_softmax_lse=True)[:2]
            lse_c = _lse_to_rows(lse_c, q.shape[0])
            # Sequences with an empty cache contribute nothing (flash-attn may leave their rows undefined).
            empty = torch.repeat_interleave(seqused == 0, cu[1:] - cu[:-1])
            lse_c[empty] = float("-inf")
            out_c[empty] = 0
            parts.append((out_c, lse_c))
        return combine_lse(parts)[0].to(q.dtype)


class VllmFlashAttnBackend(_FlashBase):
    """``vllm.vllm_flash_attn.flash_attn_varlen_func`` (FA2/FA3 as built by vLLM); pages a multiple of 16."""

    name = "vllm-flash-attn"
    page_multiple = 16
    module = "vllm.vllm_flash_attn"


class FlashAttnBackend(_FlashBase):
    """The ``flash-attn`` package's paged varlen path; its paged kernels need pages that are a multiple of 256."""

    name = "flash-attn"
    page_multiple = 256
    module = "flash_attn"


class XformersBackend(AttentionBackend):
    """xformers ``memory_efficient_attention`` over gathered K/V with the log-mass as an additive bias."""

    name = "xformers"
    devices = ("cuda",)
    page_multiple = 1
    supports_bias = True

    @classmethod
    def available(cls) -> bool:
        return _cuda_module("xformers.ops") is not None

    def forward(self, batch: AttentionBatch) -> torch.Tensor:  # pragma: no cover - CUDA only
        import xformers.ops as xops

        out = torch.empty_like(batch.q)
        view = batch.cache
        for i in range(batch.num_seqs):
            s = batch.seq(i)
            q, k, v = batch.q[s], batch.k[s], batch.v[s]
            h, hkv, d = q.shape[1], k.shape[1], k.shape[2]
            bias = torch.zeros(k.shape[0], device=q.device, dtype=torch.float32)
            if view is not None and int(view.seq_lens[i]) > 0:
                slots = view.slots(i)
                k = torch.cat([view.key_cache.view(-1, hkv, d)[slots], k])
                v = torch.cat([view.value_cache.view(-1, hkv, d)[slots], v])
                bias = torch.cat([view.bias(i), bias])
            nk = k.shape[0]
            pad = (-nk) % 8  # xformers wants the bias' last dim aligned; padded keys get -inf
            if pad:
                k = torch.cat([k, k.new_zeros(pad, hkv, d)])
                v = torch.cat([v, v.new_zeros(pad, hkv, d)])
                bias = torch.cat([bias, bias.new_full((pad,), float("-inf"))])
            rep = h // hkv
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            b = bias.to(q.dtype)[None, None, None, :].expand(1, h, q.shape[0], nk + pad)
            o = xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=b, scale=batch.scale)
            out[s] = o[0]
        return out
