"""RayCluster on a real local Ray instance (2 CPUs, two CPU workers with one torch thread each, tiny model).

Two clusters, one after the other (each takes both CPUs): ``plain`` (batching, snapshots off) serves the mixed
workload, the queue bound and bad requests, then loses a worker; ``snapshotting`` (snapshot every 2 blocks,
batch 1 so that every stream's arithmetic is exactly a single-engine run's) loses a worker and its streams must
finish bit-identical elsewhere."""

import time

import pytest
import tests_helpers as helpers
import torch
from test_engine import tiny_model

from ff_engine.engine import Engine, SessionConfig
from ff_engine.engine.scheduler import Scheduler
from ff_engine.errors import ConfigError
from ff_engine.policies import FutureForcing, SinkWindow, Unbounded, Window
from ff_engine.serving import persist
from ff_engine.serving.contract import Overloaded

ray = pytest.importorskip("ray")
from ff_engine.serving import RayCluster  # needs ray

PAGE, PAGES = 16, 40
MIX = [(Window(), 3), (SinkWindow(sink_frames=3), 6), (FutureForcing(), 6), (Unbounded(), None), (Window(), 6)]


def cfg(i, frames, policy, budget, prompt=None):
    prompt = torch.randn(4, 256, generator=torch.Generator().manual_seed(i)) if prompt is None else prompt
    return SessionConfig(
        prompt=prompt, num_frames=frames, seed=i, policy=policy, budget_frames=budget, session_id=f"s{i}"
    )


def single_engine(model, cfgs, max_batch):
    """Every stream of ``cfgs`` on one engine (one scheduler): {id: latents}."""
    sched = Scheduler(Engine(model, num_pages=2000, page_size=PAGE, backend="vllm-cpu"), max_batch=max_batch)
    out: dict[str, list] = {}
    for c in cfgs:
        sched.submit(c)
    sched.run(lambda r: out.setdefault(r.session_id, []).append(r.latents))
    return {k: torch.cat(v) for k, v in out.items()}


def wait_for(cond, timeout=120.0):
    helpers.until(cond, timeout, poll=0.01, what="timed out")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def plain(ray_session, model, tmp_path_factory):
    c = RayCluster(
        model,
        num_workers=2,
        num_pages=PAGES,
        page_size=PAGE,
        backend="vllm-cpu",
        max_batch=4,
        snapshot_every=0,
        max_queue=16,
        output_dir=str(tmp_path_factory.mktemp("plain")),
    )
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def snapshotting(ray_session, model, plain, tmp_path_factory):
    plain.shutdown()  # its two CPUs go to this cluster's workers
    c = RayCluster(
        model,
        num_workers=2,
        num_pages=PAGES,
        page_size=PAGE,
        backend="vllm-cpu",
        max_batch=1,
        snapshot_every=2,
        output_dir=str(tmp_path_factory.mktemp("snap")),
        park_after=0.0,
        undo_blocks=2,
    )
    yield c
    c.shutdown()


def test_two_workers_serve_20_mixed_streams_exactly_and_leak_nothing(plain, model):
    cfgs = [cfg(i, 3 + 3 * (i % 4), *MIX[i % len(MIX)]) for i in range(20)]  # 1 to 4 blocks
    handles = [plain.submit(c) for c in cfgs]
    assert handles[0].status().worker != handles[1].status().worker  # the second goes where more pages are free
    # (no sampled "both workers were busy" check: under a loaded box a worker may finish all its short streams
    # between two samples of this thread -- the race behind issue 27's flaky first test)
    while not all(h.status().terminal for h in handles):  # pages in use never exceed a worker's pool
        for w in plain.stats()["workers"]:
            assert w["pages_placed"] <= w["pages_total"] and w["pages_used"] <= w["pages_total"]
        time.sleep(0.02)
    ref = single_engine(model, cfgs, max_batch=20)
    for h in handles:
        got = torch.cat([b.latents for b in h.blocks(timeout=60)])
        assert h.status().state == "finished", h.status()
        assert (got - ref[h.id]).abs().max() <= 1e-4, h.id
    assert {h.status().worker for h in handles} == {"worker-0", "worker-1"}
    for audit in plain.audit():  # pool invariants hold and nothing is held or reserved
        assert audit["pages_used"] == 0 and audit["pages_reserved"] == 0 and not audit["sessions"], audit


def test_queue_bound_overloads_and_a_bad_request_fails_alone(plain):
    bad = plain.submit(cfg(202, 6, Window(), 3, prompt=torch.randn(4, 100)))  # only the model can refuse it
    wide = (Window(), 30)  # 26 of a worker's 40 pages: one stream per worker at a time
    # two long streams hold both workers while the queue fills: a short one could end before the 19th submit on a
    # loaded box, freeing a worker, and the queue would never be full (the race behind issue 27's flaky test)
    holders = [plain.submit(cfg(100 + i, 3000, *wide)) for i in range(2)]
    accepted = [plain.submit(cfg(102 + i, 6, *wide)) for i in range(16)]  # 16 waiting
    with pytest.raises(Overloaded) as exc:
        plain.submit(cfg(200, 6, *wide))
    assert exc.value.retry_after > 0
    with pytest.raises(ConfigError, match="num_frames"):
        plain.submit(cfg(201, 0, Window(), 3))
    for h in holders:
        h.cancel()
    for h in accepted:  # the last waits behind 8 streams on its worker: the timeout covers the queue, not a block
        assert len(list(h.blocks(timeout=300))) == 2 and h.status().state == "finished"  # nothing dropped
    list(bad.blocks(timeout=60))
    assert bad.status().state == "failed" and bad.status().error
    assert plain.stats()["rejected"] == 2


def test_a_killed_worker_fails_its_streams_with_their_blocks_kept_when_snapshots_are_off(plain, model):
    cfgs = [cfg(300 + i, 18, *MIX[i % 3]) for i in range(4)]
    handles = [plain.submit(c) for c in cfgs]
    victims = [h for h in handles if h.status().worker == "worker-0"]
    assert victims and len(victims) < len(handles)
    wait_for(lambda: victims[0].status().blocks_done >= 2)
    ray.kill(plain.actors["worker-0"])
    wait_for(lambda: all(h.status().terminal for h in handles))
    ref = single_engine(model, cfgs, max_batch=4)
    for h in handles:
        st = h.status()
        if h in victims:
            assert st.state == "failed" and "snapshots are off" in st.error, st
            kept = [persist.read_block(plain.output_dir, h.id, k) for k in range(st.blocks_done)]
            assert kept and (torch.cat(kept) - ref[h.id][: 3 * len(kept)]).abs().max() <= 1e-4
        else:
            assert st.state == "finished" and st.worker == "worker-1" and st.resumed == 0
            assert (torch.cat([b.latents for b in h.blocks(timeout=60)]) - ref[h.id]).abs().max() <= 1e-4
    assert [w["alive"] for w in plain.stats()["workers"]] == [False, True]


def test_park_resume_and_fork_across_ray_workers_equal_single_engine_runs(snapshotting, model):
    """Controls cross the actor boundary: a parked stream's snapshot comes back through Ray and it resumes on a
    worker with room; a fork shares its source's worker; all equal solo runs."""
    # Long enough (16 and 32 blocks) that neither ends before its controls on a loaded box; b is forked first.
    a_cfg, b_cfg = cfg(300, 48, Window(), 3), cfg(301, 96, FutureForcing(), 6)
    a, b = snapshotting.submit(a_cfg), snapshotting.submit(b_cfg)
    wait_for(lambda: a.status().blocks_done >= 1 and b.status().blocks_done >= 1)
    fork = b.fork("s301-fork")
    assert fork.status().worker == b.status().worker
    a.pause()
    wait_for(lambda: a.status().state == "parked")
    assert a.status().pages_reserved == 0
    b.pause()
    wait_for(lambda: b.status().state == "parked")
    b.resume()
    a.resume()
    outs = {h.id: {blk.block: blk.latents for blk in h.blocks(timeout=120)} for h in (a, b, fork)}
    solo = {c.session_id: Engine(model, num_pages=PAGES, page_size=PAGE, backend="vllm-cpu").generate(c)
            for c in (a_cfg, b_cfg)}
    for h, ref in ((a, solo["s300"]), (b, solo["s301"]), (fork, solo["s301"])):
        assert h.status().state == "finished", h.status()
        assert torch.equal(torch.cat([outs[h.id][i] for i in range(len(outs[h.id]))]), ref), h.id
    stats = snapshotting.stats()
    assert stats["parked"] == stats["unparked"] == 2 and stats["forked"] == 1
    wait_for(lambda: all(x["pages_used"] == 0 for x in snapshotting.audit()))


def test_a_killed_workers_streams_resume_elsewhere_bit_identical(snapshotting, model):
    cfgs = [cfg(400 + i, 18, *MIX[i % 3]) for i in range(4)]  # 6 blocks; snapshots after blocks 2 and 4
    before = snapshotting.stats()  # the cluster served the park / fork test before this one
    handles = [snapshotting.submit(c) for c in cfgs]
    victims = [h for h in handles if h.status().worker == "worker-0"]
    wait_for(lambda: victims[0].status().blocks_done >= 3)
    ray.kill(snapshotting.actors["worker-0"])
    outs = {h.id: torch.cat([b.latents for b in h.blocks(timeout=120)]) for h in handles}
    for h in handles:
        st = h.status()
        assert st.state == "finished" and st.worker == "worker-1", st
        assert st.resumed == (1 if h in victims else 0)
        if h is victims[0]:  # it had 3 blocks when its worker died: it continued from the snapshot of block 2
            assert st.extra["resumed_from_block"] >= 2
        ref = Engine(model, num_pages=PAGES, page_size=PAGE, backend="vllm-cpu").generate(cfgs[handles.index(h)])
        assert torch.equal(outs[h.id], ref), h.id  # batch 1 everywhere: exactly the uninterrupted run
        assert not persist.snapshot_path(snapshotting.output_dir, h.id).exists()
    stats = snapshotting.stats()
    assert stats["resumed"] == len(victims) and stats["finished"] == before["finished"] + 4
    assert snapshotting.audit()[0]["pages_used"] == 0
