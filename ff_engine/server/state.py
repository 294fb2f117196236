"""The app's typed state: what every route needs, built once at startup (``app.state.ff``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, WebSocket

from ff_engine.server.auth import KeyCheck
from ff_engine.server.prometheus import ServerMetrics
from ff_engine.server.runtime import Runtime
from ff_engine.server.settings import ServerSettings
from ff_engine.server.stream_registry import StreamRegistry


@dataclass
class AppState:
    settings: ServerSettings
    keys: KeyCheck
    runtime: Runtime
    metrics: ServerMetrics
    registry: StreamRegistry
    request_model: type
    loop: asyncio.AbstractEventLoop


def app_state(request: Request) -> AppState:
    """FastAPI dependency: the app's state."""
    return request.app.state.ff


def ws_state(ws: WebSocket) -> AppState:
    return ws.app.state.ff


State = Annotated[AppState, Depends(app_state)]  # a route's typed state parameter
