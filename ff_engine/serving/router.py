"""The router: places streams on workers by free page budget, drives the workers, and recovers from a worker death.

One router thread owns all scheduling decisions; ``submit`` / ``cancel`` (any thread) only edit its books under
its lock and wake it.

* **How blocks flow back.** The router keeps at most one ``step(cancel, start)`` call in flight per worker and
  takes the blocks from the call's return value (a ``WorkerReport``); the moment a call returns it sends the
  next one.  Why this and not workers pushing to a queue actor: commands and results are ordered per worker for
  free (a cancel sent with a call is applied before that call's block), the worker needs no concurrency of its
  own, back-pressure is built in (a worker never runs ahead of the router), and a worker's death surfaces as
  the exception of exactly the call that was in flight (Ray's ``RayActorError``), with nothing else to watch.
  An idle worker gets an empty call every ``heartbeat_s``, so a death is noticed even without work.
* **Placement.** A stream needs its exact page reservation (``Engine.pages_needed``; the router's book per
  worker is the sum over the streams it placed there, so a worker's own pool always has room for what the
  router sends).  Among the live workers where it fits, the stream goes to the one with the **most free pages**,
  ties to fewer streams.  (Tightest fit would stack every stream on the first worker until it is full and leave
  the others idle; with pages as the scarce resource, most-free spreads load and keeps the largest holes.)
  Every block of a stream is produced by that worker (session affinity) until it ends or the worker dies.
* **Queue.** Streams that fit nowhere yet wait in FIFO order (no overtaking, as in ``Scheduler``).  At most
  ``max_queue`` new streams wait; beyond that ``submit`` raises ``Overloaded`` with ``retry_after`` = the time
  until the first running stream is expected to end (its blocks left x the recent step time of its worker x the
  batch rounds needed to cycle through that worker's streams).  A request that could never fit any worker is
  refused at ``submit`` (``BudgetError``); a request the worker's engine rejects fails alone.
* **Cancel** frees the stream's pages in the router's book at once (a waiting stream may be placed in the same
  instant) and on the worker with its next call, before anything else that call does.
* **Prompt updates** (``update``) of a running stream ride with its worker's next call, after that call's cancels
  and starts, and are applied between two steps (a block boundary), in the order sent; the caller waits for the
  worker's answer (at most the call in flight plus the next one), so a refusal is raised to it.  A queued stream
  (or one whose start is not sent yet) gets the new prompt in its request, applied at admission.  On success the
  record's request takes the new prompt, so a stream restarted or resumed after a worker death continues with it.
* **Worker death.** The streams placed on a dead worker go back to the *front* of the queue (ahead of new
  streams, not counted against ``max_queue``) and resume on live workers from the last snapshot their worker
  wrote (``snapshot_every`` > 0), or from block 0 when none was written yet — generation is deterministic, so
  blocks the router already has are regenerated identically and dropped.  With snapshots off they end
  ``failed`` and keep the blocks already persisted.  Streams on other workers are not touched.  A dead worker
  is not replaced here: the cluster's capacity shrinks (a waiting stream that no live worker can hold fails),
  unless the owner adds workers back (``add_worker``; ``ServeCluster`` does when Serve replaces a replica, and
  sets ``wait_for_workers`` so that streams wait for the replacement rather than fail).
* **Elasticity** (``moves.py``): workers that join at run time, ``migrate`` (a stream moved between two blocks)
  and ``drain``.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ff_engine.engine.session import SessionConfig, new_session_id
from ff_engine.errors import BudgetError, ConfigError, FFEngineError
from ff_engine.serving.contract import Overloaded
from ff_engine.serving.controls import Fork, Park, Pause, Rollback, Steer, Update, merge_actions
from ff_engine.serving.moves import Elastic
from ff_engine.serving.placement import PLACEMENTS, best_worker, make_room, queue_admits
from ff_engine.serving.stream_table import Handle, StreamRecord, StreamTable
from ff_engine.serving.worker import Start, WorkerReport

log = logging.getLogger(__name__)


class WorkerLost(Exception):
    """A worker that cannot be reached any more (its process died or was killed)."""


class Endpoint(Protocol):
    """How the router talks to one ``EngineWorker``: in-process (``LocalService``) or a Ray actor."""

    name: str

    def step(self, cancel: list[str], start: list[Start], update: list[Update]) -> cf.Future: ...  # WorkerReport

    def validate(self, cfg: SessionConfig) -> tuple[FFEngineError | None, int]: ...  # WorkerLost if gone

    def describe(self) -> dict: ...

    def audit(self) -> dict: ...

    def kill(self) -> None: ...


@dataclass
class WorkerState:
    """The router's view of one worker.  ``placed``: live streams on it -> their reservation (the book)."""

    endpoint: Endpoint
    pages_total: int
    max_batch: int
    alive: bool = True
    draining: bool = False  # no new stream is placed on it (``Router.drain``)
    placed: dict[str, int] = field(default_factory=dict)
    to_cancel: list[str] = field(default_factory=list)
    to_start: list[Start] = field(default_factory=list)
    to_update: list[tuple[Update, cf.Future]] = field(default_factory=list)
    updating: list[tuple[Update, cf.Future]] = field(default_factory=list)  # sent with the call in flight
    inflight: cf.Future | None = None
    last_call: float = 0.0
    pages_used: int = 0  # the worker's own pool, as of its last report
    pages_reserved: int = 0
    step_ema: float = 0.0  # seconds per block-producing call (for retry-after)
    blocks: int = 0
    steps: int = 0  # calls that produced blocks (blocks / steps: mean batch)
    busy_s: float = 0.0  # time in the worker's scheduler steps (the blocks)
    busy_cpu_s: float = 0.0  # CPU time the worker's step thread got in them
    persist_s: float = 0.0
    snapshot_s: float = 0.0
    snapshots: int = 0
    call_s: float = 0.0  # wall time of the block-producing calls, send to report (busy_s plus the call's overhead)
    gap_s: float = 0.0  # wall time from a block-producing call's report to the next call (the router's loop)
    sent_at: float = 0.0
    reported_at: float | None = None  # the last block-producing call's report, until the next call

    @property
    def name(self) -> str:
        return self.endpoint.name

    @property
    def free(self) -> int:
        return self.pages_total - sum(self.placed.values())


class Router(Elastic):
    def __init__(
        self,
        endpoints: list[Endpoint],
        *,
        max_queue: int | None = None,
        snapshot_every: int = 0,
        output_dir: str | None = None,
        keep_blocks: int = 8,
        retention_s: float = 600.0,
        max_terminal: int = 1024,
        heartbeat_s: float = 0.5,
        park_after: float | None = None,
        wait_for_workers: bool = False,
        placement: str = "most-free",
    ):
        if placement not in PLACEMENTS:
            raise ConfigError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
        self.placement = placement
        self.wait_for_workers = wait_for_workers  # workers come back (Serve replaces them): streams wait for one
        if park_after is not None and (isinstance(park_after, bool) or not isinstance(park_after, int | float)
                                       or not park_after >= 0):
            raise ConfigError(f"park_after must be None (never) or seconds >= 0, got {park_after!r}")
        self.park_after = park_after
        if max_queue is not None and (isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0):
            raise ConfigError(f"max_queue must be None (unbounded) or an integer >= 0, got {max_queue!r}")
        if isinstance(keep_blocks, bool) or not isinstance(keep_blocks, int) or keep_blocks < 1:
            raise ConfigError(f"keep_blocks must be an integer >= 1, got {keep_blocks!r}")
        if not heartbeat_s > 0:
            raise ConfigError(f"heartbeat_s must be > 0 seconds, got {heartbeat_s!r}")
        if not endpoints:
            raise ConfigError("a router needs at least one worker (num_workers >= 1)")
        self.max_queue, self.snapshot_every, self.output_dir = max_queue, snapshot_every, output_dir
        self.keep_blocks, self.heartbeat_s = keep_blocks, heartbeat_s
        self.table = StreamTable(retention_s, max_terminal)
        self.workers: list[WorkerState] = []
        for ep in endpoints:
            info = ep.describe()
            self.workers.append(WorkerState(ep, info["pages_total"], info["max_batch"], last_call=time.monotonic()))
        self.frames_per_block = info["frames_per_block"]
        self.queue: deque[str] = deque()
        self.counts = {"submitted": 0, "finished": 0, "failed": 0, "cancelled": 0, "rejected": 0, "resumed": 0,
                       "parked": 0, "unparked": 0, "forked": 0, "rolled_back": 0, "steered": 0,
                       "migrated": 0, "drained": 0, "workers_added": 0, "blocks_regenerated": 0, "rooms_made": 0}
        self.migrate_seconds: deque[float] = deque(maxlen=4096)  # migrate request -> restored on its target
        self.admission_log: deque[str] = deque(maxlen=4096)  # new streams in the order they were placed
        self._making_room: cf.Future | None = None  # migration-aware placement: the one move in flight for the head
        self.unpark_seconds: deque[float] = deque(maxlen=4096)  # resume request -> restored on a worker
        self._lock = threading.RLock()
        self._wake = cf.Future()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="ff-engine-router", daemon=True)
        self._thread.start()

    # ---- the service API ------------------------------------------------------------------------
    def submit(self, cfg: SessionConfig) -> Handle:
        if not isinstance(cfg, SessionConfig):
            raise ConfigError(f"a request must be a SessionConfig, got {type(cfg).__name__}")
        if cfg.session_id is None:
            cfg = dataclasses.replace(cfg, session_id=new_session_id())
        error, pages = self._validate(cfg)
        with self._lock:
            if error is None:
                error = self._admissible(pages)
            if error is not None:
                self.counts["rejected"] += 1
                raise error
            num_blocks = math.ceil(cfg.num_frames / self.frames_per_block)
            record = StreamRecord(cfg, num_blocks, pages, self.output_dir, self.keep_blocks)
            self.table.add(record)  # ConfigError on a duplicate id
            self.counts["submitted"] += 1
            self.queue.append(record.id)
            self._place()
        self._kick()
        return Handle(record, self)

    def get(self, stream_id: str) -> Handle:
        return Handle(self.table.get(stream_id), self)

    def cancel(self, stream_id: str) -> None:
        with self._lock:
            record = self.table.get(stream_id)
            if record.terminal:
                return
            if stream_id in self.queue:
                self.queue.remove(stream_id)
            elif record.worker is not None:
                w = self._worker(record.worker)
                w.placed.pop(stream_id, None)
                unsent = [s for s in w.to_start if s.cfg.session_id == stream_id]
                if unsent:
                    w.to_start.remove(unsent[0])
                else:
                    w.to_cancel.append(stream_id)
            if record.end("cancelled"):
                self.counts["cancelled"] += 1
            self._drop_pending(record, "the stream was cancelled")
            self._place()
        self._kick()

    def update(self, stream_id: str, prompt, recache_frames: int | None = None) -> int | None:
        """Switch a stream's prompt at its next block boundary (``StreamHandle.update``).  Returns the block from
        which the new prompt is in force (None when not known: a queued stream that resumes from a snapshot).
        Raises ``UnknownStream``, ``ConfigError`` for a terminal stream or a bad argument, or the worker's
        ``FFEngineError`` (a refused switch changes nothing; a failed re-cache ends the stream ``failed``)."""
        if not isinstance(prompt, torch.Tensor):
            raise ConfigError(f"prompt must be a tensor of text embeddings, got {type(prompt).__name__}")
        if recache_frames is not None and (
            isinstance(recache_frames, bool) or not isinstance(recache_frames, int) or recache_frames < 0
        ):
            raise ConfigError(f"recache_frames must be None or an integer >= 0, got {recache_frames!r}")
        with self._lock:
            record = self.table.get(stream_id)
            if record.terminal:
                raise ConfigError(f"stream {stream_id!r} is {record.state}: only a queued or running stream is updated")
            w = self._worker(record.worker) if record.worker is not None else None
            unsent = [s for s in w.to_start if s.cfg.session_id == stream_id] if w is not None else []
            if w is None or unsent:  # not on a worker yet: the request itself changes
                record.cfg = dataclasses.replace(record.cfg, prompt=prompt)
                for s in unsent:
                    s.cfg = record.cfg
                return None if record.resumed else 0
            answer = cf.Future()
            self._route(record, Update(stream_id, prompt, recache_frames), answer)  # it is on worker w
        self._kick()
        return answer.result()

    def control(self, stream_id: str, ctrl) -> cf.Future:
        """Send an ``Update`` / ``Steer`` / ``Pause`` / ``Rollback`` to a stream without waiting: the future's result is the
        block from which it is in force (the ``applied`` receipt), or its exception the refusal.  A parked stream
        that is steered or un-paused is resumed first (on whichever worker has room); a queued one gets the
        control right after its start.  Raises ``UnknownStream`` / ``ConfigError`` (terminal stream) at once."""
        if not isinstance(ctrl, Update | Steer | Pause | Rollback):
            raise ConfigError(f"a stream control is an Update, Steer, Pause or Rollback, got {type(ctrl).__name__}")
        if isinstance(ctrl, Update) and not isinstance(ctrl.prompt, torch.Tensor):
            raise ConfigError(f"prompt must be a tensor of text embeddings, got {type(ctrl.prompt).__name__}")
        answer = cf.Future()
        with self._lock:
            record = self._live(stream_id)
            if isinstance(ctrl, Pause):
                record.paused_at = time.monotonic() if ctrl.paused else None
            if (record.state == "parked" or record.parking and record.moving is None) and (
                    isinstance(ctrl, Pause) and ctrl.paused):
                answer.set_result(record.blocks_done)  # already paused, and parked (or being parked)
                return answer
            self._route(record, ctrl, answer)
            if isinstance(ctrl, Steer) and record.paused_at is not None:  # an action resumes a paused stream
                record.paused_at = None
                self._route(record, Pause(stream_id, False), cf.Future())
            self._place()
        self._kick()
        return answer

    def fork(self, stream_id: str, fork_id: str | None = None) -> Handle:
        """A new stream from the exact state of running stream ``stream_id`` at its next block boundary, on the
        same worker, sharing its pages copy-on-write (``Engine.fork``); waits for the worker and returns the fork's
        handle (its blocks before the fork point are the source's).  ``BudgetError`` when that worker's book has
        no room for the fork's own reservation."""
        fork_id = fork_id or new_session_id()
        with self._lock:
            record = self._live(stream_id)
            if record.state != "running" or record.parking:
                state = "being parked or moved" if record.state == "running" else record.state
                raise ConfigError(f"stream {stream_id!r} is {state}: only a running stream can be forked")
            w = self._worker(record.worker)
            if w.draining:
                raise ConfigError(f"stream {stream_id!r} is on worker {w.name}, which is draining: fork it after it moved")
            if w.free < record.pages:
                raise BudgetError(f"fork needs {record.pages} pages on worker {w.name}; {w.free} are free there")
            cfg = dataclasses.replace(record.cfg, session_id=fork_id)
            fork = StreamRecord(cfg, record.num_blocks, record.pages, self.output_dir, self.keep_blocks)
            self.table.add(fork)  # ConfigError on a duplicate id
            fork.parent, fork.paused_at = record, record.paused_at
            w.placed[fork_id] = record.pages
            fork.set_state("running", w.name)
            answer = cf.Future()
            w.to_update.append((Fork(stream_id, fork_id), answer))
        self._kick()
        answer.result()
        return Handle(fork, self)

    def _live(self, stream_id: str):
        record = self.table.get(stream_id)
        if record.terminal:
            raise ConfigError(f"stream {stream_id!r} is {record.state}: only a queued or running stream is controlled")
        return record

    def _route(self, record, ctrl, answer: cf.Future) -> None:
        """Where a control for a live stream goes.  While a Park is on its way to the worker (``record.parking``:
        idle parking or a move) the stream is leaving that worker, and a control queued behind the Park would
        find it gone there ("not running"): it waits in ``record.pending`` and follows the stream -- ``_parked``
        resumes a parked stream that has controls waiting, and a moving one takes them to its new worker."""
        if record.parking:
            record.pending.append((ctrl, answer))
            return
        if record.state == "parked":
            self._unpark(record)
        self._enqueue(record, ctrl, answer)

    def _enqueue(self, record, ctrl, answer: cf.Future) -> None:
        """On its worker's next call (after its start when that is not sent yet), or after its placement."""
        if record.worker is None:
            record.pending.append((ctrl, answer))
        else:
            self._worker(record.worker).to_update.append((ctrl, answer))

    def _unpark(self, record) -> None:
        """Back to the front of the queue; placed, it is restored from its snapshot (``Start.snapshot``)."""
        record.set_state("queued", None)
        record.unpark_requested = time.monotonic()
        self.queue.appendleft(record.id)

    def _park_idle(self, now: float) -> None:
        """Streams paused longer than ``park_after``: their worker snapshots them and returns their pages."""
        if self.park_after is None:
            return
        for w in self.workers:
            for sid in list(w.placed):
                r = self.table.find(sid)
                if r is not None and r.paused_at is not None and not r.parking and now - r.paused_at >= self.park_after:
                    r.parking = True
                    w.to_update.append((Park(sid), cf.Future()))

    def retry_after(self) -> float:
        """Seconds until the first running stream is expected to end (1 s when nothing measured yet)."""
        with self._lock:
            best = math.inf
            for w in self.workers:
                if not w.alive or not w.placed or not w.step_ema:
                    continue
                rounds = math.ceil(len(w.placed) / w.max_batch)
                for sid in w.placed:
                    r = self.table.find(sid)
                    if r is not None:
                        best = min(best, (r.num_blocks - r.blocks_done) * rounds * w.step_ema)
            return 1.0 if math.isinf(best) else max(0.1, best)

    def stats(self) -> dict:
        with self._lock:
            workers = []
            for w in self.workers:
                workers.append(
                    {
                        "name": w.name,
                        "alive": w.alive,
                        "draining": w.draining,
                        "pages_total": w.pages_total,
                        "pages_used": w.pages_used if w.alive else 0,
                        "pages_reserved": w.pages_reserved if w.alive else 0,
                        "pages_placed": w.pages_total - w.free,
                        "active": len(w.placed),
                        "blocks": w.blocks,
                        "steps": w.steps,
                        "busy_s": w.busy_s,
                        "call_s": w.call_s,
                        "gap_s": w.gap_s,
                        "busy_cpu_s": w.busy_cpu_s,
                        "persist_s": w.persist_s,
                        "snapshot_s": w.snapshot_s,
                        "snapshots": w.snapshots,
                    }
                )
            active = sum(len(w.placed) for w in self.workers)
            parked_now = sum(r.state == "parked" for r in self.table.records())
            lat = sorted(self.unpark_seconds)
            pct = {f"unpark_p{q}_s": lat[min(len(lat) - 1, int(q / 100 * len(lat)))] if lat else None for q in (50, 99)}
            mig = sorted(self.migrate_seconds)
            pct |= {f"migrate_p{q}_s": mig[min(len(mig) - 1, int(q / 100 * len(mig)))] if mig else None
                    for q in (50, 99)}
            return {"workers": workers, "queued": len(self.queue), "active": active, "parked_now": parked_now,
                    **pct, **self.counts}

    def audit(self) -> list[dict]:
        """Each live worker's pool invariants and pages in use (see ``EngineWorker.audit``)."""
        return [w.endpoint.audit() for w in self.workers if w.alive]

    def shutdown(self) -> None:
        """Stop the router thread; every stream not yet ended fails ("the service shut down"), so no consumer
        waits forever.  Workers are the owner's to stop."""
        self._stop = True
        self._kick()
        self._thread.join(timeout=60)
        with self._lock:
            for record in self.table.records():
                self._fail(record, "the service shut down")
            self.queue.clear()
            for w in self.workers:
                self._refuse_updates(w, "the service shut down before the update was applied")

    # ---- placement (under the lock) ---------------------------------------------------------------
    def _best(self, pages: int, exclude: WorkerState | None = None) -> WorkerState | None:
        return best_worker(self.workers, pages, self.placement, exclude)

    def _admissible(self, pages: int) -> FFEngineError | None:
        """Why a valid request of ``pages`` cannot be queued now, or None.  Streams re-queued after a worker death
        do not count against ``max_queue``; a stream that can be placed at once never waits."""
        if self._stop or not self._thread.is_alive():
            return FFEngineError("the service is shut down (or its router stopped): no new streams")
        live = [w for w in self.workers if w.alive]
        if not live:
            return FFEngineError("no live worker: every worker of this service has died")
        if pages > max(w.pages_total for w in live):
            return BudgetError(
                f"stream needs {pages} pages, more than any live worker's pool "
                f"({max(w.pages_total for w in live)} pages, num_pages)"
            )
        waiting_new = sum(1 for sid in self.queue if (r := self.table.find(sid)) is not None and not r.resumed
                          and r.unpark_requested is None)
        placeable_now = not self.queue and self._best(pages) is not None
        if not queue_admits(waiting_new, self.max_queue, placeable_now):
            return Overloaded(
                f"admission queue is full ({waiting_new} streams waiting, max_queue {self.max_queue})",
                self.retry_after(),
            )
        return None

    def _place(self) -> None:
        while self.queue:
            record = self.table.find(self.queue[0])
            if record is None or record.terminal:
                self.queue.popleft()
                continue
            live = [w for w in self.workers if w.alive]
            if not live and self.wait_for_workers:
                return  # a replacement is on its way (ServeCluster): the queue waits for it
            if not live or record.pages > max(w.pages_total for w in live):
                self.queue.popleft()
                self._fail(record, f"no live worker can hold its {record.pages} pages (workers died)")
                continue
            source = self._worker(record.moving.source) if record.moving is not None else None
            w = self._move_target(record) or self._best(record.pages, exclude=source)
            if w is None:
                if record.moving is None:
                    self._make_room(record.pages)
                return  # FIFO: nothing overtakes the head
            self.queue.popleft()
            if not record.resumed and record.parked is None and record.moving is None:
                self.admission_log.append(record.id)
            w.placed[record.id] = record.pages
            w.to_start.append(Start(record.cfg, resume=record.resumed > 0, snapshot=record.parked))
            record.parked = None
            w.to_update += record.pending
            record.pending = []
            record.set_state("running", w.name)

    def _make_room(self, pages: int) -> None:
        """``migration-aware``: when the head fits nowhere but would after one running stream moved, migrate that
        stream (one such move at a time); the head is placed when its pages come back."""
        if self.placement != "migration-aware" or (self._making_room and not self._making_room.done()):
            return

        def movable(sid) -> bool:
            r = self.table.find(sid)
            w = self._worker(r.worker) if r is not None and r.worker else None
            return (r is not None and r.state == "running" and r.moving is None and not r.parking
                    and w is not None and not any(s.cfg.session_id == sid for s in w.to_start))

        plan = make_room(self.workers, pages, movable)
        if plan is None:
            return
        sid, source, target = plan
        self._making_room = cf.Future()
        self._start_move(self.table.find(sid), source, target.name, self._making_room)
        self.counts["rooms_made"] += 1

    def _fail(self, record: StreamRecord, error: str) -> None:
        if record.end("failed", error):
            self.counts["failed"] += 1
        self._drop_pending(record, f"the stream failed: {error}")

    @staticmethod
    def _drop_pending(record: StreamRecord, why: str) -> None:
        record.parked = None
        Elastic._move_failed(record, why)
        for _, answer in record.pending:
            if not answer.done():
                answer.set_exception(ConfigError(why))
        record.pending = []

    def _worker(self, name: str) -> WorkerState:
        return next(w for w in self.workers if w.name == name)

    # ---- the router thread ------------------------------------------------------------------------
    def _kick(self) -> None:
        with self._lock:
            if not self._wake.done():
                self._wake.set_result(None)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a router bug must not leave consumers waiting forever
            log.exception("router thread crashed")
            with self._lock:
                for record in self.table.records():
                    self._fail(record, f"the router crashed: {type(exc).__name__}: {exc}")
                for w in self.workers:
                    self._refuse_updates(w, "the router crashed before the update was applied")
            raise

    def _loop(self) -> None:
        while not self._stop:
            with self._lock:
                if self._wake.done():
                    self._wake = cf.Future()
                now = time.monotonic()
                self._park_idle(now)
                self._place()
                for w in self.workers:
                    if (
                        w.alive
                        and w.inflight is None
                        and (
                            w.to_cancel
                            or w.to_start
                            or w.to_update
                            or w.placed
                            or now - w.last_call >= self.heartbeat_s
                        )
                    ):
                        self._send(w, now)
                calls = {w.inflight: w for w in self.workers if w.inflight is not None}
                wake = self._wake
            done, _ = cf.wait([*calls, wake], timeout=self.heartbeat_s, return_when=cf.FIRST_COMPLETED)
            with self._lock:
                for fut in done:
                    if fut in calls:
                        self._on_report(calls[fut], fut)

    def _send(self, w: WorkerState, now: float) -> None:
        cancel, start, w.updating = w.to_cancel, w.to_start, w.to_update
        w.to_cancel, w.to_start, w.to_update, w.last_call = [], [], [], now
        w.sent_at = time.monotonic()
        if w.reported_at is not None:
            w.gap_s += w.sent_at - w.reported_at
            w.reported_at = None
        try:
            w.inflight = w.endpoint.step(cancel, start, [u for u, _ in w.updating])
        except Exception as exc:  # noqa: BLE001 - an endpoint that cannot even take a call is lost
            self._lose(w, exc)

    def _on_report(self, w: WorkerState, fut: cf.Future) -> None:
        w.inflight = None
        try:
            rep: WorkerReport = fut.result()
        except Exception as exc:  # noqa: BLE001 - RayActorError, or a worker bug: either way the worker is gone
            self._lose(w, exc)
            return
        assert len(rep.updated) == len(w.updating), "a worker answers every update it was sent"
        for (u, answer), (block, error) in zip(w.updating, rep.updated):
            self._applied(w, u, block, error)
            if not answer.done():  # a caller that stopped waiting may have cancelled it
                answer.set_exception(error) if error is not None else answer.set_result(block)
        w.updating = []
        for sid, snap in rep.parked.items():
            self._parked(w, sid, snap)
        w.pages_used, w.pages_reserved = rep.pages_used, rep.pages_reserved
        if rep.batch:
            wall = rep.step_s + rep.persist_s + rep.snapshot_s
            w.step_ema = wall if not w.step_ema else 0.8 * w.step_ema + 0.2 * wall
            w.call_s += time.monotonic() - w.sent_at
        w.blocks += rep.batch
        w.steps += rep.batch > 0
        w.busy_s += rep.step_s
        w.busy_cpu_s += rep.step_cpu_s
        w.persist_s += rep.persist_s
        w.snapshot_s += rep.snapshot_s
        w.snapshots += len(rep.snapshots)
        for sid, first in rep.started.items():
            record = self.table.find(sid)
            if record is not None and sid in w.placed:
                record.started(first)
                if record.moving is not None:
                    self._moved_in(record, w, first)
                elif record.unpark_requested is not None:
                    self.unpark_seconds.append(time.monotonic() - record.unpark_requested)
                    record.unpark_requested = None
                    self.counts["unparked"] += 1
        for r in rep.results:
            record = self.table.find(r.session_id)
            if record is None or record.terminal or r.session_id not in w.placed:
                continue  # cancelled, or re-placed after this worker was given up on
            if r.error is not None:
                w.placed.pop(r.session_id)
                self._fail(record, r.error)
                continue
            if not record.add_block(r.block, r.latents):
                self.counts["blocks_regenerated"] += 1  # after a resume from an older snapshot (dropped)
            if r.done:
                w.placed.pop(r.session_id)
                if record.end("finished"):
                    self.counts["finished"] += 1
        for sid, held in rep.pages.items():
            record = self.table.find(sid)
            if record is not None:
                record.pages_held = held
        if rep.batch and w.placed:  # streams still to step: the time to the next call is the loop's (gap_s)
            w.reported_at = time.monotonic()

    def _applied(self, w: WorkerState, ctrl, block: int | None, error) -> None:
        """The router's books after a worker answered a control (what a restart after a death replays)."""
        record = self.table.find(ctrl.session_id)
        if isinstance(ctrl, Fork):
            fork = self.table.find(ctrl.fork_id)
            if error is not None:
                w.placed.pop(ctrl.fork_id, None)
                if fork is not None and fork.end("failed", f"fork refused: {error}"):
                    self.counts["failed"] += 1
            elif fork is not None:
                fork.inherit(record, block)
                record.forks += 1
                self.counts["forked"] += 1
            return
        if record is None or error is not None:
            if isinstance(ctrl, Park) and record is not None:
                record.parking = False
                self._move_failed(record, f"the move was refused: {error}")
                if record.worker is not None:  # still where it was: what waited for the Park goes there now
                    self._worker(record.worker).to_update += record.pending
                    record.pending = []
            return
        if isinstance(ctrl, Update):
            record.cfg = dataclasses.replace(record.cfg, prompt=ctrl.prompt)
        elif isinstance(ctrl, Steer):
            self.counts["steered"] += 1
            if ctrl.actions is not None:
                actions = merge_actions(record.cfg.actions, ctrl.actions, block * self.frames_per_block)
                record.cfg = dataclasses.replace(record.cfg, actions=actions)
        elif isinstance(ctrl, Rollback):
            record.rewind(block)
            self.counts["rolled_back"] += 1

    def _parked(self, w: WorkerState, sid: str, snap) -> None:
        """Its pages are back in the worker's pool: free them in the book too, so a queued stream can go there."""
        w.placed.pop(sid, None)
        record = self.table.find(sid)
        if record is None or record.terminal:
            return
        record.parking, record.parked = False, snap
        record.pages_held = 0
        if record.moving is not None:
            self._moved_out(record, snap)
            self._place()
            return
        record.set_state("parked", None)
        self.counts["parked"] += 1
        if record.pending:  # controls sent while the Park was on its way (``_route``): they resume it
            self._unpark(record)
        self._place()

    def _lose(self, w: WorkerState, exc: BaseException) -> None:
        """Worker ``w`` is gone: re-place or fail its streams (module docstring)."""
        log.warning("worker %s lost (%s: %s); %d streams affected", w.name, type(exc).__name__, exc, len(w.placed))
        w.alive, w.inflight = False, None
        try:
            w.endpoint.kill()  # a worker whose step raised may still be running: make sure it is gone
        except Exception as kill_exc:  # noqa: BLE001 - already dead is fine
            log.debug("worker %s: kill: %s", w.name, kill_exc)
        orphans = [sid for sid in w.placed if (r := self.table.find(sid)) is not None and not r.terminal]
        w.placed.clear()
        w.to_start.clear()
        w.to_cancel.clear()
        self._refuse_updates(w, f"worker {w.name} died before the update was applied; send it again")
        resume = []
        for sid in orphans:
            record = self.table.find(sid)
            self._move_failed(record, f"worker {w.name} died during the move; the stream resumes from its snapshot")
            if self.snapshot_every:
                record.resumed += 1
                record.set_state("queued", None)
                self.counts["resumed"] += 1
                resume.append(sid)
            else:
                self._fail(
                    record,
                    f"worker {w.name} died ({type(exc).__name__}) and snapshots are off "
                    f"(snapshot_every=0); blocks 0..{record.blocks_done - 1} are persisted",
                )
        self.queue.extendleft(reversed(resume))
        self._place()

    def _refuse_updates(self, w: WorkerState, why: str) -> None:
        for _, answer in w.updating + w.to_update:
            if not answer.done():
                answer.set_exception(FFEngineError(why))
        w.updating, w.to_update = [], []

    def _validate(self, cfg: SessionConfig) -> tuple[FFEngineError | None, int]:
        """Validate on a live worker's engine (all workers run the same model); a worker that died meanwhile is
        skipped (its in-flight call reports the death to the router thread)."""
        for w in self.workers:
            if w.alive:
                try:
                    return w.endpoint.validate(cfg)
                except WorkerLost:
                    continue
        return FFEngineError("no live worker: every worker of this service has died"), 0
