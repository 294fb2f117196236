"""WebSocket ``/v1/realtime/video``: one generation session at a time per connection (vLLM-Omni's shapes).

Client -> server (JSON text; ``event_id`` optional, at most 64 of ``[A-Za-z0-9_.:-]``):
  ``session.start``  the fields of ``POST /v1/videos`` + ``slow_client`` ("wait" | "drop") + ``include_latents``
  ``session.update`` ``prompt`` (a server-side name), ``actions`` (names or indices per latent frame),
                     ``conditioning`` (per-pixel-frame rows), ``paused``: in force from the stream's next block
                     boundary; ``policy_params`` cannot change mid-stream (an ``error`` names it)
  ``session.rollback`` {blocks}: back before the stream's last ``blocks`` blocks, regenerated from there
  ``session.fork``   a new stream from this one's exact state (its id in ``session.forked``)
  Every control gets two receipts: ``control.received`` {event} at once (``event``: 1, 2, ... per connection),
  then ``session.updated`` {applies_at_block} / ``session.rolled_back`` {to_block} / ``session.forked``
  {fork_id, at_block} when applied, or an ``error`` with the same ``event``.
  ``session.cancel`` (alias ``session.stop``), ``session.ping``
Server -> client (JSON text, each with ``seq``: 0, 1, 2... per connection, in send order):
  ``session.started`` {session_id, config, num_blocks, frames_per_block, fps}; per block ``video.block``
  {block, frames, first_frame, last, pages_held, pages_reserved, dropped_frames} followed by ``frames`` binary
  messages (one JPEG each) and, with ``include_latents``, one more: the block's latents, float32 little-endian
  [F, C, H, W] (shape in the header); ``session.updated``, ``session.cancelled``, ``session.pong``,
  ``session.done`` {state, blocks_done, error, dropped_frames}, ``error`` {code, message, param, status}.

Invariants: a client event with an ``event_id`` already seen is not applied again (its first answer is sent
again, marked ``duplicate``).  Outgoing messages go through one bounded queue (``ws_queue_blocks`` items); when it
is full a ``wait`` session stops reading blocks from the service (the service keeps them; nothing is lost) and a
``drop`` session skips the block's frames and counts them in ``dropped_frames``.  A bad message gets an ``error``
naming the field and the connection stays usable; leaving the connection cancels its running stream.  The
first ``session.start`` or ``session.resume`` must arrive within ``ws_start_timeout`` (10 s), else an ``error``
(``code: "start_timeout"``) and the connection closes.

The same path speaks vLLM-Omni's streaming video protocol (``omni.py``): a connection that did not offer the
``ff-engine`` subprotocol and whose first ``session.start`` is vLLM-Omni's (``omni.is_omni_start``: a field only
vLLM-Omni's has, such as ``format`` or ``num_frames``, or a text prompt) is handed to ``omni.OmniSession``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict

import numpy as np
from fastapi import WebSocket
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect

from ff_engine.server import interactive
from ff_engine.server.errors import ApiError
from ff_engine.server.frames import BlockRenderer, JpegEncoder, stream_blocks
from ff_engine.server.schemas import CLIENT_EVENTS, SessionStart, first_error, request_model, validate_policy_params
from ff_engine.server.stream_registry import owner_of
from ff_engine.serving.controls import Rollback

log = logging.getLogger("ff_engine.server")
SUBPROTOCOL = "ff-engine"
SEEN_EVENTS = 256


class RealtimeSession:
    def __init__(self, ws: WebSocket, state, keys, settings):
        self.ws, self.state, self.keys, self.settings = ws, state, keys, settings
        self.out: asyncio.Queue = asyncio.Queue(maxsize=settings.ws_queue_blocks)
        self.seq = 0
        self.seen: OrderedDict[str, dict] = OrderedDict()
        self.rec = None
        self.producer: asyncio.Task | None = None
        self.start_model = request_model(state.runtime.limits, SessionStart)
        self.slow_client, self.delivered, self.done_sent, self.close_code = "wait", 0, False, None
        self.omni_start: dict | None = None  # a vLLM-Omni session.start: the connection is handed to omni.py
        self.events = 0  # control messages received on this connection (their receipts' event numbers)
        self.applying: set[asyncio.Task] = set()  # controls waiting for their applied receipt

    # ---- connection ---------------------------------------------------------------------------------------
    async def run(self) -> None:
        offered = self.ws.scope.get("subprotocols", [])
        token = next((p.removeprefix("bearer.") for p in offered if p.startswith("bearer.")), None)
        header = self.ws.headers.get("authorization") or (f"Bearer {token}" if token else None)
        try:
            key = self.keys.check(header)
        except ApiError as exc:
            return await self._deny(exc)
        self.owner = owner_of(key)
        await self.ws.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
        sender = asyncio.create_task(self._send_loop())
        receiver = asyncio.create_task(self._receive_loop())
        try:
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await self._leave()
            for t in (receiver, self.producer, sender, *self.applying):
                if t is not None:
                    t.cancel()
            await asyncio.gather(*(t for t in (receiver, self.producer, sender) if t), return_exceptions=True)
        if self.omni_start is not None:  # from here on the connection speaks vLLM-Omni's protocol
            from ff_engine.server.omni import OmniSession

            await OmniSession(self.ws, self.state, self.owner).run(self.omni_start)

    async def _leave(self) -> None:
        """Leaving cancels the running stream (pages return at once), except a ``wait`` session whose client
        went without closing (a lost network, a missed keepalive): its stream is held ``ws_resume_seconds`` for
        a ``session.resume`` by id on a new connection, then cancelled."""
        if self.rec is None or self.done_sent:
            return
        abnormal = self.close_code not in (1000, 1001)
        if self.slow_client == "wait" and abnormal and self.settings.ws_resume_seconds > 0:
            self.state.registry.detach(self.rec, self.delivered, self.settings.ws_resume_seconds)
            log.info("realtime: %s detached at block %d (close %s)", self.rec.id, self.delivered, self.close_code)
        elif self.rec.final is None:
            await asyncio.to_thread(self.rec.handle.cancel)

    async def _deny(self, exc: ApiError) -> None:
        if "websocket.http.response" in self.ws.scope.get("extensions", {}):
            await self.ws.send_denial_response(exc.response())
        else:
            await self.ws.close(code=1008, reason=exc.message[:120])

    async def _send_loop(self) -> None:
        while True:
            item = await self.out.get()
            event, binaries = item
            await self.ws.send_text(json.dumps({**event, "seq": self.seq}))
            self.seq += 1
            for b in binaries:
                await self.ws.send_bytes(b)
            self.out.task_done()
            if event["type"] == "video.block":
                self.delivered = event["block"] + 1  # the next block this connection has not handed to TCP
            elif event["type"] == "session.done":
                self.done_sent = True

    @property
    def running(self) -> bool:
        """A session is running until its blocks have all been queued and ``session.done`` sent."""
        return self.producer is not None and not self.producer.done()

    async def emit(self, event: dict, binaries: tuple = ()) -> None:
        await self.out.put((event, binaries))

    async def error(self, status: int, message: str, param: str | None, code: str, event_id=None) -> None:
        await self.emit(
            {"type": "error", "status": status, "code": code, "message": message, "param": param, "event_id": event_id}
        )

    # ---- client events ------------------------------------------------------------------------------------
    async def _receive_loop(self) -> None:
        limit = self.settings.max_body_bytes
        deadline = asyncio.get_running_loop().time() + self.settings.ws_start_timeout
        while True:
            try:
                msg = await self._receive(deadline)
            except TimeoutError:
                return await self._start_timeout()
            if msg["type"] == "websocket.disconnect":
                self.close_code = msg.get("code")
                return
            if msg.get("text") is None:
                await self.error(
                    400,
                    "message: binary messages are not accepted; send JSON text events",
                    "message",
                    "invalid_message",
                )
                continue
            text = msg["text"]
            if len(text) > limit:
                await self.error(413, f"message: larger than the {limit}-byte limit", "message", "too_large")
                continue
            try:
                await self._handle(text)
            except WebSocketDisconnect:
                return
            except Exception:
                log.exception("realtime: event %r failed", text[:120])
                await self.error(500, "message: internal error handling this event; see the server log",
                                 "message", "internal_error")
            if self.omni_start is not None:
                await self.out.join()  # this protocol's answers so far go out first
                return

    async def _receive(self, deadline: float) -> dict:
        """The next message; until a first session starts, ``TimeoutError`` past ``deadline``."""
        if self.rec is not None:
            return await self.ws.receive()
        return await asyncio.wait_for(self.ws.receive(), max(0.0, deadline - asyncio.get_running_loop().time()))

    async def _start_timeout(self) -> None:
        """No session within ``ws_start_timeout``: one ``error`` (vLLM-Omni's message), then the connection closes."""
        t = self.settings.ws_start_timeout
        await self.error(408, f"type: Timeout waiting for session.start (none within {t:g} s, --ws-start-timeout)",
                         "type", "start_timeout")
        await self.out.join()
        self.close_code = 1000
        await self.ws.close(1000)

    async def _handle(self, text: str) -> None:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            return await self.error(400, f"message: not valid JSON ({str(exc)[:80]})", "message", "invalid_json")
        if not isinstance(data, dict):
            return await self.error(400, "message: must be a JSON object with a 'type'", "message", "invalid_json")
        typ = data.get("type")
        if not isinstance(typ, str) or typ not in CLIENT_EVENTS:  # a list or an object is not hashable
            return await self.error(
                422,
                f"type: unknown event type {json.dumps(typ)[:64]}; one of {sorted(CLIENT_EVENTS)}",
                "type",
                "unknown_event",
            )
        if typ == "session.start" and self.rec is None and SUBPROTOCOL not in self.ws.scope.get("subprotocols", []):
            from ff_engine.server.omni import is_omni_start

            if is_omni_start(data):
                self.omni_start = data
                return None
        model = self.start_model if typ == "session.start" else CLIENT_EVENTS[typ]
        eid = data.get("event_id") if isinstance(data.get("event_id"), str) else None
        try:
            ev = model.model_validate(data)
        except ValidationError as exc:
            field, msg = first_error(exc)
            return await self.error(422, f"{field}: {msg}", field, "invalid_value", eid)
        if ev.event_id is not None and ev.event_id in self.seen:
            return await self.emit({**self.seen[ev.event_id], "duplicate": True})
        answer = await getattr(self, "_on_" + typ.split(".")[1])(ev)
        if answer is not None and ev.event_id is not None:
            self.seen[ev.event_id] = answer
            while len(self.seen) > SEEN_EVENTS:
                self.seen.popitem(last=False)

    async def _on_start(self, ev) -> dict | None:
        from ff_engine.server.app import submit

        if self.running:
            await self.error(
                409,
                "type: a session is already running on this connection; cancel it first",
                "type",
                "session_active",
                ev.event_id,
            )
            return None
        req = ev.model_dump(exclude={"type", "event_id", "slow_client", "include_latents"}, exclude_none=True)
        try:
            rec = await submit(
                self.state.registry, self.state.request_model.model_validate(req), self.owner, "ws"
            )
        except ApiError as exc:
            await self.emit(
                {
                    "type": "error",
                    "status": exc.status,
                    "code": exc.code,
                    "message": exc.message,
                    "param": exc.param,
                    "event_id": ev.event_id,
                    **_retry(exc),
                }
            )
            return None
        self.rec, self.slow_client, self.delivered, self.done_sent = rec, ev.slow_client, 0, False
        st = await asyncio.to_thread(rec.handle.status)
        g = self.state.runtime.geometry
        answer = {
            "type": "session.started",
            "event_id": ev.event_id,
            "session_id": rec.id,
            "config": rec.request,
            "num_blocks": st.num_blocks,
            "frames_per_block": g.frames_per_block,
            "fps": g.fps,
            "slow_client": ev.slow_client,
        }
        await self.emit(answer)
        self.producer = asyncio.create_task(self._produce(rec, ev.slow_client, ev.include_latents))
        return answer

    async def _on_resume(self, ev) -> dict | None:
        """Re-attach a ``wait`` session whose connection was lost, by id; blocks from ``from_block`` (default:
        the first one the lost connection did not send)."""
        if self.running:
            msg = "type: a session is already running on this connection; cancel it first"
            await self.error(409, msg, "type", "session_active", ev.event_id)
            return None
        got = await self.state.registry.reattach(ev.session_id, self.owner)
        if got is None:
            msg = f"session_id: no detached session {ev.session_id!r} (unknown, another key's, ended or expired)"
            await self.error(404, msg, "session_id", "not_found", ev.event_id)
            return None
        rec, next_block = got
        start = next_block if ev.from_block is None else ev.from_block
        self.rec, self.slow_client, self.delivered, self.done_sent = rec, "wait", start, False
        st = await asyncio.to_thread(rec.handle.status)
        answer = {"type": "session.resumed", "event_id": ev.event_id, "session_id": rec.id, "from_block": start,
                  "num_blocks": st.num_blocks, "blocks_done": st.blocks_done}
        await self.emit(answer)
        self.producer = asyncio.create_task(self._produce(rec, "wait", ev.include_latents, start))
        return answer

    async def _on_update(self, ev) -> dict | None:
        """Prompt, actions, conditioning, paused -- from the stream's next block boundary on (``interactive.py``).
        ``control.received`` goes out at once; ``session.updated`` names the block it applies at once the worker
        has applied it (the connection keeps reading meanwhile).  ``policy_params`` are checked, then refused:
        a running stream's policy is fixed."""
        if not self.running:
            await self.error(409, "type: no running session to update", "type", "no_session", ev.event_id)
            return None
        if ev.policy_params is not None:
            try:
                validate_policy_params(self.rec.request["policy"], ev.policy_params)
            except ValueError as exc:
                await self.error(422, str(exc), getattr(exc, "field", "policy_params"), "invalid_value", ev.event_id)
                return None
            msg = "policy_params: a running stream's cache policy cannot change; start a new session"
            await self.error(422, msg, "policy_params", "unsupported", ev.event_id)
            return None
        try:
            controls = interactive.controls_of(self.state.runtime, self.rec.id, ev)
            futures = await interactive.send(self.rec.handle, controls)
        except ApiError as exc:
            await self.error(exc.status, exc.message, exc.param, exc.code, ev.event_id)
            return None
        receipt = await self._received(ev)
        changed = [name for name, _ in controls]

        async def done():
            block = await interactive.applied(futures, changed)
            return {"type": "session.updated", "applies_at_block": block, "changed": changed}

        self._when_applied(ev, receipt["event"], done())
        return receipt

    async def _on_rollback(self, ev) -> dict | None:
        """The stream goes back ``blocks`` blocks (``--undo-blocks`` history); ``session.rolled_back`` names the
        block it regenerates from, and ``video.block`` messages restart there."""
        if not self.running:
            await self.error(409, "type: no running session to roll back", "type", "no_session", ev.event_id)
            return None
        try:  # queued before the next message is read: controls reach the stream in the order they were sent
            futures = await interactive.send(self.rec.handle, [("blocks", Rollback(self.rec.id, ev.blocks))])
        except ApiError as exc:
            await self.error(exc.status, exc.message, exc.param, exc.code, ev.event_id)
            return None
        receipt = await self._received(ev)

        async def done():
            return {"type": "session.rolled_back", "to_block": await interactive.applied(futures, ["blocks"])}

        self._when_applied(ev, receipt["event"], done())
        return receipt

    async def _on_fork(self, ev) -> dict | None:
        """A new stream from this one's exact state (pages shared copy-on-write); ``session.forked`` gives its
        id (watch it over REST, ``GET /v1/videos/{id}/stream``, or steer it with ``POST .../update``)."""
        from ff_engine.server.app import fork

        if not self.running:
            await self.error(409, "type: no running session to fork", "type", "no_session", ev.event_id)
            return None
        receipt = await self._received(ev)
        rec = self.rec

        async def done():
            new = await fork(self.state.registry, rec, self.owner)
            st = await asyncio.to_thread(new.handle.status)
            return {"type": "session.forked", "fork_id": new.id, "at_block": st.blocks_done}

        # Awaited here, not in the background: the connection's later controls must not reach the source before
        # the fork point (an un-pause or a steer sent after session.fork is the source's alone).  This holds the
        # connection's reading for up to one block.
        await self._answer_when_done(ev, receipt["event"], done())
        return receipt

    async def _received(self, ev) -> dict:
        """The first receipt of a control: its event number on this connection (1, 2, ...)."""
        self.events += 1
        answer = {"type": "control.received", "event_id": ev.event_id, "event": self.events, "control": ev.type,
                  "session_id": self.rec.id}
        await self.emit(answer)
        return answer

    def _when_applied(self, ev, number: int, work) -> None:
        """The second receipt, when ``work`` finishes: its answer, or an ``error`` carrying the event number."""
        task = asyncio.create_task(self._answer_when_done(ev, number, work))
        self.applying.add(task)
        task.add_done_callback(self.applying.discard)

    async def _answer_when_done(self, ev, number: int, work) -> None:
        sid = self.rec.id
        try:
            answer = await work
        except ApiError as exc:
            return await self.emit({"type": "error", "status": exc.status, "code": exc.code, "message": exc.message,
                                    "param": exc.param, "event_id": ev.event_id, "event": number})
        await self.emit({**answer, "event_id": ev.event_id, "event": number, "session_id": sid})

    async def _on_cancel(self, ev) -> dict | None:
        if self.rec is None:
            await self.error(409, "type: no session to cancel", "type", "no_session", ev.event_id)
            return None
        await asyncio.to_thread(self.rec.handle.cancel)
        answer = {"type": "session.cancelled", "event_id": ev.event_id, "session_id": self.rec.id}
        await self.emit(answer)
        return answer

    async def _on_stop(self, ev) -> dict | None:
        return await self._on_cancel(ev)

    async def _on_ping(self, ev) -> dict | None:
        answer = {"type": "session.pong", "event_id": ev.event_id}
        await self.emit(answer)
        return answer

    # ---- the stream's blocks --------------------------------------------------------------------------------
    async def _produce(self, rec, slow_client: str, include_latents: bool, start_block: int = 0) -> None:
        rt = self.state.runtime
        renderer = BlockRenderer(rt.decoder(), JpegEncoder(self.settings.jpeg_quality))
        dropped = 0
        async for blk in stream_blocks(rec.handle):
            px = await asyncio.to_thread(renderer.pixels, blk.latents)  # every block: the decoder keeps state
            first = blk.block * len(px)  # by index: after a rollback the regenerated blocks come again
            if blk.block < start_block:  # a resumed session: delivered before the connection was lost
                continue
            if slow_client == "drop" and self.out.full():
                dropped += len(px)
                continue
            jpegs = await asyncio.to_thread(renderer.jpegs, px)
            st = await asyncio.to_thread(rec.handle.status)
            header = {
                "type": "video.block",
                "session_id": rec.id,
                "block": blk.block,
                "frames": len(jpegs),
                "first_frame": first,
                "last": blk.done,
                "pages_held": st.pages_held,
                "pages_reserved": st.pages_reserved,
                "dropped_frames": dropped,
            }
            binaries = list(jpegs)
            if include_latents:
                lat = blk.latents.float().contiguous().numpy().astype("<f4")
                header["latents_shape"] = list(lat.shape)
                binaries.append(np.ascontiguousarray(lat).tobytes())
            await self.emit(header, tuple(binaries))
        st = await asyncio.to_thread(rec.handle.status)
        await self.emit(
            {
                "type": "session.done",
                "session_id": rec.id,
                "state": st.state,
                "blocks_done": st.blocks_done,
                "error": st.error,
                "dropped_frames": dropped,
            }
        )


def _retry(exc: ApiError) -> dict:
    retry = (exc.headers or {}).get("Retry-After")
    return {"retry_after": int(retry)} if retry else {}
