"""Elasticity, as ``Router`` methods: workers that join at run time, drains, and streams that move between blocks.

* ``add_worker``: a new worker (a replacement for a dead one, or a scale-up) takes new streams from its first call.
* ``migrate(stream, to=None)``: move one running stream to another worker **between two blocks**, bit-identically:
  its worker snapshots it to host memory and returns its pages (the ``Park`` control), and the router restores the
  snapshot on the target at the front of the queue (``Start.snapshot``).  Nothing is regenerated and nothing is
  skipped: the snapshot is taken after the last block the router received and the target continues with the next.
  The answer (a future) carries what it cost: seconds from the request to the restore, snapshot bytes, the block.
* ``drain(worker)``: no new stream is placed on it, each of its streams migrates, and the future resolves (with the
  moves) once it holds none.  The worker stays up, empty, until its owner removes it (``ServeCluster`` scales
  down through Ray Serve; an engine replica that Serve stops writes a final snapshot of every stream it still
  holds, see ``ff_engine/serving/serve.py``).

Invariants kept: a moving stream is in exactly one worker's book (its source's) until its pages come back, then
in none (state ``parked``) until it is placed again; a paused stream stays paused where it lands; a move whose
source dies mid-way fails its future, and the stream resumes from its disk snapshot like any orphan.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from dataclasses import dataclass

from ff_engine.errors import ConfigError
from ff_engine.serving.controls import Park, Pause


@dataclass
class Move:
    """A migration in flight: where from, where to (None: the best other worker), when asked, who waits."""

    source: str
    target: str | None
    asked: float
    answer: cf.Future
    bytes: int = 0


def snapshot_bytes(snap) -> int:
    return sum(t.numel() * t.element_size() for t in snap.tensors.values())


def all_of(futures: list[cf.Future]) -> cf.Future:
    """A future of the list of results once every one of ``futures`` is done (exceptions as values)."""
    out: cf.Future = cf.Future()
    if not futures:
        out.set_result([])
        return out
    left = [len(futures)]

    def one_done(_):
        left[0] -= 1
        if left[0] == 0 and not out.done():
            out.set_result([f.exception() or f.result() for f in futures])

    for f in futures:
        f.add_done_callback(one_done)
    return out


class Elastic:
    """Mixin of ``Router`` (it uses the router's lock, books, table and queue)."""

    def add_worker(self, endpoint) -> None:
        """A worker that joined (a replacement or a scale-up); ``ConfigError`` for a name already in use."""
        from ff_engine.serving.router import WorkerState  # the router imports this module

        info = endpoint.describe()  # outside the lock: a remote call
        with self._lock:
            if any(w.name == endpoint.name for w in self.workers):
                raise ConfigError(f"a worker named {endpoint.name!r} is already in this service")
            self.workers.append(WorkerState(endpoint, info["pages_total"], info["max_batch"],
                                            last_call=time.monotonic()))
            self.counts["workers_added"] += 1
            self._place()
        self._kick()

    def migrate(self, stream_id: str, to: str | None = None) -> cf.Future:
        """Move running stream ``stream_id`` to worker ``to`` (None: the live worker with the most free pages
        other than its own) at its next block boundary; the future's result is a dict (stream, from, to, block,
        seconds, bytes).  ``ConfigError`` when it is not running, is already moving, or ``to`` cannot take it."""
        with self._lock:
            record = self._live(stream_id)
            if record.state != "running" or record.moving is not None or record.parking:
                raise ConfigError(f"stream {stream_id!r} is {record.state}"
                                  f"{' and moving' if record.moving or record.parking else ''}: only a running "
                                  "stream that is not already moving can migrate")
            source = self._worker(record.worker)
            if to is not None:
                target = next((w for w in self.workers if w.name == to), None)
                if target is None or not target.alive or target.draining or target is source:
                    raise ConfigError(f"cannot migrate to {to!r}: not a live, undrained worker other than "
                                      f"the stream's own ({source.name})")
            elif self._best(record.pages, exclude=source) is None:
                raise ConfigError(f"no other worker has {record.pages} free pages for stream {stream_id!r}")
            answer = cf.Future()
            self._start_move(record, source, to, answer)
        self._kick()
        return answer

    def drain(self, name: str) -> cf.Future:
        """Place nothing more on worker ``name`` and migrate each of its streams; the future's result is the
        list of the moves' results (or exceptions) once it holds no stream."""
        with self._lock:
            w = next((w for w in self.workers if w.name == name), None)
            if w is None or not w.alive:
                raise ConfigError(f"no live worker named {name!r}")
            w.draining = True
            moves = []
            for sid in list(w.placed):
                record = self.table.find(sid)
                if record is None or record.terminal:
                    continue
                unsent = [s for s in w.to_start if s.cfg.session_id == sid]
                if unsent:  # not started there yet: back to the queue's front, its controls with it
                    self._unplace(w, record, unsent[0])
                elif record.moving is not None:
                    moves.append(record.moving.answer)
                elif not record.parking:
                    answer = cf.Future()
                    self._start_move(record, w, None, answer)
                    moves.append(answer)
            self.counts["drained"] += 1
            self._place()
        self._kick()
        return all_of(moves)

    # ---- under the lock -------------------------------------------------------------------------
    def _start_move(self, record, source, to: str | None, answer: cf.Future) -> None:
        record.moving = Move(source.name, to, time.monotonic(), answer)
        record.parking = True
        source.to_update.append((Park(record.id), cf.Future()))

    def _unplace(self, w, record, start) -> None:
        w.to_start.remove(start)
        w.placed.pop(record.id)
        record.parked = start.snapshot
        record.pending = [(c, a) for c, a in w.to_update if c.session_id == record.id] + record.pending
        w.to_update = [(c, a) for c, a in w.to_update if c.session_id != record.id]
        record.set_state("queued", None)
        self.queue.appendleft(record.id)

    def _moved_out(self, record, snap) -> None:
        """Its pages are back (``_parked``): straight back to the queue's front, toward its target."""
        record.moving.bytes = snapshot_bytes(snap)
        if record.paused_at is not None:  # a restored stream runs: pause it again where it lands
            record.pending.insert(0, (Pause(record.id, True), cf.Future()))
        record.set_state("queued", None)
        self.queue.appendleft(record.id)

    def _move_target(self, record):
        """The worker a moving stream goes to, or None to wait (its target is busy) / use ``_best``."""
        move = record.moving
        if move is None or move.target is None:
            return None
        w = next((w for w in self.workers if w.name == move.target), None)
        if w is not None and w.alive and not w.draining and w.free >= record.pages:
            return w
        return None

    def _moved_in(self, record, w, first: int) -> None:
        move, record.moving = record.moving, None
        seconds = time.monotonic() - move.asked
        self.migrate_seconds.append(seconds)
        self.counts["migrated"] += 1
        if not move.answer.done():
            move.answer.set_result({"stream": record.id, "from": move.source, "to": w.name, "block": first,
                                    "seconds": seconds, "bytes": move.bytes})

    @staticmethod
    def _move_failed(record, why: str) -> None:
        move, record.moving = record.moving, None
        if move is not None and not move.answer.done():
            move.answer.set_exception(ConfigError(why))
