"""Steering, fork and rollback over the real server (REST and WebSocket), on the embedded action-steered world
model (v4): two receipts per control, the applied block is the one the video changes at (checked against a single
engine given the same actions), forks and rollbacks leave no page behind, bad controls get one error naming the
field."""

from __future__ import annotations

import time

import pytest
import tests_helpers as helpers
import torch
from server_support import LiveServer, torch_threads, world_v4

from ff_engine.client import Client, ServerError
from ff_engine.engine import Engine
from ff_engine.server.schemas import VideoRequest
from ff_engine.serving.controls import merge_actions


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with torch_threads(1), LiveServer(tmp_path_factory.mktemp("ia"), model=world_v4(), backend="torch",
                                      num_pages=2048, undo_blocks=4, park_after=0.5) as srv:
        yield srv


def solo(server, actions, frames=18, seed=5):
    """What one engine gives for the server's config of this request, with these per-frame actions."""
    cfg = server.runtime.session_config(VideoRequest(frames=frames, seed=seed, policy="window"))
    cfg.actions = actions
    e = Engine(server.runtime.model, num_pages=2048, page_size=server.settings.page_size, backend="torch")
    return e.generate(cfg)


def until(cond, timeout=60.0):
    """Parking happens on the router's clock, which a loaded machine stretches."""
    helpers.until(cond, timeout, poll=0.05)


def idle(server, timeout=30):
    t0 = time.monotonic()
    while server.pages_used():
        assert time.monotonic() - t0 < timeout, server.service.stats()
        time.sleep(0.05)


def test_ws_steer_two_receipts_and_the_video_changes_where_it_says(server):
    names = server.runtime.describe()["actions"]
    fpb = server.runtime.geometry.frames_per_block
    with Client(server.url) as c, c.realtime(frames=18, seed=5, policy="window", actions=["stay"],
                                             include_latents=True) as rt:
        it = iter(rt)
        blocks = {0: next(it).latents}
        rt.send({"type": "session.update", "event_id": "go", "actions": ["right"]})
        for b in it:
            blocks[b.index] = b.latents
    assert rt.done["state"] == "finished"
    received = [e for e in rt.events if e["type"] == "control.received"]
    updated = [e for e in rt.events if e["type"] == "session.updated"]
    assert received[0]["event"] == updated[0]["event"] == 1 and received[0]["event_id"] == "go"
    assert rt.events.index(received[0]) < rt.events.index(updated[0])
    at = updated[0]["applies_at_block"]
    assert 1 <= at <= 6 and updated[0]["changed"] == ["actions"]
    video = torch.cat([torch.tensor(blocks[i]) for i in range(6)])
    want = solo(server, merge_actions([names.index("stay")], [names.index("right")], at * fpb))
    assert torch.allclose(video, want.float(), atol=1e-6)
    idle(server)


def test_ws_rollback_regenerates_and_fork_gives_a_second_stream(server):
    with Client(server.url) as c, c.realtime(frames=24, seed=5, policy="window", actions=["stay"]) as rt:
        it = iter(rt)
        next(it)
        rt.send({"type": "session.update", "event_id": "hold", "paused": True})
        rt.send({"type": "session.fork", "event_id": "f"})
        rt.send({"type": "session.rollback", "event_id": "r", "blocks": 1})
        rt.send({"type": "session.update", "event_id": "play", "paused": False, "actions": ["left"]})
        seen = [b.index for b in it]
        fork_id = next(e for e in rt.events if e["type"] == "session.forked")["fork_id"]
        c.update(fork_id, paused=False)  # forked while paused (controls apply in the order sent): it starts paused
        st = c.wait(fork_id, timeout=120)
    assert rt.done["state"] == "finished" and seen[-1] == 7
    events = {e["event_id"]: e for e in rt.events if e["type"] != "control.received"}
    receipts = [e["event"] for e in rt.events if e["type"] == "control.received"]
    assert receipts == [1, 2, 3, 4]
    assert events["r"]["type"] == "session.rolled_back" and events["r"]["event"] == 3
    assert events["f"]["at_block"] >= 1 and st["status"] == "finished" and st["request"]["forked_from"] == rt.id
    assert events["play"]["changed"] == ["actions", "paused"]
    to = events["r"]["to_block"]
    assert seen.count(to) >= 1 and sorted(set(seen)) == list(range(min(seen), 8))
    idle(server)


def test_rest_update_fork_rollback_and_their_errors(server):
    with Client(server.url) as c:
        v = c.submit(frames=120, seed=2, policy="window", actions=["right"])  # long: it must not end before the pause
        until(lambda: c.status(v["id"])["blocks_done"] >= 2)  # an undo history to roll back into
        u = c.update(v["id"], paused=True)
        assert u["changed"] == ["paused"]
        f = c.fork(v["id"])
        assert f["id"] != v["id"] and f["request"]["forked_from"] == v["id"]
        r = c.rollback(v["id"], blocks=1)
        assert isinstance(r["to_block"], int)
        with pytest.raises(ServerError) as bad:
            c.update(v["id"], actions=["fly"])
        assert bad.value.status == 422 and bad.value.param.startswith("actions")
        with pytest.raises(ServerError) as empty:
            c.update(v["id"])
        assert empty.value.status == 422
        with pytest.raises(ServerError) as deep:
            c.rollback(v["id"], blocks=64)
        assert deep.value.status == 422
        until(lambda: c.status(f["id"])["status"] == c.status(v["id"])["status"] == "parked")  # past --park-after
        assert c.status(v["id"])["pages_reserved"] == 0  # its pages back in the pool
        assert "ff_engine_streams_parked 2.0" in c.metrics()  # the fork of a paused stream starts paused too
        c.update(v["id"], actions=["left"])  # an action resumes it
        c.update(f["id"], actions=["stay"])
        a, b = c.wait(v["id"], timeout=120), c.wait(f["id"], timeout=120)
        assert a["status"] == b["status"] == "finished"
        with pytest.raises(ServerError) as ended:
            c.update(v["id"], actions=["left"])
        assert ended.value.status == 409
        with pytest.raises(ServerError) as gone:
            c.fork("vid_" + "0" * 32)
        assert gone.value.status == 404
    idle(server)
    metrics = Client(server.url).metrics()
    counts = {ln.split()[0]: float(ln.split()[1]) for ln in metrics.splitlines() if ln and not ln.startswith("#")}
    assert counts["ff_engine_forks_total"] >= 1 and counts["ff_engine_parks_total"] >= 2
    assert counts["ff_engine_unparks_total"] >= 2 and counts["ff_engine_streams_parked"] == 0
