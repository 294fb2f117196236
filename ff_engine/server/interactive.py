"""Steering a served stream: the REST and WebSocket controls turned into service controls, with their receipts.

A control is *received* when the service has queued it for the stream's worker (``Router.control``: in order,
under the router's lock, no waiting) and *applied* when the worker has put it in force between two blocks; the
applied receipt carries that block's index.  REST answers once applied; the WebSocket sends both receipts
(``control.received`` at once, then ``session.updated`` / ``session.rolled_back`` / ``session.forked``).
"""

from __future__ import annotations

import asyncio

from ff_engine.errors import FFEngineError
from ff_engine.server.errors import ApiError
from ff_engine.serving.controls import Pause, Rollback, Steer, Update


def controls_of(runtime, sid: str, body) -> list[tuple[str, object]]:
    """``(changed field, control)`` for a ``ControlBody``, in the order they apply: prompt, steering, pause.
    ``ApiError`` 422 naming the field for what the model cannot take (nothing is sent then)."""
    out = []
    try:
        if body.prompt is not None:
            out.append(("prompt", Update(sid, runtime.prompts.load(body.prompt, 0))))
        actions = runtime.action_indices(body.actions) if body.actions is not None else None
        cond = runtime.conditioning(body.conditioning) if body.conditioning is not None else None
    except (FFEngineError, ValueError) as exc:
        msg = str(exc).splitlines()[0]
        raise ApiError(422, msg, msg.split(":")[0].split(" ")[0], "invalid_value") from None
    if actions is not None or cond is not None:
        out.append(("actions" if cond is None else "conditioning" if actions is None else "actions+conditioning",
                    Steer(sid, actions, cond)))
    if body.paused is not None:
        out.append(("paused", Pause(sid, body.paused)))
    if not out:
        raise ApiError(422, "body: nothing to change (prompt, actions, conditioning or paused)", "body",
                       "invalid_value")
    return out


async def send(handle, controls: list[tuple[str, object]]) -> list[asyncio.Future]:
    """Queue every control (received); the returned futures resolve to each one's applied block."""
    def enqueue():
        return [handle.control(c) for _, c in controls]

    try:
        futures = await asyncio.to_thread(enqueue)
    except FFEngineError as exc:  # the stream is terminal (or unknown): nothing was queued
        raise ApiError(409, f"id: {str(exc).splitlines()[0]}", "id", "not_running") from None
    return [asyncio.wrap_future(f) for f in futures]


async def applied(futures: list[asyncio.Future], changed: list[str]) -> int | None:
    """The block from which they are all in force; ``ApiError`` for the first refusal (422, or 409 when the
    stream ended meanwhile)."""
    blocks = []
    for name, fut in zip(changed, futures):
        try:
            blocks.append(await fut)
        except FFEngineError as exc:
            msg = str(exc).splitlines()[0]
            field = name.split("+")[0]
            status, code = (409, "not_running") if "not running" in msg or "ended" in msg else (422, "invalid_value")
            raise ApiError(status, msg if msg.startswith(field) else f"{field}: {msg}", field, code) from None
    known = [b for b in blocks if b is not None]
    return max(known) if known else None


async def rollback(handle, blocks: int) -> int:
    fut = (await send(handle, [("blocks", Rollback(handle.id, blocks))]))[0]
    return await applied([fut], ["blocks"])
