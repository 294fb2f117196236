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
                                      num_pages=256, header_timeout=1.0, max_connections_per_client=24) as srv:
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
        assert str(e.value).endswith("was cancelled") or "None" not in str(e.value)
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
