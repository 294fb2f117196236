"""Cache policies, selectable by name (``make_policy``) or as objects."""

from __future__ import annotations

from ff_engine.errors import ConfigError
from ff_engine.policies.base import CachePolicy, LayerTokens, top_tokens
from ff_engine.policies.window import SinkWindow, Unbounded, Window

POLICIES: dict[str, type[CachePolicy]] = {
    "unbounded": Unbounded,
    "window": Window,
    "sink-window": SinkWindow,
}


def make_policy(name: str, **params) -> CachePolicy:
    if name not in POLICIES:
        raise ConfigError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    try:
        return POLICIES[name](**params)
    except TypeError as exc:
        raise ConfigError(f"bad parameters for policy {name!r}: {exc}") from None


__all__ = ["CachePolicy", "LayerTokens", "top_tokens", "Unbounded", "Window", "SinkWindow", "POLICIES", "make_policy"]
