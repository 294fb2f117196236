"""vLLM's CPU paged attention op as an ff-engine backend.

vLLM's CPU kernel keeps K in a packed, ISA-specific layout that only ``cpu_attn_reshape_and_cache`` writes,
so policies cannot read or rewrite keys there.  How the two coexist:

* The canonical plain-layout cache (``PagedKVCache``) stays the single source of truth.
* ``PackedKVMirror`` holds vLLM's packed layout for the *same page ids* and is a ``StorageListener`` of the
  cache: every append, merge and compaction re-packs exactly the slots it wrote, so the mirror never goes
  stale and block tables are shared unchanged.  Cost: a second copy of the KV bytes, plus one
  ``reshape_and_cache`` of every written slot (measured in ``benchmarks/attention.py``).
* The block's own K/V (which must not enter the cache during denoising) are packed into a private scratch
  region of the mirror, after the sequence's cached tokens: the op then sees [cache ; block] as one paged
  sequence with ``causal=False``, which is exactly the video attention.  The op returns no LSE, so this is
  the only exact way to include the block.

* The op has no per-key bias: a batch whose cache holds merged tokens (log-mass != 0) is served by the torch
  reference instead, and ``fallbacks`` counts it.  Merges that need no bias (the affine-hyperplane merge)
  keep this fast path.
Isolation (why one stream's data can never reach another's attention).  vLLM's CPU kernel reads the last
page it is shown *whole*, past ``seq_len``, and a NaN/inf there reaches every output row of the sequence
(masking after a multiply: ``NaN * 0 = NaN``; tests/test_isolation.py).  Before this rule, the stale tail
of the last scratch page (another stream's block from an earlier call) and the stale packed bytes of reused
pages did exactly that.  The rule, enforced in ``forward`` by construction: for each sequence the op is
shown exactly ``pages_for(seq_len)`` pages (the block table ends in the all-zero null page 0), and every slot
of them is either one of that sequence's live cached tokens (kept equal to the canonical cache by
``on_write``) or was written *in this call, for this sequence*: its block K/V, then zeros up to the end of
its last page.  Scratch pages are private to one sequence within a call and sessions in one batch are
distinct, so no two sequences share a written slot.  Independently, pages freed by the cache are cleared here
too (``on_free``), so the mirror never holds a page of a stream that no longer owns it
(``check_invariants``).

Threads.  The op is not reentrant: two engines in one process calling it from two threads at once got results off
by ~1e-4 now and then (a stream migrated between two in-process workers, ``tests/test_moves.py``; never with the
torch backend), so its calls hold ``_KERNEL_LOCK``.  One engine per process (the server, a Ray worker) never
waits on it.
"""

from __future__ import annotations

import threading

import torch

from ff_engine.attention.interface import AttentionBackend, AttentionBatch
from ff_engine.attention.torch_ref import TorchReferenceBackend
from ff_engine.errors import ConfigError

_KERNEL_LOCK = threading.Lock()  # the op is not reentrant across threads (module docstring)
_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _ops():
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return ops, _get_attn_isa


class PackedKVMirror:
    """vLLM's packed CPU layout ``[rows, kv_heads, 2 * page_size, head_dim]`` of one cache's ``KVStorage``.

    Rows 0..num_pages are the cache's pages (same ids); rows after that are scratch pages for block K/V.  It sees
    the storage only (a ``StorageListener`` of it), never the cache's tables or sessions.
    """

    def __init__(self, storage, isa: str):
        self.source, self.isa = storage, isa
        self.scratch_start = storage.num_pages + 1
        self.storage = torch.zeros(0)
        self._alloc(self.scratch_start + 1)
        self.packed_tokens = 0  # tokens re-packed through on_write (cost accounting)
        ops, _ = _ops()
        self._ops = ops
        # Pack what the cache already holds (all slots of all held pages).
        held = storage.held_pages()
        if held:
            ps = storage.page_size
            slots = (torch.tensor(held)[:, None] * ps + torch.arange(ps)[None]).reshape(-1)
            self.on_write(storage, slots)
        storage.listeners.append(self)

    def _alloc(self, rows: int) -> None:
        c = self.source
        new = torch.zeros((rows, c.num_kv_heads, 2 * c.page_size, c.head_dim), dtype=c.dtype)
        if self.storage.numel():
            new[: self.storage.shape[0]] = self.storage
        self.storage = new

    @property
    def key_cache(self):
        return self.storage.chunk(2, dim=2)[0]

    @property
    def value_cache(self):
        return self.storage.chunk(2, dim=2)[1]

    def ensure_scratch(self, pages: int) -> None:
        if self.storage.shape[0] < self.scratch_start + pages:
            self._alloc(self.scratch_start + pages)

    def pack(self, k, v, slots) -> None:
        self._ops.cpu_attn_reshape_and_cache(k, v, self.key_cache, self.value_cache, slots, self.isa)

    def on_write(self, storage, slots: torch.Tensor) -> None:
        h, d = storage.num_kv_heads, storage.head_dim
        k = storage.key_cache.view(-1, h, d)[slots]
        v = storage.value_cache.view(-1, h, d)[slots]
        self.pack(k, v, slots)
        self.packed_tokens += int(slots.numel())

    def on_free(self, storage, pages: list[int]) -> None:
        self.storage.index_fill_(0, torch.as_tensor(pages, dtype=torch.int64), 0)

    def check_invariants(self, storage) -> None:
        """Rows of pages no table holds (the null page 0 included) are all-zero."""
        held = storage.live_slots().any(1)  # a held page holds >= 1 live token
        stale = (self.storage[: self.scratch_start][~held] != 0).flatten(1).any(-1)
        assert not bool(stale.any()), f"packed mirror: {int(stale.sum())} pages held by no table are not zero"


class VllmCpuBackend(AttentionBackend):
    name = "vllm-cpu"
    devices = ("cpu",)
    page_multiple = 16
    supports_bias = False

    def __init__(self):
        self._mirrors: dict[int, PackedKVMirror] = {}
        self._ref = TorchReferenceBackend()
        self.fallbacks = 0

    @classmethod
    def available(cls) -> bool:
        try:
            _ops()
            return hasattr(torch.ops._C, "cpu_attention_with_kv_cache")
        except Exception:  # noqa: BLE001 -- any failure to load the op means the backend is unavailable
            return False

    def validate(self, page_size: int, dtype: torch.dtype, head_dim: int) -> None:
        super().validate(page_size, dtype, head_dim)
        if head_dim not in _HEAD_SIZES:
            raise ConfigError(f"head_dim {head_dim} is not supported by vLLM's CPU attention; allowed {_HEAD_SIZES}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"dtype {dtype} is not supported by vLLM's CPU attention")

    def isa(self, dtype, page_size, head_dim) -> str:
        return _ops()[1](dtype, page_size, head_dim)

    def mirror(self, storage) -> PackedKVMirror:
        """The packed mirror of ``storage`` (a cache's ``KVStorage``), built on first use."""
        m = self._mirrors.get(id(storage))
        if m is None or m.source is not storage:
            self.validate(storage.page_size, storage.dtype, storage.head_dim)
            m = PackedKVMirror(storage, self.isa(storage.dtype, storage.page_size, storage.head_dim))
            self._mirrors[id(storage)] = m
        return m

    def forward(self, batch: AttentionBatch) -> torch.Tensor:
        view = batch.cache
        if view is not None and view.has_bias():
            self.fallbacks += 1
            return self._ref.forward(batch)
        q, k, v = batch.q, batch.k, batch.v
        n_seq, (_, h, d), hkv = batch.num_seqs, q.shape, k.shape[1]
        if view is None:
            raise ConfigError("the vllm-cpu backend needs a paged cache view (cache=None given)")
        if len(set(view.session_ids)) != n_seq:
            raise ConfigError(f"a batch must hold each session once, got {view.session_ids}")
        ps = view.page_size
        m = self.mirror(view.storage)
        # Lay each sequence's block tokens after its cached tokens: fill the tail of its last page (mirror
        # only, canonical storage is untouched) and continue in scratch pages private to it in this call;
        # then zeros up to the end of its last page, so every slot the op reads was written for it (module doc).
        tables, block_slots, pad_slots, seq_lens, scratch_next = [], [], [], [], m.scratch_start
        for i in range(n_seq):
            n_cache, n_new = int(view.seq_lens[i]), batch.seq(i).stop - batch.seq(i).start
            pages = view.block_table[i, : view.pages_for(n_cache)].tolist()
            n_scratch = view.pages_for(n_cache + n_new) - len(pages)
            pages += list(range(scratch_next, scratch_next + n_scratch))
            scratch_next += n_scratch
            pos = torch.arange(n_cache, len(pages) * ps)  # this call's slots: the block, then the padding
            slots = torch.tensor(pages, dtype=torch.int64)[pos // ps] * ps + pos % ps
            block_slots.append(slots[:n_new])
            pad_slots.append(slots[n_new:])
            tables.append(pages)
            seq_lens.append(n_cache + n_new)
        m.ensure_scratch(scratch_next - m.scratch_start)
        m.pack(k.contiguous(), v.contiguous(), torch.cat(block_slots))
        pad = torch.cat(pad_slots)
        if pad.numel():
            zeros = k.new_zeros((pad.numel(), hkv, d))
            m.pack(zeros, zeros, pad)
        bt = torch.zeros((n_seq, max(len(t) for t in tables) + 1), dtype=torch.int32)  # every row ends in page 0
        for i, t in enumerate(tables):
            bt[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
        qsl = batch.cu_seqlens.to(torch.int32)
        ops = m._ops
        out = torch.empty_like(q)
        with _KERNEL_LOCK:
            md = ops.cpu_attn_get_scheduler_metadata(n_seq, h, hkv, d, seq_lens_t, q.dtype, qsl, False, -1, m.isa,
                                                     False)
            ops.cpu_attention_with_kv_cache(
                q.contiguous(), m.key_cache, m.value_cache, out, qsl, seq_lens_t, batch.scale, False, None, -1,
                bt, 0.0, md, None,
            )
        return out
