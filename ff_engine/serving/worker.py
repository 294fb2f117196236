"""``EngineWorker``: one ``Engine`` + ``Scheduler`` on one device, driven one ``step`` call at a time.

The worker is a plain class: ``RayCluster`` wraps it as a Ray actor (one per GPU, or a CPU worker with one torch
thread), ``LocalService`` calls it in-process.  Either way the router is its only caller and ``step`` is its only
mutating entry point, so the engine is never touched by two threads (``validate`` / ``describe`` only read).

One ``step(cancel, start, controls)``, in this order:
  1. cancel streams (their pages return to the pool before anything is admitted in the same call);
  2. start streams: a fresh request goes to the scheduler; a resumed one is restored from the snapshot its
     previous worker wrote (or started from its request when there is none yet), and switched to the request's
     prompt when the stream's prompt changed after that snapshot;
  2b. controls, in the order sent (``controls.py``: prompt updates, steering, pause, park, fork, rollback;
     between steps, so at a block boundary; a stream still waiting in the scheduler gets a new prompt or
     actions in its request); each answer goes back in order;
  3. one scheduler step (one block of up to ``max_batch`` streams, batched);
  4. persist every finished block under ``output_dir`` (atomic file per block) — only then is it reported;
  5. snapshot every stream whose finished block count is a multiple of ``snapshot_every``.
It returns a ``WorkerReport``: the blocks (with latents), which streams started at which block, pages per stream,
pool totals, and the time spent in each phase.  ``step`` never raises for one stream's failure: a stream that
fails (bad request, engine error, a block that cannot be persisted) comes back as a result with ``error`` set.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from ff_engine.engine.engine import BlockResult, Engine
from ff_engine.engine.recache import streaming_config
from ff_engine.engine.scheduler import Scheduler
from ff_engine.engine.session import SessionConfig
from ff_engine.engine.snapshot import SessionSnapshot, restore_session, snapshot_session
from ff_engine.errors import ConfigError, FFEngineError, SnapshotError
from ff_engine.serving import persist
from ff_engine.serving.controls import Update, apply  # noqa: F401 - Update is re-exported (router, endpoints)
from ff_engine.serving.model_spec import materialize

log = logging.getLogger(__name__)


@dataclass(eq=False)  # identity: the generated __eq__ would compare the configs' tensors (list.remove raised)
class Start:
    """Start stream ``cfg.session_id`` on this worker; ``resume``: it ran elsewhere before, continue it from its
    snapshot under ``output_dir`` when one exists; ``snapshot``: it was parked, continue it from that."""

    cfg: SessionConfig
    resume: bool = False
    snapshot: SessionSnapshot | None = None  # a parked stream's state (host memory): restored instead of the disk


@dataclass
class WorkerReport:
    name: str
    results: list[BlockResult] = field(default_factory=list)
    started: dict[str, int] = field(default_factory=dict)  # stream id -> first block this worker produces
    snapshots: dict[str, int] = field(default_factory=dict)  # stream id -> blocks its new snapshot covers
    updated: list[tuple[int | None, FFEngineError | None]] = field(default_factory=list)  # per control, in order:
    # (the block from which it is in force, None) or (None, why it was refused) -- ``controls.apply``
    parked: dict[str, SessionSnapshot] = field(default_factory=dict)  # stream id -> its state, pages released
    pages: dict[str, int] = field(default_factory=dict)  # active stream id -> pages held
    pages_total: int = 0
    pages_used: int = 0
    pages_reserved: int = 0
    active: int = 0
    batch: int = 0  # streams in this step's batch
    step_s: float = 0.0  # scheduler step (the blocks themselves), wall time
    step_cpu_s: float = 0.0  # CPU time of this thread in the step: below step_s when the core is shared
    persist_s: float = 0.0
    snapshot_s: float = 0.0


class EngineWorker:
    def __init__(
        self,
        name: str,
        model,
        *,
        num_pages: int,
        page_size: int = 32,
        backend: str = "auto",
        max_batch: int = 8,
        snapshot_every: int = 0,
        output_dir: str | None = None,
        device: str = "cpu",
        torch_threads: int | None = None,
        undo_blocks: int = 0,
    ):
        if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int) or snapshot_every < 0:
            raise ConfigError(f"snapshot_every must be an integer >= 0 (0 = off), got {snapshot_every!r}")
        if snapshot_every and output_dir is None:
            raise ConfigError("snapshot_every > 0 needs an output_dir to write snapshots to")
        self.torch_threads = torch_threads
        self._use_torch_threads()
        self.name, self.snapshot_every, self.output_dir = name, snapshot_every, output_dir
        self.engine = Engine(
            materialize(model, device), num_pages=num_pages, page_size=page_size, backend=backend, device=device,
            undo_blocks=undo_blocks,
        )
        self.scheduler = Scheduler(self.engine, max_batch=max_batch)

    # ---- read-only (safe beside a running step) -------------------------------------------------
    def describe(self) -> dict:
        e = self.engine
        return {
            "name": self.name,
            "pages_total": e.cache.num_pages,
            "page_size": e.cache.page_size,
            "frames_per_block": e.geometry.frames_per_block,
            "max_batch": self.scheduler.max_batch,
            "geometry": e.geometry,
            "model_config": getattr(e.model, "cfg", None),
            "device": str(e.cache.device),
            "torch_threads": torch.get_num_threads(),
        }

    def validate(self, cfg: SessionConfig) -> tuple[FFEngineError | None, int]:
        """(None, pages the stream reserves) for a valid request, else (the error, 0). Returns the error rather
        than raising it, so it crosses a process boundary as itself, without a remote traceback."""
        try:
            self.engine.validate(cfg)
            return None, self.engine.pages_that_fit(cfg)
        except FFEngineError as exc:
            return exc, 0

    # ---- the one mutating entry point ------------------------------------------------------------
    def step(self, cancel: list[str] = (), start: list[Start] = (), update: list = ()) -> WorkerReport:
        self._use_torch_threads()
        report = WorkerReport(self.name)
        for sid in cancel:
            self.scheduler.cancel(sid)
            self.ended(sid)
        for s in start:
            sid = s.cfg.session_id
            try:
                report.started[sid] = self._start(s)
            except FFEngineError as exc:
                report.results.append(BlockResult(sid, 0, None, True, str(exc)))
        report.updated = [apply(self, u, report) for u in update]  # Update, Steer, Fork, ... (controls.py)
        t0, c0 = time.perf_counter(), time.thread_time()
        results = self.scheduler.step()
        report.step_s, report.step_cpu_s = time.perf_counter() - t0, time.thread_time() - c0
        report.batch = sum(r.latents is not None for r in results)
        report.results += [self._persist(r) for r in results]
        report.persist_s = time.perf_counter() - t0 - report.step_s
        t1 = time.perf_counter()
        for r in report.results:
            if r.done or r.error:
                self.ended(r.session_id)
            elif self.snapshot_every and (r.block + 1) % self.snapshot_every == 0:
                covered = self.snapshot(r.session_id)
                if covered is not None:
                    report.snapshots[r.session_id] = covered
        report.snapshot_s = time.perf_counter() - t1
        self._fill_pages(report)
        return report

    def audit(self) -> dict:
        """Pool invariants checked (``AssertionError`` on a leak) and the pages in use; call it between steps."""
        pool = self.engine.cache.pool
        pool.check_invariants()
        return {
            "name": self.name,
            "pages_total": pool.capacity,
            "pages_used": pool.capacity - pool.num_free,
            "pages_reserved": pool.capacity - pool.unreserved,
            "sessions": sorted(self.engine.sessions),
            "waiting": len(self.scheduler.waiting),
        }

    # ---- pieces ---------------------------------------------------------------------------------
    def _use_torch_threads(self) -> None:
        """torch's thread count is per OS thread (OpenMP), and an actor may call ``step`` from another thread
        than its constructor's."""
        if self.torch_threads is not None and torch.get_num_threads() != self.torch_threads:
            torch.set_num_threads(self.torch_threads)

    def _start(self, s: Start) -> int:
        sid = s.cfg.session_id
        if s.snapshot is not None:  # parked: its state came back with it
            return restore_session(self.engine, s.snapshot, sid).block
        path = persist.snapshot_path(self.output_dir, sid) if self.output_dir else None
        if s.resume and path is not None and path.exists():
            try:
                snap = SessionSnapshot.load(path)
                self._check_blocks_on_disk(sid, snap)
                session = restore_session(self.engine, snap, sid)
                if not torch.equal(session.cfg.prompt, s.cfg.prompt):  # switched after the snapshot: keep its prompt
                    self.engine.switch_prompt(sid, s.cfg.prompt)
                return session.block
            except SnapshotError as exc:  # unreadable or foreign: start over from the request (deterministic)
                log.warning("stream %s: snapshot not usable (%s); restarting it from block 0", sid, exc)
        elif path is not None:
            persist.remove_snapshot(self.output_dir, sid)  # a stale one of an earlier stream with this id
        # blocks go to consumers (and disk) as they come: keep only the latents a prompt switch's re-cache reads
        self.scheduler.submit(streaming_config(s.cfg, self.engine.geometry.frames_per_block))
        return 0

    def _check_blocks_on_disk(self, sid: str, snap: SessionSnapshot) -> None:
        """A snapshot at block k makes the router report blocks below k as done (``StreamRecord.started``), so it
        is usable only when every one of their files is on disk; otherwise the stream restarts from block 0
        (deterministic: the missing files are regenerated before anything past them is reported)."""
        block = snap.meta.get("session", {}).get("block") if isinstance(snap.meta, dict) else None
        missing = persist.missing_blocks(self.output_dir, sid, block) if isinstance(block, int) else []
        if missing:
            raise SnapshotError(f"it covers {block} blocks but block file(s) {missing[:4]} are not on disk")

    def _persist(self, r: BlockResult) -> BlockResult:
        if r.latents is None or self.output_dir is None:
            return r
        try:
            persist.write_block(self.output_dir, r.session_id, r.block, r.latents)
        except OSError as exc:  # the block is not safe: the stream cannot honour "persisted before reported"
            self.scheduler.cancel(r.session_id)
            return BlockResult(r.session_id, r.block, None, True, f"cannot persist block {r.block}: {exc}")
        return r

    def snapshot(self, sid: str) -> int | None:
        """Write the stream's snapshot; returns the blocks it covers, or None when it could not be written (the
        stream runs on, protected by its previous snapshot)."""
        try:
            snap = snapshot_session(self.engine, sid)
            persist.write_snapshot(self.output_dir, sid, snap)
        except (OSError, FFEngineError) as exc:
            log.warning("stream %s: snapshot failed: %s", sid, exc)
            return None
        return snap.meta["session"]["block"]

    def ended(self, sid: str) -> None:
        if self.output_dir is not None and self.snapshot_every:
            persist.remove_snapshot(self.output_dir, sid)

    def _fill_pages(self, report: WorkerReport) -> None:
        cache, pool = self.engine.cache, self.engine.cache.pool
        report.pages = {sid: cache.pages_held(sid) for sid in self.engine.sessions}
        report.pages_total = pool.capacity
        report.pages_used = pool.capacity - pool.num_free
        report.pages_reserved = pool.capacity - pool.unreserved
        report.active = len(self.engine.sessions) + len(self.scheduler.waiting)
