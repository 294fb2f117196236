"""Bearer keys: constant-time comparison against every configured key (no early exit, no length leak)."""

from __future__ import annotations

import hmac

from ff_engine.server.errors import ApiError


class KeyCheck:
    def __init__(self, keys: str):
        self.keys = [k.strip().encode() for k in keys.split(",") if k.strip()]

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def check(self, authorization: str | None) -> str | None:
        """The key given in an ``Authorization: Bearer`` header; ``ApiError(401)`` when keys are required and it
        is missing or matches none.  Returns None when no key is configured."""
        if not self.keys:
            return None
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError(
                401,
                "authorization: missing 'Authorization: Bearer <key>' header",
                "authorization",
                "missing_api_key",
                {"WWW-Authenticate": "Bearer"},
            )
        candidate = given.strip().encode()
        ok = False
        for key in self.keys:  # every key is compared, whatever matched before
            ok |= hmac.compare_digest(candidate, key)
        if not ok:
            raise ApiError(
                401,
                "authorization: invalid API key",
                "authorization",
                "invalid_api_key",
                {"WWW-Authenticate": "Bearer"},
            )
        return given.strip()


class BearerAuth:
    """Pure ASGI middleware: every HTTP path but ``public`` needs a valid key; the key is put in
    ``scope["state"]["key"]``.  WebSocket connections are checked by their route (a browser cannot set headers
    on a WebSocket, so it may send the key as the subprotocol ``bearer.<key>``)."""

    def __init__(self, app, keys: KeyCheck, public: tuple[str, ...], public_prefixes: tuple[str, ...]):
        self.app, self.keys, self.public, self.prefixes = app, keys, public, public_prefixes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not (scope["path"] in self.public or scope["path"].startswith(self.prefixes)):
            headers = dict(scope["headers"])
            try:
                key = self.keys.check(headers.get(b"authorization", b"").decode("latin-1") or None)
            except ApiError as exc:
                return await exc.response()(scope, receive, send)
            scope.setdefault("state", {})["key"] = key
        await self.app(scope, receive, send)
