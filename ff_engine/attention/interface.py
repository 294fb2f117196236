"""One attention call for AR video: a block's queries attend to (paged cache) + (the block's own K/V), no mask.

Every backend implements ``AttentionBackend.forward(batch)`` and must equal ``TorchReferenceBackend`` (the
oracle): fp32 within 1e-5 relative, bf16 within 2e-2.  Sequences in one batch may belong to different
sessions with different cache lengths (continuous batching); each sequence's queries are exactly its local
tokens, which is the video case (the block attends to itself bidirectionally and to its past causally).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ff_engine.cache import CacheView
from ff_engine.errors import ConfigError


@dataclass
class AttentionBatch:
    """A varlen batch of sequences for one layer.

    q: [N, H, D]; k, v: [N, Hkv, D] (the block's own post-RoPE keys/values); cu_seqlens: int32 [S+1] with
    sequence i owning rows cu_seqlens[i]:cu_seqlens[i+1]; cache: the paged cache of the S sequences (same
    order) or None; scale: softmax scale (1/sqrt(D) for Wan).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens: torch.Tensor
    cache: CacheView | None
    scale: float

    def __post_init__(self):
        q, k, v = self.q, self.k, self.v
        if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
            raise ConfigError(
                f"q must be [N, H, D] and k/v [N, Hkv, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        if q.shape[1] % k.shape[1]:
            raise ConfigError(f"num_heads {q.shape[1]} must be a multiple of num_kv_heads {k.shape[1]}")
        if not (q.dtype == k.dtype == v.dtype):
            raise ConfigError(f"q/k/v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
        if int(self.cu_seqlens[-1]) != q.shape[0] or int(self.cu_seqlens[0]) != 0:
            raise ConfigError(f"cu_seqlens must run from 0 to N={q.shape[0]}, got {self.cu_seqlens.tolist()}")
        if self.cache is not None:
            if len(self.cache.session_ids) != self.num_seqs:
                raise ConfigError(f"cache view has {len(self.cache.session_ids)} sequences, batch has {self.num_seqs}")
            kc = self.cache.key_cache
            if kc.dtype != q.dtype or kc.shape[2:] != k.shape[1:]:
                raise ConfigError(
                    f"cache is {kc.dtype} [.., {kc.shape[2]}, {kc.shape[3]}], block k is {k.dtype} {tuple(k.shape[1:])}"
                )

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    def seq(self, i: int) -> slice:
        return slice(int(self.cu_seqlens[i]), int(self.cu_seqlens[i + 1]))


class AttentionBackend:
    """Base class: ``name``, ``available()``, ``validate(...)`` and ``forward(batch) -> out [N, H, D]``."""

    name = "base"
    #: device types (``torch.device.type``) the backend runs on
    devices: tuple[str, ...] = ("cpu", "cuda")
    #: page sizes must be a multiple of this
    page_multiple = 1
    supports_bias = True

    @classmethod
    def available(cls) -> bool:
        return True

    def validate(self, page_size: int, dtype: torch.dtype, head_dim: int) -> None:
        if page_size % self.page_multiple:
            raise ConfigError(
                f"page_size {page_size} is not supported by the {self.name} backend: it must be a multiple of "
                f"{self.page_multiple}"
            )

    def forward(self, batch: AttentionBatch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
