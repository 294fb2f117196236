"""Request body limit (pure ASGI): a body larger than ``max_bytes`` is answered 413 before any route sees it.

The body is read here (up to the limit) and replayed to the app, so a client that lies in ``Content-Length`` or
sends chunked data is held to the same bound.  Request bodies of this API are small JSON documents.
"""

from __future__ import annotations

import asyncio

from ff_engine.server.errors import ApiError


class BodyLimit:
    def __init__(self, app, max_bytes: int, timeout: float = 10.0):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(scope, receive, send)
        try:
            async with asyncio.timeout(self.timeout):
                body = await self._read(receive)
        except TimeoutError:
            err = ApiError(408, f"body: not received within {self.timeout:g} s", "body", "body_timeout")
            return await self._answer(err, scope, receive, send)
        if body is None:  # the client left
            return
        if len(body) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            size += len(msg.get("body", b""))
            chunks.append(msg.get("body", b""))
            if size > self.max_bytes or not msg.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(self, scope, receive, send):
        err = ApiError(413, f"body: larger than the {self.max_bytes}-byte limit", "body", "body_too_large")
        await self._answer(err, scope, receive, send)

    @staticmethod
    async def _answer(err: ApiError, scope, receive, send):
        """Answer here (no route sees it) and count it as the app's error handler would."""
        state = getattr(getattr(scope.get("app"), "state", None), "ff", None)
        if state is not None:
            state.metrics.invalid.labels(str(err.status)).inc()
        await err.response()(scope, receive, send)
