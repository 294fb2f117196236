"""``ServeCluster``: the ``StreamService`` on Ray Serve — engine replicas that Serve health-checks, replaces and
autoscales, driven by ff-engine's router (placement by free pages, session affinity, resume from snapshots).

What runs where:
* **``EngineReplica``** (the Serve deployment ``<app>-engine``): each replica owns one ``EngineWorker`` — one GPU's
  ``Engine`` + ``Scheduler`` (``num_gpus=1``; on CPU ``replica_cpus`` and one torch thread).  Its handle methods
  are the router's endpoint calls (``step``, ``validate``, ``describe``, ``audit``); ``step`` runs on one thread of
  its own, so ``validate`` / ``describe`` / Serve's health checks answer beside a running block.  Serve calls
  ``check_health`` (a step that raised, or ``mark_unhealthy``, makes it fail: Serve replaces the replica),
  ``record_routing_stats`` (free pages, streams) and ``record_autoscaling_stats`` (the same plus the router's
  queue, for ``scaling.engine_replicas_policy``).  When Serve stops a replica (scale-down, a redeploy) it
  finishes the step in flight, then ``__del__`` writes a final snapshot of every stream the replica still holds
  and a marker file: the router resumes those streams on live replicas from exactly the block where they
  stopped — no block lost, none repeated (a drain).
* **``AffinityRequestRouter``** (``affinity.py``; Serve's pluggable request router, in the process holding the handle): a request
  naming a replica (``replica=`` keyword; every call of the router's endpoints does) goes to that replica and no
  other — the one holding the stream's KV cache; a request naming none goes to the replica with the most free
  pages (its routing stats).  It also publishes the set of running replicas, from which ``ServeCluster`` learns
  that one joined (Serve started a replacement or a scale-up: it is added to the router) or left.
* **``ServeCluster``** (this process): the ``Router`` (stream table, queue, books) over one ``ServeEndpoint`` per
  replica, and a membership thread.

Why the router drives replicas instead of Serve routing each request by its own rules: a stream's blocks must
all run where its cache is (affinity), placement needs exact page books across replicas (a reservation placed on
a replica must fit its pool), and blocks of many streams on a replica must batch in one forward — a pull loop with
one ``step`` in flight per replica gives all three (``router.py``).  What Serve contributes is the replica
lifecycle: placement of replicas on GPUs, health checks, replacement, autoscaling, graceful stop; the request
router plugin is how ff-engine's affinity rule becomes Serve's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

import ray
import torch
from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig

from ff_engine.errors import ConfigError, FFEngineError
from ff_engine.serving.replica_set import members
from ff_engine.serving.routed import RoutedService
from ff_engine.serving.router import Router, WorkerLost
from ff_engine.serving.worker import EngineWorker

log = logging.getLogger(__name__)

class MisroutedCall(RuntimeError):
    """A call for one replica reached another (it did not run)."""


def _marker(output_dir: str, name: str) -> Path:
    return Path(output_dir) / "_replicas" / f"{name}.drained.json"


class EngineReplica:
    """One engine replica (see the module docstring); ``model`` is a ``ModelSpec`` or ``{"ref": ObjectRef}`` of an
    ``nn.Module`` put once by the cluster."""

    def __init__(self, model, engine_kw: dict, output_dir: str, device: str, torch_threads: int | None):
        self.name = serve.get_replica_context().replica_id.unique_id
        if isinstance(model, dict) and "ref" in model:
            model = ray.get(model["ref"][0])
        self.output_dir = output_dir
        self.worker = EngineWorker(self.name, model, output_dir=output_dir, device=device,
                                   torch_threads=torch_threads, **engine_kw)
        self._thread = cf.ThreadPoolExecutor(1, thread_name_prefix=f"ff-engine-{self.name}")
        self.unhealthy: str | None = None
        self.load = {"queued_streams": 0.0, "queued_pages": 0.0}

    def _mine(self, replica) -> None:
        """Every call names its replica; one that reached another (Serve re-routes a request whose replica died
        before it ran) must not run here: a stream's step on the wrong engine would fork its history."""
        if replica is not None and replica != self.name:
            raise MisroutedCall(f"a call for replica {replica} reached replica {self.name}")

    async def step(self, cancel, start, update, replica=None, load=None):
        self._mine(replica)
        if load:
            self.load = {k: float(v) for k, v in load.items()}
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, self.worker.step, cancel, start,
                                                                    update)
        except BaseException as exc:  # the engine may be inconsistent now: let Serve replace this replica
            self.unhealthy = f"a step raised {type(exc).__name__}: {exc}"
            raise

    def validate(self, cfg, replica=None):
        self._mine(replica)
        return self.worker.validate(cfg)

    def describe(self, replica=None) -> dict:
        self._mine(replica)
        return self.worker.describe()

    async def audit(self, replica=None) -> dict:
        self._mine(replica)
        return await asyncio.get_running_loop().run_in_executor(self._thread, self.worker.audit)

    def mark_unhealthy(self, why: str, replica=None) -> None:
        self._mine(replica)
        self.unhealthy = why

    def check_health(self) -> None:
        if self.unhealthy:
            raise RuntimeError(f"replica {self.name}: {self.unhealthy}")

    def _pages(self) -> dict:
        pool = self.worker.engine.cache.pool
        return {"free_pages": float(pool.unreserved), "streams": float(len(self.worker.engine.sessions)),
                "pages_total": float(pool.capacity)}

    def record_routing_stats(self) -> dict:
        return self._pages()

    def record_autoscaling_stats(self) -> dict:
        return {**self._pages(), **self.load}

    def __del__(self):
        """Serve stops this replica after its last step finished: snapshot every stream it still holds, then
        say so (the router waits for the marker before it resumes them elsewhere)."""
        if not hasattr(self, "worker"):
            return
        covered = {}
        for sid in list(self.worker.engine.sessions):
            block = self.worker.snapshot(sid) if self.output_dir else None
            if block is not None:
                covered[sid] = block
        path = _marker(self.output_dir, self.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(covered))
        os.replace(tmp, path)
        self._thread.shutdown(wait=False)


class ServeEndpoint:
    """The router's ``Endpoint`` for one replica, through the deployment handle (every call names the replica)."""

    def __init__(self, cluster: ServeCluster, name: str):
        self.cluster, self.name = cluster, name
        self.handle = cluster.handle
        self._waiter = cf.ThreadPoolExecutor(1, thread_name_prefix=f"ff-engine-serve-{name[:8]}")

    def _call(self, method: str, *args, timeout: float = 120.0, **kw):
        try:
            return self.handle.options(method_name=method).remote(*args, replica=self.name, **kw).result(
                timeout_s=timeout)
        except (ray.exceptions.RayActorError, TimeoutError, MisroutedCall) as exc:
            raise WorkerLost(f"replica {self.name}: {type(exc).__name__}: {exc}") from exc

    def step(self, cancel, start, update) -> cf.Future:
        resp = self.handle.options(method_name="step").remote(cancel, start, update, replica=self.name,
                                                              load=self.cluster.load())
        return self._waiter.submit(self._wait, resp)

    def _wait(self, resp):
        """The report; ``WorkerLost`` once Serve no longer runs this replica — after its final snapshots, so the
        router resumes its streams from exactly where they stopped (Serve may also hand the call, unrun, to
        another replica: ``MisroutedCall``)."""
        while True:
            try:
                return resp.result(timeout_s=0.25)
            except MisroutedCall:
                break
            except TimeoutError:
                if self.name not in self.cluster.live():
                    resp.cancel()
                    break
        covered = self.cluster.await_final_snapshot(self.name)
        raise WorkerLost(f"replica {self.name} was stopped by Serve "
                         f"({'final snapshots of ' + str(len(covered)) + ' streams' if covered is not None else 'no final snapshots'})")

    def validate(self, cfg):
        return self._call("validate", cfg)

    def describe(self) -> dict:
        return self._call("describe")

    def audit(self) -> dict:
        return self._call("audit")

    def kill(self) -> None:
        """The router gave up on this replica.  Nothing to stop: it died, Serve stopped it, or its step raised
        (then its own health check fails and Serve replaces it)."""
        self._waiter.shutdown(wait=False)


class ServeCluster(RoutedService):
    """``model``: a ``ModelSpec`` or an ``nn.Module``.  ``num_replicas``: engine replicas to start with;
    ``autoscale`` = ``(min, max)`` replicas lets Serve scale them (``scaling.engine_replicas_policy``: queued
    streams up, idle capacity down; a stopped replica's streams move, see ``EngineReplica.__del__``).  Engine
    arguments per replica as ``Engine``; ``snapshot_every`` blocks between a stream's snapshots (> 0: a replica that
    dies loses no stream); the rest as ``Router``.  Ray is initialised here when it is not."""

    def __init__(
        self,
        model,
        *,
        num_replicas: int = 1,
        autoscale: tuple[int, int] | None = None,
        num_pages: int,
        page_size: int = 32,
        backend: str = "auto",
        max_batch: int = 8,
        snapshot_every: int = 8,
        output_dir: str | None = None,
        max_queue: int | None = None,
        app_name: str = "ff-engine",
        replica_cpus: float = 1.0,
        address: str | None = None,
        ray_init: dict | None = None,
        heartbeat_s: float = 0.5,
        park_after: float | None = None,
        undo_blocks: int = 0,
        drain_wait_s: float = 60.0,
        **router_kw,
    ):
        if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
            raise ConfigError(f"num_replicas must be an integer >= 1, got {num_replicas!r}")
        if autoscale is not None and not (len(autoscale) == 2 and 1 <= autoscale[0] <= num_replicas <= autoscale[1]):
            raise ConfigError(f"autoscale must be (min, max) replicas with min <= num_replicas <= max, got {autoscale!r}")
        if snapshot_every < 1:
            raise ConfigError("ServeCluster needs snapshot_every >= 1: a replica Serve replaces must not lose streams")
        if not ray.is_initialized():
            ray.init(address=address, **(ray_init or {}))
        serve.start(proxy_location="Disabled")  # no-op when Serve already runs (with an HTTP proxy or not)
        self.app_name, self.deployment = app_name, f"{app_name}-engine"
        self.output_dir = os.path.abspath(output_dir or tempfile.mkdtemp(prefix="ff-engine-serve-"))
        self.drain_wait_s = drain_wait_s
        self.router = None
        gpus = int(ray.cluster_resources().get("GPU", 0))
        source = {"ref": [ray.put(model)]} if isinstance(model, torch.nn.Module) else model
        engine_kw = {"num_pages": num_pages, "page_size": page_size, "backend": backend, "max_batch": max_batch,
                         "snapshot_every": snapshot_every, "undo_blocks": undo_blocks}
        self._gpus, self._replica_cpus = gpus, replica_cpus
        self._bind_args = (source, engine_kw, self.output_dir, "cuda" if gpus else "cpu", None if gpus else 1)
        self.autoscale = autoscale
        self.handle = serve.run(self._deployment(num_replicas, autoscale).bind(*self._bind_args),
                                name=app_name, route_prefix=None, blocking=False,
                                external_scaler_enabled=autoscale is None)  # scale() sets the count in place
        self._known: set[str] = set()
        self._stop = threading.Event()
        try:
            names = self._wait_for_replicas(num_replicas)
            self.router = Router([ServeEndpoint(self, n) for n in sorted(names)], max_queue=max_queue,
                                 snapshot_every=snapshot_every, output_dir=self.output_dir,
                                 heartbeat_s=heartbeat_s, park_after=park_after, wait_for_workers=True,
                                 **router_kw)
            self._known = set(names)
        except BaseException:
            serve.delete(app_name)
            raise
        self._watcher = threading.Thread(target=self._watch, name="ff-engine-serve-members", daemon=True)
        self._watcher.start()

    def _deployment(self, num_replicas, autoscale):
        scaling = {"num_replicas": num_replicas}
        if autoscale is not None:
            scaling = {"autoscaling_config": AutoscalingConfig(
                min_replicas=autoscale[0], max_replicas=autoscale[1], initial_replicas=num_replicas,
                upscale_delay_s=0.0, downscale_delay_s=0.0, metrics_interval_s=0.5, look_back_period_s=1.0,
                policy=AutoscalingPolicy(policy_function="ff_engine.serving.scaling:engine_replicas_policy"))}
        return serve.deployment(
            EngineReplica,
            name=self.deployment,
            ray_actor_options={"num_gpus": 1} if self._gpus else {"num_cpus": self._replica_cpus},
            max_ongoing_requests=64,
            logging_config={"enable_access_log": False},  # a line per block otherwise
            health_check_period_s=1.0,
            health_check_timeout_s=60.0,
            graceful_shutdown_timeout_s=60.0,
            request_router_config=RequestRouterConfig(request_router_class="ff_engine.serving.affinity.AffinityRequestRouter",
                                                      request_routing_stats_period_s=0.5),
            **scaling,
        )

    # ---- membership ---------------------------------------------------------------------------
    def live(self) -> set[str]:
        """Running replicas as Serve last reported them (all known ones until the first report)."""
        m = members(self.app_name, self.deployment)
        return self._known if m is None else m

    def _wait_for_replicas(self, n: int, timeout: float = 300.0) -> set[str]:
        end = time.monotonic() + timeout
        while True:
            self.handle.options(method_name="describe").remote().result(timeout_s=timeout)  # starts the router
            m = members(self.app_name, self.deployment) or set()
            if len(m) >= n:
                return m
            if time.monotonic() > end:
                raise FFEngineError(f"Serve started {len(m)} of {n} engine replicas within {timeout:.0f} s")
            time.sleep(0.2)

    def _watch(self) -> None:
        """Replicas Serve started since (a replacement, a scale-up) join the router."""
        while not self._stop.wait(0.25):
            for name in sorted(self.live() - self._known):
                try:
                    self.router.add_worker(ServeEndpoint(self, name))
                    self._known.add(name)
                    log.info("replica %s joined", name)
                except (WorkerLost, ConfigError) as exc:
                    log.warning("replica %s could not join: %s", name, exc)

    def await_final_snapshot(self, name: str) -> dict | None:
        """Wait (at most ``drain_wait_s``) for a stopped replica's final snapshots: the streams and blocks they
        cover, or None when it died without writing them (its periodic snapshots are used instead)."""
        path, end = _marker(self.output_dir, name), time.monotonic() + self.drain_wait_s
        while time.monotonic() < end:
            if path.exists():
                return json.loads(path.read_text())
            time.sleep(0.05)
        return None

    def load(self) -> dict:
        """What the autoscaling policy needs from the router: the streams waiting and their pages."""
        r = self.router
        if r is None:
            return {}
        with r._lock:
            waiting = [rec for sid in r.queue if (rec := r.table.find(sid)) is not None]
            return {"queued_streams": len(waiting), "queued_pages": sum(rec.pages for rec in waiting)}

    # ---- the service -------------------------------------------------------------------------------
    def replicas(self) -> list[str]:
        return [w.name for w in self.router.workers if w.alive]

    def describe(self) -> dict:
        return next(w.endpoint for w in self.router.workers if w.alive).describe()

    def audit(self) -> list[dict]:
        return self.router.audit()

    def scale(self, num_replicas: int) -> None:
        """Set the engine replicas (without ``autoscale``): Serve starts or stops replicas in place (its external
        scaler, the call behind Serve's REST scale route); a replica it stops drains (``EngineReplica.__del__``).
        A redeploy would replace every replica instead."""
        if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
            raise ConfigError(f"num_replicas must be an integer >= 1, got {num_replicas!r}")
        if self.autoscale is not None:
            raise ConfigError("this cluster autoscales (autoscale=...): Serve sets its replica count")
        from ray.serve._private.common import DeploymentID
        from ray.serve.context import _get_global_client

        controller = _get_global_client()._controller
        ray.get(controller.update_deployment_replicas.remote(DeploymentID(self.deployment, self.app_name),
                                                             num_replicas))

    def shutdown(self) -> None:
        """Stop the router and delete the Serve application (Ray and Serve stay up). Idempotent."""
        self._stop.set()
        if self.router is not None:
            self.router.shutdown()
        try:
            serve.delete(self.app_name)
        except Exception as exc:  # noqa: BLE001 - already gone is fine
            log.debug("serve.delete(%s): %s", self.app_name, exc)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
