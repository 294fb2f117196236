"""What ``LocalService`` and ``RayCluster`` share: the ``StreamService`` calls, answered by their router.

The two differ only in how they start and reach their workers (an in-process endpoint or Ray actors); every
stream-level call goes to the one ``Router`` they both drive.
"""

from __future__ import annotations

import torch

from ff_engine.engine.session import SessionConfig
from ff_engine.serving.stream_table import Handle


class RoutedService:
    """Mixin: ``self.router`` is a ``ff_engine.serving.router.Router``."""

    router: object

    def submit(self, cfg: SessionConfig) -> Handle:
        return self.router.submit(cfg)

    def get(self, stream_id: str) -> Handle:
        return self.router.get(stream_id)

    def cancel(self, stream_id: str) -> None:
        self.router.cancel(stream_id)

    def update(self, stream_id: str, prompt: torch.Tensor, recache_frames: int | None = None) -> int | None:
        """``StreamHandle.update`` of stream ``stream_id`` (``Router.update``)."""
        return self.router.update(stream_id, prompt, recache_frames)

    def control(self, stream_id: str, ctrl):
        """``Router.control``: a ``Steer`` / ``Pause`` / ``Rollback``; a future of the block it applies at."""
        return self.router.control(stream_id, ctrl)

    def fork(self, stream_id: str, fork_id: str | None = None) -> Handle:
        """``Router.fork``: the fork's handle."""
        return self.router.fork(stream_id, fork_id)

    def stats(self) -> dict:
        return self.router.stats()
