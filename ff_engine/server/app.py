"""``ff-engine serve``: FastAPI routes over a ``StreamService`` (local engine or Ray cluster).

REST (OpenAI-style errors, see ``errors.py``):
  POST   /v1/videos               -> 202 {id, ...}     (429 + Retry-After when the queue or the key is full)
  GET    /v1/videos/{id}          -> status, blocks done, pages held, error
  GET    /v1/videos/{id}/stream   -> multipart/x-mixed-replace MJPEG, frames as they are produced
  GET    /v1/videos/{id}/file     -> the finished MP4 (Range requests)
  DELETE /v1/videos/{id}          -> cancel; the stream's pages return to the pool at once
  GET    /v1/models, /v1/policies, /metrics (Prometheus), /health (no key), / (the viewer, static)
WebSocket /v1/realtime/video: see ``realtime.py``.

Why MJPEG for ``/stream`` and not fragmented MP4: every part is one self-contained JPEG, so a frame goes out the
moment its block is decoded (no GOP or fragment to fill), a client may join at any frame, an ``<img>`` tag shows it
with no script, and ``curl`` output splits on the boundary.  The cost is bandwidth (intra-only); the finished
file (``/file``) is H.264.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError

from ff_engine.errors import FFEngineError
from ff_engine.server.auth import BearerAuth, KeyCheck
from ff_engine.server.errors import ApiError, field_of
from ff_engine.server.frames import BlockRenderer, JpegEncoder, stream_blocks
from ff_engine.server.limits import BodyLimit
from ff_engine.server.prometheus import ServerMetrics
from ff_engine.server.schemas import VideoRequest, first_error, policy_schema, request_model
from ff_engine.server.stream_registry import STREAM_ID, KeyLimit, StreamRegistry, owner_of
from ff_engine.serving.contract import UnknownStream

STATIC = Path(__file__).parent / "static"
BOUNDARY = "ffframe"
PUBLIC = ("/health", "/")  # and /static/: the viewer's files (no data, no action)
log = logging.getLogger("ff_engine.server")


def create_app(settings, runtime=None) -> FastAPI:
    """The app.  ``runtime`` (model + service) is built at startup unless given (tests pass their own)."""
    from ff_engine.server.runtime import Runtime

    keys = KeyCheck(settings.api_key)
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(64, thread_name_prefix="ffe-io"))
        rt = runtime or await asyncio.to_thread(Runtime, settings)
        metrics = ServerMetrics(rt.service)
        state.update(
            runtime=rt,
            metrics=metrics,
            registry=StreamRegistry(rt, metrics),
            request_model=request_model(rt.limits),
            loop=asyncio.get_running_loop(),
        )
        app.state.ff = state
        try:
            yield
        finally:
            await state["registry"].close()
            if runtime is None:
                await asyncio.to_thread(rt.service.shutdown)

    app = FastAPI(title="ff-engine", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(BearerAuth, keys=keys, public=PUBLIC, public_prefixes=("/static/",))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        if exc.status in (400, 413, 415, 422):
            state["metrics"].invalid.labels(str(exc.status)).inc()
        return exc.response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path[:120])
        return ApiError(500, f"server: internal error ({type(exc).__name__}); see the server log").response()

    @app.exception_handler(404)
    async def _not_found(request: Request, exc):
        return ApiError(404, f"path: no route {request.url.path[:120]!r}", "path").response()

    @app.exception_handler(405)
    async def _method(request: Request, exc):
        return ApiError(405, f"method: {request.method} is not allowed on {request.url.path[:120]!r}").response()

    def owner(request: Request) -> str:
        return owner_of(getattr(request.state, "key", None))

    def stream_of(request: Request, video_id: str):
        if not STREAM_ID.match(video_id):
            raise ApiError(400, "id: must be a server-made video id ('vid_' + 32 hex digits)", "id", "invalid_id")
        try:
            return state["registry"].get(video_id, owner(request))
        except UnknownStream as exc:
            raise ApiError(404, str(exc), "id", "not_found") from None

    # ---- routes ---------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        stats = await asyncio.to_thread(state["runtime"].service.stats)
        alive = sum(1 for w in stats.get("workers", []) if w.get("alive", True))
        body = {
            "status": "ok" if alive else "unavailable",
            "workers_alive": alive,
            "active": stats.get("active", 0),
            "queued": stats.get("queued", 0),
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        data = await asyncio.to_thread(state["metrics"].render)
        return Response(data, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [state["runtime"].describe()]}

    @app.get("/v1/policies")
    async def policies():
        from ff_engine.policies import POLICIES

        data = [policy_schema(n) for n in sorted(POLICIES)]
        return {"object": "list", "data": data}

    @app.post("/v1/videos", status_code=202)
    async def create_video(request: Request):
        if "json" not in request.headers.get("content-type", "application/json"):
            raise ApiError(415, "content-type: send application/json", "content-type", "unsupported_media_type")
        req = parse_request(state["request_model"], await request.body())
        rec = await submit(state["registry"], req, owner(request))
        body = await state["registry"].status(rec)
        return JSONResponse(body, status_code=202, headers={"Location": f"/v1/videos/{rec.id}"})

    @app.get("/v1/videos/{video_id}")
    async def get_video(request: Request, video_id: str):
        return await state["registry"].status(stream_of(request, video_id))

    @app.delete("/v1/videos/{video_id}")
    async def cancel_video(request: Request, video_id: str):
        rec = stream_of(request, video_id)
        if rec.final is None:  # already ended: nothing to cancel (the service may have forgotten it)
            await asyncio.to_thread(rec.handle.cancel)
        return await state["registry"].status(rec)

    @app.get("/v1/videos/{video_id}/file")
    async def video_file(request: Request, video_id: str):
        rec = stream_of(request, video_id)
        if not rec.file_ready:
            st = await state["registry"].status(rec)
            raise ApiError(
                409, f"id: the video is {st['status']}; its file exists once it has finished", "id", "not_ready"
            )
        return FileResponse(rec.path, media_type="video/mp4", filename=f"{rec.id}.mp4")

    @app.get("/v1/videos/{video_id}/stream")
    async def video_stream(request: Request, video_id: str):
        rec = stream_of(request, video_id)
        rt = state["runtime"]
        renderer = BlockRenderer(rt.decoder(), JpegEncoder(settings.jpeg_quality))
        return StreamingResponse(
            mjpeg_parts(rec, renderer),
            media_type=f"multipart/x-mixed-replace; boundary={BOUNDARY}",
            headers={"Cache-Control": "no-store", "X-Video-Id": rec.id},
        )

    @app.websocket("/v1/realtime/video")
    async def realtime(ws: WebSocket):
        from ff_engine.server.realtime import RealtimeSession

        await RealtimeSession(ws, state, keys, settings).run()

    @app.get("/")
    async def viewer():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app


def parse_request(model: type[VideoRequest], body: bytes) -> VideoRequest:
    """Body -> request model; ``ApiError`` 400 (not JSON) or 422 (a field) naming the field."""
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as exc:
        field, msg = first_error(exc)
        status = 400 if exc.errors()[0]["type"] == "json_invalid" else 422
        raise ApiError(status, f"{field or 'body'}: {msg}", field or "body", "invalid_value") from None


async def submit(registry: StreamRegistry, req: VideoRequest, owner: str, source: str = "rest"):
    """Submit through the registry; engine errors become 422 naming their field, overload 429 + Retry-After."""
    try:
        return await registry.submit(req, owner, source)
    except KeyLimit as exc:
        raise ApiError(429, str(exc), None, "key_limit", {"Retry-After": str(max(1, round(exc.retry_after)))}) from None
    except FFEngineError as exc:
        retry = getattr(exc, "retry_after", None)
        if retry is not None:  # ff_engine.serving.contract.Overloaded
            raise ApiError(429, str(exc), None, "queue_full", {"Retry-After": str(max(1, round(retry)))}) from None
        msg = str(exc).splitlines()[0]
        raise ApiError(422, msg, field_of(msg), "invalid_value") from None


async def mjpeg_parts(rec, renderer: BlockRenderer):
    """One multipart part per video frame; headers carry the block and frame index."""
    frame = 0
    async for blk in stream_blocks(rec.handle):
        px = await asyncio.to_thread(renderer.pixels, blk.latents)
        for jpeg in await asyncio.to_thread(renderer.jpegs, px):
            head = (
                f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n"
                f"X-Block: {blk.block}\r\nX-Frame: {frame}\r\n\r\n"
            )
            yield head.encode() + jpeg + b"\r\n"
            frame += 1
    yield f"--{BOUNDARY}--\r\n".encode()
