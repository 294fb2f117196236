"""One stream's data never reaches another stream's attention, on every attention backend that runs on CPU.

The channels these tests close (see ``PagedKVCache`` and ``ff_engine.attention.vllm_cpu``): scratch pages of
vLLM's packed mirror that an earlier call of another stream left behind, pages (canonical and packed) that a
finished or cancelled stream returned to the pool with its bytes still in them, and per-page summaries computed
over a reused page.  Each is poisoned with NaN, which any kernel that reads a slot past ``seq_len`` turns into
a NaN output, so "finite and equal to a run without the poisoner" is an exact test of isolation.
"""

import math

import pytest
import torch
from test_engine import tiny_model

from ff_engine.attention import BACKENDS, AttentionBatch, available_backends, get_backend
from ff_engine.cache import PagedKVCache
from ff_engine.engine import Engine, SessionConfig
from ff_engine.errors import ConfigError
from ff_engine.policies import Unbounded

CPU_BACKENDS = available_backends("cpu")
H, HKV, D, PS = 2, 2, 64, 16


def _kv(n, seed, fill=None):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(n, HKV, D, generator=g), torch.randn(n, HKV, D, generator=g)
    if fill is not None:
        k.fill_(fill), v.fill_(fill)
    return k, v


def _append(cache, sid, n, seed, fill=None):
    k, v = _kv(n, seed, fill)
    cache.append(sid, 0, k, v, torch.zeros(n, 3, dtype=torch.int32))


def _attend(backend, cache, sids, block_lens, seed, fill=None):
    n = sum(block_lens)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, H, D, generator=g)
    k, v = _kv(n, seed + 1, fill)
    cu = torch.tensor([0, *torch.tensor(block_lens).cumsum(0).tolist()], dtype=torch.int32)
    return backend.forward(AttentionBatch(q, k, v, cu, cache.view(sids, 0), 1 / math.sqrt(D)))


def _victim_alone(backend_name, cache_len, block_len):
    """What the victim's call gives in a cache no other stream ever touched."""
    cache = PagedKVCache(1, HKV, D, PS, num_pages=16)
    cache.add_session("victim", 4)
    _append(cache, "victim", cache_len, seed=1)
    return _attend(get_backend(backend_name), cache, ["victim"], [block_len], seed=2)


def test_cpu_backends_are_listed():
    assert "torch" in CPU_BACKENDS  # the oracle always runs; the others are there when their library is
    assert all("cpu" in BACKENDS[n].devices for n in CPU_BACKENDS)
    assert ("vllm-cpu" in CPU_BACKENDS) == BACKENDS["vllm-cpu"].available()
    assert "vllm-flash-attn" not in CPU_BACKENDS and "xformers" not in CPU_BACKENDS


@pytest.mark.skipif("vllm-cpu" not in CPU_BACKENDS, reason="needs vLLM's CPU attention op")
def test_vllm_cpu_rejects_a_session_twice_in_one_batch():
    """Two sequences of one session would share the tail of its last page in the packed mirror."""
    cache = PagedKVCache(1, HKV, D, PS, num_pages=4)
    cache.add_session("a", 2)
    _append(cache, "a", 5, seed=1)
    with pytest.raises(ConfigError, match="session"):
        _attend(get_backend("vllm-cpu"), cache, ["a", "a"], [3, 3], seed=2)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_a_poisoned_block_never_reaches_a_later_call(backend_name):
    """Scratch channel: a NaN block of one call, then another stream whose block ends mid scratch page."""
    be = get_backend(backend_name)
    cache = PagedKVCache(1, HKV, D, PS, num_pages=16)
    for sid in ("poison", "victim"):
        cache.add_session(sid, 4)
    _attend(be, cache, ["poison"], [2 * PS], seed=5, fill=float("nan"))  # fills two scratch pages (vllm-cpu)
    _append(cache, "victim", 20, seed=1)
    out = _attend(be, cache, ["victim"], [20], seed=2)  # [20 cached ; 20 block] ends in the middle of a page
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _victim_alone(backend_name, 20, 20), rtol=0, atol=1e-6)
    cache.check_invariants()


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("free_by", ["release", "compact"])
def test_a_reused_page_holds_nothing_of_its_last_owner(backend_name, free_by):
    """Page channel: a stream's NaN pages go back to the pool (cancel or compaction) and the next stream's
    partial last page is one of them."""
    be = get_backend(backend_name)
    cache = PagedKVCache(1, HKV, D, PS, num_pages=16)
    for sid in ("poison", "victim"):
        cache.add_session(sid, 4)
    _append(cache, "poison", 1, seed=3)
    _attend(be, cache, ["poison"], [3], seed=4)  # derived layouts (the packed mirror) exist before the poison
    _append(cache, "poison", 3 * PS - 1, seed=3, fill=float("nan"))
    _attend(be, cache, ["poison"], [3], seed=4)
    poisoned = set(cache.table("poison", 0).pages)
    if free_by == "release":
        cache.release_session("poison")
    else:
        cache.compact("poison", 0, torch.tensor([0]))  # keeps the one clean token; its page tail was NaN
        poisoned -= set(cache.table("poison", 0).pages)
    cache.check_invariants()
    _append(cache, "victim", 20, seed=1)
    assert set(cache.table("victim", 0).pages) & poisoned  # the test is not vacuous: a page was reused
    out = _attend(be, cache, ["victim"], [7], seed=2)  # [20 cached ; 7 block] ends in the middle of a page
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _victim_alone(backend_name, 20, 7), rtol=0, atol=1e-6)
    summ, ref = cache.page_summaries("victim", 0), cache.recompute_page_summaries("victim", 0)
    for key in ("centroid", "radius", "log_mass"):  # what policies rank pages by
        torch.testing.assert_close(summ[key], ref[key])
    cache.check_invariants()


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_a_live_poisoned_stream_outside_the_batch_is_not_read(backend_name):
    """A stream whose cached K/V are NaN (its write pass overflowed; it is cancelled only at its next block) is
    still live while another stream's call runs without it."""
    be = get_backend(backend_name)
    cache = PagedKVCache(1, HKV, D, PS, num_pages=16)
    for sid in ("poison", "victim"):
        cache.add_session(sid, 4)
    _append(cache, "poison", 40, seed=3, fill=float("nan"))
    _append(cache, "victim", 20, seed=1)
    out = _attend(be, cache, ["victim"], [7], seed=2)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _victim_alone(backend_name, 20, 7), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_batched_neighbours_do_not_leak(backend_name):
    """In one call, a NaN neighbour in the same batch changes nothing for the other sequence."""
    be = get_backend(backend_name)
    cache = PagedKVCache(1, HKV, D, PS, num_pages=16)
    for sid in ("victim", "poison"):
        cache.add_session(sid, 4)
    _append(cache, "victim", 20, seed=1)
    _append(cache, "poison", 5, seed=3, fill=float("nan"))
    n = 7 + 9
    g = torch.Generator().manual_seed(2)
    q = torch.randn(n, H, D, generator=g)
    k, v = _kv(7, 3)  # the victim's block as _victim_alone draws it
    kp, vp = _kv(9, 0, float("nan"))
    cu = torch.tensor([0, 7, n], dtype=torch.int32)
    batch = AttentionBatch(
        q, torch.cat([k, kp]), torch.cat([v, vp]), cu, cache.view(["victim", "poison"], 0), 1 / math.sqrt(D)
    )
    out = be.forward(batch)
    alone = PagedKVCache(1, HKV, D, PS, num_pages=16)
    alone.add_session("victim", 4)
    _append(alone, "victim", 20, seed=1)
    ref = be.forward(AttentionBatch(q[:7], k, v, cu[:2], alone.view(["victim"], 0), 1 / math.sqrt(D)))
    assert torch.isfinite(out[:7]).all()
    torch.testing.assert_close(out[:7], ref, rtol=0, atol=1e-6)


def test_check_invariants_catches_a_dirty_free_page():
    cache = PagedKVCache(1, HKV, D, PS, num_pages=4)
    cache.add_session("a", 2)
    _append(cache, "a", 20, seed=1)
    cache.check_invariants()
    cache.key_cache[3, 0, 0, 0] = float("nan")  # page 3 is free
    with pytest.raises(AssertionError, match="key_cache"):
        cache.check_invariants()
    cache.key_cache[3] = 0
    cache.value_cache[cache.table("a", 0).pages[-1], PS - 1] = 1.0  # a slot past the last live token
    with pytest.raises(AssertionError, match="value_cache"):
        cache.check_invariants()


# ---- the scenario, end to end ---------------------------------------------------------------------------
def _good(m, frames):
    return SessionConfig(
        prompt=torch.randn(4, m.cfg.text_dim, generator=torch.Generator().manual_seed(7)),
        num_frames=frames,
        policy=Unbounded(),
        seed=11,
    )


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_an_overflowing_session_never_reaches_another(backend_name):
    """The issue's script: a finite prompt that overflows to NaN inside the model runs alone for one block and
    is cancelled; the other stream, never batched with it, then produces exactly what it produces alone."""
    m = tiny_model(num_layers=1)  # one layer is enough for the scenario and halves its cost
    frames = 2 * m.geometry.frames_per_block
    ref = Engine(m, num_pages=16, page_size=PS, backend=backend_name).generate(_good(m, frames))

    e = Engine(m, num_pages=16, page_size=PS, backend=backend_name)
    good = e.add_session(_good(m, frames))
    blocks = [r.latents for r in e.step([good.id])]
    bad = e.add_session(SessionConfig(prompt=torch.full((4, m.cfg.text_dim), 3e38), num_frames=frames))
    (r,) = e.step([bad.id])
    assert r.error and bad.id not in e.sessions  # cancelled alone, correctly
    blocks += [r.latents for r in e.step([good.id])]
    assert all(b is not None for b in blocks)
    torch.testing.assert_close(torch.cat(blocks), ref, rtol=0, atol=1e-6)
    e.cache.check_invariants()
