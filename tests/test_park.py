"""Pause, park and resume: a parked stream holds no device page, resumes bit-identically, and parking under
load admits the queue."""

import pytest
import torch
from test_engine import tiny_model

from ff_engine.engine import Engine, SessionConfig
from ff_engine.engine.scheduler import Scheduler
from ff_engine.errors import ConfigError
from ff_engine.policies import make_policy


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_layers=1)


def _cfg(model, seed, frames=15, policy="future-forcing"):
    return SessionConfig(prompt=torch.randn(3, model.cfg.text_dim, generator=torch.Generator().manual_seed(seed)),
                         num_frames=frames, seed=seed, policy=make_policy(policy), budget_frames=6)


def _solo(model, cfg):
    return Engine(model, num_pages=64, page_size=8, backend="torch").generate(cfg)


def _collect(sched, out):
    for r in sched.step():
        assert r.error is None, r.error
        out.setdefault(r.session_id, []).append(r.latents)


def test_park_then_resume_is_bit_identical_and_holds_no_page(model):
    clock = Clock()
    e = Engine(model, num_pages=64, page_size=8, backend="torch")
    sched = Scheduler(e, park_after=30.0, clock=clock)
    sid = sched.submit(_cfg(model, 1))
    out = {}
    for _ in range(2):
        _collect(sched, out)
    sched.pause(sid)
    _collect(sched, out)  # paused: not stepped, not parked yet
    assert len(out[sid]) == 2 and sid in e.sessions
    clock.t = 31.0
    _collect(sched, out)
    assert sid in sched.parked and sid not in e.sessions and e.cache.pool.num_free == e.cache.pool.capacity
    assert sched.idle  # a parked stream waits for its user
    clock.t = 40.0
    assert sched.resume(sid) and sid in e.sessions
    while not sched.idle:
        _collect(sched, out)
    assert torch.equal(torch.cat(out[sid]), _solo(model, _cfg(model, 1)))
    assert sched.stats.parked == 1 and sched.stats.resumed == 1 and sched.stats.resume_seconds == [0.0]
    e.cache.check_invariants()


def test_a_hundred_parked_streams_hold_zero_device_pages(model):
    e = Engine(model, num_pages=40, page_size=8, backend="torch")
    sched = Scheduler(e, max_batch=8)
    ids = []
    while len(sched.parked) < 100:
        if len(ids) < 100:
            ids += [sched.submit(_cfg(model, 100 + len(ids), frames=9, policy="window")) for _ in range(4)]
        sched.step()
        for sid in list(e.sessions):
            sched.park(sid)
    assert len(sched.parked) == 100 and not e.sessions
    assert e.cache.pool.num_free == e.cache.pool.capacity and e.cache.pool.reserved_total == 0
    e.cache.check_invariants()


def test_parking_under_load_admits_the_queue_and_the_parked_stream_resumes_first(model):
    clock = Clock()
    e0 = Engine(model, num_pages=64, page_size=8, backend="torch")
    need = e0.pages_needed(_cfg(model, 2))
    e = Engine(model, num_pages=need + need // 2, page_size=8, backend="torch")  # one stream at a time
    sched = Scheduler(e, park_after=5.0, clock=clock)
    a, b, c = (sched.submit(_cfg(model, s)) for s in (2, 3, 4))
    out = {}
    _collect(sched, out)
    assert list(e.sessions) == [a] and len(sched.waiting) == 2
    sched.pause(a)
    clock.t = 6.0
    _collect(sched, out)  # a is parked before admission: b is admitted in the same step, and steps
    assert a in sched.parked and list(e.sessions) == [b] and len(out[b]) == 1
    assert not sched.resume(a)  # b holds the pages: a waits at the head of the queue, before c
    while b in e.sessions:
        _collect(sched, out)
    _collect(sched, out)
    assert a in e.sessions and c not in e.sessions and [w.session_id for w in sched.waiting] == [c]
    while not sched.idle:
        _collect(sched, out)
    for sid, seed in ((a, 2), (b, 3), (c, 4)):
        assert torch.equal(torch.cat(out[sid]), _solo(model, _cfg(model, seed))), sid
    assert e.cache.pool.num_free == e.cache.pool.capacity


def test_pause_park_resume_errors_and_cancel(model):
    e = Engine(model, num_pages=64, page_size=8, backend="torch")
    sched = Scheduler(e)
    for call in (sched.pause, sched.park, sched.resume):
        with pytest.raises(ConfigError):
            call("sess-nope")
    with pytest.raises(ConfigError, match="park_after"):
        Scheduler(e, park_after=-1)
    sid = sched.submit(_cfg(model, 5))
    sched.step()
    sched.park(sid)
    with pytest.raises(ConfigError, match="already"):
        sched.submit(SessionConfig(prompt=torch.randn(3, model.cfg.text_dim), num_frames=6, session_id=sid))
    assert sched.cancel(sid) and sid not in sched.parked and not sched.cancel(sid)
