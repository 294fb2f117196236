"""``ff-engine serve``: FastAPI routes over a ``StreamService`` (local engine or Ray cluster).

The app: middleware (``limits.BodyLimit``, ``auth.BearerAuth``), error handlers (OpenAI-style errors, see
``errors.py``), the routers of ``routes.py`` (REST) and the WebSocket ``/v1/realtime/video`` (``realtime.py``),
and the helpers the routes share (request parsing, submit, the finished file, MJPEG parts).

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

from fastapi import FastAPI, Request
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError

from ff_engine.errors import BudgetError, FFEngineError, UnknownStream
from ff_engine.server import routes
from ff_engine.server.auth import BearerAuth, KeyCheck
from ff_engine.server.errors import ApiError, field_of
from ff_engine.server.frames import BlockRenderer, stream_blocks
from ff_engine.server.limits import BodyLimit
from ff_engine.server.prometheus import ServerMetrics
from ff_engine.server.schemas import VideoRequest, first_error, policy_schema, request_model
from ff_engine.server.state import AppState
from ff_engine.server.stream_registry import KeyLimit, StreamRegistry

PUBLIC = ("/health", "/")  # and /static/: the viewer's files (no data, no action)
INVALID = (400, 408, 413, 415, 416, 422)  # counted in ff_engine_requests_invalid_total
log = logging.getLogger("ff_engine.server")


def create_app(settings, runtime=None, hub=None) -> FastAPI:
    """The app.  ``runtime`` (model + service) is built at startup unless given (``ff-engine serve`` and the
    tests build it first, so that a startup error is one line).  ``hub``: a callable returning a ``StreamHub``'s
    Serve handle — the app of an ingress replica, whose streams, registry and service are the hub's (``hub.py``)."""
    keys = KeyCheck(settings.api_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from ff_engine.server.runtime import Runtime

        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(64, thread_name_prefix="ffe-io"))
        if hub is not None:
            from ff_engine.server import hub as remote

            handle = hub()
            rt = await asyncio.to_thread(Runtime, settings, remote.HubService(handle))
            metrics, registry = remote.HubMetrics(handle), remote.RemoteRegistry(handle)
        else:
            rt = runtime or await asyncio.to_thread(Runtime, settings)
            metrics = ServerMetrics(rt.service)
            registry = StreamRegistry(rt, metrics)
        app.state.ff = AppState(settings, keys, rt, metrics, registry, request_model(rt.limits),
                                asyncio.get_running_loop())
        try:
            yield
        finally:
            await app.state.ff.registry.close()
            if runtime is None:  # an ingress replica's HubService: the hub's service outlives it
                await asyncio.to_thread(rt.service.shutdown)

    app = FastAPI(title="ff-engine", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout)
    app.add_middleware(BearerAuth, keys=keys, public=PUBLIC, public_prefixes=("/static/",))
    app.mount("/static", StaticFiles(directory=routes.STATIC), name="static")
    add_error_handlers(app)
    for router in (routes.service, routes.videos, routes.realtime):
        app.include_router(router)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error in the API's one shape (``errors.ApiError``); bad input counted by status."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        if exc.status in INVALID:
            request.app.state.ff.metrics.invalid.labels(str(exc.status)).inc()
        return exc.response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path[:120])
        return ApiError(500, f"server: internal error ({type(exc).__name__}); see the server log").response()

    @app.exception_handler(UnknownStream)  # a stream the service forgot between a lookup and a later call
    async def _unknown(request: Request, exc: UnknownStream):
        return ApiError(404, str(exc).splitlines()[0], "id", "not_found").response()

    @app.exception_handler(404)
    async def _not_found(request: Request, exc):
        return ApiError(404, f"path: no route {request.url.path[:120]!r}", "path").response()

    @app.exception_handler(405)
    async def _method(request: Request, exc):
        return ApiError(
            405, f"method: {request.method} is not allowed on {request.url.path[:120]!r}", "method", "method_not_allowed"
        ).response()


def is_json(content_type: str) -> bool:
    """``application/json`` or ``application/<x>+json``, with any parameters (``; charset=utf-8``)."""
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))


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
        field = field_of(msg)
        if field is None and "pages" in msg:  # the engine's admission: the stream can never fit the pool
            field = pages_field(req)
            msg = f"{field}: {msg}"
        raise ApiError(422, msg, field, "invalid_value") from None


async def fork(registry: StreamRegistry, rec, owner: str):
    """Fork through the registry; no room on the stream's worker 429 (``BudgetError``), a stream that is not
    running (queued, parked, ended) 409."""
    try:
        return await registry.fork(rec, owner)
    except KeyLimit as exc:
        raise ApiError(429, str(exc), None, "key_limit", {"Retry-After": str(max(1, round(exc.retry_after)))}) from None
    except BudgetError as exc:
        raise ApiError(429, str(exc).splitlines()[0], None, "no_pages", {"Retry-After": "1"}) from None
    except FFEngineError as exc:
        raise ApiError(409, f"id: {str(exc).splitlines()[0]}", "id", "not_running") from None


def pages_field(req: VideoRequest) -> str:
    """What sets a stream's pages: its budget (bounded policy) or its length (unbounded)."""
    from ff_engine.server.runtime import length_field

    try:
        bounded = policy_schema(req.policy).get("bounded", True)
    except FFEngineError:
        bounded = True
    return "budget_frames" if bounded else length_field(req)


async def file_of(registry: StreamRegistry, rec) -> None:
    """Return once ``rec``'s MP4 is in place; ``ApiError`` 409 when it will not be.  A stream the service reports
    finished has its file written by then or within moments (the writer closes and renames it after the last
    block): that is waited for, so ``finished`` always means ``/file`` answers 200."""
    ready, error = await registry.file_state(rec)
    if ready:
        return
    if error:
        raise ApiError(409, f"id: the video finished but its file could not be written ({error})",
                       "id", "file_error")
    st = await registry.status(rec)
    ended = st["status"] in ("failed", "cancelled")
    msg = f"id: the video {st['status']}; it has no file" if ended else f"id: the video is {st['status']}; its " \
        f"file is served once it has finished ({st['blocks_done']} of {st['num_blocks']} blocks done)"
    raise ApiError(409, msg, "id", "not_ready")


async def mjpeg_parts(rec, renderer: BlockRenderer):
    """One multipart part per video frame; headers carry the block and frame index."""
    frame = 0
    async for blk in stream_blocks(rec.handle):
        px = await asyncio.to_thread(renderer.pixels, blk.latents)
        for jpeg in await asyncio.to_thread(renderer.jpegs, px):
            head = (
                f"--{routes.BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n"
                f"X-Block: {blk.block}\r\nX-Frame: {frame}\r\n\r\n"
            )
            yield head.encode() + jpeg + b"\r\n"
            frame += 1
    yield f"--{routes.BOUNDARY}--\r\n".encode()
