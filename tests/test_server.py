"""``ff-engine serve`` end to end: a real uvicorn server on 127.0.0.1 over the real ``LocalService``."""

from __future__ import annotations

import io
import json
import time

import av
import numpy as np
import pytest
import torch
from server_support import LiveServer, torch_threads, world_model

from ff_engine.client import Client, ServerError
from ff_engine.engine import Engine
from ff_engine.errors import ConfigError
from ff_engine.server.frames import JpegEncoder, decode_jpeg
from ff_engine.server.schemas import request_model
from ff_engine.server.settings import ServerSettings
from ff_engine.video import Mp4Writer

KEY = "test-key-1"
REQ = {"frames": 12, "seed": 7, "policy": "sink-window", "policy_params": {"sink_frames": 3}, "budget_frames": 6}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with (
        torch_threads(1),
        LiveServer(
            tmp_path_factory.mktemp("srv"),
            backend="torch",
            api_key=f"{KEY},other-key",
            max_queue=2,
            max_streams_per_key=6,
        ) as srv,
    ):
        yield srv


@pytest.fixture
def client(server):
    with Client(server.url, api_key=KEY) as c:
        yield c


def wait_pages_free(server, timeout=60.0):
    deadline = time.monotonic() + timeout
    while server.pages_used() and time.monotonic() < deadline:
        time.sleep(0.02)
    return server.pages_used()


def reference(server, req):
    """``Engine.generate`` on the request's own ``SessionConfig``, decoded and JPEG-encoded like the server."""
    cfg = server.runtime.session_config(request_model(server.runtime.limits).model_validate(req))
    latents = Engine(world_model(), num_pages=512, page_size=32, backend="torch").generate(cfg)
    decoder, enc = server.runtime.decoder(), JpegEncoder(server.settings.jpeg_quality)
    fpb = server.runtime.geometry.frames_per_block
    pixels = np.concatenate([decoder.decode(latents[i : i + fpb]) for i in range(0, len(latents), fpb)])
    return latents, pixels, [enc.encode(f) for f in pixels]


def decode_mp4(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def test_rest_and_websocket_frames_equal_engine_generate(server, client, tmp_path):
    """Comparison: the WebSocket's latents equal ``Engine.generate``'s exactly; the JPEGs of both routes are
    byte-identical to the reference pixels JPEG-encoded with the server's encoder settings (so their PyAV decodes
    are equal too); the MP4, decoded with PyAV, is within a PSNR bound of the reference pixels (see below)."""
    latents, pixels, jpegs = reference(server, REQ)
    v = client.submit(**REQ)
    rest = [jpeg for _, jpeg in client.frames(v["id"])]
    assert rest == jpegs
    assert np.array_equal(np.stack([decode_jpeg(j) for j in rest]), np.stack([decode_jpeg(j) for j in jpegs]))
    assert np.abs(decode_jpeg(rest[0]).astype(int) - pixels[0]).mean() < 3  # JPEG is lossy, but close
    path = client.save(v["id"], tmp_path / "rest.mp4")
    ref_path = tmp_path / "ref.mp4"
    w = Mp4Writer(ref_path, fps=server.runtime.geometry.fps)
    w.write(pixels)
    w.close()
    # libx264 through PyAV is not bit-reproducible run to run (two encodes of the same pixels differ), so the MP4
    # is held to a PSNR bound: against the reference pixels, as good as the reference's own encode.
    served, ref_mp4 = decode_mp4(path.read_bytes()), decode_mp4(ref_path.read_bytes())
    assert served.shape == ref_mp4.shape == pixels.shape
    print("PSNR served / reference encode:", psnr(served, pixels), psnr(ref_mp4, pixels), psnr(served, ref_mp4))
    assert psnr(served, pixels) >= 35 and abs(psnr(served, pixels) - psnr(ref_mp4, pixels)) < 1.0

    with client.realtime(include_latents=True, **REQ) as rt:
        blocks = list(rt)
    assert rt.done["state"] == "finished" and len(blocks) == 4
    assert torch.equal(torch.from_numpy(np.concatenate([b.latents for b in blocks])), latents)
    assert [f for b in blocks for f in b.frames] == jpegs
    assert [b.header["first_frame"] for b in blocks] == [0, 3, 6, 9]
    assert wait_pages_free(server) == 0


def test_range_request_on_the_file(server, client, tmp_path):
    v = client.submit(frames=6, seed=1)
    client.wait(v["id"])
    r = client.http.get(f"/v1/videos/{v['id']}/file", headers={"Range": "bytes=0-99"})
    assert r.status_code == 206 and len(r.content) == 100 and r.headers["content-range"].startswith("bytes 0-99/")
    whole = client.http.get(f"/v1/videos/{v['id']}/file").content
    assert whole[:100] == r.content and whole[4:8] == b"ftyp"


def test_cancel_frees_every_page_at_once(server, client):
    v = client.submit(frames=600, seed=2, budget_frames=6)
    deadline = time.monotonic() + 30
    while client.status(v["id"])["blocks_done"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert client.status(v["id"])["pages_held"] > 0
    st = client.cancel(v["id"])
    assert st["status"] == "cancelled" and st["pages_held"] == 0 and st["pages_reserved"] == 0
    assert server.service.stats()["workers"][0]["pages_placed"] == 0  # the router's book: freed in the call
    assert wait_pages_free(server) == 0  # the worker's pool: at its next step
    assert client.cancel(v["id"])["status"] == "cancelled"  # idempotent
    assert client.status(v["id"])["file_ready"] is False


def test_overload_answers_429_and_loses_nothing(server, client):
    """More long streams than fit (1024 pages hold 9 streams of 108 pages; the queue takes 2): each submit is
    accepted (and then runs or waits, never vanishes) or answered 429 with Retry-After: ``key_limit`` past a
    key's 6 unfinished streams, ``queue_full`` once the admission queue is full."""
    accepted = [client.submit(frames=1020, seed=i)["id"] for i in range(6)]
    with pytest.raises(ServerError) as e:
        client.submit(frames=1020, seed=6)
    assert e.value.status == 429 and e.value.code == "key_limit" and e.value.retry_after >= 1
    codes = []
    with Client(server.url, api_key="other-key") as other:
        for i in range(6):
            try:
                accepted.append(other.submit(frames=1020, seed=10 + i)["id"])
            except ServerError as exc:
                assert exc.status == 429 and exc.retry_after >= 1
                codes.append(exc.code)
        assert codes == ["queue_full"] and len(accepted) == 11
        with pytest.raises(ServerError) as e:
            client.status(accepted[-1])  # the other key's stream: invisible to this key
        assert e.value.status == 404
        states = [other.status(i)["status"] for i in accepted[6:]]
        states += [client.status(i)["status"] for i in accepted[:6]]
        assert set(states) <= {"running", "queued"} and states.count("queued") >= 2  # 2 wait for pages
        for i in accepted[6:]:
            other.cancel(i)
    for i in accepted[:6]:
        client.cancel(i)
    assert wait_pages_free(server) == 0
    text = client.metrics()
    assert 'ff_engine_requests_rejected_total{reason="queue_full"} 1.0' in text
    assert 'ff_engine_requests_rejected_total{reason="key_limit"} 1.0' in text


def test_auth(server):
    with Client(server.url) as anon:
        assert anon.health()["status"] == "ok"  # /health needs no key
        for call in (anon.models, anon.policies, anon.metrics, lambda: anon.submit(frames=3)):
            with pytest.raises(ServerError) as e:
                call()
            assert e.value.status == 401 and e.value.param == "authorization"
        assert anon.http.get("/").status_code == 200  # the viewer's static page carries no data
    with Client(server.url, api_key="wrong") as bad:
        with pytest.raises(ServerError) as e:
            bad.models()
        assert e.value.message == "authorization: invalid API key"
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    with pytest.raises(InvalidStatus) as e:
        connect(server.url.replace("http", "ws") + "/v1/realtime/video")
    assert e.value.response.status_code == 401
    with connect(
        server.url.replace("http", "ws") + "/v1/realtime/video", subprotocols=["ff-engine", f"bearer.{KEY}"]
    ) as ws:  # a browser's way to send the key
        ws.send(json.dumps({"type": "session.ping", "event_id": "p"}))
        assert json.loads(ws.recv())["type"] == "session.pong"


def test_length_is_bounded_by_max_seconds_and_memory_not_a_rope_table(server, client):
    """No RoPE table caps a request (the world model's is 1,024 latent frames): 400 s (3,201 frames) bounded is
    accepted; unbounded it would reserve its whole length and is refused on the page pool; past ``--max-seconds``
    (default 600 s) it is refused naming the field."""
    m = client.models()[0]
    assert m["max_seconds"] == 600 and m["max_frames"] == 4800
    vid = client.submit(seconds=400, seed=7)["id"]
    client.cancel(vid)
    with pytest.raises(ServerError) as e:
        client.submit(seconds=400, policy="unbounded")
    assert 400 <= e.value.status < 500 and "pages" in e.value.message, e.value
    for too_long in ({"seconds": 601}, {"frames": 4801}):
        with pytest.raises(ServerError) as e:
            client.submit(**too_long)
        assert e.value.status == 422 and e.value.param == next(iter(too_long)), e.value
    with pytest.raises(ConfigError, match="--max-seconds"):
        ServerSettings(max_seconds=0).validate()


def test_models_policies_health_metrics(server, client):
    m = client.models()[0]
    assert m["id"] == "ff-world" and m["frames_per_block"] == 3 and m["max_frames"] > 0
    pol = {p["name"]: p for p in client.policies()}
    assert pol["future-forcing"]["parameters"]["horizon"]["minimum"] == 1
    assert pol["unbounded"]["bounded"] is False
    client.wait(client.submit(frames=6, seed=3)["id"])
    text = client.metrics()
    for name in (
        "ff_engine_streams_active",
        "ff_engine_streams_queued",
        "ff_engine_streams_failed_total",
        'ff_engine_pages_used{worker="local"}',
        'ff_engine_pages_free{worker="local"}',
        "ff_engine_frames_generated_total",
        "ff_engine_frames_per_second",
        "ff_engine_block_latency_seconds_bucket",
        "ff_engine_time_to_first_frame_seconds_count",
    ):
        assert name in text, name
    frames = float(next(ln for ln in text.splitlines() if ln.startswith("ff_engine_frames_generated_total")).split()[1])
    assert frames >= 6


def test_websocket_cancel_update_and_idempotent_events(server, client):
    with client.realtime(frames=1020, seed=4, policy="sink-window") as rt:
        it = iter(rt)
        first = next(it)
        assert first.index == 0 and len(first.frames) == 3 and first.header["pages_reserved"] > 0
        rt.send({"type": "session.ping", "event_id": "ping-1"})
        rt.send({"type": "session.ping", "event_id": "ping-1"})  # same id: answered again, not re-applied
        rt.send({"type": "session.update", "event_id": "u1", "policy_params": {"sink_frames": 2}})
        rt.send({"type": "session.update", "event_id": "u2", "policy_params": {"horizon": "x"}})
        rt.cancel("c1")
        rt.cancel("c1")
        for _ in it:
            pass
    assert rt.done["state"] == "cancelled"
    pongs = [e for e in rt.events if e["type"] == "session.pong"]
    assert len(pongs) == 2 and pongs[1].get("duplicate") is True and "duplicate" not in pongs[0]
    errors = {e["event_id"]: e for e in rt.events if e["type"] == "error"}
    assert errors["u1"]["code"] == "unsupported" or any(e["type"] == "session.updated" for e in rt.events)
    assert errors["u2"]["param"] == "policy_params.horizon"
    cancels = [e for e in rt.events if e["type"] == "session.cancelled"]
    assert len(cancels) == 2 and cancels[1]["duplicate"] is True
    seqs = [e["seq"] for e in rt.events] + [rt.done["seq"]]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert wait_pages_free(server) == 0


def test_leaving_the_websocket_cancels_its_stream(server, client):
    rt = client.realtime(frames=1020, seed=5)
    sid = rt.id
    next(iter(rt))
    rt.close()
    deadline = time.monotonic() + 60
    while client.status(sid)["status"] != "cancelled":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert wait_pages_free(server) == 0
