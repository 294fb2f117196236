import pytest
import torch
from test_engine import tiny_model

from ff_engine.engine import Engine, SessionConfig
from ff_engine.engine.engine import reservation_pages
from ff_engine.engine.scheduler import Scheduler
from ff_engine.errors import BudgetError, ConfigError
from ff_engine.plan import parse_bytes, plan
from ff_engine.policies import FutureForcing, Unbounded, Window
from model_adapters.causal_wan import PRESETS


def cfg(i, frames=9, policy=None, budget=3):
    return SessionConfig(prompt=torch.randn(4, 256, generator=torch.Generator().manual_seed(i)), num_frames=frames,
                         seed=i, policy=policy or Window(), budget_frames=budget, session_id=f"s{i}")


@pytest.mark.parametrize("max_batch", [1, 2, 8])
def test_batched_streams_equal_sequential_and_join_late(max_batch):
    m = tiny_model()
    specs = [(0, 9, Window(), 3), (1, 15, FutureForcing(), 6), (2, 6, Unbounded(), None), (3, 12, Window(), 3)]
    seq = {f"s{i}": Engine(m, num_pages=400, page_size=16, backend="vllm-cpu").generate(cfg(i, f, p, b))
           for i, f, p, b in specs}
    e = Engine(m, num_pages=400, page_size=16, backend="vllm-cpu")
    sched = Scheduler(e, max_batch=max_batch)
    got = {}
    for i, f, p, b in specs[:2]:
        sched.submit(cfg(i, f, p, b))
    for r in sched.step():  # two streams running ...
        got.setdefault(r.session_id, []).append(r.latents)
    for i, f, p, b in specs[2:]:
        sched.submit(cfg(i, f, p, b))  # ... two more join at a later block
    sched.run(lambda r: got.setdefault(r.session_id, []).append(r.latents))
    for sid, ref in seq.items():
        assert (torch.cat(got[sid]) - ref).abs().max() <= 1e-4, sid
    assert max(sched.stats.batch_sizes) <= max_batch
    assert e.cache.pool.num_free == e.cache.num_pages


def test_admission_waits_for_pages_and_is_fifo():
    m = tiny_model()
    one = reservation_pages(m.geometry, 4, cfg(0))
    e = Engine(m, num_pages=2 * one, page_size=4, backend="torch")
    sched = Scheduler(e, max_batch=8)
    for i in range(5):
        sched.submit(cfg(i))
    order = []
    while not sched.idle:
        admitted_before = set(e.sessions)
        sched.step()
        assert len(e.sessions) <= 2 and e.cache.pool.reserved_total <= e.cache.num_pages
        order += [s for s in e.sessions if s not in admitted_before]
    assert sched.stats.admitted == 5 and sched.stats.finished == 5
    with pytest.raises(BudgetError, match="whole pool"):
        sched.submit(cfg(9, frames=300, policy=Unbounded(), budget=None))
    with pytest.raises(ConfigError, match="max_batch"):
        Scheduler(e, max_batch=0)


def test_round_robin_is_fair():
    m = tiny_model()
    e = Engine(m, num_pages=400, page_size=16, backend="torch")
    sched = Scheduler(e, max_batch=2)
    for i in range(5):
        sched.submit(cfg(i, frames=30))
    for _ in range(10):
        sched.step()
    blocks = [s.block for s in e.sessions.values()]
    assert max(blocks) - min(blocks) <= 1


def test_plan_matches_the_design_numbers():
    r = plan(PRESETS["wan-1.3b"].geometry(), gpu_mem_bytes=parse_bytes("80GiB"), budget_frames=21, seconds=60)
    assert r["latent_frames"] == 240
    # 60 s of 480x832 = 374,400 tokens; 30 layers x 2 x 1536 x 2 bytes each, about 69 GB
    assert abs(r["unbounded_kv_bytes_per_stream"] / 1e9 - 69.0) < 0.5
    assert r["bounded_streams"] >= 8 * max(1, r["unbounded_streams"])
    with pytest.raises(ConfigError, match="gpu-mem"):
        parse_bytes("lots")


def test_a_bad_request_is_rejected_without_stopping_the_others():
    m = tiny_model()
    e = Engine(m, num_pages=200, page_size=16, backend="torch")
    sched = Scheduler(e, max_batch=4)
    sched.submit(cfg(0))
    bad = cfg(1)
    bad.prompt = torch.full((3, 256), float("nan"))
    sched.submit(bad)
    sched.submit(cfg(2))
    failures = []
    sched.run(lambda r: failures.append(r) if r.error else None)
    assert sched.stats.finished == 2 and sched.stats.rejected == 1
    assert [(r.session_id, r.done) for r in failures] == [("s1", True)] and "NaN" in failures[0].error
    assert e.cache.pool.num_free == 200
