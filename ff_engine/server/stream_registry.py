"""The server's streams: id -> service handle, owner, MP4 file; one file-writing consumer per stream.

Invariants:
  * ids are made here (``vid_`` + 32 hex digits, ``uuid4``) and checked against ``STREAM_ID`` before any lookup;
    a file path is built from the record, never from a request.
  * A key sees only its own streams (another key's id answers 404, as an unknown one does).
  * A key holds at most ``max_streams_per_key`` streams that are not terminal; the next submit is refused
    (``KeyLimit``, answered 429) before anything reaches the service.
  * Every stream has exactly one file writer, which also measures time to first frame and block latency (so each
    block is measured once however many clients watch).  The finished MP4 appears under its final name only
    when the stream finished; a failed or cancelled stream leaves no file.
  * At most ``max_records`` terminal streams are remembered; the oldest are forgotten, with their MP4 and the blocks
    the service persisted for them (bounded disk).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ff_engine.errors import FFEngineError, Overloaded, RetryLater
from ff_engine.server.frames import BlockRenderer, JpegEncoder, stream_blocks
from ff_engine.serving.contract import StreamStatus, UnknownStream

log = logging.getLogger("ff_engine.server")
STREAM_ID = re.compile(r"^vid_[0-9a-f]{32}$")
FILE_WAIT_S = 30.0  # a finished stream's MP4 is closed and renamed well within this


class KeyLimit(RetryLater):
    """This key already holds its maximum of unfinished streams."""


def owner_of(key: str | None) -> str:
    """A key's fingerprint (the key itself is never stored)."""
    return "anonymous" if not key else hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass
class ServedStream:
    id: str
    handle: object  # ff_engine.serving.contract.StreamHandle
    owner: str
    request: dict
    created_at: float
    submitted: float  # time.monotonic() at submit
    path: Path
    writer: asyncio.Task | None = None
    file_ready: bool = False
    file_error: str | None = None
    frames: int = 0
    first_block_s: float | None = None
    terminal_seen: float | None = None
    final: StreamStatus | None = None  # the service's last word, kept: it may forget the stream before we do
    extra: dict = field(default_factory=dict)


class StreamRegistry:
    def __init__(self, runtime, metrics):
        self.runtime, self.metrics, self.settings = runtime, metrics, runtime.settings
        self.streams: dict[str, ServedStream] = {}
        self.out_dir = Path(self.settings.output_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._pending: dict[str, int] = {}  # submits in flight per owner (counted before any await)
        self.detached: dict[str, tuple] = {}  # id -> (stream, next undelivered block, expiry task)

    # ---- submit / look up ---------------------------------------------------------------------------------
    def live_count(self, owner: str) -> int:
        live = sum(1 for s in self.streams.values() if s.owner == owner and not self._terminal(s))
        return live + self._pending.get(owner, 0)

    async def submit(self, req, owner: str, source: str = "rest") -> ServedStream:
        """Validate against the model, hand to the service, start the file writer. Raises ``FFEngineError``
        (bad input: nothing queued), ``KeyLimit`` or ``Overloaded``."""
        limit = self.settings.max_streams_per_key
        if self.live_count(owner) >= limit:
            self.metrics.rejected.labels("key_limit").inc()
            raise KeyLimit(f"this key already has {limit} unfinished streams (max_streams_per_key)", 1.0)
        sid = "vid_" + uuid.uuid4().hex
        cfg = self.runtime.session_config(req, session_id=sid)
        self._pending[owner] = self._pending.get(owner, 0) + 1
        try:
            handle = await asyncio.to_thread(self.runtime.service.submit, cfg)
        except FFEngineError as exc:
            if isinstance(exc, Overloaded):
                self.metrics.rejected.labels("queue_full").inc()
            raise
        finally:
            self._pending[owner] -= 1
        rec = ServedStream(
            sid,
            handle,
            owner,
            {**req.model_dump(exclude_none=True), "source": source},
            time.time(),
            time.monotonic(),
            self.out_dir / f"{sid}.mp4",
        )
        self.streams[sid] = rec
        rec.writer = asyncio.create_task(self._write_file(rec))
        self._forget_old()
        return rec

    async def fork(self, rec: ServedStream, owner: str) -> ServedStream:
        """A new stream from ``rec``'s exact state (``StreamHandle.fork``: same worker, pages shared
        copy-on-write), under a new id, for the same key; counted against the key's limit like a submit."""
        limit = self.settings.max_streams_per_key
        if self.live_count(owner) >= limit:
            self.metrics.rejected.labels("key_limit").inc()
            raise KeyLimit(f"this key already has {limit} unfinished streams (max_streams_per_key)", 1.0)
        fid = "vid_" + uuid.uuid4().hex
        self._pending[owner] = self._pending.get(owner, 0) + 1
        try:
            handle = await asyncio.to_thread(rec.handle.fork, fid)
        finally:
            self._pending[owner] -= 1
        request = {**rec.request, "source": "fork", "forked_from": rec.id}
        fork = ServedStream(fid, handle, owner, request, time.time(), time.monotonic(), self.out_dir / f"{fid}.mp4")
        self.streams[fid] = fork
        fork.writer = asyncio.create_task(self._write_file(fork))
        self._forget_old()
        return fork

    def get(self, sid: str, owner: str) -> ServedStream:
        rec = self.streams.get(sid) if STREAM_ID.match(sid) else None
        if rec is None or rec.owner != owner:
            raise UnknownStream(f"id: no video {sid[:80]!r}")
        return rec

    async def lookup(self, sid: str, owner: str) -> ServedStream:
        """``get`` as the app calls it (a ``RemoteRegistry`` asks its hub)."""
        return self.get(sid, owner)

    async def file_state(self, rec: ServedStream) -> tuple[bool, str | None]:
        """(MP4 in place, why it could not be written).  A stream the service reports finished has its file within
        moments (the writer closes and renames it after the last block): that is waited for, so ``finished``
        always means the file is there."""
        st = rec.final or await asyncio.to_thread(rec.handle.status)
        if st.state == "finished" and not rec.file_ready and rec.writer is not None and not rec.writer.done():
            await asyncio.wait({rec.writer}, timeout=FILE_WAIT_S)
        return rec.file_ready, rec.file_error

    # ---- status ------------------------------------------------------------------------------------------
    async def status(self, rec: ServedStream) -> dict:
        st = rec.final or await asyncio.to_thread(rec.handle.status)
        return {
            "id": rec.id,
            "object": "video",
            "status": st.state,
            "created_at": int(rec.created_at),
            "blocks_done": st.blocks_done,
            "num_blocks": st.num_blocks,
            "pages_held": st.pages_held,
            "pages_reserved": st.pages_reserved,
            "worker": st.worker,
            "error": st.error,
            "resumed": st.resumed,
            "frames_written": rec.frames,
            "file_ready": rec.file_ready,
            "file_error": rec.file_error,
            "time_to_first_block_s": rec.first_block_s,
            "request": rec.request,
        }

    @staticmethod
    def _terminal(rec: ServedStream) -> bool:
        """The writer ends exactly when the stream does (``blocks()`` ends with the stream), so no service call."""
        return rec.terminal_seen is not None

    # ---- the file writer ---------------------------------------------------------------------------------
    async def _write_file(self, rec: ServedStream) -> None:
        from ff_engine.video import Mp4Writer

        renderer = BlockRenderer(self.runtime.decoder(), JpegEncoder(self.settings.jpeg_quality))
        part = rec.path.with_suffix(".part.mp4")
        writer = Mp4Writer(part, fps=self.runtime.geometry.fps)
        try:
            await self._consume(rec, renderer, writer)
        except Exception as exc:  # noqa: BLE001 - the stream's status says why; the server keeps serving
            log.warning("stream %s: file writer stopped: %s", rec.id, exc)
            rec.file_error = f"{type(exc).__name__}: {str(exc)[:200]}"
        finally:
            await asyncio.to_thread(writer.close)
            try:
                rec.final = await asyncio.to_thread(rec.handle.status)
                finished = rec.final.state == "finished"
            except UnknownStream:
                finished = False
            if finished and part.exists():
                part.replace(rec.path)
                rec.file_ready = True
            else:
                part.unlink(missing_ok=True)
            rec.terminal_seen = time.monotonic()

    async def _consume(self, rec: ServedStream, renderer: BlockRenderer, writer) -> None:
        last = rec.submitted
        async for blk in stream_blocks(rec.handle):
            now = time.monotonic()
            if blk.block == 0:
                rec.first_block_s = now - rec.submitted
                self.metrics.ttff.observe(now - rec.submitted)
            else:
                self.metrics.block_latency.observe(now - last)
            last = now
            px = await asyncio.to_thread(renderer.pixels, blk.latents)
            await asyncio.to_thread(writer.write, px)
            rec.frames += len(px)
            self.metrics.add_frames(len(px))

    # ---- bounded memory ------------------------------------------------------------------------------------
    def _forget_old(self) -> None:
        done = [s for s in self.streams.values() if s.terminal_seen is not None]
        for rec in sorted(done, key=lambda s: s.terminal_seen)[: max(0, len(done) - self.settings.max_records)]:
            del self.streams[rec.id]
            rec.path.unlink(missing_ok=True)
            self._remove_blocks(rec)

    def _remove_blocks(self, rec: ServedStream) -> None:
        """The service's persisted blocks and snapshot of a forgotten stream, when they are under our output
        directory (the service keeps them on disk; without this a long-running server fills its disk)."""
        folder = Path(rec.final.output_dir).resolve() if rec.final and rec.final.output_dir else None
        if folder is not None and folder.is_relative_to(self.out_dir.resolve()) and folder.name == rec.id:
            shutil.rmtree(folder, ignore_errors=True)

    # ---- detached realtime sessions (resume by id) -------------------------------------------------------
    def detach(self, rec: ServedStream, next_block: int, hold_s: float) -> None:
        """Keep a stream whose WebSocket was lost for ``hold_s`` seconds; cancelled then unless re-attached."""

        async def expire():
            await asyncio.sleep(hold_s)
            if self.detached.pop(rec.id, None) is not None and rec.final is None:  # blocks stay until forgotten
                log.info("stream %s: not resumed within %.0f s; cancelled", rec.id, hold_s)
                await asyncio.to_thread(rec.handle.cancel)

        self.detached[rec.id] = (rec, next_block, asyncio.get_running_loop().create_task(expire()))

    async def reattach(self, sid: str, owner: str) -> tuple[ServedStream, int] | None:
        got = self.detached.get(sid)
        if got is None or got[0].owner != owner:
            return None
        rec, next_block, timer = self.detached.pop(sid)
        timer.cancel()
        return rec, next_block

    async def close(self) -> None:
        for _, _, timer in self.detached.values():
            timer.cancel()
        tasks = [s.writer for s in self.streams.values() if s.writer and not s.writer.done()]
        for s in self.streams.values():
            if s.final is None:
                s.handle.cancel()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
