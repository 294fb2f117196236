"""Request body limit (pure ASGI): a body larger than ``max_bytes`` is answered 413 before any route sees it.

The body is read here (up to the limit) and replayed to the app, so a client that lies in ``Content-Length`` or
sends chunked data is held to the same bound.  Request bodies of this API are small JSON documents.
"""

from __future__ import annotations

from ff_engine.server.errors import ApiError


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(scope, receive, send)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            size += len(msg.get("body", b""))
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        err = ApiError(413, f"body: larger than the {self.max_bytes}-byte limit", "body", "body_too_large")
        await err.response()(scope, receive, send)
