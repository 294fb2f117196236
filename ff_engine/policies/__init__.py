"""Cache policies, selectable by name (``make_policy``) or as objects."""

from __future__ import annotations

import dataclasses
import sys

from ff_engine.errors import ConfigError
from ff_engine.policies.base import CachePolicy, CompressContext, LayerTokens, top_tokens
from ff_engine.policies.baselines import H2O, DeepSink, KeyNorm, PostRopeExpectedAttention, Random, SnapKV
from ff_engine.policies.expected_attention import ExpectedAttention
from ff_engine.policies.forcing_kv import ForcingKV
from ff_engine.policies.future_forcing import FutureForcing, FutureQueryProxy
from ff_engine.policies.params import declared_params, field_schema, parse_text
from ff_engine.policies.window import SinkWindow, Unbounded, Window

POLICIES: dict[str, type[CachePolicy]] = {
    p.name: p
    for p in (Unbounded, Window, SinkWindow, DeepSink, H2O, SnapKV, ExpectedAttention, PostRopeExpectedAttention,
              FutureForcing, Random, KeyNorm, ForcingKV)
}


def policy_params(name: str) -> dict[str, type]:
    """Constructor parameters of a policy and their annotated types (every one declares its range)."""
    cls = POLICIES.get(name) if isinstance(name, str) else None
    if cls is None or not dataclasses.is_dataclass(cls):
        return {}
    return {n: f.type for n, f in declared_params(cls).items()}


def parse_policy_args(name: str, raw: dict[str, str]) -> dict:
    """Parameters given as text (the CLI's ``--policy-arg k=v``), each read as the type its policy declares
    (``params.param``), so the CLI needs no type rules of its own.  Unknown names pass through untyped:
    ``make_policy`` rejects them (and unknown policies) with one message."""
    cls = POLICIES.get(name) if isinstance(name, str) else None
    declared = declared_params(cls) if cls is not None and dataclasses.is_dataclass(cls) else {}
    return {k: parse_text(k, v, declared[k]) if k in declared else v for k, v in raw.items()}


def policy_schema(name: str) -> dict:
    """What ``make_policy(name, **params)`` accepts: each parameter's type, default and allowed range (JSON-schema
    keywords: ``minimum`` / ``exclusiveMaximum`` / ``enum``...), from the ranges the policy declares (``param``);
    the same declarations validate every policy object, so the schema cannot drift from what is enforced."""
    cls = _policy_class(name)
    doc = (cls.__doc__ or "").strip()
    if doc.startswith(f"{cls.__name__}("):  # the dataclass's generated signature: the module says what it is
        doc = (sys.modules[cls.__module__].__doc__ or "").strip()
    doc = " ".join(doc.split("\n\n")[0].split())
    params = {p: field_schema(cls, p) for p in declared_params(cls)}
    return {"name": name, "bounded": cls.bounded, "description": doc, "parameters": params}


def _policy_class(name) -> type[CachePolicy]:
    if not isinstance(name, str) or name not in POLICIES:
        raise ConfigError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name]


def make_policy(name: str, **params) -> CachePolicy:
    """A policy by name; ``ConfigError`` (one line naming the parameter and its allowed range) for an unknown
    name, an unknown parameter or a value of the wrong type or out of range."""
    _policy_class(name)
    known = policy_params(name)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(f"policy {name!r} has no parameter(s) {unknown}; it takes {sorted(known)}")
    try:
        return POLICIES[name](**params)
    except TypeError as exc:
        raise ConfigError(f"bad parameters for policy {name!r}: {exc}") from None


__all__ = [
    "H2O",
    "POLICIES",
    "CachePolicy",
    "CompressContext",
    "DeepSink",
    "ExpectedAttention",
    "FutureForcing",
    "FutureQueryProxy",
    "KeyNorm",
    "LayerTokens",
    "PostRopeExpectedAttention",
    "Random",
    "SinkWindow",
    "SnapKV",
    "Unbounded",
    "Window",
    "make_policy",
    "parse_policy_args",
    "policy_params",
    "policy_schema",
    "top_tokens",
]
