"""What the service remembers of each stream, and the handles consumers read blocks through.

* ``StreamRecord``: one stream's state, counters and its finished blocks.  Blocks arrive in order from one
  producer (the router thread); any number of consumers read them, each with its own cursor, so every consumer
  sees every block exactly once, in order (``StreamHandle.blocks`` / ``ablocks``).
* **Memory retention.** A record keeps the latents of its most recent ``keep_blocks`` blocks in memory; an older
  block is read back from the file its worker persisted (``persist.read_block``).  Without an output directory
  nothing is on disk, so every block stays in memory until the record is forgotten.  ``StreamTable`` forgets a
  terminal stream ``retention_s`` seconds after it ended, or earlier when more than ``max_terminal`` terminal
  streams are held (oldest first); after that, ``get`` raises ``UnknownStream`` (its files stay on disk).
  Memory is therefore bounded by live streams x ``keep_blocks`` + ``max_terminal`` x ``keep_blocks`` blocks.
* Async consumers wait on an ``asyncio.Event`` per waiting reader, set from the producer thread with
  ``call_soon_threadsafe``; no executor thread is held per waiting consumer.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator

import torch

from ff_engine.engine.session import SessionConfig
from ff_engine.errors import ConfigError
from ff_engine.serving import persist
from ff_engine.serving.contract import TERMINAL_STATES, StreamBlock, StreamStatus, UnknownStream
from ff_engine.serving.controls import Pause, Rollback, Steer


class StreamRecord:
    """One stream, from ``submit`` to being forgotten.  Mutated by the service's own thread(s) only through
    ``add_block`` / ``set_state`` / ``end``; read by any thread.  Invariant: blocks ``0 .. blocks_done - 1``
    are each in memory (the last ``keep_blocks``) or on disk under ``output_dir``."""

    def __init__(
        self, cfg: SessionConfig, num_blocks: int, pages: int, output_dir: str | None, keep_blocks: int | None
    ):
        self.id: str = cfg.session_id
        self.cfg = cfg
        self.num_blocks = num_blocks
        self.pages = pages  # the stream's exact reservation on a worker
        self.output_dir = output_dir
        self.keep_blocks = keep_blocks if output_dir is not None else None  # None: keep every block in memory
        self.state = "queued"
        self.worker: str | None = None
        self.error: str | None = None
        self.resumed = 0
        self.resumed_from: int | None = None  # the block its last move continued from
        self.pages_held = 0
        self.blocks_done = 0
        self.ended_at: float | None = None
        self.paused_at: float | None = None  # when its user paused it (the router parks it after park_after)
        self.parked = None  # a parked stream's SessionSnapshot (host memory), until it is placed again
        self.pending: list = []  # (control, future) to send right after its start (a queued or parked stream)
        self.parking = False  # a Park is on its way to its worker
        self.moving = None  # a ``moves.Move`` while it migrates between workers
        self.unpark_requested: float | None = None  # when it was asked to resume from parked (latency)
        self.parent: StreamRecord | None = None  # the stream it was forked from
        self.forks = 0  # streams forked from it
        self.rollbacks = 0  # times it was rolled back; consumers re-read from the block it went back to
        self.rewound_to: list[int] = []  # per rollback, the block it went back to
        self._recent: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._cond = threading.Condition()
        self._async_waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    # ---- producer side --------------------------------------------------------------------------
    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def add_block(self, block: int, latents: torch.Tensor) -> bool:
        """Record the next block; a block already recorded (re-generated after a resume) is ignored.
        Returns whether it was new."""
        with self._cond:
            if self.terminal or block < self.blocks_done:
                return False
            if block != self.blocks_done:
                raise AssertionError(f"stream {self.id}: block {block} after {self.blocks_done} (gap)")
            self._recent[block] = latents
            while self.keep_blocks is not None and len(self._recent) > self.keep_blocks:
                self._recent.popitem(last=False)
            self.blocks_done += 1
            self._notify()
            return True

    def started(self, block: int) -> None:
        """Its worker continues it from ``block``: 0, or after a move the block of the snapshot it was restored
        from.  Blocks below that which the service never received are on disk (the dead worker persisted them
        before it wrote the snapshot): make them readable."""
        with self._cond:
            if self.resumed:
                self.resumed_from = block
            if block > self.blocks_done:
                if self.output_dir is None:
                    raise AssertionError("resuming past unreceived blocks needs an output directory")
                self.blocks_done = block
                self._notify()

    def inherit(self, parent: StreamRecord, block: int) -> None:
        """A fork: blocks ``0 .. block - 1`` are its source's (in memory here, or linked on disk by its worker)."""
        with self._cond:
            if self.output_dir is None:
                for i in range(block):
                    self._recent[i] = parent.block(i).latents
            self.blocks_done = max(self.blocks_done, block)
            self._notify()

    def rewind(self, block: int) -> None:
        """A rollback: blocks from ``block`` on will be regenerated; every consumer past it reads them again."""
        with self._cond:
            for i in [i for i in self._recent if i >= block]:
                del self._recent[i]
            self.blocks_done = min(self.blocks_done, block)
            self.rewound_to.append(block)
            self.rollbacks += 1
            self._notify()

    def set_state(self, state: str, worker: str | None) -> None:
        """``queued`` / ``parked`` (worker None) or ``running`` on ``worker``; a terminal stream stays as it is."""
        with self._cond:
            if not self.terminal:
                self.state, self.worker = state, worker
                self._notify()

    def end(self, state: str, error: str | None = None) -> bool:
        """Make the stream terminal (first call wins). Returns whether this call ended it."""
        assert state in TERMINAL_STATES, state
        with self._cond:
            if self.terminal:
                return False
            self.state, self.error, self.ended_at = state, error, time.monotonic()
            self.pages_held = 0
            self._notify()
            return True

    def _notify(self) -> None:
        self._cond.notify_all()
        for loop, event in list(self._async_waiters):
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the consumer's loop is closed: it will never read again
                self._async_waiters.discard((loop, event))

    # ---- consumer side --------------------------------------------------------------------------
    def block(self, i: int) -> StreamBlock:
        """Block ``i`` (< ``blocks_done``); its latents are shared by every consumer: read-only."""
        with self._cond:
            latents = self._recent.get(i)
        if latents is None:
            latents = persist.read_block(self.output_dir, self.id, i)
        return StreamBlock(self.id, i, latents, i == self.num_blocks - 1)

    def ready(self, i: int) -> bool | None:
        """True: block ``i`` can be read; None: it never will be (the stream ended before it); False: wait."""
        if i < self.blocks_done:
            return True
        return None if self.terminal else False

    def wait(self, i: int, timeout: float | None, seen_rollbacks: int | None = None) -> bool | None:
        """``ready(i)`` once it is not False (or ``timeout``); ``"rewound"`` at once on a rollback the caller has
        not seen (its cursor may be past the blocks to be regenerated)."""
        with self._cond:
            rewound = (lambda: False) if seen_rollbacks is None else (lambda: self.rollbacks != seen_rollbacks)
            self._cond.wait_for(lambda: self.ready(i) is not False or rewound(), timeout)
            return "rewound" if rewound() else self.ready(i)

    async def await_block(self, i: int) -> None:
        loop, event = asyncio.get_running_loop(), asyncio.Event()
        with self._cond:
            if self.ready(i) is not False:
                return
            self._async_waiters.add((loop, event))
        try:
            await event.wait()
        finally:
            with self._cond:
                self._async_waiters.discard((loop, event))

    def cursor(self, i: int, seen_rollbacks: int) -> tuple[int, int]:
        """A consumer's next block after any rollback since it last looked: never past the earliest block those
        rollbacks went back to (the blocks from there on were regenerated, perhaps already)."""
        with self._cond:
            if self.rollbacks != seen_rollbacks:
                return min([i, *self.rewound_to[seen_rollbacks:]]), self.rollbacks
            return i, seen_rollbacks

    def status(self) -> StreamStatus:
        with self._cond:
            running = self.state == "running"
            extra = {} if self.resumed_from is None else {"resumed_from_block": self.resumed_from}
            if self.paused_at is not None:
                extra["paused"] = True
            if self.rollbacks:
                extra["rollbacks"] = self.rollbacks
            return StreamStatus(
                id=self.id,
                state=self.state,
                blocks_done=self.blocks_done,
                num_blocks=self.num_blocks,
                pages_held=self.pages_held if running else 0,
                pages_reserved=self.pages if running else 0,
                worker=self.worker,
                error=self.error,
                resumed=self.resumed,
                extra=extra,
                output_dir=str(persist.stream_dir(self.output_dir, self.id)) if self.output_dir else None,
            )


class Handle:
    """``StreamHandle`` over a record; ``cancel`` goes through the service that owns the stream."""

    def __init__(self, record: StreamRecord, service):
        self.id = record.id
        self._record, self._service = record, service

    def status(self) -> StreamStatus:
        return self._record.status()

    def blocks(self, timeout: float | None = None) -> Iterator[StreamBlock]:
        """Every block in order; after a rollback, the regenerated ones again from the block it went back to."""
        i, seen = 0, self._record.rollbacks
        while True:
            i, seen = self._record.cursor(i, seen)
            ready = self._record.wait(i, timeout, seen)
            if ready == "rewound":
                continue
            if ready is None:
                return
            if ready is False:
                raise TimeoutError(f"stream {self.id}: no block {i} within {timeout} s")
            yield self._record.block(i)
            i += 1

    async def ablocks(self) -> AsyncIterator[StreamBlock]:
        i, seen = 0, self._record.rollbacks
        while True:
            i, seen = self._record.cursor(i, seen)
            await self._record.await_block(i)
            ready = self._record.ready(i)
            if ready is None:
                return
            if ready is False:  # woken by a state change or a rollback, not by block i
                continue
            yield self._record.block(i)
            i += 1

    def cancel(self) -> None:
        self._service.cancel(self.id)

    def update(self, prompt: torch.Tensor, recache_frames: int | None = None) -> int | None:
        return self._service.update(self.id, prompt, recache_frames)

    # ---- interactive controls (``controls.py``): each returns the block from which it is in force ----------
    def control(self, ctrl):
        """Send a control without waiting (``Router.control``): a ``concurrent.futures.Future`` of its block."""
        return self._service.control(self.id, ctrl)

    def steer(self, actions=None, conditioning: dict | None = None) -> int | None:
        return self._service.control(self.id, Steer(self.id, actions, conditioning)).result()

    def pause(self) -> int | None:
        return self._service.control(self.id, Pause(self.id, True)).result()

    def resume(self) -> int | None:
        return self._service.control(self.id, Pause(self.id, False)).result()

    def rollback(self, blocks: int = 1) -> int | None:
        return self._service.control(self.id, Rollback(self.id, blocks)).result()

    def fork(self, fork_id: str | None = None) -> Handle:
        """A new stream from this one's exact state (copy-on-write pages); its handle."""
        return self._service.fork(self.id, fork_id)


class StreamTable:
    """Every stream the service knows, by id; forgets terminal streams (see the module docstring)."""

    def __init__(self, retention_s: float = 600.0, max_terminal: int = 1024):
        if not retention_s >= 0:
            raise ConfigError(f"retention_s must be >= 0, got {retention_s!r}")
        if not isinstance(max_terminal, int) or max_terminal < 0:
            raise ConfigError(f"max_terminal must be an integer >= 0, got {max_terminal!r}")
        self.retention_s, self.max_terminal = retention_s, max_terminal
        self._records: dict[str, StreamRecord] = {}
        self._lock = threading.Lock()

    def add(self, record: StreamRecord) -> None:
        with self._lock:
            self._forget()
            if record.id in self._records:
                raise ConfigError(f"session_id {record.id!r} is already in use")
            self._records[record.id] = record

    def get(self, stream_id: str) -> StreamRecord:
        with self._lock:
            record = self._records.get(stream_id)
        if record is None:
            raise UnknownStream(f"no stream {stream_id!r} (never submitted, or forgotten after its retention)")
        return record

    def find(self, stream_id: str) -> StreamRecord | None:
        with self._lock:
            return self._records.get(stream_id)

    def records(self) -> list[StreamRecord]:
        with self._lock:
            return list(self._records.values())

    def _forget(self) -> None:
        now = time.monotonic()
        ended = sorted((r for r in self._records.values() if r.ended_at is not None), key=lambda r: r.ended_at)
        excess = len(ended) - self.max_terminal
        for i, r in enumerate(ended):
            if i < excess or now - r.ended_at > self.retention_s:
                del self._records[r.id]
