"""Continuous batching of many video streams over one ``Engine``.

* **Admission by page budget.** Requests wait in FIFO order until their whole reservation fits in the pool
  (bounded streams reserve budget + one block per layer; unbounded ones their whole requested length).  A
  request that could never fit, even in an empty pool, is rejected at ``submit``.  The queue is strict FIFO
  (no overtaking), so a large request is never starved by a stream of small ones.
* **Fair round-robin.** Each ``step`` runs one block for up to ``max_batch`` active streams in a single
  transformer forward per denoising step; the batch window rotates so every stream advances equally often.
* Streams join at any block boundary and leave when done or cancelled; their pages return to the pool at once.
* **Pause and park.** An interactive stream waiting for its user is ``pause``d (not stepped); paused longer than
  ``park_after`` seconds (or on ``park``) it is **parked**: its snapshot moves to host memory and its pages
  return to the pool, so queued streams can be admitted.  ``resume`` puts it back: at once when its reservation
  fits, else at the head of the queue (it was admitted before everything queued).  A parked stream holds no
  device page; park then resume is bit-identical (``Engine.snapshot`` / ``restore``).
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


def round_robin(active: list, cursor: int, max_batch: int) -> tuple[list, int]:
    """The next batch: up to ``max_batch`` of ``active`` (admission order) from ``cursor`` on, wrapping; and the
    cursor after it.  ``bench simulate`` batches its replicas' streams with this same rule."""
    start = cursor % len(active)
    batch = (active[start:] + active[:start])[:max_batch]
    return batch, start + len(batch)


@dataclass
class SchedulerStats:
    steps: int = 0
    blocks: int = 0
    admitted: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    rejected: int = 0
    parked: int = 0
    resumed: int = 0
    resume_seconds: list[float] = field(default_factory=list)  # resume call -> back in the engine
    batch_sizes: list[int] = field(default_factory=list)


@dataclass
class _Parked:
    """A parked stream: its snapshot, when it was parked, and (once resumed) since when it waits."""

    snapshot: object
    parked_at: float
    pages: int  # its reservation when it was parked: what restoring it takes again
    resume_requested: float | None = None


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int = 8, max_queue: int | None = None,
                 park_after: float | None = None, clock=time.monotonic):
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
        if park_after is not None and (isinstance(park_after, bool) or not park_after >= 0):
            raise ConfigError(f"park_after must be None (never) or seconds >= 0, got {park_after!r}")
        self.park_after, self.clock = park_after, clock
        self.paused: dict[str, float] = {}  # active stream id -> when it was paused
        self.parked: dict[str, _Parked] = {}  # parked (not in the engine) or resumed and queued

    def submit(self, cfg: SessionConfig) -> str:
        """Queue a stream and return its id (assigned here when ``cfg.session_id`` is None).  Raises a one-line
        ``FFEngineError`` at once for a bad request or one that could never fit, ``Overloaded`` when the queue
        is full; nothing is queued then."""
        e = self.engine
        e.validate(cfg)
        e.pages_that_fit(cfg)
        if cfg.session_id is None:
            cfg = dataclasses.replace(cfg, session_id=new_session_id())
        elif (cfg.session_id in e.sessions or cfg.session_id in self.parked
              or any(w.session_id == cfg.session_id for w in self.waiting)):
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
        if session_id in self.parked:
            del self.parked[session_id]
            self.stats.cancelled += 1
            return True
        if session_id in self.engine.sessions:
            self.paused.pop(session_id, None)
            self.engine.cancel(session_id)
            self.stats.cancelled += 1
            return True
        return False

    # ---- pause / park / resume ------------------------------------------------------------------------------
    def pause(self, session_id: str) -> None:
        """Stop stepping an active stream until ``resume`` (its user is thinking); parked after ``park_after``."""
        if session_id not in self.engine.sessions:
            raise ConfigError(f"session_id {session_id!r} is not a running stream")
        self.paused.setdefault(session_id, self.clock())

    def park(self, session_id: str) -> None:
        """Move a paused or running stream to host memory now: snapshot, then its pages back to the pool."""
        if session_id not in self.engine.sessions:
            raise ConfigError(f"session_id {session_id!r} is not a running stream")
        snap = self.engine.snapshot(session_id)
        pages = self.engine.cache.pool.reserved(session_id)
        self.engine.cancel(session_id)
        self.paused.pop(session_id, None)
        self.parked[session_id] = _Parked(snap, self.clock(), pages)
        self.stats.parked += 1

    def resume(self, session_id: str) -> bool:
        """Step the stream again: a paused one at once; a parked one once its pages fit (head of the queue).
        Returns whether it is running again now."""
        if self.paused.pop(session_id, None) is not None:
            return True
        p = self.parked.get(session_id)
        if p is None:
            if session_id in self.engine.sessions:
                return True
            raise ConfigError(f"session_id {session_id!r} is neither paused, parked nor running")
        if p.resume_requested is None:
            p.resume_requested = self.clock()
        return self._unpark(session_id)

    def _unpark(self, session_id: str) -> bool:
        p = self.parked[session_id]
        e = self.engine
        if not e.cache.pool.can_reserve(p.pages):
            return False
        e.restore(p.snapshot, session_id)
        del self.parked[session_id]
        self.stats.resumed += 1
        self.stats.resume_seconds.append(self.clock() - p.resume_requested)
        return True

    def _park_idle(self) -> None:
        if self.park_after is None:
            return
        now = self.clock()
        for sid, since in list(self.paused.items()):
            if now - since >= self.park_after and sid in self.engine.sessions:
                self.park(sid)

    def _resume_waiting(self) -> None:
        """Resumed parked streams go before the queue: they were admitted before any of it."""
        for sid in [s for s, p in self.parked.items() if p.resume_requested is not None]:
            if not self._unpark(sid):
                break

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
        """Resume parked streams that asked to, then admit waiting streams, in order, while their reservations
        fit (a resumed stream that does not fit yet holds the queue back: it goes first)."""
        admitted = []
        e = self.engine
        self._resume_waiting()
        if any(p.resume_requested is not None for p in self.parked.values()):
            return admitted
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
                continue
            if cfg.prefix is not None:
                self._prefill(cfg)
        self.stats.admitted += len(admitted)
        return admitted

    def _prefill(self, cfg: SessionConfig) -> None:
        """Write the request's prefix into its cache and report it as the stream's first blocks (next step)."""
        e, fpb = self.engine, self.engine.geometry.frames_per_block
        try:
            e.prefill(cfg.session_id, cfg.prefix)
        except FFEngineError as exc:
            e.cancel(cfg.session_id)
            self._pending.append(BlockResult(cfg.session_id, 0, None, True, str(exc)))
            return
        for b in range(cfg.prefix.shape[0] // fpb):
            self._pending.append(BlockResult(cfg.session_id, b, cfg.prefix[b * fpb:(b + 1) * fpb].float(), False, None))

    @property
    def idle(self) -> bool:
        """Nothing to do: no queue, no runnable stream, nothing to report (paused and parked streams wait for
        their users, not for the scheduler)."""
        runnable = [s for s in self.engine.sessions if s not in self.paused]
        resuming = any(p.resume_requested is not None for p in self.parked.values())
        return not self.waiting and not runnable and not self._pending and not resuming

    def step(self) -> list[BlockResult]:
        """Admit what fits, then run one block of up to ``max_batch`` active streams (round-robin)."""
        self._park_idle()
        self.admit()
        results, self._pending = self._pending, []
        active = [s for s in self.engine.sessions if s not in self.paused]
        if not active:
            return results
        batch, self._rr = round_robin(active, self._rr, self.max_batch)
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
