"""The router's placement, queue, cancellation and worker-death logic against fake workers (no engine, no Ray):
a fake worker's ``step`` returns a future the test completes by hand, so every decision is observed exactly."""

import concurrent.futures as cf

import pytest
import tests_helpers as helpers
import torch

from ff_engine.engine.engine import BlockResult
from ff_engine.engine.session import SessionConfig
from ff_engine.errors import BudgetError, ConfigError
from ff_engine.policies import Window
from ff_engine.serving.contract import Overloaded
from ff_engine.serving.router import Router
from ff_engine.serving.worker import WorkerReport


class FakeWorker:
    """An endpoint whose request pages are ``cfg.seed`` and whose calls the test answers (``answer``)."""

    def __init__(self, name, pages_total):
        self.name, self.pages_total = name, pages_total
        self.calls: list[tuple[list, list, cf.Future]] = []
        self.killed = False

    def describe(self):
        return {"pages_total": self.pages_total, "max_batch": 4, "frames_per_block": 3}

    def validate(self, cfg):
        return (ConfigError("num_frames must be a positive integer"), 0) if cfg.num_frames <= 0 else (None, cfg.seed)

    def step(self, cancel, start, update=()):
        fut = cf.Future()
        self.calls.append((list(cancel), [s.cfg.session_id for s in start], fut))
        return fut

    def audit(self):
        return {}

    def kill(self):
        self.killed = True

    def started(self):
        return [sid for _, start, _ in self.calls for sid in start]

    def answer(self, results=(), fail=None):
        """Complete the pending call: with a report carrying ``results``, or by raising ``fail``."""
        pending = [c for c in self.calls if not c[2].done()]
        assert len(pending) == 1, f"{self.name}: {len(pending)} calls in flight"
        if fail is not None:
            pending[0][2].set_exception(fail)
        else:
            pending[0][2].set_result(WorkerReport(self.name, results=list(results), batch=len(results)))


def req(sid, pages, blocks=2):
    return SessionConfig(
        prompt=torch.zeros(1, 4), num_frames=3 * blocks, seed=pages, policy=Window(), budget_frames=3, session_id=sid
    )


def until(cond, timeout=60.0):
    """Wait for the router thread to act."""
    helpers.until(cond, timeout, poll=0.005, what="router did not act in time")


@pytest.fixture
def two():
    a, b = FakeWorker("a", 40), FakeWorker("b", 30)
    router = Router([a, b], max_queue=2, snapshot_every=4, heartbeat_s=3600)
    yield router, a, b
    router.shutdown()


def test_placement_goes_to_most_free_pages_and_the_queue_is_fifo(two):
    router, _, b = two
    router.submit(req("s1", 20))  # a: 40 free, b: 30 -> a (20 left)
    router.submit(req("s2", 10))  # a 20, b 30 -> b (20 left)
    router.submit(req("s3", 15))  # a 20, b 20, tie -> fewer streams: both 1 -> name: a (5 left)
    router.submit(req("s4", 25))  # fits nowhere (a 5, b 20): waits
    router.submit(req("s5", 5))  # fits a, but must not overtake s4
    assert [r.status().worker for r in map(router.get, ["s1", "s2", "s3"])] == ["a", "b", "a"]
    assert router.get("s4").status().state == "queued" and router.get("s5").status().state == "queued"
    with pytest.raises(Overloaded) as exc:  # max_queue = 2 new streams waiting
        router.submit(req("s6", 1))
    assert exc.value.retry_after > 0
    assert router.stats()["rejected"] == 1
    until(lambda: "s2" in b.started())
    router.cancel("s2")  # b's book frees at once: s4 (25) fits b (30); s5 (5) ties a and b at 5 free: fewer streams
    assert router.get("s4").status().worker == "b" and router.get("s5").status().worker == "b"
    assert router.get("s2").status().state == "cancelled"
    b.answer()  # the call that carried s2; the next one carries its cancel, before s4's start
    until(lambda: len(b.calls) == 2)
    assert b.calls[1][:2] == (["s2"], ["s4", "s5"])


def test_results_stream_in_order_and_finish_frees_the_book(two):
    router, a, _ = two
    h = router.submit(req("s1", 40, blocks=2))
    until(lambda: a.calls)
    x = torch.ones(3, 4, 2, 3)
    a.answer([BlockResult("s1", 0, x, False)])
    until(lambda: len(a.calls) == 2)
    a.answer([BlockResult("s1", 1, 2 * x, True)])
    blocks = list(h.blocks(timeout=10))
    assert [b.block for b in blocks] == [0, 1] and blocks[1].done and torch.equal(blocks[1].latents, 2 * x)
    assert h.status().state == "finished"
    until(lambda: router.stats()["workers"][0]["pages_placed"] == 0)


def test_bad_requests_are_refused_at_submit(two):
    router, _, _ = two
    with pytest.raises(ConfigError, match="num_frames"):
        router.submit(req("bad", 5, blocks=0))
    with pytest.raises(BudgetError, match="more than any live worker"):
        router.submit(req("huge", 41))
    router.submit(req("dup", 1))
    with pytest.raises(ConfigError, match="already in use"):
        router.submit(req("dup", 1))


@pytest.mark.parametrize("snapshot_every", [4, 0])
def test_a_worker_death_requeues_its_streams_first_or_fails_them_without_snapshots(snapshot_every):
    a, b = FakeWorker("a", 40), FakeWorker("b", 30)
    router = Router([a, b], snapshot_every=snapshot_every, heartbeat_s=3600)
    try:
        router.submit(req("s1", 25))  # a
        router.submit(req("s2", 25))  # b
        router.submit(req("s3", 25))  # waits
        until(lambda: a.calls and b.calls)
        a.answer(fail=RuntimeError("actor died"))
        until(lambda: a.killed)
        s1 = router.get("s1").status()
        if snapshot_every:  # s1 goes back to the front, ahead of s3, and resumes once b has room
            assert s1.state == "queued" and s1.resumed == 1 and router.queue[0] == "s1"
            router.cancel("s2")
            assert router.get("s1").status().worker == "b"
        else:
            assert s1.state == "failed" and "snapshots are off" in s1.error
            assert router.get("s2").status().state == "running"  # the other worker's stream is untouched
    finally:
        router.shutdown()
