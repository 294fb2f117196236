"""The FlexAttention backend against the torch reference, and its block masks against a brute-force truth."""

import math

import pytest
import torch
from test_attention import CASES, TOL, dense_reference, make_batch, rel_err

from ff_engine.attention import AttentionBatch, get_backend
from ff_engine.attention.cuda_backends import VllmFlashAttnBackend
from ff_engine.attention.flex import (
    QUERY_BLOCK,
    FlexAttentionBackend,
    padded_rows,
    paged_block_mask,
    row_sequences,
    varlen_block_mask,
)
from ff_engine.cache import PagedKVCache
from ff_engine.errors import ConfigError
from kernels import attention_with_lse, combine_lse


@pytest.mark.parametrize("dtype,bias", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, True)])
@pytest.mark.parametrize("case", CASES)
def test_flex_matches_dense_reference(case, bias, dtype):
    cache_lens, block_lens, h, hkv, d, ps = case
    batch, dense = make_batch(cache_lens, block_lens, h, hkv, d, ps, dtype, bias=bias)
    out = get_backend("flex").forward(batch)
    assert out.shape == batch.q.shape and out.dtype == dtype
    assert rel_err(out, dense_reference(batch, dense)) <= TOL[dtype]


def _expand(bm, n_q, n_kv):
    """Element-level mask the sparse kernel computes: listed full blocks keep everything, listed partial blocks
    keep what ``mask_mod`` keeps, unlisted blocks nothing."""
    qb, kb = bm.BLOCK_SIZE
    out = torch.zeros(n_q, n_kv, dtype=torch.bool)
    q_idx, kv_idx = torch.arange(n_q)[:, None], torch.arange(n_kv)[None, :]
    mm = bm.mask_mod(0, 0, q_idx, kv_idx)
    for num, idx, full in ((bm.kv_num_blocks, bm.kv_indices, False), (bm.full_kv_num_blocks, bm.full_kv_indices, True)):
        for b in range(num.shape[-1]):
            for j in idx[0, 0, b, : int(num[0, 0, b])].tolist():
                rq, rk = slice(b * qb, (b + 1) * qb), slice(j * kb, (j + 1) * kb)
                assert not out[rq, rk].any(), "a block listed twice"
                out[rq, rk] = True if full else mm[rq, rk]
    return out, mm


def _fragmented_pool():
    """Sequences of many lengths (empty, one token, page-aligned, query blocks straddling sequences) over a
    fragmented pool: (block_table, page lists, kv lens, cu_seqlens, page_size, slots)."""
    ps, lens_q, lens_kv = 16, [50, 300, 3, 0, 147, 1, 60], [33, 40, 16, 0, 5, 64, 1]
    g = torch.Generator().manual_seed(0)
    num_pages = 40
    perm = torch.randperm(num_pages, generator=g) + 1
    tables, used = [], 0
    for n in lens_kv:
        p = -(-n // ps)
        tables.append(perm[used:used + p].tolist())
        used += p
    bt = torch.zeros(len(lens_kv), max(map(len, tables)), dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    cu = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    return bt, tables, lens_kv, cu, ps, (num_pages + 1) * ps


def _paged_truth(row_seq, tables, lens_kv, ps, slots):
    truth = torch.zeros(row_seq.numel(), slots, dtype=torch.bool)
    for r in range(truth.shape[0]):
        i = int(row_seq[r])
        for t in range(lens_kv[i]):
            truth[r, tables[i][t // ps] * ps + t % ps] = True
    return truth


def test_paged_block_mask_is_exact():
    """Listed blocks reproduce exactly 'row r sees the live slots of its own sequence's pages'."""
    bt, tables, lens_kv, cu, ps, slots = _fragmented_pool()
    bm, row_seq = paged_block_mask(bt, torch.tensor(lens_kv, dtype=torch.int32), cu, ps, slots)
    truth = _paged_truth(row_seq, tables, lens_kv, ps, slots)
    listed, mm = _expand(bm, truth.shape[0], slots)
    assert torch.equal(listed, truth)
    assert torch.equal(mm, truth)  # mask_mod alone is exact too (PyTorch's eager path uses only it)
    assert int(bm.full_kv_num_blocks.sum()) > 0  # full pages skip mask_mod


def _listed(bm, b):
    return [j for num, idx in ((bm.kv_num_blocks, bm.kv_indices), (bm.full_kv_num_blocks, bm.full_kv_indices))
            for j in idx[0, 0, b, : int(num[0, 0, b])].tolist()]


def test_padded_paged_block_mask_lists_one_sequence_per_query_block():
    """The compiled (CUDA) layout: rows padded per sequence to the query block, so no query block lists pages of
    two sequences (a kernel that reads a listed page whole and masks afterwards never touches another stream);
    the real rows still see exactly their own live slots."""
    bt, tables, lens_kv, cu, ps, slots = _fragmented_pool()
    cu_p, rows = padded_rows(cu)
    assert int(cu_p[-1]) % QUERY_BLOCK == 0 and torch.equal(rows, torch.unique(rows))
    bm, row_seq = paged_block_mask(bt, torch.tensor(lens_kv, dtype=torch.int32), cu_p, ps, slots)
    page_owner = {p: i for i, t in enumerate(tables) for p in t}
    for b in range(int(cu_p[-1]) // QUERY_BLOCK):
        seqs = set(row_seq[b * QUERY_BLOCK:(b + 1) * QUERY_BLOCK].tolist())
        assert len(seqs) == 1 and {page_owner[j] for j in _listed(bm, b)} <= seqs
    truth = _paged_truth(row_sequences(cu), tables, lens_kv, ps, slots)
    listed, mm = _expand(bm, int(cu_p[-1]), slots)
    assert torch.equal(listed[rows], truth) and torch.equal(mm[rows], truth)
    # the unpadded layout does straddle here: the padding is what the assertion above tests
    bm_u, _ = paged_block_mask(bt, torch.tensor(lens_kv, dtype=torch.int32), cu, ps, slots)
    assert any(len({page_owner[j] for j in _listed(bm_u, b)}) > 1 for b in range(bm_u.kv_num_blocks.shape[-1]))


def test_varlen_block_mask_is_exact():
    lens = [50, 100, 3, 0, 147, 1, 60]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    bm, row_seq = varlen_block_mask(cu)
    n = int(cu[-1])
    listed, mm = _expand(bm, n, n)
    truth = row_seq[:, None] == row_seq[None, :]
    assert torch.equal(listed, truth) and torch.equal(mm, truth)


def test_padded_varlen_block_mask_masks_pad_keys_and_never_straddles():
    lens = [50, 100, 3, 0, 147, 1, 60]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    cu_p, rows = padded_rows(cu)
    bm, row_seq = varlen_block_mask(cu_p, key_lens=cu[1:] - cu[:-1])
    n_p = int(cu_p[-1])
    for b in range(n_p // QUERY_BLOCK):  # query and KV blocks both lie inside one sequence
        assert all(row_seq[j * QUERY_BLOCK] == row_seq[b * QUERY_BLOCK] for j in _listed(bm, b))
    listed, mm = _expand(bm, n_p, n_p)
    real = torch.zeros(n_p, dtype=torch.bool)
    real[rows] = True
    truth = (row_seq[:, None] == row_seq[None, :]) & real[None, :]  # pad keys are seen by no row
    assert torch.equal(listed, truth) and torch.equal(mm, truth)


@pytest.mark.parametrize("case", CASES)
def test_flex_padded_layout_matches_dense_reference(case):
    """The compiled path's padded layout, run eagerly on finite data: padding and unpadding lose no row."""
    batch, dense = make_batch(*case, torch.float32, bias=True)
    be = FlexAttentionBackend()
    parts = [be.block_part(batch, padded=True), be.cache_part(batch, padded=True)]
    out = combine_lse(parts)[0]
    assert rel_err(out, dense_reference(batch, dense)) <= TOL[torch.float32]


def _one_session_cache(k, v, lm, scatter: bool, ps=16):
    """The tokens in sequential pages, or page by page interleaved with a decoy's pages (a fragmented pool)."""
    cache = PagedKVCache(1, k.shape[1], k.shape[2], ps, num_pages=20)
    cache.add_session("decoy", 10)
    cache.add_session("s", 10)
    step = ps if scatter else k.shape[0]
    for i in range(0, k.shape[0], step):
        n = min(step, k.shape[0] - i)
        cache.append("s", 0, k[i:i + n], v[i:i + n], torch.zeros(n, 3, dtype=torch.int32), lm[i:i + n])
        if scatter:
            z = torch.zeros(ps, k.shape[1], k.shape[2])
            cache.append("decoy", 0, z, z, torch.zeros(ps, 3, dtype=torch.int32))
    return cache


def test_flex_paged_equals_contiguous_pages():
    """The same tokens in sequential pages and scattered over a fragmented pool give the same output."""
    g = torch.Generator().manual_seed(4)
    k, v, lm = torch.randn(70, 2, 64, generator=g), torch.randn(70, 2, 64, generator=g), torch.rand(70, generator=g)
    q = torch.randn(9, 4, 64, generator=g)
    kb, vb = torch.randn(9, 2, 64, generator=g), torch.randn(9, 2, 64, generator=g)
    out = []
    for scatter in (False, True):
        cache = _one_session_cache(k, v, lm, scatter)
        pages = cache.table("s", 0).pages
        assert scatter == (pages != list(range(pages[0], pages[0] + len(pages))))
        batch = AttentionBatch(q, kb, vb, torch.tensor([0, 9], dtype=torch.int32), cache.view(["s"], 0), 1 / 8)
        out.append(FlexAttentionBackend().forward(batch))
    assert rel_err(out[1], out[0]) <= 1e-6


def test_flex_merge_invariant():
    """One token with log-mass log 2 equals two identical tokens, through the paged flex path."""
    g = torch.Generator().manual_seed(5)
    k, v, q = torch.randn(9, 2, 32, generator=g), torch.randn(9, 2, 32, generator=g), torch.randn(4, 2, 32, generator=g)
    dup_k, dup_v = torch.cat([k, k[:1]]), torch.cat([v, v[:1]])
    merged_lm = torch.zeros(9)
    merged_lm[0] = math.log(2)
    outs = []
    for kk, vv, lm in ((dup_k, dup_v, torch.zeros(10)), (k, v, merged_lm)):
        cache = _one_session_cache(kk, vv, lm, scatter=False)
        batch = AttentionBatch(q, q, q, torch.tensor([0, 4], dtype=torch.int32), cache.view(["s"], 0), 0.2)
        outs.append(FlexAttentionBackend().cache_part(batch)[0])
    assert rel_err(outs[1], outs[0]) <= 1e-6
    assert rel_err(outs[0], attention_with_lse(q, dup_k, dup_v, 0.2)[0]) <= 1e-6


def test_auto_picks_flex_on_cuda_without_vllm_and_flash_attn_biases_through_flex():
    if not VllmFlashAttnBackend.available():
        assert isinstance(get_backend("auto", "cuda"), FlexAttentionBackend)
    assert isinstance(VllmFlashAttnBackend()._bias_backend, FlexAttentionBackend)


def test_flex_rejects_bias_off_with_merged_tokens_and_duplicate_sessions():
    batch, _, cache = make_batch([20], [4], 2, 2, 64, 16, torch.float32, bias=True, with_cache=True)
    with pytest.raises(ConfigError, match="merged tokens"):
        FlexAttentionBackend(bias=False).cache_part(batch)
    view = cache.view(["s0", "s0"], 0)
    b2 = AttentionBatch(torch.cat([batch.q, batch.q]), torch.cat([batch.k, batch.k]), torch.cat([batch.v, batch.v]),
                        torch.tensor([0, 4, 8], dtype=torch.int32), view, batch.scale)
    with pytest.raises(ConfigError, match="session twice"):
        FlexAttentionBackend().forward(b2)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size,bias", [(16, True), (32, False), (32, True), (128, True)])
def test_flex_compiled_cuda_matches_reference(page_size, bias):
    """Real sizes on the GPU: bf16, GQA, three sessions of different lengths, the compiled Triton kernel."""
    batch, dense, cache = make_batch([1700, 0, 515], [480, 200, 333], 8, 4, 128, page_size, torch.bfloat16, bias=bias,
                                     with_cache=True)
    for name in ("key_cache", "value_cache", "log_mass"):
        setattr(cache, name, getattr(cache, name).cuda())
    cache.device = torch.device("cuda")
    view = cache.view(batch.cache.session_ids, 0)
    b = AttentionBatch(batch.q.cuda(), batch.k.cuda(), batch.v.cuda(), batch.cu_seqlens.cuda(), view, batch.scale)
    out = get_backend("flex", "cuda").forward(b)
    assert rel_err(out.cpu(), dense_reference(batch, dense)) <= TOL[torch.bfloat16]
