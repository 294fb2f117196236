"""Cache policies, selectable by name (``make_policy``) or as objects."""

from __future__ import annotations

import dataclasses

from ff_engine.errors import ConfigError
from ff_engine.policies.base import CachePolicy, CompressContext, LayerTokens, top_tokens
from ff_engine.policies.baselines import H2O, DeepSink, ExpectedAttention, KeyNorm, Random, SnapKV
from ff_engine.policies.future_forcing import FutureForcing, FutureQueryProxy
from ff_engine.policies.window import SinkWindow, Unbounded, Window

POLICIES: dict[str, type[CachePolicy]] = {
    p.name: p
    for p in (Unbounded, Window, SinkWindow, DeepSink, H2O, SnapKV, ExpectedAttention, FutureForcing, Random, KeyNorm)
}


def policy_params(name: str) -> dict[str, type]:
    """Constructor parameters of a policy and their types (for the CLI)."""
    cls = POLICIES.get(name)
    if cls is None or not dataclasses.is_dataclass(cls):
        return {}
    return {f.name: f.type for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}


def make_policy(name: str, **params) -> CachePolicy:
    if name not in POLICIES:
        raise ConfigError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    known = policy_params(name)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(f"policy {name!r} has no parameter(s) {unknown}; it takes {sorted(known)}")
    try:
        return POLICIES[name](**params)
    except TypeError as exc:
        raise ConfigError(f"bad parameters for policy {name!r}: {exc}") from None


__all__ = ["CachePolicy", "CompressContext", "LayerTokens", "top_tokens", "Unbounded", "Window", "SinkWindow",
           "DeepSink", "H2O", "SnapKV", "ExpectedAttention", "FutureForcing", "FutureQueryProxy", "Random",
           "KeyNorm", "POLICIES", "make_policy", "policy_params"]
