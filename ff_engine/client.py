"""Python client for ``ff-engine serve``: REST (submit, status, cancel, MJPEG frames, save the MP4) and the
realtime WebSocket (iterate blocks), sync (``Client``) and async (``AsyncClient``).  httpx + websockets; no torch.

    from ff_engine.client import Client
    with Client("http://127.0.0.1:8000", api_key=None) as c:
        v = c.submit(seconds=5, policy="future-forcing", budget_frames=6, seed=0)
        c.save(v["id"], "out.mp4")                   # waits until finished
        with c.realtime(seconds=5, policy="window") as rt:
            for block in rt:                         # Block(index, header, frames=[JPEG bytes], latents)
                ...
            print(rt.done)                           # the session.done event
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

TERMINAL = ("finished", "failed", "cancelled")


class ServerError(Exception):
    """A 4xx/5xx answer (or a WebSocket ``error`` event): ``status``, ``message``, ``param``, ``code``,
    ``retry_after`` (seconds, on 429)."""

    def __init__(self, status: int, message: str, param=None, code=None, retry_after: float | None = None):
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.param, self.code, self.retry_after = status, message, param, code, retry_after

    @classmethod
    def from_response(cls, r: httpx.Response) -> ServerError:
        try:
            err = r.json()["error"]
        except (ValueError, KeyError, TypeError):
            err = {"message": r.text[:200]}
        retry = r.headers.get("retry-after")
        return cls(
            r.status_code, err.get("message", ""), err.get("param"), err.get("code"), float(retry) if retry else None
        )

    @classmethod
    def from_event(cls, ev: dict) -> ServerError:
        return cls(ev.get("status", 400), ev.get("message", ""), ev.get("param"), ev.get("code"), ev.get("retry_after"))


@dataclass
class Block:
    """One block of a realtime session: its header (``video.block`` event), its JPEG frames, and the latents
    [F, C, H, W] float32 when the session asked for them."""

    index: int
    header: dict
    frames: list[bytes]
    latents: np.ndarray | None = None
    received_at: float = field(default_factory=time.monotonic)

    def pixels(self) -> list[np.ndarray]:
        from ff_engine.video import decode_jpeg

        return [decode_jpeg(f) for f in self.frames]


class MjpegParser:
    """Splits a ``multipart/x-mixed-replace`` body into (part headers, JPEG bytes), using each part's
    ``Content-Length``."""

    def __init__(self):
        self.buf = b""

    def feed(self, data: bytes) -> list[tuple[dict, bytes]]:
        self.buf += data
        parts = []
        while True:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return parts
            lines = self.buf[:head_end].decode("latin-1").split("\r\n")
            headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
            n = int(headers.get("Content-Length", -1))
            if n < 0 or len(self.buf) < head_end + 4 + n + 2:
                return parts
            parts.append((headers, self.buf[head_end + 4 : head_end + 4 + n]))
            self.buf = self.buf[head_end + 4 + n + 2 :]


def _ended(video_id: str, st: dict) -> str:
    """'video vid_… was cancelled' / 'video vid_… failed: <error>' (no 'None' for a stream without an error)."""
    what = {"cancelled": "was cancelled", "failed": "failed"}.get(st["status"], st["status"])
    return f"video {video_id} {what}" + (f": {st['error']}" if st.get("error") else "")


def _refused(exc) -> ServerError:
    """websockets' ``InvalidStatus`` (the upgrade was answered with an HTTP error) as a ``ServerError``."""
    resp = exc.response
    try:
        err = json.loads(resp.body or b"")["error"]
        return ServerError(resp.status_code, err.get("message", ""), err.get("param"), err.get("code"))
    except (ValueError, TypeError, KeyError, AttributeError):  # a body that is not the API's shape
        return ServerError(resp.status_code, f"websocket: upgrade refused with HTTP {resp.status_code}")


def _ws_url(base_url: str) -> str:
    return base_url.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/v1/realtime/video"


def _start_event(params: dict, slow_client: str, include_latents: bool) -> dict:
    return {
        "type": "session.start",
        "event_id": "start",
        "slow_client": slow_client,
        "include_latents": include_latents,
        **params,
    }


def _latents(header: dict, data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4").reshape(header["latents_shape"])


class _Base:
    def __init__(self, base_url: str, api_key: str | None):
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    @staticmethod
    def _check(r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            raise ServerError.from_response(r)
        return r


# ---- sync ----------------------------------------------------------------------------------------------------
class Client(_Base):
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 60.0):
        super().__init__(base_url, api_key)
        self.http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.http.close()

    def health(self) -> dict:
        return self.http.get("/health").json()

    def models(self) -> list[dict]:
        return self._check(self.http.get("/v1/models")).json()["data"]

    def policies(self) -> list[dict]:
        return self._check(self.http.get("/v1/policies")).json()["data"]

    def metrics(self) -> str:
        return self._check(self.http.get("/metrics")).text

    def submit(self, **params) -> dict:
        """``POST /v1/videos``; returns the 202 body (``id``, ``status``...). ``ServerError`` (429: ``retry_after``)."""
        return self._check(self.http.post("/v1/videos", json=params)).json()

    def status(self, video_id: str) -> dict:
        return self._check(self.http.get(f"/v1/videos/{video_id}")).json()

    def cancel(self, video_id: str) -> dict:
        return self._check(self.http.delete(f"/v1/videos/{video_id}")).json()

    def update(self, video_id: str, **fields) -> dict:
        """``POST /v1/videos/{id}/update`` (``prompt``, ``actions``, ``conditioning``, ``paused``); returns once
        applied, with ``applies_at_block``."""
        return self._check(self.http.post(f"/v1/videos/{video_id}/update", json=fields)).json()

    def rollback(self, video_id: str, blocks: int = 1) -> dict:
        return self._check(self.http.post(f"/v1/videos/{video_id}/rollback", json={"blocks": blocks})).json()

    def fork(self, video_id: str) -> dict:
        """``POST /v1/videos/{id}/fork``: the fork's status (a new ``id``)."""
        return self._check(self.http.post(f"/v1/videos/{video_id}/fork", json={})).json()

    def wait(self, video_id: str, timeout: float = 300.0, poll: float = 0.05, file: bool = True) -> dict:
        """Poll until the stream is terminal (and, when it finished and ``file``, its MP4 is written)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(video_id)
            if st["status"] in TERMINAL and (
                st["file_ready"] or st["file_error"] or st["status"] != "finished" or not file
            ):
                return st
            if time.monotonic() > deadline:
                raise TimeoutError(f"video {video_id} still {st['status']} after {timeout} s")
            time.sleep(poll)

    def frames(self, video_id: str) -> Iterator[tuple[dict, bytes]]:
        """The MJPEG stream: (part headers with X-Block / X-Frame, JPEG bytes) as frames are produced."""
        parser = MjpegParser()
        with self.http.stream("GET", f"/v1/videos/{video_id}/stream") as r:
            if r.status_code >= 400:
                r.read()
                raise ServerError.from_response(r)
            for chunk in r.iter_bytes():
                yield from parser.feed(chunk)

    def save(self, video_id: str, path: str | Path, timeout: float = 300.0) -> Path:
        """Wait for the stream to finish and download its MP4."""
        st = self.wait(video_id, timeout)
        if st["status"] != "finished":
            raise ServerError(409, _ended(video_id, st), "id", "not_ready")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.http.stream("GET", f"/v1/videos/{video_id}/file") as r:
            if r.status_code >= 400:
                r.read()
                raise ServerError.from_response(r)
            with open(path, "wb") as f:
                f.writelines(r.iter_bytes())
        return path

    def realtime(self, slow_client: str = "wait", include_latents: bool = False, **params) -> RealtimeStream:
        return RealtimeStream(self._connect(), _start_event(params, slow_client, include_latents))

    def resume(self, session_id: str, from_block: int | None = None, include_latents: bool = False) -> RealtimeStream:
        """Re-attach a ``wait`` session whose connection was lost (``session.resume``), from ``from_block``
        (default: the first block the lost connection did not send)."""
        ev = {"type": "session.resume", "session_id": session_id, "include_latents": include_latents}
        if from_block is not None:
            ev["from_block"] = from_block
        return RealtimeStream(self._connect(), ev)

    def _connect(self, **kw):
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        try:
            return connect(_ws_url(self.base_url), additional_headers=self.headers, subprotocols=["ff-engine"],
                           max_size=None, open_timeout=30, **kw)
        except InvalidStatus as exc:
            raise _refused(exc) from None


class RealtimeStream:
    """A ``session.start`` on its own connection; iterate for ``Block``s.  ``started`` / ``done`` hold the
    ``session.started`` / ``session.done`` events, ``events`` every other event received."""

    def __init__(self, ws, start: dict):
        self.ws, self.events, self.done = ws, [], None
        ws.send(json.dumps(start))
        while True:
            ev = json.loads(ws.recv())
            if ev["type"] == "error":
                ws.close()
                raise ServerError.from_event(ev)
            if ev["type"] in ("session.started", "session.resumed"):
                self.started, self.id = ev, ev["session_id"]
                return

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __iter__(self) -> Iterator[Block]:
        while self.done is None:
            ev = json.loads(self.ws.recv())
            if ev["type"] == "video.block":
                frames = [self.ws.recv() for _ in range(ev["frames"])]
                lat = _latents(ev, self.ws.recv()) if "latents_shape" in ev else None
                yield Block(ev["block"], ev, frames, lat)
            elif ev["type"] == "session.done":
                self.done = ev
            else:
                self.events.append(ev)

    def send(self, event: dict) -> None:
        self.ws.send(json.dumps(event))

    def cancel(self, event_id: str = "cancel") -> None:
        self.send({"type": "session.cancel", "event_id": event_id})

    def close(self) -> None:
        self.ws.close()


# ---- async ---------------------------------------------------------------------------------------------------
class AsyncClient(_Base):
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 60.0):
        super().__init__(base_url, api_key)
        self.http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=timeout)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def health(self) -> dict:
        return (await self.http.get("/health")).json()

    async def models(self) -> list[dict]:
        return self._check(await self.http.get("/v1/models")).json()["data"]

    async def policies(self) -> list[dict]:
        return self._check(await self.http.get("/v1/policies")).json()["data"]

    async def metrics(self) -> str:
        return self._check(await self.http.get("/metrics")).text

    async def submit(self, **params) -> dict:
        return self._check(await self.http.post("/v1/videos", json=params)).json()

    async def status(self, video_id: str) -> dict:
        return self._check(await self.http.get(f"/v1/videos/{video_id}")).json()

    async def cancel(self, video_id: str) -> dict:
        return self._check(await self.http.delete(f"/v1/videos/{video_id}")).json()

    async def update(self, video_id: str, **fields) -> dict:
        return self._check(await self.http.post(f"/v1/videos/{video_id}/update", json=fields)).json()

    async def rollback(self, video_id: str, blocks: int = 1) -> dict:
        return self._check(await self.http.post(f"/v1/videos/{video_id}/rollback", json={"blocks": blocks})).json()

    async def fork(self, video_id: str) -> dict:
        return self._check(await self.http.post(f"/v1/videos/{video_id}/fork", json={})).json()

    async def wait(self, video_id: str, timeout: float = 300.0, poll: float = 0.05, file: bool = True) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            st = await self.status(video_id)
            if st["status"] in TERMINAL and (
                st["file_ready"] or st["file_error"] or st["status"] != "finished" or not file
            ):
                return st
            if time.monotonic() > deadline:
                raise TimeoutError(f"video {video_id} still {st['status']} after {timeout} s")
            await asyncio.sleep(poll)

    async def frames(self, video_id: str) -> AsyncIterator[tuple[dict, bytes]]:
        parser = MjpegParser()
        async with self.http.stream("GET", f"/v1/videos/{video_id}/stream") as r:
            if r.status_code >= 400:
                await r.aread()
                raise ServerError.from_response(r)
            async for chunk in r.aiter_bytes():
                for part in parser.feed(chunk):
                    yield part

    async def save(self, video_id: str, path: str | Path, timeout: float = 300.0) -> Path:
        st = await self.wait(video_id, timeout)
        if st["status"] != "finished":
            raise ServerError(409, _ended(video_id, st), "id", "not_ready")
        r = self._check(await self.http.get(f"/v1/videos/{video_id}/file"))
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(r.content)
        return path

    async def realtime(self, slow_client: str = "wait", include_latents: bool = False, **params) -> AsyncRealtimeStream:
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus

        try:
            ws = await connect(_ws_url(self.base_url), additional_headers=self.headers, subprotocols=["ff-engine"],
                               max_size=None, open_timeout=30)
        except InvalidStatus as exc:
            raise _refused(exc) from None
        stream = AsyncRealtimeStream(ws)
        await stream.start(_start_event(params, slow_client, include_latents))
        return stream


class AsyncRealtimeStream:
    def __init__(self, ws):
        self.ws, self.events, self.done = ws, [], None

    async def start(self, start: dict) -> None:
        await self.ws.send(json.dumps(start))
        while True:
            ev = json.loads(await self.ws.recv())
            if ev["type"] == "error":
                await self.ws.close()
                raise ServerError.from_event(ev)
            if ev["type"] in ("session.started", "session.resumed"):
                self.started, self.id = ev, ev["session_id"]
                return

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def __aiter__(self) -> AsyncIterator[Block]:
        while self.done is None:
            ev = json.loads(await self.ws.recv())
            if ev["type"] == "video.block":
                frames = [await self.ws.recv() for _ in range(ev["frames"])]
                lat = _latents(ev, await self.ws.recv()) if "latents_shape" in ev else None
                yield Block(ev["block"], ev, frames, lat)
            elif ev["type"] == "session.done":
                self.done = ev
            else:
                self.events.append(ev)

    async def send(self, event: dict) -> None:
        await self.ws.send(json.dumps(event))

    async def cancel(self, event_id: str = "cancel") -> None:
        await self.send({"type": "session.cancel", "event_id": event_id})

    async def close(self) -> None:
        await self.ws.close()
