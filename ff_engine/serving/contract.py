"""The serving contract: what a server (HTTP, WebSocket, CLI) sees of a running engine, local or distributed.

Two implementations share it, so the server never knows which one it talks to:
  * ``ff_engine.serving.LocalService``: one ``Engine`` + ``Scheduler`` stepped by a background thread.
  * ``ff_engine.serving.RayCluster``: one ``EngineWorker`` Ray actor per GPU (CPU workers without GPUs),
    a router that places streams by free page budget and keeps every block of a stream on its worker.

A stream's life: ``submit`` -> ``queued`` -> ``running`` -> one of ``finished`` / ``failed`` / ``cancelled``
(terminal).  Every finished block is handed to consumers in order, exactly once per consumer, as a
``StreamBlock``; a terminal stream's handle keeps answering ``status()``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ff_engine.errors import Overloaded, UnknownStream  # noqa: F401 - the contract's errors (defined below the engine, which raises Overloaded)

STREAM_STATES = ("queued", "running", "parked", "finished", "failed", "cancelled")  # parked: no pages held
TERMINAL_STATES = ("finished", "failed", "cancelled")


@dataclass
class StreamBlock:
    """One finished block of a stream: latents [F, C, H, W] (float32, CPU), its index, whether it is the last."""

    stream_id: str
    block: int
    latents: torch.Tensor
    done: bool


@dataclass
class StreamStatus:
    id: str
    state: str  # one of STREAM_STATES
    blocks_done: int
    num_blocks: int
    pages_held: int = 0
    pages_reserved: int = 0
    worker: str | None = None
    error: str | None = None
    resumed: int = 0  # times the stream was restored from a snapshot after its worker died
    output_dir: str | None = None  # where the worker persisted its blocks (when the service persists)
    extra: dict = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


class StreamHandle(Protocol):
    id: str

    def status(self) -> StreamStatus: ...

    def blocks(self, timeout: float | None = None) -> Iterator[StreamBlock]:
        """Blocks as they are produced, from the first, ending after the last (or when the stream ends early:
        then ``status()`` says why). ``timeout``: seconds to wait for the next block before ``TimeoutError``."""
        ...

    def ablocks(self) -> AsyncIterator[StreamBlock]: ...

    def cancel(self) -> None:
        """Cancel a queued or running stream; its pages return to the pool at once. Idempotent."""
        ...

    def update(self, prompt: torch.Tensor, recache_frames: int | None = None) -> int | None:
        """Switch the stream to ``prompt`` ([L, text_dim] text embeddings) from the next block boundary of the
        stream on (LongLive's switch with KV re-cache, ``Engine.switch_prompt``; ``recache_frames`` as there).
        Updates apply in the order sent.  A running stream's update is applied by its worker between two steps
        and this call waits for that (about two blocks at most); a queued stream's request takes the new prompt
        (its shape is then checked at admission, where a bad one fails the stream).  Returns the block index
        from which the new prompt is in force, or None when the service cannot know it yet.  Raises
        ``FFEngineError`` for a bad prompt or ``recache_frames`` (nothing changes) or a terminal stream; a
        re-cache that fails midway ends the stream ``failed`` (its ``status().error`` says why) and raises."""
        ...


class StreamService(Protocol):
    def submit(self, cfg) -> StreamHandle:
        """Queue a ``SessionConfig``. Raises ``FFEngineError`` on bad input (nothing queued) and ``Overloaded``
        when the queue is full."""
        ...

    def get(self, stream_id: str) -> StreamHandle: ...

    def stats(self) -> dict:
        """``{"workers": [{"name", "pages_total", "pages_used", "pages_reserved", "active", "alive"}...],
        "queued": int, "active": int, "finished": int, "failed": int, "cancelled": int, "rejected": int}``"""
        ...

    def shutdown(self) -> None: ...
