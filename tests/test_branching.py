"""Fork (copy-on-write pages) and rollback: every stream equals its solo run, pages are shared until written and
then copied, and no operation, in any order, leaks a page or gets a reference count wrong."""

import math
import random

import pytest
import torch
from test_engine import noises, tiny_model

from ff_engine.engine import Engine, SessionConfig
from ff_engine.errors import BudgetError, ConfigError
from ff_engine.policies import POLICIES, make_policy


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_layers=2)


def _cfg(model, name, seed=0, extra_blocks=4):
    policy = make_policy(name)
    fpb = model.geometry.frames_per_block
    sink = math.ceil(policy.sink_frames / fpb) * fpb
    frames = sink + (2 + extra_blocks) * fpb
    init, steps = noises(model, frames, seed=20 + seed)
    prompt = torch.randn(4, model.cfg.text_dim, generator=torch.Generator().manual_seed(seed))
    return SessionConfig(prompt=prompt, num_frames=frames, policy=policy, initial_noise=init, step_noise=steps,
                         budget_frames=sink + 2 * fpb if policy.bounded else None, seed=seed)


def _solo(model, cfg):
    return Engine(model, num_pages=128, page_size=8, backend="torch").generate(cfg)


def _run_out(e, sid):
    while sid in e.sessions:
        (r,) = e.step([sid])
        assert r.error is None, r.error
    return r


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_fork_continues_exactly_as_the_source_alone_and_shares_pages(model, name):
    cfg = _cfg(model, name)
    solo = _solo(model, cfg)
    e = Engine(model, num_pages=128, page_size=8, backend="torch")
    a = e.add_session(cfg)
    for _ in range(3):
        e.step([a.id])
    free_before = e.cache.pool.num_free
    b = e.fork(a.id)
    assert e.cache.pool.num_free == free_before  # nothing copied at fork time
    assert e.cache.shared_pages(a.id) == e.cache.pool.held(a.id) == e.cache.shared_pages(b.id) > 0
    e.cache.check_invariants()
    e.step([b.id])  # the fork writes: only the pages it writes into are copied
    e.cache.check_invariants()
    assert e.cache.shared_pages(b.id) < e.cache.pool.held(b.id) or not e.cache.shared_pages(b.id)
    blocks = {a.id: [], b.id: []}
    for sid in (a.id, b.id):
        while sid in e.sessions:
            (r,) = e.step([sid])
            assert r.error is None, r.error
            blocks[sid].append(r.latents)
            e.cache.check_invariants()
    assert e.cache.pool.num_free == e.cache.pool.capacity  # every page back, shared ones once
    n = solo.shape[0]
    for sid in (a.id, b.id):
        tail = torch.cat(blocks[sid])
        assert torch.equal(tail, solo[n - tail.shape[0]:]), sid


def test_fork_reserves_its_own_budget_and_refuses_what_does_not_fit(model):
    cfg = _cfg(model, "window")
    e = Engine(model, num_pages=128, page_size=8, backend="torch")
    need = e.pages_needed(cfg)
    e = Engine(model, num_pages=need + need // 2, page_size=8, backend="torch")
    a = e.add_session(cfg)
    e.step([a.id])
    with pytest.raises(BudgetError):
        e.fork(a.id)
    assert list(e.sessions) == [a.id]
    e.cache.check_invariants()
    with pytest.raises(ConfigError, match="not an active session"):
        e.fork("sess-nope")


def test_cancelling_the_source_leaves_the_fork_whole(model):
    cfg = _cfg(model, "future-forcing")
    solo = _solo(model, cfg)
    e = Engine(model, num_pages=128, page_size=8, backend="torch")
    a = e.add_session(cfg)
    for _ in range(2):
        e.step([a.id])
    b = e.fork(a.id)
    e.cancel(a.id)  # the shared pages stay, unscrubbed, with the fork
    e.cache.check_invariants()
    assert e.cache.shared_pages(b.id) == 0
    _run_out(e, b.id)
    assert torch.equal(torch.cat(b.latents), solo)
    assert e.cache.pool.num_free == e.cache.pool.capacity


@pytest.mark.parametrize("name", ["unbounded", "future-forcing", "window"])
def test_rollback_then_regenerate_gives_the_same_blocks(model, name):
    cfg = _cfg(model, name)
    solo = _solo(model, cfg)
    e = Engine(model, num_pages=128, page_size=8, backend="torch", undo_blocks=3)
    a = e.add_session(cfg)
    for _ in range(4):
        e.step([a.id])
    assert e.history.available(a.id) == 3
    s = e.rollback(a.id, blocks=2)
    assert s.id == a.id and e.sessions[a.id] is s and s.block == 2
    e.cache.check_invariants()
    _run_out(e, s.id)
    assert torch.equal(torch.cat(s.latents), solo)


def test_rollback_bounds_and_errors(model):
    cfg = _cfg(model, "unbounded")
    e = Engine(model, num_pages=128, page_size=8, backend="torch", undo_blocks=2)
    a = e.add_session(cfg)
    for _ in range(3):
        e.step([a.id])
    for bad in (0, 3, -1, 1.5, True):
        with pytest.raises(ConfigError, match="undo history"):
            e.rollback(a.id, bad)
    with pytest.raises(ConfigError, match="not an active session"):
        e.rollback("sess-nope", 1)
    with pytest.raises(ConfigError, match="undo_blocks"):
        Engine(model, num_pages=8, page_size=8, backend="torch", undo_blocks=-1)
    assert Engine(model, num_pages=8, page_size=8, backend="torch").history.available(a.id) == 0


def test_rollback_is_exact_on_the_real_stream(model):
    """Rollback to block k then regenerate equals the first pass block by block (not only at the end)."""
    cfg = _cfg(model, "future-forcing")
    e = Engine(model, num_pages=128, page_size=8, backend="torch", undo_blocks=4)
    a = e.add_session(cfg)
    first = [e.step([a.id])[0].latents for _ in range(4)]
    e.rollback(a.id, 3)
    again = [e.step([a.id])[0].latents for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(first[1:], again, strict=True))
    e.cache.check_invariants()


def test_randomized_interleaving_never_leaks_and_every_stream_equals_its_solo_run(model):
    """Submit / step / fork / rollback / park / resume / cancel / poison in a random order: after every operation the pool's
    reference counts and the cache's isolation invariant hold; at the end every stream that ran to completion
    equals the solo run of the request it descends from, and every page is back."""
    names = ["unbounded", "window", "future-forcing", "sink-window"]
    rng = random.Random(0)
    cfgs = {i: _cfg(model, names[i % len(names)], seed=i, extra_blocks=2) for i in range(4)}
    solos = {i: _solo(model, c) for i, c in cfgs.items()}
    e = Engine(model, num_pages=400, page_size=8, backend="torch", undo_blocks=2)
    root, finished, submitted, done_ops, parked = {}, {}, 0, [], {}
    for _ in range(80):
        op = rng.choice(["submit", "step", "step", "step", "fork", "rollback", "park", "resume", "cancel", "poison"])
        live = list(e.sessions)
        if op == "submit" and submitted < len(cfgs):
            s = e.add_session(cfgs[submitted])
            root[s.id], submitted = submitted, submitted + 1
        elif op == "step" and live:
            sid = rng.choice(live)
            session = e.sessions[sid]
            (r,) = e.step([sid])
            assert r.error is None, r.error
            if r.done:
                finished[sid] = torch.cat(session.latents)
        elif op == "fork" and live:
            src = rng.choice(live)
            try:
                root[e.fork(src).id] = root[src]
                done_ops.append("fork")
            except BudgetError:
                pass
        elif op == "rollback" and live:
            sid = rng.choice(live)
            if e.history.available(sid):
                e.rollback(sid, rng.randint(1, e.history.available(sid)))
                done_ops.append("rollback")
        elif op == "park" and live:  # what Scheduler.park does: snapshot to host memory, pages back to the pool
            sid = rng.choice(live)
            parked[sid] = e.snapshot(sid)
            e.cancel(sid)
            done_ops.append("park")
        elif op == "resume" and parked:
            sid = rng.choice(sorted(parked))
            try:
                e.restore(parked[sid], sid)
                del parked[sid]
                done_ops.append("resume")
            except BudgetError:
                pass
        elif op == "cancel" and live:
            e.cancel(rng.choice(live))
        elif op == "poison":
            bad = e.add_session(SessionConfig(prompt=torch.full((4, model.cfg.text_dim), 3e38),
                                              num_frames=6, seed=99))
            (r,) = e.step([bad.id])
            assert r.error and bad.id not in e.sessions
        e.cache.check_invariants()
    for sid in sorted(parked):
        e.restore(parked.pop(sid), sid)
    for sid in list(e.sessions):
        session = e.sessions[sid]
        _run_out(e, sid)
        finished[sid] = torch.cat(session.latents)
        e.cache.check_invariants()
    assert e.cache.pool.num_free == e.cache.pool.capacity
    assert len(finished) >= 3 and done_ops.count("fork") >= 3 and done_ops.count("rollback") >= 3, done_ops
    assert done_ops.count("park") >= 2 and done_ops.count("resume") >= 1, done_ops
    for sid, video in finished.items():
        assert torch.equal(video, solos[root[sid]]), sid
