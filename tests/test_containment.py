"""One stream's failure never touches another: per-session containment in Engine.step and the Scheduler's API.

Every test compares the surviving streams with solo runs of the same request on a fresh engine.
"""

import dataclasses
import os
import random

import pytest
import torch
from test_engine import tiny_model

from ff_engine.engine import Engine, SessionConfig
from ff_engine.engine.scheduler import Scheduler
from ff_engine.errors import ConfigError, FFEngineError
from ff_engine.policies import H2O, FutureForcing, SinkWindow, Unbounded, Window
from ff_engine.serving.contract import Overloaded

MODEL = tiny_model()
FPB = MODEL.geometry.frames_per_block


@dataclasses.dataclass
class ExplodingWindow(Window):
    """A window policy that fails inside ``compress`` (at one layer) or inside ``observe`` (mid-forward)."""

    where: str = "compress"

    def compress(self, ctx):
        if self.where == "compress" and ctx.layer == 1:
            raise OverflowError("boom in compress")
        return super().compress(ctx)

    def observe(self, layer, q_pre_rope, q, positions):
        if self.where == "observe" and layer == 1:
            raise RuntimeError("boom in observe")


def request(i, frames=9, policy=None, budget=3, **kw):
    prompt = torch.randn(4, MODEL.cfg.text_dim, generator=torch.Generator().manual_seed(100 + i))
    return SessionConfig(prompt=prompt, num_frames=frames, seed=i, policy=policy or Window(), budget_frames=budget,
                         **kw)


_solo: dict = {}


def solo(cfg: SessionConfig, backend="torch") -> torch.Tensor:
    """The request run alone on a fresh engine (cached per request)."""
    key = (cfg.seed, cfg.num_frames, repr(cfg.policy), cfg.budget_frames, float(cfg.prompt.sum()), backend)
    if key not in _solo:
        _solo[key] = Engine(MODEL, num_pages=400, page_size=16, backend=backend).generate(
            dataclasses.replace(cfg, session_id=None))
    return _solo[key]


def run_all(sched: Scheduler) -> tuple[dict, dict]:
    blocks, errors = {}, {}

    def collect(r):
        if r.error:
            errors[r.session_id] = r.error
        else:
            blocks.setdefault(r.session_id, []).append(r.latents)

    sched.run(collect)
    return {k: torch.cat(v) for k, v in blocks.items()}, errors


def poisoned(kind):
    if kind == "compress":
        return request(9, policy=ExplodingWindow(where="compress"))
    if kind == "observe":
        return request(9, policy=ExplodingWindow(where="observe"))
    if kind == "overflow-prompt":  # finite, but overflows to NaN inside the model
        return dataclasses.replace(request(9), prompt=torch.full((4, MODEL.cfg.text_dim), 3e38))
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["compress", "observe", "overflow-prompt"])
def test_a_failing_session_fails_alone_and_the_others_equal_their_solo_runs(kind):
    e = Engine(MODEL, num_pages=400, page_size=16, backend="torch")
    sched = Scheduler(e, max_batch=8)
    good = [request(0, frames=3), request(1, frames=12, policy=FutureForcing(), budget=6),
            request(2, frames=9, policy=H2O(), budget=6)]  # request 0 finishes in the very first batch
    ids = [sched.submit(c) for c in good]
    bad = sched.submit(poisoned(kind))
    out, errors = run_all(sched)
    assert set(errors) == {bad}, errors
    for sid, cfg in zip(ids, good):
        assert (out[sid] - solo(cfg)).abs().max() <= 1e-5, sid
    assert sched.idle and not e.sessions
    e.cache.check_invariants()
    assert e.cache.pool.num_free == e.cache.num_pages


def test_step_noise_that_runs_out_at_run_time_fails_only_its_session():
    e = Engine(MODEL, num_pages=400, page_size=16, backend="torch")
    sched = Scheduler(e, max_batch=8)
    good = request(0, frames=9)
    gid = sched.submit(good)
    bid = sched.submit(request(5, frames=9))
    sched.admit()
    e.sessions[bid].cfg = dataclasses.replace(e.sessions[bid].cfg)  # keep the request intact
    e.sessions[bid]._step_noise = []  # runs out at its first stochastic step
    out, errors = run_all(sched)
    assert set(errors) == {bid} and "step_noise" in errors[bid]
    assert (out[gid] - solo(good)).abs().max() <= 1e-5
    assert e.cache.pool.num_free == e.cache.num_pages


def test_future_forcing_near_the_end_of_the_rope_table():
    """Near the end of the RoPE table the proxy's future frames used to fall off it and fail the step after a
    co-batched window session had been half-advanced (0.025 off its solo run).  Future frames past the table (the
    stream ends there) are now clamped to its last frame, and the window session equals its solo run."""
    frames = MODEL.geometry.max_frames // FPB * FPB
    e = Engine(MODEL, num_pages=4000, page_size=16, backend="torch")
    fid = e.add_session(request(7, frames=frames, policy=FutureForcing(horizon=4 * FPB), budget=6)).id
    e.sessions[fid].block = frames // FPB - 6  # six blocks before the end: the cache overflows its budget there
    window = request(8, frames=9)
    wid = e.add_session(window).id
    results = {}
    while e.sessions:
        for r in e.step():
            results.setdefault(r.session_id, []).append(r)
    assert not [r.error for rs in results.values() for r in rs if r.error]
    assert len(results[fid]) == 6 and results[fid][-1].done
    assert (torch.cat([r.latents for r in results[wid]]) - solo(window)).abs().max() <= 1e-5
    assert e.cache.pool.num_free == e.cache.num_pages


def test_scheduler_api_holes_are_closed():
    e = Engine(MODEL, num_pages=400, page_size=16, backend="torch")
    sched = Scheduler(e, max_batch=2, max_queue=2)
    a = sched.submit(request(0))
    assert isinstance(a, str) and a
    b = sched.submit(request(1))
    with pytest.raises(Overloaded) as exc:
        sched.submit(request(2))
    assert exc.value.retry_after > 0 and sched.stats.rejected == 1
    assert sched.cancel(b) and not sched.cancel(b) and not sched.cancel("nope")  # a queued id cancels
    assert [c.session_id for c in sched.waiting] == [a]
    with pytest.raises(ConfigError, match="prompt"):
        sched.submit(dataclasses.replace(request(3), prompt=None))
    for bad, field in (({"seed": 2**70}, "seed"), ({"num_frames": "9"}, "num_frames"), ({"seed": -1}, "seed"),
                       ({"num_frames": True}, "num_frames"), ({"session_id": "../x"}, "session_id")):
        with pytest.raises(FFEngineError, match=field):
            sched.submit(dataclasses.replace(request(3), **bad))
    assert len(sched.waiting) == 1  # nothing bad was queued


def test_user_ids_never_collide_with_automatic_ids():
    e = Engine(MODEL, num_pages=400, page_size=16, backend="torch")
    sched = Scheduler(e)
    auto = [sched.submit(request(i)) for i in range(3)]
    user = [sched.submit(dataclasses.replace(request(i), session_id=f"session-{i}")) for i in range(3)]
    assert len(set(auto + user)) == 6
    with pytest.raises(ConfigError, match="already"):
        sched.submit(dataclasses.replace(request(4), session_id="session-1"))


def test_a_duplicated_id_in_step_runs_one_block():
    e = Engine(MODEL, num_pages=400, page_size=16, backend="torch")
    s = e.add_session(request(0, frames=9))
    results = e.step([s.id, s.id])
    assert len(results) == 1 and s.block == 1


# ---- randomized stress ------------------------------------------------------------------------------------

N_OPS = int(os.environ.get("FF_STRESS_OPS", "1500"))
MENU = [request(0, frames=3), request(1, frames=6, policy=FutureForcing(), budget=6),
        request(2, frames=9, policy=H2O(), budget=6), request(3, frames=6, policy=Unbounded(), budget=None),
        request(4, frames=9, policy=SinkWindow(sink_frames=1), budget=4)]


def _invalid(rng):
    base = rng.choice(MENU)
    return dataclasses.replace(base, **rng.choice([
        {"seed": 2**70}, {"num_frames": 0}, {"num_frames": "9"}, {"budget_frames": -1}, {"prompt": None},
        {"policy": SinkWindow(sink_frames=3), "budget_frames": 1}, {"num_frames": 2**31}, {"session_id": "a/b"},
    ]))


@pytest.mark.parametrize("seed", [0, 1])
def test_randomized_operations_never_leak_and_survivors_equal_solo_runs(seed):
    rng = random.Random(seed)
    e = Engine(MODEL, num_pages=60, page_size=8, backend="torch")  # small: the pool runs out, requests queue
    sched = Scheduler(e, max_batch=3, max_queue=6)
    live: dict[str, SessionConfig] = {}  # submitted, not yet ended
    got: dict[str, list] = {}
    poisoned_ids, ops, failed, finished = set(), 0, 0, 0
    for ops in range(N_OPS):
        op = rng.random()
        if op < 0.25:
            cfg = rng.choice(MENU)
            try:
                live[sched.submit(cfg)] = cfg
            except Overloaded:
                pass
        elif op < 0.32:
            with pytest.raises(FFEngineError):
                sched.submit(_invalid(rng))
        elif op < 0.36:
            try:
                sid = sched.submit(poisoned(rng.choice(["compress", "observe", "overflow-prompt"])))
                poisoned_ids.add(sid)
            except Overloaded:
                pass
        elif op < 0.45 and live:
            sid = rng.choice(sorted(live))
            assert sched.cancel(sid)
            live.pop(sid)
        elif op < 0.47:
            assert not sched.cancel(f"unknown-{ops}")
        else:
            for r in sched.step():
                if r.error:
                    assert r.session_id in poisoned_ids, r.error
                    failed += 1
                    continue
                ref = solo(live[r.session_id])
                assert (r.latents - ref[r.block * FPB:(r.block + 1) * FPB]).abs().max() <= 1e-5
                got.setdefault(r.session_id, []).append(r.block)
                if r.done:
                    assert got[r.session_id] == list(range(len(got[r.session_id])))
                    live.pop(r.session_id)
                    finished += 1
        e.cache.check_invariants()
        held = sum(e.cache.pages_held(s) for s in e.sessions)
        assert e.cache.pool.num_free == e.cache.num_pages - held
    sched.run(lambda r: live.pop(r.session_id, None) if r.done else None)
    assert sched.idle and not live and not e.sessions
    assert e.cache.pool.num_free == e.cache.num_pages
    assert ops == N_OPS - 1
    assert finished >= 20 and failed >= 5 and max(sched.stats.batch_sizes) > 1  # it exercised what it claims
