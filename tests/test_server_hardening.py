"""Issue 30, the hostile probe's findings: each case here failed before its fix (see the commit)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import httpx
import pytest
from server_support import LiveServer, torch_threads
from websockets.sync.client import connect

from ff_engine.client import Client, ServerError

KEY = "hardening-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with torch_threads(1), LiveServer(tmp_path_factory.mktemp("hard"), backend="torch", api_key=KEY,
                                      num_pages=256, header_timeout=1.0, body_timeout=1.0,
                                      max_connections_per_client=24) as srv:
        yield srv


def ws_url(server):
    return server.url.replace("http", "ws") + "/v1/realtime/video"


def test_ws_event_type_of_any_json_type_is_an_error_and_the_session_keeps_running(server):
    with connect(ws_url(server), additional_headers=AUTH, max_size=None) as ws:
        ws.send(json.dumps({"type": "session.start", "frames": 12}))
        assert json.loads(ws.recv())["type"] == "session.started"
        for typ in (["session.ping"], {"a": 1}, 5, None, True):
            ws.send(json.dumps({"type": typ}))
        errors, done = [], None
        while done is None:
            msg = ws.recv(timeout=60)
            if isinstance(msg, str):
                ev = json.loads(msg)
                errors += [ev] if ev["type"] == "error" else []
                done = ev if ev["type"] == "session.done" else None
        assert len(errors) == 5 and all(e["param"] == "type" and e["code"] == "unknown_event" for e in errors)
        assert done["state"] == "finished"


def test_a_finished_status_means_the_file_is_served(server):
    with Client(server.url, api_key=KEY) as c:
        for _ in range(3):
            vid = c.submit(frames=12)["id"]
            while c.status(vid)["status"] != "finished":
                time.sleep(0.01)
            r = c.http.get(f"/v1/videos/{vid}/file")
            assert r.status_code == 200 and r.content[4:8] == b"ftyp", r.text[:200]


def test_policy_parameters_all_have_upper_bounds_and_costly_requests_are_refused(server):
    from ff_engine.policies import POLICIES, policy_schema

    for name in POLICIES:
        for p, f in policy_schema(name)["parameters"].items():
            if f["type"] in ("integer", "number"):
                assert "maximum" in f or "exclusiveMaximum" in f, (name, p)
    cases = [
        ({"policy": "future-forcing", "policy_params": {"form": "exact", "samples": 1024, "horizon": 64}},
         "policy_params.samples"),
        ({"policy": "expected-attention", "policy_params": {"n_future_positions": 65536}},
         "policy_params.n_future_positions"),
        ({"policy": "h2o", "policy_params": {"num_queries": 10**8}}, "policy_params.num_queries"),
        ({"policy": "future-forcing", "policy_params": {"cov_rank": 10**6}}, "policy_params.cov_rank"),
        ({"policy": "expected-attention", "policy_params": {"epsilon": 1e308}}, "policy_params.epsilon"),
    ]
    with Client(server.url, api_key=KEY) as c:
        for body, field in cases:
            with pytest.raises(ServerError) as e:
                c.submit(frames=30, **body)
            assert e.value.status == 422 and e.value.param == field, (body, e.value)
        with pytest.raises(ServerError) as e:  # the whole request: blocks x units per block
            c.submit(frames=3 * 4000, policy="h2o", policy_params={"num_queries": 4096})
        assert e.value.status == 422 and e.value.param == "frames", e.value


def test_request_head_must_arrive_in_time_and_connections_per_client_are_bounded(server):
    socks = []
    for _ in range(40):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks.append(s)
    time.sleep(2.5)
    closed = 0
    for s in socks:
        try:
            closed += s.recv(100) == b""
        except (ConnectionResetError, TimeoutError):
            closed += 1
        s.close()
    assert closed == 40
    with Client(server.url, api_key=KEY) as c:
        assert c.health()["status"] == "ok"


def test_smaller_findings(server, tmp_path):
    with Client(server.url, api_key=KEY) as c, httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as h:
        r = h.post("/v1/videos", json={"policy": "unbounded", "frames": 3 * 10**4})  # more pages than exist
        assert r.status_code == 422 and r.json()["error"]["param"] == "frames", r.text
        r = h.post("/v1/videos", content=b'{"frames": 3}', headers={"Content-Type": "text/x-notjson-at-all"})
        assert r.status_code == 415
        vid = c.submit(frames=3)["id"]
        c.wait(vid)
        assert h.head("/health").status_code == 200 and h.head(f"/v1/videos/{vid}/file").status_code == 200
        r = h.put("/health")
        assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
        r = h.get(f"/v1/videos/{vid}/file", headers={"Range": "bytes=999999999-"})
        assert r.status_code == 416 and r.json()["error"]["param"] == "range"
        r = h.get(f"/v1/videos/{vid}/file", headers={"Range": "chunks=1-2"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "range"
        assert h.post("/v1/videos", content=b"{" + b" " * 20000 + b"}").status_code == 413
        assert 'ff_engine_requests_invalid_total{status="413"}' in c.metrics()
        long = c.submit(frames=900)["id"]
        c.cancel(long)
        with pytest.raises(ServerError) as e:
            c.save(long, tmp_path / "x.mp4")
        assert str(e.value).endswith(f"video {long} was cancelled") and "None" not in str(e.value), str(e.value)
    with Client(server.url, api_key="wrong") as c, pytest.raises(ServerError) as e:
        c.realtime(frames=3)
    assert e.value.status == 401 and e.value.param == "authorization"


def test_a_wait_client_that_goes_resumes_from_its_next_block(tmp_path):
    with torch_threads(1), LiveServer(tmp_path, backend="torch", ws_ping_interval=0.3, ws_ping_timeout=0.6) as srv:
        ws = connect(ws_url(srv), max_size=None, max_queue=2)
        ws.send(json.dumps({"type": "session.start", "frames": 60, "seed": 4}))
        sid = json.loads(ws.recv())["session_id"]
        got = []
        while len(got) < 2:
            msg = ws.recv()
            if isinstance(msg, str) and json.loads(msg)["type"] == "video.block":
                got.append(json.loads(msg)["block"])
        time.sleep(4)  # stops reading: the keepalive closes the connection
        ws.close()
        with Client(srv.url) as c:
            assert c.status(sid)["status"] in ("running", "finished")  # not cancelled
            with c.resume(sid, from_block=2) as rt:
                blocks = [b.index for b in rt]
            assert blocks == list(range(2, 20)) and rt.done["state"] == "finished"


@pytest.mark.parametrize("args", [["--model", "/nonexistent.pt"], ["--prompts-dir", "/nonexistent"],
                                  ["--api-key", ""], ["--ray", "auto"]])
def test_startup_errors_are_one_line_and_exit_2(args, tmp_path):
    env_cmd = [sys.executable, "-m", "ff_engine.server", *args, "--port", "0", "--output-dir", str(tmp_path)]
    p = subprocess.run(env_cmd, capture_output=True, text=True, timeout=120, check=False,
                       env={**__import__("os").environ, "RAY_ADDRESS": ""})
    lines = [ln for ln in p.stderr.splitlines() if "ff-engine serve" in ln or "Traceback" in ln]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("ff-engine serve: error: "), p.stderr[-2000:]


# ---- the rest of #30's list: one test per finding not covered above ---------------------------------------
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_connections_per_client_are_capped_at_once_and_a_slow_body_is_a_408(server):
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(24)]
    try:
        for s in socks:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # an incomplete head: held open (up to 1 s)
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        t0 = time.monotonic()
        try:
            got = extra.recv(100)
        except ConnectionResetError:
            got = b""
        assert got == b"" and time.monotonic() - t0 < 0.6  # the 25th: closed at once, not by the header deadline
        extra.close()
    finally:
        for s in socks:
            s.close()
    time.sleep(1.2)  # the held connections are gone
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    s.sendall(b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
              + b"\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n{\"fra")
    reply = s.recv(4096)
    s.close()
    assert reply.startswith(b"HTTP/1.1 408") and b'"param":"body"' in reply, reply[:300]
    with Client(server.url, api_key=KEY) as c:
        assert 'ff_engine_requests_invalid_total{status="408"}' in c.metrics()


def test_a_kept_alive_connection_idles_past_the_header_deadline_but_a_trickled_head_is_closed(server):
    """After a response, the header deadline (1 s here) starts with the next request's first byte: an idle
    kept-alive connection is reused after 1.5 s (a client that waited must not meet a closed socket), and a head
    trickled after a response is closed like any slow head."""
    head = b"GET /health HTTP/1.1\r\nHost: x\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head + b"\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(1.5)  # idle, past the header deadline, within uvicorn's keep-alive (5 s)
        s.sendall(head + b"\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        s.sendall(head)  # half a head, then nothing
        t0 = time.monotonic()
        assert s.recv(4096) == b"" and time.monotonic() - t0 < 3.0  # closed by the header deadline


def test_the_keepalive_agrees_with_what_wait_promises():
    """``wait``'s bound is ``--ws-ping-timeout`` (default 120 s, so a 60-s pause loses nothing) and uvicorn is
    configured with exactly the server's settings (uvicorn's own default closes a client after 20 s)."""
    from ff_engine.server.__main__ import uvicorn_config
    from ff_engine.server.settings import ServerSettings

    s = ServerSettings()
    cfg = uvicorn_config(None, s)
    assert s.ws_ping_timeout >= 60 and (cfg.ws_ping_interval, cfg.ws_ping_timeout) == (s.ws_ping_interval,
                                                                                        s.ws_ping_timeout)
    assert "--ws-ping-timeout" in (REPO / "docs" / "serving.md").read_text()


def test_a_wait_client_may_pause_below_the_ping_timeout_and_loses_nothing(tmp_path):
    with torch_threads(1), LiveServer(tmp_path, backend="torch", ws_ping_interval=0.3, ws_ping_timeout=6) as srv:
        with connect(ws_url(srv), max_size=None, max_queue=2) as ws:
            ws.send(json.dumps({"type": "session.start", "frames": 30, "seed": 2}))
            assert json.loads(ws.recv())["type"] == "session.started"
            time.sleep(2.5)  # not reading: the reader thread stops, pings go unanswered for 2.5 s
            blocks, done = [], None
            while done is None:
                msg = ws.recv(timeout=30)
                if isinstance(msg, str):
                    ev = json.loads(msg)
                    blocks += [ev["block"]] if ev["type"] == "video.block" else []
                    done = ev if ev["type"] == "session.done" else None
        assert blocks == list(range(10)) and done["state"] == "finished"


def test_openapi_json_is_served_behind_the_key_and_documented(server):
    r = httpx.get(server.url + "/openapi.json", headers=AUTH, timeout=30)
    assert r.status_code == 200 and "/v1/videos" in r.json()["paths"]
    ids = [op["operationId"] for path in r.json()["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids)), ids  # GET + HEAD of one route once shared an id
    assert httpx.get(server.url + "/openapi.json", timeout=30).status_code == 401
    assert "/openapi.json" in (REPO / "docs" / "serving.md").read_text()


def test_the_async_client_raises_server_error_for_a_wrong_key(server):
    import asyncio

    from ff_engine.client import AsyncClient

    async def go():
        async with AsyncClient(server.url, api_key="wrong") as c:
            await c.realtime(frames=3)

    with pytest.raises(ServerError) as e:
        asyncio.run(go())
    assert e.value.status == 401 and e.value.param == "authorization"


def test_memory_per_stream_is_bounded_by_the_record_limit(tmp_path):
    """After many streams, every per-stream table (the server's records, the service's table, open files,
    persisted blocks) holds at most ``--max-records`` terminal streams: what the server keeps does not grow with
    the streams it has served."""
    with torch_threads(1), LiveServer(tmp_path, backend="torch", max_records=3) as srv, Client(srv.url) as c:
        for seed in range(9):
            c.wait(c.submit(frames=3, seed=seed)["id"])
        registry = srv.app.state.ff.registry
        out = tmp_path / "serve"
        # both forget on the next submit: max_records terminal streams + the one that was live then
        assert len(registry.streams) <= 3 + 1 and not registry.detached and sum(registry._pending.values()) == 0
        assert len(srv.service.router.table.records()) <= 3 + 1
        assert len(list(out.glob("vid_*.mp4"))) <= 3 + 1 and len(list((out / "blocks").glob("vid_*"))) <= 3 + 1


def test_disk_per_remembered_stream_is_as_documented(server):
    """docs/serving.md: persisted blocks are frames x C x H x W x 4 bytes (18 KB per latent frame for the world
    model) plus the MP4; the bound is --max-records x the longest stream."""
    from pathlib import Path

    g = server.runtime.geometry
    per_frame = g.latent_channels * g.latent_hw[0] * g.latent_hw[1] * 4
    with Client(server.url, api_key=KEY) as c:
        vid = c.submit(frames=30)["id"]
        c.wait(vid)
        blocks = sum(p.stat().st_size for p in (Path(server.settings.output_dir) / "blocks" / vid).rglob("*")
                     if p.is_file())
    assert 30 * per_frame <= blocks <= 30 * per_frame * 1.1 + 65536, (blocks, 30 * per_frame)
    doc = (REPO / "docs" / "serving.md").read_text()
    assert f"{per_frame // 1000} KB per latent frame" in doc and "--max-records" in doc.split("**Disk.**")[1][:900]


def test_the_readme_serve_section_runs_as_written():
    """README's Serve section: KEY is set before it is used, the POST example says the status the server answers
    ("running"), and ``--ray auto`` comes after starting a cluster."""
    readme = (REPO / "README.md").read_text()
    serve = readme.split("## Serve", 1)[1].split("\n## ", 1)[0]
    assert serve.index("export KEY=") < serve.index('"$KEY"')
    assert '"status": "running"' in serve
    ray = next(ln for ln in serve.splitlines() if "--ray auto" in ln)
    assert "ray start --head" in ray.split("--ray auto")[0]
