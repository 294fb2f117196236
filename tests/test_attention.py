import math

import pytest
import torch

from ff_engine.attention import AttentionBatch, get_backend
from ff_engine.attention.vllm_cpu import VllmCpuBackend
from ff_engine.cache import PagedKVCache
from ff_engine.errors import ConfigError
from kernels import attention_with_lse, combine_lse

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def make_batch(cache_lens, block_lens, h, hkv, d, page_size, dtype, bias=False, seed=0, with_cache=False):
    g = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(1, hkv, d, page_size, num_pages=sum(-(-n // page_size) for n in cache_lens) + 2, dtype=dtype)
    dense = []
    for i, n in enumerate(cache_lens):
        cache.add_session(f"s{i}", max(1, -(-n // page_size)))
        k = torch.randn(n, hkv, d, generator=g).to(dtype)
        v = torch.randn(n, hkv, d, generator=g).to(dtype)
        lm = (torch.rand(n, generator=g) * 2).float() if bias else None
        if n:
            cache.append(f"s{i}", 0, k, v, torch.zeros(n, 3, dtype=torch.int32), lm)
        dense.append((k, v, lm if lm is not None else torch.zeros(n)))
    n_q = sum(block_lens)
    q = torch.randn(n_q, h, d, generator=g).to(dtype)
    k = torch.randn(n_q, hkv, d, generator=g).to(dtype)
    v = torch.randn(n_q, hkv, d, generator=g).to(dtype)
    cu = torch.tensor([0, *torch.tensor(block_lens).cumsum(0).tolist()], dtype=torch.int32)
    batch = AttentionBatch(q, k, v, cu, cache.view([f"s{i}" for i in range(len(cache_lens))], 0), 1 / math.sqrt(d))
    return (batch, dense, cache) if with_cache else (batch, dense)


def dense_reference(batch, dense):
    outs = []
    for i, (ck, cv, lm) in enumerate(dense):
        s = batch.seq(i)
        k, v = torch.cat([ck, batch.k[s]]), torch.cat([cv, batch.v[s]])
        bias = torch.cat([lm, torch.zeros(s.stop - s.start)])
        outs.append(attention_with_lse(batch.q[s].float(), k.float(), v.float(), batch.scale, bias)[0])
    return torch.cat(outs)


CASES = [  # cache lens (several sessions), block lens, heads, kv heads, head dim, page size
    ([0], [7], 2, 2, 64, 16),
    ([16, 33, 5], [8, 8, 3], 4, 2, 64, 16),  # GQA, page-boundary and partial pages, different lengths
    ([31, 32, 64, 1], [5, 9, 4, 12], 2, 1, 128, 32),
    ([100], [48], 4, 4, 128, 16),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["torch", "vllm-cpu"])
def test_backend_matches_dense_reference(backend, case, bias, dtype):
    cache_lens, block_lens, h, hkv, d, ps = case
    batch, dense = make_batch(cache_lens, block_lens, h, hkv, d, ps, dtype, bias=bias)
    be = get_backend(backend)
    out = be.forward(batch)
    assert out.shape == batch.q.shape and out.dtype == dtype
    assert rel_err(out, dense_reference(batch, dense)) <= TOL[dtype]
    if backend == "vllm-cpu":
        assert be.fallbacks == int(bias and any(cache_lens))


def test_vllm_mirror_follows_compaction():
    batch, dense, cache = make_batch([40], [6], 2, 2, 64, 16, torch.float32, with_cache=True)
    be = VllmCpuBackend()
    be.forward(batch)  # builds the mirror
    keep = torch.tensor([0, 3, 4, 20, 39])
    cache.compact("s0", 0, keep)
    view = cache.view(["s0"], 0)
    b2 = AttentionBatch(batch.q, batch.k, batch.v, batch.cu_seqlens, view, batch.scale)
    ref = dense_reference(b2, [(dense[0][0][keep], dense[0][1][keep], torch.zeros(5))])
    assert rel_err(be.forward(b2), ref) <= 1e-5


def test_lse_combination_is_exact():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(5, 2, 16, generator=g), torch.randn(30, 2, 16, generator=g), torch.randn(30, 2, 16, generator=g)
    bias = torch.randn(30, generator=g)
    full = attention_with_lse(q, k, v, 0.25, bias)
    parts = [attention_with_lse(q, k[a:b], v[a:b], 0.25, bias[a:b]) for a, b in [(0, 7), (7, 7), (7, 30)]]
    out, lse = combine_lse(parts)
    assert torch.allclose(out, full[0], atol=1e-6) and torch.allclose(lse, full[1], atol=1e-6)


def test_merged_identical_tokens_equal_duplicates():
    """Two identical tokens == one token with log-mass log 2 (the merge invariant attention must honour)."""
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(4, 2, 16, generator=g), torch.randn(9, 2, 16, generator=g), torch.randn(9, 2, 16, generator=g)
    dup = attention_with_lse(q, torch.cat([k, k[:1]]), torch.cat([v, v[:1]]), 0.25)[0]
    bias = torch.zeros(9)
    bias[0] = math.log(2)
    merged = attention_with_lse(q, k, v, 0.25, bias)[0]
    assert torch.allclose(dup, merged, atol=1e-6)


def test_bad_backend_inputs():
    with pytest.raises(ConfigError, match="page_size 24"):
        VllmCpuBackend().validate(24, torch.float32, 64)
    with pytest.raises(ConfigError, match="head_dim"):
        VllmCpuBackend().validate(32, torch.float32, 48)
    with pytest.raises(ConfigError, match="unknown attention backend"):
        get_backend("nope")
    batch, _ = make_batch([4], [3], 2, 2, 64, 16, torch.float32)
    with pytest.raises(ConfigError, match="cu_seqlens"):
        AttentionBatch(batch.q, batch.k, batch.v, torch.tensor([0, 2], dtype=torch.int32), None, 1.0)
    with pytest.raises(ConfigError, match="dtype"):
        AttentionBatch(batch.q.double(), batch.k, batch.v, batch.cu_seqlens, None, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["vllm-flash-attn", "flash-attn", "xformers"])
@pytest.mark.parametrize("bias", [False, True])
def test_cuda_backends_match_reference(backend, bias):
    from ff_engine.attention import BACKENDS

    if not BACKENDS[backend].available():
        pytest.skip(f"{backend} not installed")
    ps = 256 if backend == "flash-attn" else 16
    for dtype in (torch.bfloat16,):
        batch, dense, cache = make_batch([300, 0, 515], [64, 20, 33], 4, 2, 128, ps, dtype, bias=bias, with_cache=True)
        for name in ("key_cache", "value_cache", "log_mass"):
            setattr(cache, name, getattr(cache, name).cuda())
        cache.device = torch.device("cuda")
        view = cache.view(batch.cache.session_ids, 0)
        b = AttentionBatch(batch.q.cuda(), batch.k.cuda(), batch.v.cuda(), batch.cu_seqlens.cuda(), view, batch.scale)
        out = get_backend(backend, "cuda").forward(b)
        assert rel_err(out.cpu(), dense_reference(batch, dense)) <= TOL[dtype]
