"""``bench simulate``: deterministic for a seed, and on a trace it admits and rejects exactly as a real two-worker
router does (the same placement and admission code, ``ff_engine.serving.placement``)."""

import pytest
import torch
from test_distributed import PAGE, cfg, wait_for
from test_engine import tiny_model

from ff_engine.bench.simulate import Simulation, parser, simulate
from ff_engine.policies import Unbounded, Window
from ff_engine.serving.contract import Overloaded
from ff_engine.serving.local import LocalEndpoint
from ff_engine.serving.router import Router
from ff_engine.serving.worker import EngineWorker

SMALL = ["--replicas", "6", "--minutes", "2", "--rate", "0.5"]


def test_deterministic_for_a_seed():
    a = parser().parse_args(SMALL)
    assert simulate(a, "most-free", True) == simulate(a, "most-free", True)
    b = parser().parse_args([*SMALL, "--seed", "1"])
    assert simulate(b, "most-free", True) != simulate(a, "most-free", True)


@pytest.mark.parametrize("placement", ["most-free", "best-fit"])
def test_a_trace_is_admitted_and_rejected_as_by_the_real_router(placement):
    model = tiny_model()
    # a burst: short windows and long unbounded streams (a large reservation), more than fits, a short queue
    cfgs = [cfg(i, 18 if i % 3 else 36, Unbounded() if i % 3 == 0 else Window(), None if i % 3 == 0 else 6)
            for i in range(12)]
    eps = [LocalEndpoint(EngineWorker(n, model, num_pages=30, page_size=PAGE, backend="vllm-cpu", max_batch=2))
           for n in ("a", "b")]
    router = Router(eps, max_queue=3, heartbeat_s=0.05, placement=placement)
    pages = [eps[0].worker.engine.pages_that_fit(c) for c in cfgs]
    rejected, handles = [], []
    try:
        for c in cfgs:
            try:
                handles.append(router.submit(c))
            except Overloaded:
                rejected.append(c.session_id)
        wait_for(lambda: all(h.status().state == "finished" for h in handles), timeout=180)
        real_order = list(router.admission_log)
    finally:
        router.shutdown()
        for ep in eps:
            ep.kill()
    a = parser().parse_args(["--replicas", "2", "--pages", "30", "--max-queue", "3", "--max-batch", "2"])
    sim = Simulation(a, placement, park=False, trace=[(0.0, c.num_frames // 3, p) for c, p in zip(cfgs, pages)])
    out = sim.run()
    assert [f"s{i}" for i in out["rejections"]] == rejected and rejected  # something was refused
    assert [f"s{i}" for i in out["admission_order"]] == real_order
    assert torch.tensor(pages).unique().numel() > 1  # mixed reservations


@pytest.mark.parametrize("placement", ["migration-aware", "most-free"])
def test_migration_aware_placement_moves_one_stream_for_a_fragmented_request(placement):
    """The scene of ``test_moves``' real-router test, simulated: two 20-page replicas each hold an 8-page stream of
    20 blocks, an 18-page request arrives; migration-aware places it after one move, long before either stream
    ends (its first frame comes within a few block times), most-free after a stream ends."""
    a = parser().parse_args(["--replicas", "2", "--pages", "20", "--max-batch", "1", "--profile", "cpu-world"])
    trace = [(0.0, 20, 8), (0.0, 20, 8), (1.0, 8, 18)]
    sim = Simulation(a, placement, park=False, trace=trace)
    out = sim.run()
    ttff_large = sim.streams[2].first_block_at - 1.0
    stream_s = 20 * 0.265  # a small stream alone on its replica
    assert out["admission_order"] == [0, 1, 2] and out["finished"] == 3
    if placement == "migration-aware":
        assert out["moves"] == 1 and ttff_large < 4 * 0.265
    else:
        assert out["moves"] == 0 and ttff_large > stream_s - 1.0


def test_a_round_costs_the_sum_of_its_streams_block_costs():
    """``simulate_check``'s per-stream weights: two 2-block streams arrive together on one replica, blocks costing 1
    and 3 units of a 0.5-s profile.  The first starts a round alone (as the router steps at once): 0.5 s; then
    both together: 2 s (the first finishes at 2.5 s); then the second alone: 1.5 s, finishing at 4 s."""
    a = parser().parse_args(["--replicas", "1", "--pages", "10", "--max-batch", "2"])
    profile = {"block_s": 0.5, "batch_cost": (0.0, 1.0)}
    sim = Simulation(a, "most-free", park=False, profile=profile, trace=[(0.0, 2, 4, 1.0), (0.0, 2, 4, 3.0)])
    out = sim.run()
    assert out["finished"] == 2 and out["admission_order"] == [0, 1]
    assert [(s.first_block_at, s.finished_at) for s in sim.streams.values()] == [(0.5, 2.5), (2.5, 4.0)]
    alone = Simulation(a, "most-free", park=False, profile=profile, trace=[(0.0, 2, 4, 1.0)])
    alone.run()
    assert (alone.streams[0].first_block_at, alone.streams[0].finished_at) == (0.5, 1.0)


def test_a_trace_may_give_each_block_its_own_cost():
    """An unbounded cache's blocks cost more as it grows: costs 1 then 3 units of a 0.5-s profile put the first
    block at 0.5 s and the end at 2 s (a mean cost of 2 would say 1 s and 2 s)."""
    a = parser().parse_args(["--replicas", "1", "--pages", "10", "--max-batch", "2"])
    profile = {"block_s": 0.5, "batch_cost": (0.0, 1.0)}
    sim = Simulation(a, "most-free", park=False, profile=profile, trace=[(0.0, 2, 4, [1.0, 3.0])])
    sim.run()
    assert (sim.streams[0].first_block_at, sim.streams[0].finished_at) == (0.5, 2.0)
