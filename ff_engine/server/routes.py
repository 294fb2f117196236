"""REST routes as ``APIRouter``s over the typed ``AppState`` (``state.py``); helpers in ``app.py``.

  POST   /v1/videos               -> 202 {id, ...}     (429 + Retry-After when the queue or the key is full)
  GET    /v1/videos/{id}          -> status, blocks done, pages held, error
  GET    /v1/videos/{id}/stream   -> multipart/x-mixed-replace MJPEG, frames as they are produced
  GET    /v1/videos/{id}/file     -> the finished MP4 (Range requests; HEAD too)
  DELETE /v1/videos/{id}          -> cancel; the stream's pages return to the pool at once
  POST   /v1/videos/{id}/update   -> {applies_at_block}: prompt, actions, conditioning, paused (``ControlBody``)
  POST   /v1/videos/{id}/rollback -> {to_block}: the stream regenerates from there (``--undo-blocks`` history)
  POST   /v1/videos/{id}/fork     -> 202 the fork's status: a new stream from this one's exact state
  GET    /v1/models, /v1/policies, /metrics (Prometheus), /health (no key; HEAD too), / (the viewer, static)
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from ff_engine.server.errors import ApiError
from ff_engine.server.frames import BlockRenderer, JpegEncoder
from ff_engine.server.schemas import Strict, policy_schema
from ff_engine.server.state import AppState, State, ws_state
from ff_engine.server.stream_registry import STREAM_ID, owner_of
from ff_engine.serving.contract import UnknownStream

STATIC = Path(__file__).parent / "static"
BOUNDARY = "ffframe"
RANGE = re.compile(r"^bytes=\s*(\d*-\d*\s*(,\s*\d*-\d*\s*)*)$")

service = APIRouter()  # /health, /metrics, /v1/models, /v1/policies, /
videos = APIRouter(prefix="/v1/videos")
realtime = APIRouter()


def owner(request: Request) -> str:
    return owner_of(getattr(request.state, "key", None))


async def stream_of(request: Request, video_id: str, st: AppState):
    if not STREAM_ID.match(video_id):
        raise ApiError(400, "id: must be a server-made video id ('vid_' + 32 hex digits)", "id", "invalid_id")
    try:
        return await st.registry.lookup(video_id, owner(request))
    except UnknownStream as exc:
        raise ApiError(404, str(exc), "id", "not_found") from None


@service.get("/health")
@service.head("/health", operation_id="health_head")  # one operation id per method (/openapi.json)
async def health(st: State):
    stats = await asyncio.to_thread(st.runtime.service.stats)
    alive = sum(1 for w in stats.get("workers", []) if w.get("alive", True))
    body = {
        "status": "ok" if alive else "unavailable",
        "workers_alive": alive,
        "active": stats.get("active", 0),
        "queued": stats.get("queued", 0),
    }
    return JSONResponse(body, status_code=200 if alive else 503)


@service.get("/metrics")
async def metrics(st: State):
    data = await asyncio.to_thread(st.metrics.render)
    return Response(data, media_type="text/plain; version=0.0.4; charset=utf-8")


@service.get("/v1/models")
async def models(st: State):
    return {"object": "list", "data": [st.runtime.describe()]}


@service.get("/v1/policies")
async def policies():
    from ff_engine.policies import POLICIES

    return {"object": "list", "data": [policy_schema(n) for n in sorted(POLICIES)]}


@service.get("/")
async def viewer():
    return FileResponse(STATIC / "index.html", media_type="text/html")


@videos.post("", status_code=202)
async def create_video(request: Request, st: State):
    from ff_engine.server.app import is_json, parse_request, submit

    if not is_json(request.headers.get("content-type", "application/json")):
        raise ApiError(415, "content-type: send application/json", "content-type", "unsupported_media_type")
    req = parse_request(st.request_model, await request.body())
    rec = await submit(st.registry, req, owner(request))
    body = await st.registry.status(rec)
    return JSONResponse(body, status_code=202, headers={"Location": f"/v1/videos/{rec.id}"})


@videos.get("/{video_id}")
async def get_video(request: Request, video_id: str, st: State):
    return await st.registry.status(await stream_of(request, video_id, st))


@videos.delete("/{video_id}")
async def cancel_video(request: Request, video_id: str, st: State):
    rec = await stream_of(request, video_id, st)
    if rec.final is None:  # already ended: nothing to cancel (the service may have forgotten it)
        await asyncio.to_thread(rec.handle.cancel)
    return await st.registry.status(rec)


async def json_body(request: Request, model):
    from ff_engine.server.app import is_json, parse_request

    if not is_json(request.headers.get("content-type", "application/json")):
        raise ApiError(415, "content-type: send application/json", "content-type", "unsupported_media_type")
    return parse_request(model, await request.body())


def running(rec) -> None:
    if rec.final is not None:
        raise ApiError(409, f"id: the video is {rec.final.state}; only a queued or running one is controlled",
                       "id", "not_running")


@videos.post("/{video_id}/update")
async def update_video(request: Request, video_id: str, st: State):
    from ff_engine.server import interactive
    from ff_engine.server.schemas import ControlBody

    rec = await stream_of(request, video_id, st)
    body = await json_body(request, ControlBody)
    running(rec)
    controls = interactive.controls_of(st.runtime, rec.id, body)
    futures = await interactive.send(rec.handle, controls)
    block = await interactive.applied(futures, [name for name, _ in controls])
    return {"id": rec.id, "object": "video.update", "applies_at_block": block,
            "changed": [name for name, _ in controls]}


@videos.post("/{video_id}/rollback")
async def rollback_video(request: Request, video_id: str, st: State):
    from ff_engine.server import interactive
    from ff_engine.server.schemas import RollbackBody

    rec = await stream_of(request, video_id, st)
    body = await json_body(request, RollbackBody)
    running(rec)
    block = await interactive.rollback(rec.handle, body.blocks)
    return {"id": rec.id, "object": "video.rollback", "to_block": block}


@videos.post("/{video_id}/fork", status_code=202)
async def fork_video(request: Request, video_id: str, st: State):
    from ff_engine.server.app import fork

    rec = await stream_of(request, video_id, st)
    await json_body(request, _Empty)
    running(rec)
    new = await fork(st.registry, rec, owner(request))
    body = await st.registry.status(new)
    return JSONResponse(body, status_code=202, headers={"Location": f"/v1/videos/{new.id}"})


class _Empty(Strict):
    """A fork takes no fields (an empty body or ``{}``)."""


@videos.get("/{video_id}/file")
@videos.head("/{video_id}/file", operation_id="video_file_head")
async def video_file(request: Request, video_id: str, st: State):
    from ff_engine.server.app import file_of

    rec = await stream_of(request, video_id, st)
    await file_of(st.registry, rec)
    check_range(request.headers.get("range"), rec.path.stat().st_size)
    return FileResponse(rec.path, media_type="video/mp4", filename=f"{rec.id}.mp4")


def check_range(header: str | None, size: int) -> None:
    """A ``Range`` header Starlette would refuse in plain text, refused here in the API's shape: 400 malformed,
    416 (``Content-Range: bytes */size``) when no range starts inside the file."""
    if header is None:
        return
    m = RANGE.match(header.strip())
    if not m:
        raise ApiError(400, "range: expected 'bytes=START-END[, ...]'", "range", "invalid_range")
    ok = False
    for part in m.group(1).split(","):
        a, _, b = part.strip().partition("-")
        if not a and not b or a and b and int(a) > int(b):
            raise ApiError(400, f"range: malformed range {part.strip()!r}", "range", "invalid_range")
        ok |= (int(a) < size) if a else int(b) > 0
    if not ok:
        raise ApiError(416, f"range: no range inside the file's {size} bytes", "range", "range_not_satisfiable",
                       {"Content-Range": f"bytes */{size}"})


@videos.get("/{video_id}/stream")
async def video_stream(request: Request, video_id: str, st: State):
    from ff_engine.server.app import mjpeg_parts

    rec = await stream_of(request, video_id, st)
    renderer = BlockRenderer(st.runtime.decoder(), JpegEncoder(st.settings.jpeg_quality))
    return StreamingResponse(
        mjpeg_parts(rec, renderer),
        media_type=f"multipart/x-mixed-replace; boundary={BOUNDARY}",
        headers={"Cache-Control": "no-store", "X-Video-Id": rec.id},
    )


@realtime.websocket("/v1/realtime/video")
async def realtime_video(ws: WebSocket):
    from ff_engine.server.realtime import RealtimeSession

    st = ws_state(ws)
    await RealtimeSession(ws, st, st.keys, st.settings).run()
