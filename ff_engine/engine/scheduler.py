"""Continuous batching of many video streams over one ``Engine``.

* **Admission by page budget.** Requests wait in FIFO order until their whole reservation fits in the pool
  (bounded streams reserve budget + one block per layer; unbounded ones their whole requested length).  A
  request that could never fit, even in an empty pool, is rejected at ``submit``.  The queue is strict FIFO
  (no overtaking), so a large request is never starved by a stream of small ones.
* **Fair round-robin.** Each ``step`` runs one block for up to ``max_batch`` active streams in a single
  transformer forward per denoising step; the batch window rotates so every stream advances equally often.
* Streams join at any block boundary and leave when done or cancelled; their pages return to the pool at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ff_engine.engine.engine import BlockResult, Engine, reservation_pages
from ff_engine.engine.session import SessionConfig
from ff_engine.errors import BudgetError, ConfigError, FFEngineError


@dataclass
class SchedulerStats:
    steps: int = 0
    blocks: int = 0
    admitted: int = 0
    finished: int = 0
    batch_sizes: list[int] = field(default_factory=list)


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int = 8):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.engine, self.max_batch = engine, max_batch
        self.waiting: deque[SessionConfig] = deque()
        self._rr = 0
        self.stats = SchedulerStats()
        self.rejected: list[tuple[SessionConfig, str]] = []  # requests that failed admission, with the reason

    def submit(self, cfg: SessionConfig) -> None:
        """Queue a stream; raises at once if it could never be admitted."""
        need = reservation_pages(self.engine.geometry, self.engine.cache.page_size, cfg)
        if need > self.engine.cache.num_pages:
            raise BudgetError(f"stream needs {need} pages, more than the whole pool of {self.engine.cache.num_pages}")
        cfg.policy.validate(cfg.budget_frames, self.engine.geometry.frames_per_block)
        self.waiting.append(cfg)

    def admit(self) -> list[str]:
        """Admit waiting streams, in order, while their reservations fit."""
        admitted = []
        pool = self.engine.cache.pool
        while self.waiting:
            cfg = self.waiting[0]
            if not pool.can_reserve(reservation_pages(self.engine.geometry, self.engine.cache.page_size, cfg)):
                break
            self.waiting.popleft()
            try:
                admitted.append(self.engine.add_session(cfg).id)
            except FFEngineError as exc:  # a bad request must not stop the other streams
                self.rejected.append((cfg, str(exc)))
        self.stats.admitted += len(admitted)
        return admitted

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.engine.sessions

    def step(self) -> list[BlockResult]:
        self.admit()
        active = list(self.engine.sessions)
        if not active:
            return []
        start = self._rr % len(active)
        batch = (active[start:] + active[:start])[: self.max_batch]
        self._rr = start + len(batch)
        results = self.engine.step(batch)
        self.stats.steps += 1
        self.stats.blocks += len(results)
        self.stats.finished += sum(r.done for r in results)
        self.stats.batch_sizes.append(len(batch))
        return results

    def run(self, on_result=None) -> None:
        """Step until every submitted stream is done."""
        while not self.idle:
            for r in self.step():
                if on_result:
                    on_result(r)
