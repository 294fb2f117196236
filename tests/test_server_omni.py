"""vLLM-Omni's streaming video protocol on ``WS /v1/realtime/video``, driven by a client written only from
vLLM-Omni's docs (``docs/serving/streaming_video_output_api.md`` and the example's protocol table): the events
come in the documented order and shapes, each ``video.chunk_metadata`` is followed by exactly one binary
fragmented-MP4 chunk, and the chunks concatenated in receive order are a file PyAV plays with every frame at
the model's size.  What ff-engine cannot honour is one ``error``; start timeout, stall clock, ping, stop,
interaction."""

from __future__ import annotations

import io
import json
import time

import av
import pytest
import torch
from server_support import LiveServer, torch_threads
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from ff_engine.client import Client

KEY = "omni-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with torch_threads(1), LiveServer(tmp_path_factory.mktemp("omni"), backend="torch", api_key=KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def busy(tmp_path_factory):
    """A pool that holds one window stream (108 pages): a second one waits, making no progress."""
    with torch_threads(1), LiveServer(tmp_path_factory.mktemp("omni-busy"), backend="torch", num_pages=150,
                                      ws_stall_timeout=1.5, ws_start_timeout=1.0) as srv:
        yield srv


# ---- a vLLM-Omni client, from its docs ------------------------------------------------------------------
def omni_url(srv) -> str:
    return srv.url.replace("http://", "ws://") + "/v1/realtime/video"


def receive_session(ws, timeout: float = 120.0, on_event=None) -> tuple[list[dict], list[tuple[dict, bytes]]]:
    """Every JSON event until ``session.done`` or ``error``, and the (metadata, binary) pairs: a binary frame
    must come right after its ``video.chunk_metadata``."""
    events, chunks, pending = [], [], None
    while True:
        msg = ws.recv(timeout=timeout)
        if isinstance(msg, bytes):
            assert pending is not None, "a binary frame without its video.chunk_metadata"
            chunks.append((pending, msg))
            pending = None
            continue
        assert pending is None, f"{msg[:80]} came between a chunk's metadata and its bytes"
        ev = json.loads(msg)
        events.append(ev)
        if on_event is not None:
            on_event(ws, ev)
        if ev["type"] == "video.chunk_metadata":
            pending = ev
        elif ev["type"] in ("session.done", "error"):
            return events, chunks


def assert_closed(ws) -> None:
    with pytest.raises(ConnectionClosed):
        ws.recv(timeout=10)


def frames_of(data: bytes) -> tuple[int, int, int]:
    with av.open(io.BytesIO(data)) as r:
        frames = [f for f in r.decode(video=0)]
    return len(frames), frames[0].width, frames[0].height


# ---- the protocol ----------------------------------------------------------------------------------------
def test_an_omni_client_streams_a_playable_fragmented_mp4(server):
    start = {"type": "session.start", "model": "ff-world", "prompt": "A serene lakeside sunrise", "format": "m4s",
             "width": 192, "height": 128, "fps": 8, "num_frames": 10, "seed": 3}
    with connect(omni_url(server), additional_headers=AUTH, max_size=None) as ws:
        ws.send(json.dumps(start))
        events, chunks = receive_session(ws)
        assert_closed(ws)
    first, done = events[0], events[-1]
    assert first["type"] == "video.start" and first["format"] == "m4s" and first["request_id"].startswith("vid_")
    assert {k: first["config"][k] for k in ("width", "height", "fps", "num_frames")} == \
        {"width": 192, "height": 128, "fps": 8, "num_frames": 10}
    assert [e["type"] for e in events[1:-1]] == ["video.chunk_metadata"] * len(chunks)
    assert done == {"type": "session.done", "request_id": first["request_id"], "chunks": len(chunks), "stopped": False}
    metas = [m for m, _ in chunks]
    assert [m["transport_chunk_index"] for m in metas] == list(range(len(chunks)))
    assert all(m["byte_length"] == len(b) and m["request_id"] == first["request_id"] for m, b in chunks)
    media = [m for m in metas if m["kind"] == "media"]
    assert [m["generation_chunk_index"] for m in media] == [0, 1, 2, 3]
    assert [m["num_frames"] for m in media] == [3, 3, 3, 1]  # num_frames honoured exactly
    assert metas[-1]["kind"] == "trailer" and metas[-1]["generation_chunk_index"] is None
    assert metas[-1]["num_frames"] == 0 and len(metas) == 5
    assert all(m[k] == [] for m in metas for k in ("started_event_ids", "active_event_ids", "completed_event_ids"))
    assert chunks[0][1][4:8] == b"ftyp" and all(b[4:8] == b"moof" for _, b in chunks[1:])  # init, then fragments
    assert frames_of(b"".join(b for _, b in chunks)) == (10, 192, 128)
    with Client(server.url, api_key=KEY) as c:  # the same stream, by its request_id, over ff-engine's REST
        st = c.wait(first["request_id"])
        assert st["status"] == "finished" and st["request"]["source"] == "omni"


def test_the_minimal_start_from_the_docs_takes_the_models_defaults(server):
    with connect(omni_url(server), additional_headers=AUTH, max_size=None) as ws:
        ws.send(json.dumps({"type": "session.start", "prompt": "A serene lakeside sunrise", "seconds": "1"}))
        events, chunks = receive_session(ws)
    assert events[0]["type"] == "video.start" and events[-1]["type"] == "session.done"
    assert events[0]["config"]["num_frames"] == 8 and events[0]["config"]["ff_engine"]["prompt"] is None
    assert frames_of(b"".join(b for _, b in chunks)) == (8, 192, 128)


@pytest.mark.parametrize("fields, named", [
    ({"width": 640, "height": 384, "fps": 16, "guidance_scale": 5.0, "num_inference_steps": 4},
     ["width 640 x height 384", "fps 16", "guidance_scale", "num_inference_steps"]),
    ({"format": "mp4"}, ["Invalid session.start format: expected 'm4s'."]),
    ({"model": "BestWishYsh/Helios-Distilled"}, ["Model mismatch"]),
    ({"extra_params": {"policy": "lru"}}, ["extra_params.policy"]),
    ({"extra_params": {"shift": 3}}, ["extra_params.shift"]),
    ({"num_frames": 0}, ["num_frames"]),
    ({"num_frames": 10**6}, ["num_frames"]),
])
def test_what_cannot_be_honoured_is_one_error_and_nothing_runs(server, fields, named):
    with connect(omni_url(server), additional_headers=AUTH, max_size=None) as ws:
        ws.send(json.dumps({"type": "session.start", "prompt": "a lake", "num_frames": 6, **fields}))
        events, chunks = receive_session(ws)
        assert_closed(ws)
    assert len(events) == 1 and not chunks
    err = events[0]
    assert err["type"] == "error" and all(n in err["message"] for n in named), err
    assert server.pages_used() == 0


def test_policy_from_extra_params_and_a_wrong_key(server):
    start = {"type": "session.start", "prompt": "a lake", "num_frames": 6,
             "extra_params": {"policy": "future-forcing", "policy_params": {"horizon": 3}, "budget_frames": 6}}
    with connect(omni_url(server), additional_headers=AUTH, max_size=None) as ws:
        ws.send(json.dumps(start))
        events, chunks = receive_session(ws)
    ff = events[0]["config"]["ff_engine"]
    assert ff["policy"] == "future-forcing" and ff["policy_params"] == {"horizon": 3}
    assert events[-1]["type"] == "session.done" and frames_of(b"".join(b for _, b in chunks))[0] == 6
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as e:
        connect(omni_url(server), additional_headers={"Authorization": "Bearer wrong"})
    assert e.value.response.status_code == 401


def test_interaction_is_queued_by_name_and_stop_ends_the_session(server, monkeypatch):
    """``session.interaction`` with a server-side prompt name is queued and marked on the chunk it applies at; free
    text gets an error and the session goes on; ``session.stop`` ends it with ``stopped: true``.  (The world model
    is unconditional: the catalogue is given one name for its zero prompt, as in test_server_realtime.)"""
    catalog = server.runtime.prompts
    monkeypatch.setitem(catalog.paths, "calm", None)
    monkeypatch.setattr(catalog, "load", lambda name, seed: torch.zeros(1, 16))
    sent = {"update": False, "stop": False}

    def drive(ws, ev):
        if ev["type"] == "video.chunk_metadata" and not sent["update"]:
            sent["update"] = True
            ws.send(json.dumps({"type": "session.interaction", "interaction": {"event": {"prompt": "sunlight"}}}))
            ws.send(json.dumps({"type": "session.interaction",
                                "interaction": {"event_id": "calm-1", "event": {"prompt": "calm"}}}))
            ws.send(json.dumps({"type": "session.ping"}))
        elif ev["type"] == "session.interaction.queued" and not sent["stop"]:
            sent["stop"] = True
            ws.send(json.dumps({"type": "session.stop"}))

    with connect(omni_url(server), additional_headers=AUTH, max_size=None) as ws:
        ws.send(json.dumps({"type": "session.start", "prompt": "a lake", "num_frames": 600}))
        events, chunks = [], []
        while not events or events[-1]["type"] != "session.done":
            evs, chs = receive_session(ws, on_event=drive)
            events += evs
            chunks += chs
        assert_closed(ws)
    types = [e["type"] for e in events]
    errors = [e for e in events if e["type"] == "error"]
    assert len(errors) == 1 and errors[0]["code"] == "interaction_failed" and "no text encoder" in errors[0]["message"]
    queued = next(e for e in events if e["type"] == "session.interaction.queued")
    assert queued["event_id"] == "calm-1" and queued["request_id"] == events[0]["request_id"]
    assert "session.pong" in types
    done = events[-1]
    assert done["stopped"] is True and done["chunks"] == len(chunks) < 200
    marked = [m for m, _ in chunks if m["started_event_ids"]]
    assert all(m["kind"] == "media" for m, _ in chunks)  # stopped: no trailer
    if marked:  # the switch may land after the stop
        assert marked[0]["started_event_ids"] == ["calm-1"] == marked[0]["completed_event_ids"]
    with Client(server.url, api_key=KEY) as c:
        assert c.status(events[0]["request_id"])["status"] == "cancelled"


def test_garbage_on_an_omni_session_is_an_error_and_the_session_goes_on(server):
    def garbage(ws, ev):
        if ev["type"] == "video.start":
            for text in ("{not json", "[1]", '{"type": "session.explode"}', '{"type": ["session.stop"]}',
                         '{"type": "session.interaction"}',
                         ('{"type": "session.interaction", "interaction": {"event": {"prompt": "x"}, '
                          '"transition_chunks": 2}}')):
                ws.send(text)
            ws.send(b"\x00binary")

    with connect(omni_url(server), additional_headers=AUTH, max_size=None) as ws:
        ws.send(json.dumps({"type": "session.start", "prompt": "a lake", "num_frames": 30}))
        events, chunks = [], []
        while not events or events[-1]["type"] != "session.done":
            evs, chs = receive_session(ws, on_event=garbage)
            events += evs
            chunks += chs
    errors = [e for e in events if e["type"] == "error"]
    assert len(errors) == 7 and all(e["message"] for e in errors)
    assert events[-1]["stopped"] is False and frames_of(b"".join(b for _, b in chunks))[0] == 30


# ---- timing: start timeout, stall clock, pings ------------------------------------------------------------
def test_start_timeout_closes_an_idle_connection_of_either_protocol(busy):
    for subprotocols in (None, ["ff-engine"]):
        t0 = time.monotonic()
        with connect(omni_url(busy), subprotocols=subprotocols) as ws:
            ev = json.loads(ws.recv(timeout=10))
            assert ev["type"] == "error" and "Timeout waiting for session.start" in ev["message"]
            assert_closed(ws)
        assert time.monotonic() - t0 < 5


def test_a_session_without_progress_or_pings_stalls_and_pings_keep_one_alive(busy):
    with Client(busy.url) as c:
        hog = c.submit(frames=3000)["id"]  # holds the pool: the next stream waits, making no progress
        while c.status(hog)["status"] != "running":
            time.sleep(0.05)
        with connect(omni_url(busy), max_size=None) as ws:  # no pings: stalls after ~1.5 s
            ws.send(json.dumps({"type": "session.start", "prompt": "a lake", "num_frames": 6}))
            events, _ = receive_session(ws, timeout=20)
            assert [e["type"] for e in events] == ["video.start", "error"]
            assert events[1]["message"] == "Stall timeout: no generation progress"
            rid = events[0]["request_id"]
            events, _ = receive_session(ws, timeout=20)
            assert events == [{"type": "session.done", "request_id": rid, "chunks": 0, "stopped": True}]
        assert c.status(rid)["status"] == "cancelled"
        with connect(omni_url(busy), max_size=None) as ws:  # pings every 0.3 s: still waiting after 3 s
            ws.send(json.dumps({"type": "session.start", "prompt": "a lake", "num_frames": 6}))
            assert json.loads(ws.recv(timeout=20))["type"] == "video.start"
            t0, pongs = time.monotonic(), 0
            while time.monotonic() - t0 < 3:
                ws.send(json.dumps({"type": "session.ping"}))
                ev = json.loads(ws.recv(timeout=5))
                assert ev == {"type": "session.pong"}, ev
                pongs += 1
                time.sleep(0.3)
            c.cancel(hog)  # the pool frees: the waiting stream runs to its end
            events, chunks = receive_session(ws, timeout=60)
        assert pongs >= 5 and events[-1]["type"] == "session.done" and events[-1]["stopped"] is False
        assert frames_of(b"".join(b for _, b in chunks))[0] == 6
        assert busy.pages_used() == 0
