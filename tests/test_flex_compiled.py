"""The compiled FlexAttention path, run on this CPU: inductor's CPU template, the one-call layout.

On CUDA the flex backend compiles ``flex_attention`` to Triton and combines a cache part and a block part by their
LSE.  Inductor's CPU template cannot return the LSE (PyTorch 2.13), so compiled off CUDA the backend makes one
call per sequence over [its own pages ; its own block rows] (``FlexAttentionBackend.fused``).  What this file shows on CPU: the block
mask of that layout is exact and lists one sequence per query block; the compiled kernel matches the dense
reference and the eager path, with merged tokens (log-mass bias) and several sequences of different lengths; the
engine under every policy gives what the torch reference gives; dynamo really compiled (and reuses the kernel per
shape); a fork and its source, batched together over shared (copy-on-write) pages, give what the torch
reference gives.  NaN isolation runs in ``tests/test_isolation.py`` (``flex-compiled`` is a CPU backend there).
"""

import math

import pytest
import torch
from test_attention import CASES, TOL, dense_reference, make_batch, rel_err
from test_engine import noises, tiny_model
from test_flex import _expand, _fragmented_pool, _listed, _paged_truth

from ff_engine.attention import get_backend
from ff_engine.attention.flex import (
    QUERY_BLOCK,
    CompiledFlexAttentionBackend,
    FlexAttentionBackend,
    fused_block_mask,
    padded_rows,
    row_sequences,
)
from ff_engine.engine import Engine, SessionConfig
from ff_engine.errors import ConfigError
from ff_engine.policies import POLICIES, make_policy
from kernels import combine_lse


def test_fused_block_mask_is_exact_and_never_straddles():
    bt, tables, lens_kv, cu, ps, slots = _fragmented_pool()
    lens_q = (cu[1:] - cu[:-1]).tolist()
    cu_p, rows = padded_rows(cu)
    n_rows = 2 * int(cu_p[-1])  # bucket padding: query blocks of no sequence
    bm, row_seq = fused_block_mask(bt, torch.tensor(lens_kv, dtype=torch.int32), cu_p, cu[1:] - cu[:-1], ps, slots,
                                   n_rows)
    listed, mm = _expand(bm, n_rows, slots + n_rows)
    truth = torch.zeros(n_rows, slots + n_rows, dtype=torch.bool)
    truth[rows, :slots] = _paged_truth(row_sequences(cu), tables, lens_kv, ps, slots)
    for r, i in zip(rows.tolist(), row_sequences(cu).tolist()):  # the block part: its own sequence's real rows
        own = rows[int(cu[i]):int(cu[i]) + lens_q[i]]
        truth[r, slots + own] = True
    assert torch.equal(listed[rows], truth[rows]) and torch.equal(mm[rows], truth[rows])
    assert not listed[int(cu_p[-1]):].any()  # rows of no sequence compute nothing (pad rows are dropped anyway)
    assert int(bm.full_kv_num_blocks.sum()) > 0
    page_owner = {p: i for i, t in enumerate(tables) for p in t}
    chunk_owner = {slots // ps + j: int(row_seq[j * ps]) for j in range(int(cu_p[-1]) // ps)}
    for b in range(n_rows // QUERY_BLOCK):  # one sequence per query block, and it lists only what that one owns
        seqs = set(row_seq[b * QUERY_BLOCK:(b + 1) * QUERY_BLOCK].tolist())
        owners = {page_owner.get(j, chunk_owner.get(j)) for j in _listed(bm, b)}
        assert len(seqs) == 1 and (owners <= seqs if -2 not in seqs else not owners)


def test_fused_layout_needs_a_page_size_dividing_the_query_block():
    with pytest.raises(ConfigError, match="divid"):
        CompiledFlexAttentionBackend().validate(48, torch.float32, 64)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_compiled_fused_matches_dense_reference_and_eager(case, bias):
    batch, dense = make_batch(*case, torch.float32, bias=bias)
    compiled = CompiledFlexAttentionBackend().forward(batch)
    assert compiled.shape == batch.q.shape
    assert rel_err(compiled, dense_reference(batch, dense)) <= TOL[torch.float32]
    eager = FlexAttentionBackend(compiled=False)
    two_call = combine_lse([eager.block_part(batch, padded=True), eager.cache_part(batch, padded=True)])[0]
    assert rel_err(compiled, two_call) <= TOL[torch.float32]
    assert rel_err(eager.fused(batch, compiled=False), two_call) <= TOL[torch.float32]


def test_dynamo_compiles_once_per_shape():
    from torch._dynamo.utils import counters

    batch, _ = make_batch([40, 7], [9, 5], 2, 2, 64, 16, torch.float32, bias=True, seed=3)
    be = CompiledFlexAttentionBackend()
    be.forward(batch)
    before = counters["stats"]["unique_graphs"]
    for seed in (4, 5):  # same shapes, other values: no new graph
        be.forward(make_batch([40, 7], [9, 5], 2, 2, 64, 16, torch.float32, bias=True, seed=seed)[0])
    assert counters["stats"]["unique_graphs"] == before
    assert counters["stats"]["unique_graphs"] >= 1  # a graph was compiled at all (not an eager fallback)


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_layers=2)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_engine_under_every_policy_matches_the_torch_reference(model, name):
    """Two streams of different lengths in one batch, each under the policy at a budget it must enforce
    (eviction, and merging where the policy merges), through the compiled kernel and through the reference."""
    policy = make_policy(name)
    fpb = model.geometry.frames_per_block
    sink = math.ceil(policy.sink_frames / fpb) * fpb
    budget = sink + 2 * fpb if policy.bounded else None
    outs = {}
    for backend in ("torch", "flex-compiled"):
        e = Engine(model, num_pages=64, page_size=16, backend=backend)
        ids = []
        for k, frames in enumerate((sink + 5 * fpb, sink + 3 * fpb)):
            init, steps = noises(model, frames, seed=10 + k)
            cfg = SessionConfig(prompt=torch.randn(4, model.cfg.text_dim, generator=torch.Generator().manual_seed(k)),
                                num_frames=frames, policy=make_policy(name), budget_frames=budget,
                                initial_noise=init, step_noise=steps)
            ids.append(e.add_session(cfg).id)
        blocks = {i: [] for i in ids}
        while any(i in e.sessions for i in ids):
            for r in e.step():
                assert r.error is None, (backend, r.error)
                blocks[r.session_id].append(r.latents)
        outs[backend] = torch.cat([torch.cat(blocks[i]) for i in ids])
        e.cache.check_invariants()
    assert torch.isfinite(outs["flex-compiled"]).all()
    assert rel_err(outs["flex-compiled"], outs["torch"]) <= 1e-4


def test_flex_compiled_is_a_cpu_backend():
    assert isinstance(get_backend("flex-compiled"), CompiledFlexAttentionBackend)


def test_forked_streams_on_shared_pages_match_the_torch_reference(model):
    """A fork shares its source's pages; both, batched in one call, through the compiled kernel and the reference."""
    fpb = model.geometry.frames_per_block
    init, steps = noises(model, 6 * fpb, seed=7)
    outs = {}
    for backend in ("torch", "flex-compiled"):
        e = Engine(model, num_pages=64, page_size=16, backend=backend)
        a = e.add_session(SessionConfig(prompt=torch.randn(4, model.cfg.text_dim, generator=torch.Generator().manual_seed(3)),
                                        num_frames=6 * fpb, policy=make_policy("future-forcing"), budget_frames=3 * fpb,
                                        initial_noise=init, step_noise=steps))
        for _ in range(3):
            e.step([a.id])
        b = e.fork(a.id)
        assert e.cache.shared_pages(b.id) > 0
        blocks = []
        while e.sessions:
            blocks += [r.latents for r in e.step([a.id, b.id])]
        outs[backend] = torch.cat(blocks)
        e.cache.check_invariants()
    assert rel_err(outs["flex-compiled"], outs["torch"]) <= 1e-4
