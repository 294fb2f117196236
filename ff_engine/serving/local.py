"""``LocalService``: the ``StreamService`` on one in-process engine — the server's default, and what users without
Ray embed.

It is the cluster's code with one worker: the same ``Router`` (queue, ``Overloaded``, cancel, stream records,
handles, retention) drives one ``EngineWorker`` (the same step: cancel, start, one scheduler step, persist) through
``LocalEndpoint``, which runs each ``step`` on one background thread.  So the in-process twin cannot drift from
the distributed engine.  Blocks are persisted only when ``output_dir`` is given (then memory keeps the last
``keep_blocks`` blocks per stream; without it every block of a stream stays in memory until the stream is
forgotten, see ``streams``).  There is no worker to lose, so no snapshots.
"""

from __future__ import annotations

import concurrent.futures as cf

import torch

from ff_engine.engine.session import SessionConfig
from ff_engine.serving.routed import RoutedService
from ff_engine.serving.router import Router
from ff_engine.serving.worker import EngineWorker, Start, Update


class LocalEndpoint:
    """An ``EngineWorker`` in this process; ``step`` and ``audit`` run on its one thread, in call order."""

    def __init__(self, worker: EngineWorker):
        self.worker, self.name = worker, worker.name
        # torch's thread count is per OS thread (OpenMP): give the engine thread the creator's setting
        self._thread = cf.ThreadPoolExecutor(
            1,
            thread_name_prefix=f"ff-engine-{worker.name}",
            initializer=torch.set_num_threads,
            initargs=(torch.get_num_threads(),),
        )

    def step(self, cancel: list[str], start: list[Start], update: list[Update]) -> cf.Future:
        return self._thread.submit(self.worker.step, cancel, start, update)

    def validate(self, cfg: SessionConfig):
        return self.worker.validate(cfg)  # read-only: safe beside a running step

    def describe(self) -> dict:
        return self.worker.describe()

    def audit(self) -> dict:
        return self._thread.submit(self.worker.audit).result()

    def kill(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)


class LocalService(RoutedService):
    """``model``: an ``nn.Module`` or a ``ModelSpec``.  Engine arguments as ``Engine``; ``max_batch`` as
    ``Scheduler``; ``max_queue``, ``keep_blocks``, ``retention_s``, ``max_terminal``, ``park_after`` as ``Router``;
    ``undo_blocks``: rollback history per stream (``Engine``)."""

    def __init__(
        self,
        model,
        *,
        num_pages: int,
        page_size: int = 32,
        backend: str = "auto",
        max_batch: int = 8,
        max_queue: int | None = None,
        output_dir: str | None = None,
        device: str = "cpu",
        keep_blocks: int = 8,
        retention_s: float = 600.0,
        max_terminal: int = 1024,
        undo_blocks: int = 0,
        park_after: float | None = None,
    ):
        worker = EngineWorker(
            "local",
            model,
            num_pages=num_pages,
            page_size=page_size,
            backend=backend,
            max_batch=max_batch,
            output_dir=output_dir,
            device=device,
            undo_blocks=undo_blocks,
        )
        self.engine = worker.engine
        self.output_dir = output_dir
        self._endpoint = LocalEndpoint(worker)
        try:
            self.router = Router(
                [self._endpoint],
                max_queue=max_queue,
                output_dir=output_dir,
                keep_blocks=keep_blocks,
                retention_s=retention_s,
                max_terminal=max_terminal,
                park_after=park_after,
            )
        except BaseException:
            self._endpoint.kill()
            raise

    def describe(self) -> dict:
        """The worker's model and pool (``EngineWorker.describe``): geometry, model config, pages, page size."""
        return self._endpoint.describe()

    def audit(self) -> list[dict]:
        return self.router.audit()

    def shutdown(self) -> None:
        self.router.shutdown()
        self._endpoint.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
