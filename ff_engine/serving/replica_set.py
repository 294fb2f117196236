"""The running engine replicas of each Serve deployment, as Serve last told a request router in this process."""

from __future__ import annotations

import threading

_MEMBERS: dict[tuple[str, str], set[str]] = {}
_LOCK = threading.Lock()


def publish(app: str, deployment: str, names: set[str]) -> None:
    with _LOCK:
        _MEMBERS[(app, deployment)] = set(names)


def members(app: str, deployment: str) -> set[str] | None:
    """The replica names, or None before Serve's first report."""
    with _LOCK:
        m = _MEMBERS.get((app, deployment))
        return None if m is None else set(m)
