"""Steer, fork, roll back and park through the service (``Router.control`` / ``fork``, ``controls.py``): every
stream equals what a single engine gives for the same actions, parked streams hold no pages and free room for
queued ones, and no control leaks a page."""

import time

import pytest
import torch

from ff_engine import models
from ff_engine.engine import Engine, SessionConfig
from ff_engine.errors import BudgetError, ConfigError
from ff_engine.policies import make_policy
from ff_engine.serving import LocalService
from ff_engine.serving.controls import Pause, merge_actions
from model_adapters.world import EMBEDDED_V4

PAGE = 16


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return models.load_model(str(EMBEDDED_V4))


def cfg(model, sid, blocks=5, seed=0, policy="window", actions=None):
    fpb = model.geometry.frames_per_block
    prompt = torch.zeros(1, model.cfg.text_dim)
    return SessionConfig(prompt=prompt, num_frames=blocks * fpb, seed=seed, policy=make_policy(policy),
                         budget_frames=2 * fpb, session_id=sid, actions=actions)


def solo(model, c) -> torch.Tensor:
    return Engine(model, num_pages=512, page_size=PAGE, backend="torch").generate(c)


def frames(handle, timeout=120) -> torch.Tensor:
    """The stream's final video: the last version of every block (a rollback regenerates some)."""
    got = {}
    for b in handle.blocks(timeout=timeout):
        got[b.block] = b.latents
    return torch.cat([got[i] for i in sorted(got)])


def wait_blocks(handle, n, timeout=60):
    t0 = time.monotonic()
    while handle.status().blocks_done < n:
        assert time.monotonic() - t0 < timeout, handle.status()
        time.sleep(0.01)


def no_leak(svc):
    for a in svc.audit():
        assert a["pages_used"] == 0 and a["pages_reserved"] == 0, a


def test_steer_applies_at_a_block_and_equals_an_engine_given_those_actions(model):
    fpb = model.geometry.frames_per_block
    right = model.cfg.actions.index("right")
    with LocalService(model, num_pages=512, page_size=PAGE, backend="torch") as svc:
        c = cfg(model, "steer")
        h = svc.submit(c)
        h.pause()  # hold it still, so the steer lands at a known block
        at = h.steer([right])
        assert at is not None and at >= 0
        h.resume()
        video = frames(h)
        assert h.status().state == "finished"
        no_leak(svc)
        assert svc.stats()["steered"] == 1
    want = solo(model, cfg(model, "ref", actions=merge_actions(None, [right], at * fpb)))
    assert torch.equal(video, want)
    assert not torch.equal(video, solo(model, c))  # the steer changed the video


def test_steer_refuses_an_unknown_action_and_changes_nothing(model):
    with LocalService(model, num_pages=512, page_size=PAGE, backend="torch") as svc:
        h = svc.submit(cfg(model, "bad"))
        with pytest.raises(ConfigError, match="action"):
            h.steer([99])
        video = frames(h)
    assert torch.equal(video, solo(model, cfg(model, "ref")))


@pytest.mark.parametrize("policy", ["window", "future-forcing"])
def test_fork_shares_the_prefix_and_both_continue_as_solo_runs(model, policy):
    left = model.cfg.actions.index("left")
    fpb = model.geometry.frames_per_block
    with LocalService(model, num_pages=512, page_size=PAGE, backend="torch") as svc:
        src = svc.submit(cfg(model, "src", policy=policy))
        wait_blocks(src, 2)
        src.pause()
        fork = src.fork("fork")
        forked_at = fork.status().blocks_done
        assert forked_at >= 2
        at = fork.steer([left])
        src.resume()
        a, b = frames(src), frames(fork)
        no_leak(svc)
        assert svc.stats()["forked"] == 1
    assert torch.equal(a, solo(model, cfg(model, "r1", policy=policy)))
    assert torch.equal(b[: forked_at * fpb], a[: forked_at * fpb])
    want = solo(model, cfg(model, "r2", policy=policy, actions=merge_actions(None, [left], at * fpb)))
    assert torch.equal(b, want)


def test_fork_without_room_on_its_worker_is_refused(model):
    c = cfg(model, "big")
    one = Engine(model, num_pages=512, page_size=PAGE, backend="torch").pages_needed(c)
    with LocalService(model, num_pages=one + 1, page_size=PAGE, backend="torch") as svc:
        h = svc.submit(c)
        wait_blocks(h, 1)
        with pytest.raises(BudgetError, match="fork needs"):
            h.fork()
        frames(h)
        no_leak(svc)


def test_rollback_regenerates_the_same_blocks_and_consumers_see_them_again(model):
    with LocalService(model, num_pages=512, page_size=PAGE, backend="torch", undo_blocks=4) as svc:
        h = svc.submit(cfg(model, "undo", blocks=6))
        seen = []
        it = h.blocks(timeout=60)
        for b in it:
            seen.append(b.block)
            if b.block == 2:
                h.pause()
                break
        wait_blocks(h, 3)
        back = h.rollback(2)
        assert back == h.status().blocks_done
        h.resume()
        for b in it:
            seen.append(b.block)
        video = frames(h)
        no_leak(svc)
        assert svc.stats()["rolled_back"] == 1
    assert seen[: seen.index(2) + 1] == list(range(seen.index(2) + 1))
    assert seen[-1] == 5 and back in seen[seen.index(2) + 1:]  # the regenerated blocks came again
    assert torch.equal(video, solo(model, cfg(model, "ref", blocks=6)))


def test_rollback_beyond_the_history_is_refused(model):
    with LocalService(model, num_pages=512, page_size=PAGE, backend="torch", undo_blocks=1) as svc:
        h = svc.submit(cfg(model, "deep", blocks=4))
        wait_blocks(h, 2)
        h.pause()
        with pytest.raises(ConfigError):
            h.rollback(3)
        h.resume()
        frames(h)
        no_leak(svc)


def test_a_paused_stream_is_parked_its_pages_admit_a_queued_one_and_it_resumes_bit_identically(model):
    a_cfg, b_cfg = cfg(model, "a", blocks=5), cfg(model, "b", blocks=3, seed=1)
    one = Engine(model, num_pages=512, page_size=PAGE, backend="torch").pages_needed(a_cfg)
    with LocalService(model, num_pages=one, page_size=PAGE, backend="torch", park_after=0.0) as svc:
        a = svc.submit(a_cfg)
        wait_blocks(a, 1)
        a.pause()
        b = svc.submit(b_cfg)  # waits for a's pages
        t0 = time.monotonic()
        while a.status().state != "parked":
            assert time.monotonic() - t0 < 30, a.status()
            time.sleep(0.01)
        assert a.status().pages_reserved == 0
        vb = frames(b)  # admitted into a's pages
        assert b.status().state == "finished"
        a.resume()
        va = frames(a)
        st = svc.stats()
        assert st["parked"] == 1 and st["unparked"] == 1 and st["unpark_p50_s"] is not None
        no_leak(svc)
    assert torch.equal(va, solo(model, a_cfg)) and torch.equal(vb, solo(model, b_cfg))


def test_cancelling_a_parked_stream_ends_it(model):
    with LocalService(model, num_pages=512, page_size=PAGE, backend="torch", park_after=0.0) as svc:
        a = svc.submit(cfg(model, "p", blocks=4))
        wait_blocks(a, 1)
        a.pause()
        t0 = time.monotonic()
        while a.status().state != "parked":
            assert time.monotonic() - t0 < 30
            time.sleep(0.01)
        a.cancel()
        assert a.status().state == "cancelled"
        with pytest.raises(ConfigError, match="cancelled"):
            a.steer([0])
        no_leak(svc)


@pytest.mark.parametrize("control", ["resume", "steer", "rollback"])
def test_a_control_sent_while_its_park_is_in_flight_waits_for_the_park_and_resumes_the_stream(model, monkeypatch,
                                                                                             control):
    """The race behind a flaky server test: a Park is on its way to the worker (``record.parking``) when the user
    un-pauses or steers; the control must follow the stream into the host snapshot and out again, not reach the
    worker after the Park (where the stream is gone: "not running").  A slow ``_park`` holds the window open."""
    from ff_engine.serving import controls

    slow_park, entered = controls._park, []

    def park(worker, p, report):
        entered.append(p.session_id)
        time.sleep(0.4)
        return slow_park(worker, p, report)

    monkeypatch.setitem(controls._APPLY, controls.Park, park)
    right = model.cfg.actions.index("right")
    c = cfg(model, "r", blocks=5)
    with LocalService(model, num_pages=512, page_size=PAGE, backend="torch", park_after=0.0, undo_blocks=2) as svc:
        a = svc.submit(c)
        wait_blocks(a, 2)
        paused = a.control(Pause(a.id, True))  # not waited for: its Park may ride the same worker call
        t0 = time.monotonic()
        while not entered:  # the worker is applying the Park now
            assert time.monotonic() - t0 < 30, a.status()
            time.sleep(0.005)
        if control == "rollback":  # it reaches the stream, restored from its park: no undo history survives that
            with pytest.raises(ConfigError, match="undo history"):
                a.rollback(1)
            a.resume()
        else:
            applied = a.resume() if control == "resume" else a.steer([right])
            assert isinstance(applied, int) and applied >= 2
        assert isinstance(paused.result(), int)
        video = frames(a)
        st = a.status()
        assert st.state == "finished", st
        assert svc.stats()["parked"] >= 1
        no_leak(svc)
    assert video.shape[0] == c.num_frames
