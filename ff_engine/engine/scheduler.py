"""Continuous batching of many video streams over one ``Engine``.

* **Admission by page budget.** Requests wait in FIFO order until their whole reservation fits in the pool
  (bounded streams reserve budget + one block per layer; unbounded ones their whole requested length).  A
  request that could never fit, even in an empty pool, is rejected at ``submit``.  The queue is strict FIFO
  (no overtaking), so a large request is never starved by a stream of small ones.
* **Fair round-robin.** Each ``step`` runs one block for up to ``max_batch`` active streams in a single
  transformer forward per denoising step; the batch window rotates so every stream advances equally often.
* Streams join at any block boundary and leave when done or cancelled; their pages return to the pool at once.
* **Nothing is lost silently.** ``submit`` validates the whole request (``Engine.validate``) and returns the
  stream's id; a full queue (``max_queue``) raises ``Overloaded`` with a retry-after estimate; a request that
  fails at admission, or a session that fails while running, comes back from ``step`` as a ``BlockResult``
  with ``error`` set.  ``cancel`` works on queued and running ids alike.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass, field

from ff_engine.engine.engine import BlockResult, Engine
from ff_engine.engine.session import SessionConfig, new_session_id
from ff_engine.errors import ConfigError, FFEngineError, Overloaded


@dataclass
class SchedulerStats:
    steps: int = 0
    blocks: int = 0
    admitted: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    rejected: int = 0
    batch_sizes: list[int] = field(default_factory=list)


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int = 8, max_queue: int | None = None):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if max_queue is not None and (isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0):
            raise ConfigError(f"max_queue must be None (unbounded) or an integer >= 0, got {max_queue!r}")
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.waiting: deque[SessionConfig] = deque()
        self._rr = 0
        self.stats = SchedulerStats()
        self._step_seconds = 0.0  # moving average of one step's wall time (for retry-after estimates)
        self._pending: list[BlockResult] = []  # admission failures, reported by the next step

    def submit(self, cfg: SessionConfig) -> str:
        """Queue a stream and return its id (assigned here when ``cfg.session_id`` is None).  Raises a one-line
        ``FFEngineError`` at once for a bad request or one that could never fit, ``Overloaded`` when the queue
        is full; nothing is queued then."""
        e = self.engine
        e.validate(cfg)
        e.pages_that_fit(cfg)
        if cfg.session_id is None:
            cfg = dataclasses.replace(cfg, session_id=new_session_id())
        elif cfg.session_id in e.sessions or any(w.session_id == cfg.session_id for w in self.waiting):
            raise ConfigError(f"session_id {cfg.session_id!r} is already queued or active")
        if self.max_queue is not None and len(self.waiting) >= self.max_queue:
            self.stats.rejected += 1
            raise Overloaded(f"admission queue is full ({self.max_queue} waiting)", self.retry_after())
        self.waiting.append(cfg)
        return cfg.session_id

    def cancel(self, session_id: str) -> bool:
        """Cancel a queued or running stream (its pages return at once). Returns whether it existed."""
        for i, cfg in enumerate(self.waiting):
            if cfg.session_id == session_id:
                del self.waiting[i]  # by position: requests hold tensors, so == is not usable
                self.stats.cancelled += 1
                return True
        if session_id in self.engine.sessions:
            self.engine.cancel(session_id)
            self.stats.cancelled += 1
            return True
        return False

    def retry_after(self) -> float:
        """Seconds until the head of the queue may be admitted: the fewest blocks any running stream has left,
        times the recent step time, spread over the batches needed to cycle through the active streams."""
        active = list(self.engine.sessions.values())
        if not active:
            return 1.0
        rounds = -(-len(active) // self.max_batch)
        left = min(s.num_blocks - s.block for s in active)
        return max(1.0, left * rounds * self._step_seconds)

    def admit(self) -> list[str]:
        """Admit waiting streams, in order, while their reservations fit."""
        admitted = []
        e = self.engine
        while self.waiting:
            cfg = self.waiting[0]
            if not e.cache.pool.can_reserve(e.pages_needed(cfg)):
                break
            self.waiting.popleft()
            try:
                admitted.append(e.add_session(cfg).id)
            except FFEngineError as exc:  # a bad request must not stop the other streams
                self.stats.rejected += 1
                self._pending.append(BlockResult(cfg.session_id, 0, None, True, str(exc)))
        self.stats.admitted += len(admitted)
        return admitted

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.engine.sessions and not self._pending

    def step(self) -> list[BlockResult]:
        """Admit what fits, then run one block of up to ``max_batch`` active streams (round-robin)."""
        self.admit()
        results, self._pending = self._pending, []
        active = list(self.engine.sessions)
        if not active:
            return results
        start = self._rr % len(active)
        batch = (active[start:] + active[:start])[: self.max_batch]
        self._rr = start + len(batch)
        t0 = time.perf_counter()
        out = self.engine.step(batch)
        dt = time.perf_counter() - t0
        self._step_seconds = dt if not self.stats.steps else 0.8 * self._step_seconds + 0.2 * dt
        self.stats.steps += 1
        self.stats.blocks += sum(r.error is None for r in out)
        self.stats.finished += sum(r.done and r.error is None for r in out)
        self.stats.failed += sum(r.error is not None for r in out)
        self.stats.batch_sizes.append(len(batch))
        return results + out

    def run(self, on_result=None) -> None:
        """Step until every submitted stream is done."""
        while not self.idle:
            for r in self.step():
                if on_result:
                    on_result(r)
