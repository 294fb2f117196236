"""Control messages for a running stream, and how a worker applies them between two steps.

Every control rides the router's queue to the stream's worker with that worker's next ``step`` call, after the
call's cancels and starts, and is applied before its scheduler step (a block boundary), in the order sent.  The
worker answers each one with ``(block, None)`` -- the block index from which it is in force -- or
``(None, error)`` (nothing changed).  The router turns that into the caller's ``applied`` receipt.

* ``Update``: a new prompt (``Engine.switch_prompt``).
* ``Steer``: actions (per latent frame) and / or per-frame conditioning rows for the next blocks
  (``Engine.set_actions`` / ``Engine.set_conditioning``).
* ``Pause``: stop (``paused=True``) or restart stepping the stream (``Scheduler.pause`` / ``resume``); the
  router parks a stream paused longer than its ``park_after``.
* ``Park``: snapshot the stream to host memory and return its pages (``WorkerReport.parked`` carries the
  snapshot back; the router restores it on whichever worker has room when the stream resumes).
* ``Fork``: a second stream from the exact state of this one, sharing its pages copy-on-write (``Engine.fork``);
  its blocks so far are the source's (the persisted files are linked under the fork's id); the fork of a paused
  stream starts paused (steer it, or un-pause it).
* ``Rollback``: the stream's state before its last ``blocks`` blocks (``Engine.rollback``; the worker's engine
  keeps ``undo_blocks`` of history); the answer is the block it regenerates next.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from ff_engine.engine.engine import BlockResult
from ff_engine.engine.snapshot import snapshot_session
from ff_engine.errors import ConfigError, FFEngineError
from ff_engine.serving import persist


@dataclass(eq=False)  # identity: the generated __eq__ would compare tensors
class Update:
    """Switch stream ``session_id`` to ``prompt`` at its next block boundary (``Engine.switch_prompt``)."""

    session_id: str
    prompt: torch.Tensor
    recache_frames: int | None = None


@dataclass(eq=False)
class Steer:
    """Actions (indices into the model's action names, per latent frame, the last one held) and / or per-frame
    conditioning rows (``{"keyboard_cond": rows, ...}``) from the stream's next block on."""

    session_id: str
    actions: list[int] | None = None
    conditioning: dict | None = None


@dataclass(eq=False)
class Pause:
    session_id: str
    paused: bool = True


@dataclass(eq=False)
class Park:
    session_id: str


@dataclass(eq=False)
class Fork:
    session_id: str
    fork_id: str


@dataclass(eq=False)
class Rollback:
    session_id: str
    blocks: int = 1


CONTROLS = (Update, Steer, Pause, Park, Fork, Rollback)


def merge_actions(old: list[int] | None, new: list[int], from_frame: int) -> list[int]:
    """The per-frame action list after ``new`` takes over at ``from_frame`` (earlier frames keep theirs, a
    held last entry filling any gap): what a restart from block 0 must replay to regenerate the same video."""
    old = list(old or [0])
    head = (old + [old[-1]] * from_frame)[:from_frame]
    return head + list(new)


def apply(worker, ctrl, report) -> tuple[int | None, FFEngineError | None]:
    """Apply one control on ``worker`` (an ``EngineWorker``) between steps; never raises ``FFEngineError``."""
    try:
        return _APPLY[type(ctrl)](worker, ctrl, report), None
    except FFEngineError as exc:
        return None, exc


def _waiting(worker, sid: str) -> int | None:
    return next((i for i, cfg in enumerate(worker.scheduler.waiting) if cfg.session_id == sid), None)


def _running(worker, sid: str):
    """The stream's engine session; one still queued in the worker's scheduler is admitted first if it fits (what
    the coming step would do), so a control sent right after the start applies before its first block."""
    if _waiting(worker, sid) is not None:
        worker.scheduler.admit()
    s = worker.engine.sessions.get(sid)
    if s is None:
        raise ConfigError(f"stream {sid!r} is not running on worker {worker.name} (not admitted yet, or ended)")
    return s


def _update(worker, u: Update, report) -> int:
    """A refused prompt changes nothing; a re-cache that fails ends the stream, reported as a failed result."""
    sid = u.session_id
    i = _waiting(worker, sid)
    if i is not None:  # not admitted yet: the prompt of its request (checked by the model at admission)
        worker.scheduler.waiting[i] = dataclasses.replace(worker.scheduler.waiting[i], prompt=u.prompt)
        return 0
    session = worker.engine.sessions.get(sid)
    try:
        worker.engine.switch_prompt(sid, u.prompt, u.recache_frames)
    except FFEngineError as exc:
        if session is not None and sid not in worker.engine.sessions:
            report.results.append(BlockResult(sid, session.block, None, True, session.error or str(exc)))
        raise
    return session.block


def _steer(worker, s: Steer, report) -> int:
    e, sid = worker.engine, s.session_id
    if s.actions is None and not s.conditioning:
        raise ConfigError("a steer needs actions or conditioning")
    i = _waiting(worker, sid)
    if i is not None:  # not admitted: its request's actions from frame 0
        cfg = worker.scheduler.waiting[i]
        if s.actions is not None:
            e.validate_actions(s.actions)
            cfg = dataclasses.replace(cfg, actions=list(s.actions))
        if s.conditioning:
            cfg = dataclasses.replace(cfg, conditioning={**(cfg.conditioning or {}), **s.conditioning})
        worker.scheduler.waiting[i] = cfg
        return 0
    session = _running(worker, sid)
    if s.conditioning:
        e.set_conditioning(sid, **s.conditioning)  # checked as a whole first: a bad one changes nothing
    if s.actions is not None:
        e.set_actions(sid, s.actions)
    return session.block


def _pause(worker, p: Pause, report) -> int:
    session = _running(worker, p.session_id)
    if p.paused:
        worker.scheduler.pause(p.session_id)
    else:
        worker.scheduler.resume(p.session_id)
    return session.block


def _park(worker, p: Park, report) -> int:
    """Snapshot, then release: the snapshot travels back in the report and the pages return to the pool now."""
    session = _running(worker, p.session_id)
    snap = snapshot_session(worker.engine, p.session_id)
    worker.scheduler.paused.pop(p.session_id, None)
    worker.engine.cancel(p.session_id)
    worker.ended(p.session_id)
    report.parked[p.session_id] = snap
    return session.block


def _fork(worker, f: Fork, report) -> int:
    session = _running(worker, f.session_id)
    worker.engine.fork(f.session_id, f.fork_id)
    if f.session_id in worker.scheduler.paused:  # a fork of a paused stream waits for its own first action
        worker.scheduler.pause(f.fork_id)
    if worker.output_dir is not None:  # the fork's blocks so far are the source's: link the files
        for b in range(session.block):
            link_block(worker.output_dir, f.session_id, f.fork_id, b)
    return session.block


def _rollback(worker, r: Rollback, report) -> int:
    if isinstance(r.blocks, bool) or not isinstance(r.blocks, int) or r.blocks < 1:
        raise ConfigError(f"blocks must be an integer >= 1, got {r.blocks!r}")
    session = worker.engine.rollback(r.session_id, r.blocks)
    if worker.snapshot_every:  # the snapshot on disk is ahead of the stream now: replace it
        worker.snapshot(r.session_id)
    return session.block


def link_block(output_dir: str, src: str, dst: str, block: int) -> None:
    """Block ``block`` of ``src`` readable as ``dst``'s (a hard link where the filesystem has them)."""
    a, b = persist.block_path(output_dir, src, block), persist.block_path(output_dir, dst, block)
    b.parent.mkdir(parents=True, exist_ok=True)
    if b.exists():
        b.unlink()
    try:
        os.link(a, b)
    except OSError:
        persist.write_block(output_dir, dst, block, persist.read_block(output_dir, src, block))


_APPLY = {Update: _update, Steer: _steer, Pause: _pause, Park: _park, Fork: _fork, Rollback: _rollback}
