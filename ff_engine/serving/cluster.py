"""``RayCluster``: the ``StreamService`` on Ray core — one ``EngineWorker`` actor per GPU, one router in the driver.

* Workers are Ray actors (``num_gpus=1`` each when the cluster has GPUs; otherwise CPU workers with
  ``num_cpus=1`` and one torch thread each).  ``max_restarts=0``: a restarted actor would come back with an empty
  engine, so a death is handled by the router (re-placement from snapshots), not by Ray.
* Each actor has a ``control`` concurrency group (one thread) for ``validate`` / ``describe``, so ``submit``
  validates a request on a worker's own engine without waiting behind the block that worker is computing;
  ``step`` and ``audit`` stay in the default group (one at a time, in order).
* The model reaches the workers as a ``ModelSpec`` (each loads it) or an ``nn.Module`` put once in the object
  store (``model_spec``).
* Everything is persisted under ``output_dir`` (a fresh temporary folder by default): every block, and each
  running stream's latest snapshot.  Snapshots go to disk rather than the object store because an object lives
  only as long as its owner, and the owner of anything a worker ``ray.put``s is that worker — the one whose death
  the snapshot must outlive.  On several machines ``output_dir`` must be shared storage.

``ray.init`` runs here when Ray is not initialised yet: with ``address`` (an existing cluster) or a local one.
"""

from __future__ import annotations

import logging
import os
import tempfile

import ray
import torch
from ray.exceptions import RayActorError

from ff_engine.engine.session import SessionConfig
from ff_engine.errors import ConfigError, FFEngineError
from ff_engine.serving.routed import RoutedService
from ff_engine.serving.router import Router, WorkerLost
from ff_engine.serving.worker import EngineWorker, Start, Update

log = logging.getLogger(__name__)


@ray.remote(concurrency_groups={"control": 1}, max_restarts=0)
class RayEngineWorker(EngineWorker):
    """``EngineWorker`` as an actor; the read-only calls run in the ``control`` group, beside a running step.
    A bad argument (``FFEngineError`` in the constructor) is kept and handed to the driver by ``describe``, so it
    reaches the user as itself, in one line, instead of as a dead actor's remote traceback."""

    def __init__(self, *args, **kwargs):
        self.init_error = None
        try:
            super().__init__(*args, **kwargs)
        except FFEngineError as exc:
            self.init_error = exc

    @ray.method(concurrency_group="control")
    def validate(self, cfg: SessionConfig):
        return EngineWorker.validate(self, cfg)

    @ray.method(concurrency_group="control")
    def describe(self) -> dict:
        return {"init_error": self.init_error} if self.init_error else EngineWorker.describe(self)


class RayEndpoint:
    def __init__(self, name: str, actor):
        self.name, self.actor = name, actor

    def step(self, cancel: list[str], start: list[Start], update: list[Update]):
        return self.actor.step.remote(cancel, start, update).future()

    def validate(self, cfg: SessionConfig):
        try:
            return ray.get(self.actor.validate.remote(cfg))
        except RayActorError as exc:
            raise WorkerLost(str(exc)) from exc

    def describe(self) -> dict:
        info = ray.get(self.actor.describe.remote())
        if "init_error" in info:
            raise info["init_error"]
        return info

    def audit(self) -> dict:
        return ray.get(self.actor.audit.remote())

    def kill(self) -> None:
        ray.kill(self.actor, no_restart=True)


def _check_num_workers(num_workers) -> None:
    if num_workers is not None and (
        isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1
    ):
        raise ConfigError(f"num_workers must be an integer >= 1, got {num_workers!r}")


class RayCluster(RoutedService):
    """``model``: a ``ModelSpec`` or an ``nn.Module``.  ``num_workers``: default one per GPU (one CPU worker when
    there are none).  Engine arguments per worker as ``Engine`` (``num_pages`` is each worker's pool);
    ``snapshot_every``: blocks between a stream's snapshots, 0 = off; the rest as ``Router``."""

    def __init__(
        self,
        model,
        *,
        num_workers: int | None = None,
        num_pages: int,
        page_size: int = 32,
        backend: str = "auto",
        max_batch: int = 8,
        snapshot_every: int = 8,
        output_dir: str | None = None,
        max_queue: int | None = None,
        address: str | None = None,
        keep_blocks: int = 8,
        retention_s: float = 600.0,
        max_terminal: int = 1024,
        heartbeat_s: float = 0.5,
        ray_init: dict | None = None,
        undo_blocks: int = 0,
        park_after: float | None = None,
    ):
        _check_num_workers(num_workers)
        if not ray.is_initialized():
            ray.init(address=address, **(ray_init or {}))
        gpus = int(ray.cluster_resources().get("GPU", 0))
        num_workers = num_workers or max(gpus, 1)
        # Absolute: the driver and every worker process must name the same folder whatever their working directory.
        self.output_dir = os.path.abspath(output_dir or tempfile.mkdtemp(prefix="ff-engine-cluster-"))
        self.actors = self._spawn_actors(
            model, num_workers, gpus,
            num_pages=num_pages, page_size=page_size, backend=backend, max_batch=max_batch,
            snapshot_every=snapshot_every, undo_blocks=undo_blocks,
        )
        self._endpoints = [RayEndpoint(name, actor) for name, actor in self.actors.items()]
        try:
            self.router = Router(
                self._endpoints,
                max_queue=max_queue,
                snapshot_every=snapshot_every,
                output_dir=self.output_dir,
                keep_blocks=keep_blocks,
                retention_s=retention_s,
                max_terminal=max_terminal,
                heartbeat_s=heartbeat_s,
                park_after=park_after,
            )
        except BaseException:
            self.shutdown_workers()
            raise

    def _spawn_actors(self, model, num_workers: int, gpus: int, **engine_kw) -> dict:
        """One ``RayEngineWorker`` per worker, a GPU each when the cluster has them (one CPU and one thread
        otherwise), all writing under ``self.output_dir``."""
        source = ray.put(model) if isinstance(model, torch.nn.Module) else model
        resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        return {
            f"worker-{i}": RayEngineWorker.options(**resources).remote(
                f"worker-{i}",
                source,
                **engine_kw,
                output_dir=self.output_dir,
                device="cuda" if gpus else "cpu",
                torch_threads=None if gpus else 1,
            )
            for i in range(num_workers)
        }

    def describe(self) -> dict:
        """A live worker's model and pool (``EngineWorker.describe``)."""
        return next(ep for ep, w in zip(self._endpoints, self.router.workers) if w.alive).describe()

    def audit(self) -> list[dict]:
        return self.router.audit()

    def shutdown(self) -> None:
        """Stop the router and kill the workers (Ray itself stays up: it may be shared). Idempotent."""
        self.router.shutdown()
        self.shutdown_workers()

    def shutdown_workers(self) -> None:
        for ep in self._endpoints:
            try:
                ep.kill()
            except Exception as exc:  # noqa: BLE001 - already dead is fine
                log.debug("worker %s: kill: %s", ep.name, exc)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
