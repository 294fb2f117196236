"""Stateless HTTP on Ray Serve: the server's state in one hub replica, the FastAPI app in any number of ingress
replicas (``ff-engine serve --ray local --ray-serve --ingress-replicas N``).

What lives where:
  * **``StreamHub``** (deployment ``<app>-hub``, one replica): everything a stream needs to outlive a connection —
    the ``Runtime`` and its service (a ``ServeCluster``: the router, its stream table and page books, over the
    engine replicas of ``<app>-engine``), the ``StreamRegistry`` (ids, owners, the one MP4 writer per stream,
    detached WebSocket sessions) and the generation metrics.
  * **Ingress** (deployment ``<app>-ingress``, N replicas behind Serve's HTTP proxy): today's FastAPI app (REST,
    WebSocket, viewer) with a ``RemoteRegistry``: a record is a ``RemoteStream``, a stream handle a
    ``RemoteHandle``, and every call on them is a call of the hub.  An ingress replica keeps nothing a stream
    needs: killed mid-stream, its clients reconnect through the proxy (to another replica, or to the replacement
    Serve starts) by id — ``GET /v1/videos/{id}``, ``/stream``, ``/file``, or ``session.resume`` with
    ``from_block`` on the WebSocket — and the stream never noticed.

Why one hub and not state spread over the ingress replicas or a replicated store: placement needs exact page books
across engine replicas and one pull loop per replica (``serving/router.py``), so there is one router; the registry
sits beside it because its file writer consumes every block once.  The hub's replica is therefore the one process
whose loss loses streams (their persisted blocks and snapshots stay on disk); Serve restarts it empty.  What the
hub costs: one extra hop per call (a Serve handle call) and the blocks' latents
cross the object store once per watching connection.

Hub methods raise the registry's own errors (``UnknownStream``, ``KeyLimit``, ``Overloaded``, ``ConfigError``...);
``_unwrapped`` hands the ingress the original exception, not Ray's wrapper, so the app answers them as before.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import logging
from pathlib import Path

from ff_engine.errors import UnknownStream
from ff_engine.serving.contract import StreamBlock

log = logging.getLogger("ff_engine.server")


def _cause(exc: BaseException) -> BaseException:
    """The exception a hub method raised, unwrapped from Ray's ``RayTaskError`` (which carries it as ``cause``)."""
    from ray.exceptions import RayTaskError

    return exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc


def _unwrapped(fn):
    """Decorate an ingress-side coroutine: a hub error is re-raised as itself."""
    @functools.wraps(fn)
    async def call(*args, **kw):
        try:
            return await fn(*args, **kw)
        except Exception as exc:  # noqa: BLE001 - re-raised, only unwrapped
            raise _cause(exc) from None
    return call


def _result(response):
    """``DeploymentResponse.result()`` with the hub's error unwrapped (worker threads only, never the loop)."""
    try:
        return response.result()
    except Exception as exc:  # noqa: BLE001 - re-raised, only unwrapped
        raise _cause(exc) from None


def _off_the_loop(fn, *args):
    """``fn(*args)`` on a thread of its own, waited for: Serve builds a replica on its event loop's thread, where a
    blocking handle call (``ServeCluster`` waits for its engine replicas) is refused."""
    with cf.ThreadPoolExecutor(1, thread_name_prefix="ffe-hub-init") as pool:
        return pool.submit(fn, *args).result()


# ---- the hub ------------------------------------------------------------------------------------------------
class StreamHub:
    """The server's state (one Serve replica).  Every method names the stream and its owner; a stream of another
    key is ``UnknownStream``, as in the one-process server."""

    def __init__(self, settings):
        from ff_engine.server.prometheus import ServerMetrics
        from ff_engine.server.runtime import Runtime
        from ff_engine.server.schemas import request_model
        from ff_engine.server.stream_registry import StreamRegistry

        self.runtime = _off_the_loop(Runtime, settings)  # its ServeCluster waits on handles: not from the loop
        self.metrics = ServerMetrics(self.runtime.service)
        self.registry = StreamRegistry(self.runtime, self.metrics)
        self.request_model = request_model(self.runtime.limits)

    @staticmethod
    def _record(rec) -> dict:
        return {"id": rec.id, "owner": rec.owner, "request": rec.request, "path": str(rec.path), "final": rec.final}

    async def submit(self, request: dict, owner: str, source: str) -> dict:
        req = self.request_model.model_validate(request)
        return self._record(await self.registry.submit(req, owner, source))

    async def fork(self, sid: str, owner: str) -> dict:
        return self._record(await self.registry.fork(self.registry.get(sid, owner), owner))

    async def lookup(self, sid: str, owner: str) -> dict:
        return self._record(self.registry.get(sid, owner))

    async def status(self, sid: str, owner: str) -> dict:
        return await self.registry.status(self.registry.get(sid, owner))

    async def file_state(self, sid: str, owner: str) -> tuple[bool, str | None]:
        return await self.registry.file_state(self.registry.get(sid, owner))

    async def handle_status(self, sid: str, owner: str):
        rec = self.registry.get(sid, owner)
        return rec.final or await asyncio.to_thread(rec.handle.status)

    async def cancel(self, sid: str, owner: str) -> None:
        await asyncio.to_thread(self.registry.get(sid, owner).handle.cancel)

    async def update(self, sid: str, owner: str, prompt, recache_frames):
        return await asyncio.to_thread(self.registry.get(sid, owner).handle.update, prompt, recache_frames)

    async def control(self, sid: str, owner: str, ctrl):
        """Queue ``ctrl`` (before this coroutine first yields, so controls queue in the order they arrive) and
        answer once it is applied: the block it applies at."""
        fut = self.registry.get(sid, owner).handle.control(ctrl)
        return await asyncio.wrap_future(fut)

    async def blocks(self, sid: str, owner: str, start: int = 0):
        """The stream's blocks from ``start`` (a Serve streaming call): ``(block, latents, done)``."""
        from ff_engine.server.frames import stream_blocks

        async for blk in stream_blocks(self.registry.get(sid, owner).handle):
            if blk.block >= start:
                yield blk.block, blk.latents, blk.done

    async def detach(self, sid: str, owner: str, next_block: int, hold_s: float) -> None:
        self.registry.detach(self.registry.get(sid, owner), next_block, hold_s)

    async def reattach(self, sid: str, owner: str) -> tuple[dict, int] | None:
        """A detached session (as the one-process server), or a stream whose connection's ingress replica died
        before it could detach it (it may have finished meanwhile: its blocks are kept, as a detached session's
        are): the hub cannot know what that connection delivered, so the client's ``from_block`` decides
        (default: the first block)."""
        got = await self.registry.reattach(sid, owner)
        if got is None:
            try:
                got = (self.registry.get(sid, owner), 0)
            except UnknownStream:  # unknown or another key's: None, as a missing detached session
                return None
        return self._record(got[0]), got[1]

    async def stats(self) -> dict:
        return await asyncio.to_thread(self.runtime.service.stats)

    async def metrics_text(self) -> bytes:
        return self.metrics.render()

    async def count_invalid(self, status: str) -> None:
        self.metrics.invalid.labels(status).inc()

    def __del__(self):  # Serve stops the replica (redeploy, shutdown): end the streams and their service
        try:
            self.runtime.service.shutdown()
        except Exception as exc:  # noqa: BLE001 - best effort at teardown
            log.debug("hub: service shutdown: %s", exc)


# ---- what an ingress replica sees -----------------------------------------------------------------------------
class RemoteHandle:
    """``StreamHandle`` of a hub stream.  Sync methods are called from worker threads (``asyncio.to_thread``), as
    the app calls a local handle's; ``ablocks`` streams from the hub."""

    _pool = cf.ThreadPoolExecutor(16, thread_name_prefix="ffe-hub")  # waits for controls' applied answers

    def __init__(self, hub, sid: str, owner: str):
        self.hub, self.id, self.owner = hub, sid, owner

    def status(self):
        return _result(self.hub.handle_status.remote(self.id, self.owner))

    def cancel(self) -> None:
        _result(self.hub.cancel.remote(self.id, self.owner))

    def update(self, prompt, recache_frames=None):
        return _result(self.hub.update.remote(self.id, self.owner, prompt, recache_frames))

    def control(self, ctrl) -> cf.Future:
        response = self.hub.control.remote(self.id, self.owner, ctrl)  # sent now, in call order
        return self._pool.submit(_result, response)

    async def ablocks(self, start: int = 0):
        gen = self.hub.options(stream=True).blocks.remote(self.id, self.owner, start)
        try:
            async for block, latents, done in gen:
                yield StreamBlock(self.id, block, latents, done)
        except Exception as exc:  # noqa: BLE001 - re-raised, only unwrapped
            raise _cause(exc) from None


class RemoteStream:
    """An ingress replica's view of a hub record (as ``ServedStream``: id, owner, request, path, final — the
    latter as of the lookup) with a ``RemoteHandle``."""

    def __init__(self, hub, rec: dict):
        self.id, self.owner, self.request, self.final = rec["id"], rec["owner"], rec["request"], rec["final"]
        self.path = Path(rec["path"])
        self.handle = RemoteHandle(hub, self.id, self.owner)


class RemoteRegistry:
    """``StreamRegistry``'s interface for the app, answered by the hub."""

    def __init__(self, hub):
        self.hub = hub

    @_unwrapped
    async def submit(self, req, owner: str, source: str = "rest") -> RemoteStream:
        return RemoteStream(self.hub, await self.hub.submit.remote(req.model_dump(exclude_none=True), owner, source))

    @_unwrapped
    async def fork(self, rec: RemoteStream, owner: str) -> RemoteStream:
        return RemoteStream(self.hub, await self.hub.fork.remote(rec.id, owner))

    @_unwrapped
    async def lookup(self, sid: str, owner: str) -> RemoteStream:
        return RemoteStream(self.hub, await self.hub.lookup.remote(sid, owner))

    @_unwrapped
    async def status(self, rec: RemoteStream) -> dict:
        return await self.hub.status.remote(rec.id, rec.owner)

    @_unwrapped
    async def file_state(self, rec: RemoteStream) -> tuple[bool, str | None]:
        return await self.hub.file_state.remote(rec.id, rec.owner)

    def detach(self, rec: RemoteStream, next_block: int, hold_s: float) -> None:
        self.hub.detach.remote(rec.id, rec.owner, next_block, hold_s)  # the hub's timer runs from here on

    @_unwrapped
    async def reattach(self, sid: str, owner: str) -> tuple[RemoteStream, int] | None:
        got = await self.hub.reattach.remote(sid, owner)
        return None if got is None else (RemoteStream(self.hub, got[0]), got[1])

    async def close(self) -> None:  # the streams are the hub's: an ingress replica going away ends none
        return None


class _HubCounter:
    """``metrics.invalid.labels(status).inc()`` of an ingress replica: counted in the hub (one exposition)."""

    def __init__(self, hub):
        self.hub, self.status = hub, None

    def labels(self, status: str) -> _HubCounter:
        out = _HubCounter(self.hub)
        out.status = status
        return out

    def inc(self) -> None:
        self.hub.count_invalid.remote(self.status)  # not waited for


class HubMetrics:
    """An ingress replica's ``ServerMetrics``: ``/metrics`` is the hub's exposition (generation, the service's
    pages and queue, rejections), and the bad input an ingress answers is counted there."""

    def __init__(self, hub):
        self.hub, self.invalid = hub, _HubCounter(hub)

    def render(self) -> bytes:
        return _result(self.hub.metrics_text.remote())


class HubService:
    """The slice of ``StreamService`` an ingress replica's app uses directly (health, ``/metrics``' gauges)."""

    def __init__(self, hub):
        self.hub = hub

    def stats(self) -> dict:
        return _result(self.hub.stats.remote())

    def shutdown(self) -> None:  # the service is the hub's
        return None


# ---- deploying ----------------------------------------------------------------------------------------------
def hub_handle(app_name: str):
    from ray import serve

    return serve.get_deployment_handle(f"{app_name}-hub", app_name=f"{app_name}-hub")


def ingress_app(settings, app_name: str):
    """The FastAPI app of an ingress replica: built in the replica (``create_app(..., hub=...)``)."""
    from ff_engine.server.app import create_app

    return create_app(settings, hub=lambda: hub_handle(app_name))


def deploy(settings, app_name: str = "ff-engine", wait_s: float = 600.0) -> str:
    """Start Serve's HTTP proxy on ``settings.host:port``, the hub (which starts the engine replicas through its
    ``ServeCluster``) and ``settings.ingress_replicas`` ingress replicas; the URL clients use."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=None if settings.ray == "local" else settings.ray)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    hub = serve.deployment(StreamHub, name=f"{app_name}-hub", num_replicas=1, max_ongoing_requests=10_000,
                           ray_actor_options={"num_cpus": 0}, health_check_timeout_s=wait_s,
                           graceful_shutdown_timeout_s=5.0,  # a stream's block generator may still be open
                           logging_config={"enable_access_log": False})
    serve.run(hub.bind(settings), name=f"{app_name}-hub", route_prefix=None)

    @serve.ingress(ingress_app(settings, app_name))
    class Ingress:
        """One ingress replica: the FastAPI app over the hub."""

    serve.run(serve.deployment(Ingress, name=f"{app_name}-ingress", num_replicas=settings.ingress_replicas,
                               max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0},
                               logging_config={"enable_access_log": False}).bind(),
              name=f"{app_name}-ingress", route_prefix="/")
    return f"http://{settings.host}:{settings.port}"
