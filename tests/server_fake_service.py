"""TEMPORARY stand-in for ff_engine.distributed.LocalService (until it lands): Scheduler on a thread."""

from __future__ import annotations

import asyncio
import threading
import time

from ff_engine.engine.scheduler import Scheduler
from ff_engine.errors import FFEngineError
from ff_engine.service import StreamBlock, StreamStatus, UnknownStream


class FakeHandle:
    def __init__(self, svc, sid, num_blocks):
        self.svc, self.id, self.num_blocks = svc, sid, num_blocks
        self.items: list[StreamBlock] = []
        self.state, self.error = "queued", None

    def status(self):
        e = self.svc.engine
        held = e.cache.pages_held(self.id) if self.id in e.sessions else 0
        res = e.cache.pool.reserved(self.id) if self.id in e.sessions else 0
        return StreamStatus(self.id, self.state, len(self.items), self.num_blocks, held, res, "local", self.error)

    def blocks(self, timeout=None):
        i = 0
        while True:
            with self.svc.cv:
                while i >= len(self.items) and self.state not in ("finished", "failed", "cancelled"):
                    self.svc.cv.wait(0.05)
                if i < len(self.items):
                    b = self.items[i]
                else:
                    return
            i += 1
            yield b

    async def ablocks(self):
        i = 0
        while True:
            if i < len(self.items):
                yield self.items[i]
                i += 1
            elif self.state in ("finished", "failed", "cancelled"):
                return
            else:
                await asyncio.sleep(0.01)

    def cancel(self):
        with self.svc.lock:
            if self.state in ("queued", "running"):
                self.svc.sched.cancel(self.id)
                self.state = "cancelled"


class FakeLocalService:
    def __init__(self, engine, max_batch=8, max_queue=16):
        self.engine = engine
        self.sched = Scheduler(engine, max_batch=max_batch, max_queue=max_queue)
        self.lock, self.cv = threading.RLock(), threading.Condition()
        self.handles: dict[str, FakeHandle] = {}
        self.stop = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def submit(self, cfg):
        with self.lock:
            sid = self.sched.submit(cfg)
            h = FakeHandle(self, sid, -(-cfg.num_frames // self.engine.geometry.frames_per_block))
            self.handles[sid] = h
            return h

    def get(self, sid):
        if sid not in self.handles:
            raise UnknownStream(sid)
        return self.handles[sid]

    def _loop(self):
        while not self.stop:
            with self.lock:
                results = self.sched.step()
                for sid in self.engine.sessions:
                    if self.handles[sid].state == "queued":
                        self.handles[sid].state = "running"
            if not results:
                time.sleep(0.005)
            with self.cv:
                for r in results:
                    h = self.handles.get(r.session_id)
                    if h is None or h.state == "cancelled":
                        continue
                    if r.error:
                        h.state, h.error = "failed", r.error
                        continue
                    h.items.append(StreamBlock(r.session_id, r.block, r.latents, r.done))
                    if r.done:
                        h.state = "finished"
                self.cv.notify_all()

    def stats(self):
        c = self.engine.cache
        states = [h.state for h in self.handles.values()]
        return {"workers": [{"name": "local", "pages_total": c.num_pages, "pages_used": c.num_pages - c.pool.num_free
                             if hasattr(c.pool, "num_free") else 0, "pages_reserved": 0,
                             "active": len(self.engine.sessions), "alive": True}],
                "queued": len(self.sched.waiting), "active": len(self.engine.sessions),
                **{s: states.count(s) for s in ("finished", "failed", "cancelled")}, "rejected": self.sched.stats.rejected}

    def shutdown(self):
        self.stop = True
        self.thread.join(5)
