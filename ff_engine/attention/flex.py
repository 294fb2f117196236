"""FlexAttention backend: paged attention read straight from the canonical page storage, with the log-mass bias.

Why FlexAttention: it ships with PyTorch (no vLLM wheel, no flash-attn build), it takes a per-key bias through
``score_mod`` (a merged token's ``log m``), it returns the LSE, and its block-sparse ``BlockMask`` can *be* the
page table.  It is the one CUDA path every machine with PyTorch has.

Isolation (the rule, enforced by construction): the kernel is never shown a slot that does not belong to the
sequence whose rows it computes.  Masking is not enough: a masked probability is 0, and ``0 * NaN = NaN``, so a
live stream whose K/V overflowed would poison every row that merely *reads* its slots.  The cache guarantees
the rest (``PagedKVCache``: every slot without a live token is all-zero, so a sequence's own partly filled last
page is safe to read whole).  Two layouts keep the rule:
  * eager (off CUDA): PyTorch's eager path computes dense scores for all rows x all KV, so it goes one sequence
    at a time, over a compact ``index_select`` copy of that sequence's own pages
    (``[1, Hkv, n_pages * page_size, D]``, page ids remapped to ``0 .. n_pages - 1``; ``log_mass`` likewise).
  * padded (compiled, CUDA): one call for the batch, each sequence's query rows padded to a multiple of
    ``QUERY_BLOCK`` (``padded_rows``; pad rows are zero and dropped from the output), so no query tile straddles
    two sequences and a query block lists only its own sequence's pages.  The block part pads K/V rows the same
    way (its KV tile is ``BLOCK_KV_BLOCK = QUERY_BLOCK``) and masks pad keys.  Cost: up to ``QUERY_BLOCK - 1``
    extra query rows per sequence (56 for a 3-latent-frame Wan block of 4680 rows: 1.2 %); no copy of the cache.

How the page table becomes a block mask (``paged_block_mask``, in either layout):
  * The physical cache ``[pages + 1, page_size, Hkv, D]`` is viewed, without a copy, as one KV sequence
    ``[1, Hkv, (pages + 1) * page_size, D]``; KV block ``j`` of the block mask (``KV_BLOCK = page_size``) is
    physical page ``j`` (in the eager layout: compact page ``j`` of the one sequence).
  * Query rows are the call's rows, in blocks of ``QUERY_BLOCK``.  A query block lists the pages of every
    sequence its rows belong to (one, in both layouts above; the builder stays exact for straddling blocks too).
    A page is a *full* block (no ``mask_mod`` call) when the query block lies inside one sequence and the page
    is full; the last, partly filled page of a sequence is a *partial* block, where ``mask_mod`` keeps key slot
    ``s`` for row ``r`` iff page ``s // page_size`` belongs to ``r``'s sequence and ``s % page_size`` is below
    that page's fill.
  * ``mask_mod`` is exact on its own (PyTorch's eager path uses only it), and the block lists are exact for it
    (``tests/test_flex.py`` expands them element by element and compares, and checks the padded layout lists one
    sequence per query block).
  * ``score_mod`` adds ``log_mass[slot]`` to the logit: merged tokens are served here, not by a fallback.

The block's own K/V are a second call with a block-diagonal (varlen) mask over the call's rows; the two parts
are combined exactly by their LSE (``kernels.combine_lse``), as the flash-attn backends do.

On CUDA ``flex_attention`` is compiled (Triton) and uses the padded layout; elsewhere it runs eagerly, one
sequence at a time -- for tests and rehearsals only (the CPU engine uses vLLM's op).
Invariants: a page is owned by at most one sequence of a batch (a view holds distinct sessions of one layer);
rows with no key at all (an empty cache) have LSE ``-inf`` and contribute nothing.
"""

from __future__ import annotations

import functools
import warnings

import torch

from ff_engine.attention.interface import AttentionBackend, AttentionBatch
from ff_engine.errors import ConfigError
from kernels.attention_ref import combine_lse

QUERY_BLOCK = 128
BLOCK_KV_BLOCK = 128  # KV block of the block part (contiguous rows, not pages)


def _flex():
    from torch.nn.attention import flex_attention as fa

    return fa


@functools.cache
def _compiled_flex():
    # dynamic=False: one kernel per distinct shape, cached by dynamo; the layouts keep shapes few (row counts in
    # powers of two of QUERY_BLOCK on CPU, block-list widths in powers of two everywhere)
    return torch.compile(_flex().flex_attention, dynamic=False)


def lse_when_compiled(device: torch.device) -> bool:
    """Whether compiled ``flex_attention`` can return the LSE here.  Inductor's CPU template cannot (PyTorch
    2.13: "torch.compile on CPU only supports inference and `return_lse` is not supported yet"), so compiled
    off CUDA the backend uses the one-call layout, which needs no LSE."""
    return device.type == "cuda"


def flex_out(q, k, v, block_mask, scale, score_mod=None, compiled=False):
    """``flex_attention`` on [1, H, L, D] tensors returning only out [1, H, L, D] (no LSE: the one-call layout)."""
    fn = _compiled_flex() if compiled else _flex().flex_attention
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def flex_call(q, k, v, block_mask, scale, score_mod=None, compiled=False, kernel_options=None):
    """``flex_attention`` on [1, H, L, D] tensors returning (out [1, H, L, D], lse [1, H, L] natural log, float32).

    Uses ``return_aux=AuxRequest(lse=True)`` where PyTorch has it (>= 2.9) and ``return_lse`` before."""
    fa = _flex()
    fn = _compiled_flex() if compiled else fa.flex_attention
    kw = {"score_mod": score_mod, "block_mask": block_mask, "scale": scale, "enable_gqa": q.shape[1] != k.shape[1],
          "kernel_options": kernel_options}
    with warnings.catch_warnings():
        # the eager path is intended off CUDA (tests, rehearsals): PyTorch's "not compiled" advice is noise there
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        if hasattr(fa, "AuxRequest"):
            out, aux = fn(q, k, v, return_aux=fa.AuxRequest(lse=True), **kw)
            return out, aux.lse.float()
        out, lse = fn(q, k, v, return_lse=True, **kw)  # pragma: no cover - torch < 2.9
        return out, lse.float()


# ---- block masks ----------------------------------------------------------------------------------------
def row_sequences(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """int64 [N]: the sequence every query row belongs to."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lens.numel(), device=cu_seqlens.device), lens)


def _block_spans(row_seq: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last sequence of every block of ``block`` rows: (lo, hi) int64 [num_blocks]."""
    n = row_seq.numel()
    starts = torch.arange(0, n, block, device=row_seq.device)
    return row_seq[starts], row_seq[torch.clamp(starts + block, max=n) - 1]


def _compact(candidates: torch.Tensor, keep: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``candidates`` [R, C], the entries where ``keep`` first (stable), cut to ``width``: the
    (num_blocks [R] int32, indices [R, width] int32) pair of a BlockMask."""
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    return keep.sum(-1).to(torch.int32), candidates.gather(-1, order).to(torch.int32)


def _width(count: torch.Tensor, full_width: int) -> int:
    w = max(1, int(count.max()) if count.numel() else 1)
    return min(full_width, 1 << (w - 1).bit_length())  # powers of two: few distinct shapes to compile for


def _page_lists(block_table, seq_lens, row_seq, page_size, num_slots):
    """The cache part's block lists: per query block of ``row_seq`` (the sequence of every query row), its
    candidate pages and which are partial / full, plus the per-page owner and fill ``mask_mod`` reads.
    Returns (cand [QB, C], partial [QB, C], full [QB, C], owner [pages], fill [pages])."""
    dev = block_table.device
    n_pages_total = num_slots // page_size
    lens = seq_lens.long()
    npages, nfull = (lens + page_size - 1) // page_size, lens // page_size
    owner = torch.full((n_pages_total,), -1, dtype=torch.int32, device=dev)
    fill = torch.zeros(n_pages_total, dtype=torch.int32, device=dev)
    jj = torch.arange(block_table.shape[1], device=dev)
    held = jj[None, :] < npages[:, None]  # [S, max_pages]
    seq_ids = torch.arange(lens.numel(), device=dev, dtype=torch.int32)[:, None].expand_as(held)
    pages = block_table.long()
    owner[pages[held]] = seq_ids[held]
    fill[pages[held]] = torch.clamp(lens[:, None] - jj[None, :] * page_size, max=page_size).to(torch.int32)[held]
    lo, hi = _block_spans(row_seq.clamp(min=0), QUERY_BLOCK)
    live = row_seq[::QUERY_BLOCK] >= 0  # query blocks of no sequence (the one-call layout's bucket padding)
    span = int((hi - lo).max()) + 1 if lo.numel() else 1
    seqs = lo[:, None] + torch.arange(span, device=dev)[None, :]  # [QB, span]: the sequences of each query block
    in_span = (seqs <= hi[:, None]) & live[:, None]
    seqs = seqs.clamp(max=lens.numel() - 1)
    valid = in_span[:, :, None] & held[seqs]  # [QB, span, max_pages]
    single = (lo == hi)[:, None, None]
    full = valid & single & (jj[None, None, :] < nfull[seqs][:, :, None])
    valid, full = valid.flatten(1), full.flatten(1)
    return pages[seqs].flatten(1), valid & ~full, full, owner, fill


def _from_lists(cand, partial, full, mask_mod, block_size, seq_lengths, n_kv_blocks, full_width=False):
    """A BlockMask from per-query-block candidate KV blocks and their partial / full flags.  Index lists are cut
    to a power-of-two width (few shapes to compile), or kept ``n_kv_blocks`` wide (``full_width``: inductor's
    CPU template wants the index tensor to span the whole KV length)."""
    if full_width:
        pad = max(0, n_kv_blocks - cand.shape[1])
        cand, partial, full = (torch.nn.functional.pad(x, (0, pad)) for x in (cand, partial, full))
        width = min(n_kv_blocks, cand.shape[1])
        kv_num, kv_idx = _compact(cand, partial, width)
        full_num, full_idx = _compact(cand, full, width)
    else:
        kv_num, kv_idx = _compact(cand, partial, min(_width(partial.sum(-1), n_kv_blocks), cand.shape[1]))
        full_num, full_idx = _compact(cand, full, min(_width(full.sum(-1), n_kv_blocks), cand.shape[1]))
    return _flex().BlockMask.from_kv_blocks(kv_num[None, None], kv_idx[None, None], full_num[None, None],
                                            full_idx[None, None], BLOCK_SIZE=block_size, mask_mod=mask_mod,
                                            seq_lengths=seq_lengths, compute_q_blocks=False)


def paged_block_mask(block_table, seq_lens, cu_seqlens, page_size, num_slots):
    """BlockMask of the cache part: query rows (``cu_seqlens``) against the physical slots (``num_slots`` =
    ``(pages + 1) * page_size``) of their own sequence's pages (``block_table`` [S, max_pages], ``seq_lens`` [S]).
    All inputs on the query device; returns (block_mask, row_seq)."""
    row_seq = row_sequences(cu_seqlens)
    cand, partial, full, owner, fill = _page_lists(block_table, seq_lens, row_seq, page_size, num_slots)

    def mask_mod(b, h, q_idx, kv_idx):
        page = kv_idx // page_size
        return (owner[page] == row_seq[q_idx]) & (kv_idx % page_size < fill[page])

    bm = _from_lists(cand, partial, full, mask_mod, (QUERY_BLOCK, page_size), (row_seq.numel(), num_slots),
                     num_slots // page_size)
    return bm, row_seq


def fused_block_mask(block_table, seq_lens, cu_padded, key_lens, page_size, num_slots, n_rows):
    """BlockMask of the one-call layout (``FlexAttentionBackend.fused``): padded query rows (``cu_padded``, see
    ``padded_rows``; ``n_rows`` >= its last entry, the rows past it belong to no sequence) against one KV
    sequence made of the pool's slots (``num_slots``) followed by the padded block rows (their K/V at
    ``num_slots + row``).  A row sees its own sequence's live cache slots and the real (first ``key_lens[i]``)
    block rows of its own sequence; KV blocks are ``page_size`` long in both parts (``QUERY_BLOCK`` must be a
    multiple of the page size, so the block part's chunks never straddle two sequences).  Returns
    (block_mask, row_seq [n_rows]: -2 for rows of no sequence)."""
    if QUERY_BLOCK % page_size:
        raise ConfigError(f"the one-call flex layout needs a page size dividing {QUERY_BLOCK}, got {page_size}")
    dev = block_table.device
    n_padded = int(cu_padded[-1])
    row_seq = torch.full((n_rows,), -2, dtype=torch.int64, device=dev)
    row_seq[:n_padded] = row_sequences(cu_padded)
    p_cand, p_partial, p_full, owner, fill = _page_lists(block_table, seq_lens, row_seq, page_size, num_slots)
    # block part: the chunks (page_size rows) of each query block's own sequence, after the pool's pages
    seq_of_block = row_seq[::QUERY_BLOCK]
    starts = cu_padded[:-1].long() // page_size
    n_chunks = (cu_padded[1:] - cu_padded[:-1]).long() // page_size
    width = max(1, int(n_chunks.max()) if n_chunks.numel() else 1)
    c = torch.arange(width, device=dev)[None, :]
    s = seq_of_block.clamp(min=0)
    real = (key_lens.long()[s][:, None] - c * page_size).clamp(0, page_size)  # real key rows per chunk
    ok = (seq_of_block >= 0)[:, None] & (c < n_chunks[s][:, None])
    b_cand = num_slots // page_size + starts[s][:, None] + c.clamp(max=width - 1)
    b_full, b_partial = ok & (real == page_size), ok & (real > 0) & (real < page_size)
    key_seq = torch.full((n_padded,), -3, dtype=torch.int64, device=dev)
    key_real = torch.zeros(n_padded, dtype=torch.bool, device=dev)
    if n_padded:
        key_seq[:] = row_sequences(cu_padded)
        key_real[:] = torch.arange(n_padded, device=dev) - cu_padded[:-1].long()[key_seq] < key_lens.long()[key_seq]
    n_cache = num_slots

    def mask_mod(b, h, q_idx, kv_idx):
        page = torch.clamp(kv_idx // page_size, max=n_cache // page_size - 1)
        cache_ok = (owner[page] == row_seq[q_idx]) & (kv_idx % page_size < fill[page])
        j = torch.clamp(kv_idx - n_cache, min=0, max=max(n_padded - 1, 0))
        block_ok = (key_seq[j] == row_seq[q_idx]) & key_real[j]
        return torch.where(kv_idx < n_cache, cache_ok, block_ok)

    cand = torch.cat([p_cand, b_cand], 1)
    bm = _from_lists(cand, torch.cat([p_partial, b_partial], 1), torch.cat([p_full, b_full], 1), mask_mod,
                     (QUERY_BLOCK, page_size), (n_rows, num_slots + n_rows), (num_slots + n_rows) // page_size,
                     full_width=True)
    return bm, row_seq


def varlen_block_mask(cu_seqlens, key_lens=None):
    """BlockMask of the block part: each query row attends to the rows of its own sequence (block-diagonal).
    ``key_lens`` [S] (padded layout, see ``padded_rows``): only the first ``key_lens[i]`` rows of sequence ``i``
    are keys, the rest are padding that no row may see."""
    fa = _flex()
    row_seq = row_sequences(cu_seqlens)
    n, dev = row_seq.numel(), row_seq.device
    if key_lens is None:
        real = torch.ones(n, dtype=torch.bool, device=dev)
    else:
        real = torch.arange(n, device=dev) - cu_seqlens[:-1].long()[row_seq] < key_lens.long()[row_seq]
    qlo, qhi = _block_spans(row_seq, QUERY_BLOCK)
    klo, khi = _block_spans(row_seq, BLOCK_KV_BLOCK)
    pad_in_block = torch.zeros(klo.numel() * BLOCK_KV_BLOCK, dtype=torch.int32, device=dev)
    pad_in_block[:n] = (~real).to(torch.int32)
    all_real = pad_in_block.view(-1, BLOCK_KV_BLOCK).sum(-1) == 0
    overlap = (qlo[:, None] <= khi[None, :]) & (klo[None, :] <= qhi[:, None])
    full = (qlo == qhi)[:, None] & (klo == khi)[None, :] & (qlo[:, None] == klo[None, :]) & all_real[None, :]
    cand = torch.arange(klo.numel(), device=dev).expand_as(overlap)
    partial = overlap & ~full
    kv_num, kv_idx = _compact(cand, partial, cand.shape[1])
    full_num, full_idx = _compact(cand, full, cand.shape[1])

    def mask_mod(b, h, q_idx, kv_idx):
        return (row_seq[q_idx] == row_seq[kv_idx]) & real[kv_idx]

    bm = fa.BlockMask.from_kv_blocks(kv_num[None, None], kv_idx[None, None], full_num[None, None],
                                     full_idx[None, None], BLOCK_SIZE=(QUERY_BLOCK, BLOCK_KV_BLOCK),
                                     mask_mod=mask_mod, seq_lengths=(n, n), compute_q_blocks=False)
    return bm, row_seq


def padded_rows(cu_seqlens: torch.Tensor, multiple: int = QUERY_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """The padded layout: every sequence's rows padded to a multiple of ``multiple``, so no block of ``multiple``
    rows holds rows of two sequences.  Returns (cu_padded int32 [S+1], rows int64 [N]: the padded row of every
    real row, in order); pad rows belong to the sequence they pad."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    cu_padded = torch.zeros_like(cu_seqlens, dtype=torch.int64)
    cu_padded[1:] = ((lens + multiple - 1) // multiple * multiple).cumsum(0)
    row_seq = row_sequences(cu_seqlens)
    offset = torch.arange(row_seq.numel(), device=row_seq.device) - cu_seqlens[:-1].long()[row_seq]
    return cu_padded.to(torch.int32), cu_padded[:-1][row_seq] + offset


def _pad(x: torch.Tensor, rows: torch.Tensor, n_padded: int) -> torch.Tensor:
    """[N, H, D] -> [1, H, n_padded, D] with ``x``'s rows at ``rows`` and zeros (finite) elsewhere."""
    out = x.new_zeros((n_padded, *x.shape[1:]))
    out[rows] = x
    return out.transpose(0, 1)[None]


def _rows_out(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, H, N, D], [1, H, N] -> [N, H, D], [N, H]; rows without keys get out 0 and LSE -inf."""
    out, lse = out[0].transpose(0, 1), lse[0].transpose(0, 1)
    empty = ~torch.isfinite(lse)
    return out.masked_fill(empty[..., None], 0), lse.masked_fill(empty, float("-inf"))


class FlexAttentionBackend(AttentionBackend):
    """``flex``: PyTorch FlexAttention over the page table, per-key log-mass bias, LSE combination.

    ``compiled``: compile ``flex_attention`` (Triton on CUDA); None = on CUDA only.  ``bias``: add the log-mass
    bias (default True; False is for benchmarking an all-original cache and raises if the cache holds merged
    tokens)."""

    name = "flex"
    page_multiple = 16  # the Triton kernel's KV tile is one page; tl.dot wants >= 16
    supports_bias = True

    def __init__(self, compiled: bool | None = None, bias: bool = True):
        self.compiled, self.bias = compiled, bias

    @classmethod
    def available(cls) -> bool:
        try:
            _flex()
        except ImportError:
            return False
        return True

    def _compile(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.compiled is None else self.compiled

    @staticmethod
    def _kernel_options(page_size: int, device: torch.device):
        # The Triton kernel's BLOCK_N must divide the sparse KV block (one page); its default tiles are 64/128.
        return {"BLOCK_N": page_size} if device.type == "cuda" and page_size < 64 else None

    @staticmethod
    def _padded(compiled: bool, padded: bool | None) -> bool:
        # the padded layout is the compiled kernel's; eager flex computes dense scores, so it goes per sequence
        return compiled if padded is None else padded

    def forward(self, batch: AttentionBatch) -> torch.Tensor:
        q, view = batch.q, batch.cache
        compiled = self._compile(q.device)
        if view is not None and compiled and not lse_when_compiled(q.device):
            return self.fused(batch, compiled=True)
        parts = [self.block_part(batch, compiled=compiled)]
        if view is not None and int(view.seq_lens.max()) > 0:
            parts.append(self.cache_part(batch, compiled=compiled))
        return combine_lse(parts)[0].to(q.dtype)

    def block_part(self, batch: AttentionBatch, compiled: bool | None = None,
                   padded: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(out [N, H, D], lse [N, H]) of the batch's queries over their own block's K/V (block-diagonal)."""
        q, k, v = batch.q, batch.k, batch.v
        compiled = self._compile(q.device) if compiled is None else compiled
        cu = batch.cu_seqlens.to(q.device)
        if self._padded(compiled, padded):
            cu_p, rows = padded_rows(cu)
            n_p = int(cu_p[-1])
            bm, _ = varlen_block_mask(cu_p, key_lens=cu[1:] - cu[:-1])
            out, lse = _rows_out(*flex_call(_pad(q, rows, n_p), _pad(k, rows, n_p), _pad(v, rows, n_p), bm,
                                            batch.scale, compiled=compiled))
            return out[rows], lse[rows]
        outs = [_rows_out(*flex_call(q[s].transpose(0, 1)[None], k[s].transpose(0, 1)[None],
                                     v[s].transpose(0, 1)[None], None, batch.scale, compiled=compiled))
                for s in map(batch.seq, range(batch.num_seqs)) if s.stop > s.start]
        return _cat_rows(outs, q)

    def cache_part(self, batch: AttentionBatch, compiled: bool | None = None,
                   padded: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(out [N, H, D], lse [N, H]) of the batch's queries over their cached pages only."""
        q, view = batch.q, batch.cache
        compiled = self._compile(q.device) if compiled is None else compiled
        self._check_view(view)
        if self._padded(compiled, padded):
            return self._cache_padded(batch, compiled)
        seqs = [i for i in range(batch.num_seqs) if batch.seq(i).stop > batch.seq(i).start]
        return _cat_rows([self._cache_one(batch, i, compiled) for i in seqs], q)

    def fused(self, batch: AttentionBatch, compiled: bool = True) -> torch.Tensor:
        """The one-call layout, one call per sequence: its query rows padded and bucketed to a power of two of
        ``QUERY_BLOCK`` rows, against one KV sequence = a compact copy of *its own* pages (bucketed to a power of
        two) followed by its own block K/V rows, so the cache part and the block part are one softmax and no LSE
        is needed (``lse_when_compiled``).  The kernel is never shown another stream's slot -- the isolation
        rule, by construction, as in the eager layout: a whole-pool KV sequence relying on the block mask alone
        let a NaN neighbour reach a batched stream once a compiled graph was reused (measured: ``tests/
        test_isolation.py`` run after ``tests/test_flex_compiled.py`` in one process).  Cost: a copy of the
        sequence's pages per call, which is why CUDA keeps the two-call, no-copy layout."""
        q = batch.q
        self._check_view(batch.cache)
        outs = [self._fused_one(batch, i, compiled) for i in range(batch.num_seqs)]
        return torch.cat(outs).to(q.dtype) if outs else q.new_zeros(q.shape)

    def _fused_one(self, batch: AttentionBatch, i: int, compiled: bool) -> torch.Tensor:
        view, s = batch.cache, batch.seq(i)
        q, k, v = batch.q[s], batch.k[s], batch.v[s]
        n = s.stop - s.start
        if n == 0:
            return q
        ps, hkv, d = view.page_size, view.key_cache.shape[2], view.key_cache.shape[3]
        seq_len = view.seq_lens[i : i + 1].to(q.device)
        n_pages = (int(seq_len) + ps - 1) // ps
        width = 1 << max(0, n_pages - 1).bit_length()  # powers of two: few shapes to compile
        pages = view.block_table[i, :n_pages].to(q.device).long()
        parts = []
        for storage in (view.key_cache, view.value_cache, view.log_mass):
            own = storage.new_zeros((width, *storage.shape[1:]))
            own[:n_pages] = storage.index_select(0, pages)
            parts.append(own)
        cu = torch.tensor([0, n], dtype=torch.int32, device=q.device)
        cu_p, rows = padded_rows(cu)
        n_rows = QUERY_BLOCK * (1 << (-(-int(cu_p[-1]) // QUERY_BLOCK) - 1).bit_length())
        table = torch.arange(width, dtype=torch.int32, device=q.device)[None]
        bm, _ = fused_block_mask(table, seq_len, cu_p, cu[1:], ps, width * ps, n_rows)
        kv = [torch.cat([c.view(-1, hkv, d).transpose(0, 1)[None], _pad(x.to(c.dtype), rows, n_rows)], dim=2)
              for c, x in ((parts[0], k), (parts[1], v))]  # [own pages ; own block rows]
        log_mass = torch.cat([parts[2].view(-1), parts[2].new_zeros(n_rows)])
        out = flex_out(_pad(q, rows, n_rows), *kv, bm, batch.scale, self._score_mod(log_mass), compiled)
        return out[0].transpose(0, 1)[rows]

    def _check_view(self, view) -> None:
        if len(set(view.session_ids)) != len(view.session_ids):
            raise ConfigError(f"a batch holds a session twice: {view.session_ids} (session_ids)")
        if not self.bias and view.has_bias():
            raise ConfigError("bias=False but the cache holds merged tokens (log-mass != 0)")

    def _score_mod(self, log_mass: torch.Tensor):
        if not self.bias:
            return None

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + log_mass[kv_idx].to(score.dtype)

        return score_mod

    def _cache_padded(self, batch: AttentionBatch, compiled: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole pool viewed as one KV sequence (no copy), query rows in the padded layout: every query block
        lies inside one sequence, so it lists only that sequence's pages."""
        q, view = batch.q, batch.cache
        ps, hkv, d = view.page_size, view.key_cache.shape[2], view.key_cache.shape[3]
        kc = view.key_cache.view(-1, hkv, d).transpose(0, 1)[None]  # [1, Hkv, slots, D]: a view, no copy
        vc = view.value_cache.view(-1, hkv, d).transpose(0, 1)[None]
        cu_p, rows = padded_rows(batch.cu_seqlens.to(q.device))
        bm, _ = paged_block_mask(view.block_table.to(q.device), view.seq_lens.to(q.device), cu_p, ps, kc.shape[2])
        out, lse = _rows_out(*flex_call(_pad(q, rows, int(cu_p[-1])), kc, vc, bm, batch.scale,
                                        self._score_mod(view.log_mass.view(-1)), compiled,
                                        self._kernel_options(ps, q.device)))
        return out[rows], lse[rows]

    def _cache_one(self, batch: AttentionBatch, i: int, compiled: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence ``i``'s rows over a compact copy of its own pages only (``index_select``): the kernel sees no
        slot of another stream, whatever it computes densely."""
        q, view, s = batch.q[batch.seq(i)], batch.cache, batch.seq(i)
        ps, hkv, d = view.page_size, view.key_cache.shape[2], view.key_cache.shape[3]
        seq_len = view.seq_lens[i : i + 1].to(q.device)
        n_pages = (int(seq_len) + ps - 1) // ps
        if n_pages == 0:
            return q.new_zeros(q.shape), torch.full(q.shape[:2], float("-inf"), device=q.device)
        pages = view.block_table[i, :n_pages].to(q.device).long()
        kc = view.key_cache.index_select(0, pages).view(-1, hkv, d).transpose(0, 1)[None]
        vc = view.value_cache.index_select(0, pages).view(-1, hkv, d).transpose(0, 1)[None]
        compact_table = torch.arange(n_pages, dtype=torch.int32, device=q.device)[None]
        cu = torch.tensor([0, s.stop - s.start], dtype=torch.int32, device=q.device)
        bm, _ = paged_block_mask(compact_table, seq_len, cu, ps, n_pages * ps)
        score_mod = self._score_mod(view.log_mass.index_select(0, pages).view(-1))
        return _rows_out(*flex_call(q.transpose(0, 1)[None], kc, vc, bm, batch.scale, score_mod, compiled,
                                    self._kernel_options(ps, q.device)))


class CompiledFlexAttentionBackend(FlexAttentionBackend):
    """``flex-compiled``: the flex backend with ``flex_attention`` always compiled -- Triton on CUDA (the two-call
    padded layout), inductor's CPU template elsewhere (the one-call layout, ``FlexAttentionBackend.fused``).
    On CPU it exists to run the compiled path in the normal test suite; the CPU engine's default stays vLLM's op.
    The first call per shape compiles (seconds on CPU); dynamo caches the kernel per shape."""

    name = "flex-compiled"

    def __init__(self, bias: bool = True):
        super().__init__(compiled=True, bias=bias)

    def validate(self, page_size: int, dtype: torch.dtype, head_dim: int) -> None:
        super().validate(page_size, dtype, head_dim)
        if QUERY_BLOCK % page_size:
            raise ConfigError(f"page_size {page_size} is not supported by the {self.name} backend: it must divide "
                              f"{QUERY_BLOCK} (the one-call layout's chunks of block rows)")


def _cat_rows(parts: list[tuple[torch.Tensor, torch.Tensor]], q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence (out, lse) pairs, in row order, as one (out [N, H, D], lse [N, H]); N = 0 gives empty ones."""
    if not parts:
        return q.new_zeros(q.shape), torch.full(q.shape[:2], float("-inf"), device=q.device)
    return torch.cat([o for o, _ in parts]), torch.cat([lse for _, lse in parts])
