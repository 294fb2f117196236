"""Malformed and hostile requests: each is answered 4xx with a message naming the field, and the streams that
were running before keep running."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from server_support import LiveServer, torch_threads
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from ff_engine.client import Client

KEY = "hostile-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
FF = "future-forcing"

# (name, method, path, body: dict | bytes | None, headers, expected status, expected field)
CASES = [
    ("bad json", "POST", "/v1/videos", b"{bad", {}, 400, "body"),
    ("not utf-8", "POST", "/v1/videos", b"\xff\xfe\x00", {}, 400, "body"),
    ("json array", "POST", "/v1/videos", [1, 2], {}, 422, "body"),
    ("deep nesting", "POST", "/v1/videos", b"[" * 5000 + b"]" * 5000, {}, 400, "body"),
    ("unknown field", "POST", "/v1/videos", {"frames": 3, "fps": 60}, {}, 422, "fps"),
    ("negative frames", "POST", "/v1/videos", {"frames": -3}, {}, 422, "frames"),
    ("huge frames", "POST", "/v1/videos", {"frames": 10**9}, {}, 422, "frames"),
    ("NaN seconds", "POST", "/v1/videos", b'{"seconds": NaN}', {}, 422, "seconds"),
    ("infinite seconds", "POST", "/v1/videos", b'{"seconds": Infinity}', {}, 422, "seconds"),
    ("seconds as string", "POST", "/v1/videos", {"seconds": "5"}, {}, 422, "seconds"),
    ("zero seconds", "POST", "/v1/videos", {"seconds": 0}, {}, 422, "seconds"),
    ("negative seed", "POST", "/v1/videos", {"seed": -1}, {}, 422, "seed"),
    ("huge seed", "POST", "/v1/videos", {"seed": 2**70}, {}, 422, "seed"),
    ("float seed", "POST", "/v1/videos", {"seed": 1.5}, {}, 422, "seed"),
    ("bool frames", "POST", "/v1/videos", {"frames": True}, {}, 422, "frames"),
    ("negative budget", "POST", "/v1/videos", {"budget_frames": -6}, {}, 422, "budget_frames"),
    (
        "budget below the sink",
        "POST",
        "/v1/videos",
        {"policy": "sink-window", "budget_frames": 1},
        {},
        422,
        "budget_frames",
    ),
    ("unknown policy", "POST", "/v1/videos", {"policy": "lru"}, {}, 422, "policy"),
    ("policy of wrong type", "POST", "/v1/videos", {"policy": 5}, {}, 422, "policy"),
    (
        "unknown policy parameter",
        "POST",
        "/v1/videos",
        {"policy": FF, "policy_params": {"bogus": 1}},
        {},
        422,
        "policy_params.bogus",
    ),
    (
        "parameter of another policy",
        "POST",
        "/v1/videos",
        {"policy": "window", "policy_params": {"horizon": 3}},
        {},
        422,
        "policy_params.horizon",
    ),
    (
        "parameter out of range",
        "POST",
        "/v1/videos",
        {"policy": FF, "policy_params": {"horizon": 0}},
        {},
        422,
        "policy_params.horizon",
    ),
    (
        "parameter of wrong type",
        "POST",
        "/v1/videos",
        {"policy": FF, "policy_params": {"horizon": "6"}},
        {},
        422,
        "policy_params.horizon",
    ),
    (
        "NaN parameter",
        "POST",
        "/v1/videos",
        b'{"policy": "future-forcing", "policy_params": {"decay": NaN}}',
        {},
        422,
        "policy_params.decay",
    ),
    (
        "parameter not in enum",
        "POST",
        "/v1/videos",
        {"policy": FF, "policy_params": {"form": "psychic"}},
        {},
        422,
        "policy_params.form",
    ),
    ("policy_params not an object", "POST", "/v1/videos", {"policy_params": [1]}, {}, 422, "policy_params"),
    (
        "too many policy_params",
        "POST",
        "/v1/videos",
        {"policy_params": {f"p{i}": i for i in range(40)}},
        {},
        422,
        "policy_params",
    ),
    ("seconds and frames", "POST", "/v1/videos", {"seconds": 2, "frames": 6}, {}, 422, "frames"),
    ("prompt path traversal", "POST", "/v1/videos", {"prompt": "../../etc/passwd"}, {}, 422, "prompt"),
    ("unknown prompt", "POST", "/v1/videos", {"prompt": "cat"}, {}, 422, "prompt"),
    ("wrong model", "POST", "/v1/videos", {"model": "gpt-4"}, {}, 422, "model"),
    ("oversized body", "POST", "/v1/videos", b'{"prompt": "' + b"a" * 40000 + b'"}', {}, 413, "body"),
    ("lying content-length", "POST", "/v1/videos", b"{}", {"Content-Length": "999999999"}, 413, "body"),
    ("wrong content type", "POST", "/v1/videos", b"frames=3", {"Content-Type": "text/plain"}, 415, "content-type"),
    ("missing key", "POST", "/v1/videos", {"frames": 3}, {"Authorization": ""}, 401, "authorization"),
    ("wrong key", "GET", "/v1/models", None, {"Authorization": "Bearer nope"}, 401, "authorization"),
    ("basic auth", "GET", "/v1/policies", None, {"Authorization": "Basic dXNlcjpwdw=="}, 401, "authorization"),
    ("id with ../", "GET", "/v1/videos/vid_..%2F..%2Fetc%2Fpasswd", None, {}, 404, "path"),
    ("dotted id", "GET", "/v1/videos/..", None, {}, 404, "path"),
    ("malformed id", "GET", "/v1/videos/vid_1234", None, {}, 400, "id"),
    ("malformed id on file", "GET", "/v1/videos/..%5C..%5Cwin.ini/file", None, {}, 400, "id"),
    ("unknown id", "DELETE", "/v1/videos/vid_" + "0" * 32, None, {}, 404, "id"),
    ("unknown route", "GET", "/v1/admin", None, {}, 404, "path"),
]


def raw_request(base_url, method, path, body, headers) -> httpx.Response:
    head = f"{method} {path} HTTP/1.1\r\nHost: {base_url.host}\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection((base_url.host, base_url.port), timeout=10) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, content = data.partition(b"\r\n\r\n")
    return httpx.Response(int(head.split()[1]), content=content)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with torch_threads(1), LiveServer(tmp_path_factory.mktemp("hostile"), backend="torch", api_key=KEY) as srv:
        yield srv


def send(http: httpx.Client, method, path, body, headers):
    headers = {**AUTH, "Content-Type": "application/json", **headers}
    headers = {k: v for k, v in headers.items() if v}
    if "Content-Length" in headers:  # a lie httpx will not tell: raw socket
        return raw_request(http.base_url, method, path, body, headers)
    content = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
    return http.request(method, path, content=content, headers=headers)


def test_hostile_requests_get_4xx_naming_the_field_while_streams_keep_running(server):
    assert len(CASES) >= 25
    with Client(server.url, api_key=KEY) as c, httpx.Client(base_url=server.url, timeout=30) as http:
        running = c.submit(frames=1020, seed=1)["id"]
        rt = c.realtime(frames=1020, seed=2)
        blocks = iter(rt)
        next(blocks)
        before = c.status(running)["blocks_done"]
        for name, method, path, body, headers, status, field in CASES:
            r = send(http, method, path, body, headers)
            assert r.status_code == status, (name, r.status_code, r.text[:300])
            err = r.json()["error"]
            assert err["param"] == field and err["message"].startswith(f"{field}:"), (name, err)
            assert "Traceback" not in r.text
        # the streams that were running were not disturbed
        deadline = time.monotonic() + 30
        while c.status(running)["blocks_done"] <= before:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.status(running)["status"] == "running"
        assert next(blocks).index == 1 and c.status(rt.id)["status"] == "running"
        c.cancel(running)
        rt.cancel()
        for _ in blocks:
            pass
        assert rt.done["state"] == "cancelled"
        rt.close()
        assert 'ff_engine_requests_invalid_total{status="422"}' in c.metrics()


WS_GARBAGE = [
    ("not json", "hello", "message", "invalid_json"),
    ("json array", "[1, 2]", "message", "invalid_json"),
    ("no type", '{"frames": 3}', "type", "unknown_event"),
    ("unknown type", '{"type": "session.explode"}', "type", "unknown_event"),
    ("bad field", '{"type": "session.start", "frames": -1}', "frames", "invalid_value"),
    ("NaN field", '{"type": "session.start", "seconds": NaN}', "seconds", "invalid_value"),
    ("unknown field", '{"type": "session.start", "frames": 3, "evil": 1}', "evil", "invalid_value"),
    ("bad slow_client", '{"type": "session.start", "slow_client": "ignore"}', "slow_client", "invalid_value"),
    ("bad event id", '{"type": "session.ping", "event_id": "../x"}', "event_id", "invalid_value"),
    ("unknown policy", '{"type": "session.start", "policy": "lru"}', "policy", "invalid_value"),
    ("update without session", '{"type": "session.update", "policy_params": {}}', "type", "no_session"),
    ("cancel without session", '{"type": "session.cancel"}', "type", "no_session"),
]


def test_websocket_garbage_gets_errors_and_the_connection_stays_usable(server):
    url = server.url.replace("http", "ws") + "/v1/realtime/video"
    with connect(url, additional_headers=AUTH, max_size=None) as ws:
        ws.send(b"\x00\x01binary")
        ev = json.loads(ws.recv())
        assert ev["type"] == "error" and ev["param"] == "message" and ev["status"] == 400
        for name, text, field, code in WS_GARBAGE:
            ws.send(text)
            ev = json.loads(ws.recv())
            assert ev["type"] == "error" and ev["param"] == field and ev["code"] == code, (name, ev)
            assert ev["message"].startswith(f"{field}:") and 400 <= ev["status"] < 500, (name, ev)
        ws.send(json.dumps({"type": "session.start", "frames": 6, "event_id": "s1"}))
        events = []
        while not events or events[-1].get("type") != "session.done":
            msg = ws.recv()
            if isinstance(msg, str):
                events.append(json.loads(msg))
        assert events[0]["type"] == "session.started" and events[-1]["state"] == "finished"
    with connect(url, additional_headers=AUTH, max_size=None) as ws:  # over the size limit: closed (1009)
        ws.send("x" * (server.settings.max_body_bytes + 10))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd.code == 1009
    with Client(server.url, api_key=KEY) as c:
        assert c.health()["status"] == "ok"
        assert c.wait(c.submit(frames=3)["id"])["status"] == "finished"
