"""Declared policy parameters: each field's allowed range, stated once and used by validation and the schema.

A policy field is declared with ``param(default, doc=..., ge=/gt=/le=/lt=/choices=)``; the range lives in the
dataclass field's metadata.  ``check_params(obj)`` (called by every policy's ``__post_init__``) checks each
declared field's type and range and raises one ``ConfigError`` naming the parameter and the allowed range;
``field_schema`` describes the same field for ``policy_schema`` (GET /v1/policies).  Invariants:
  * a value of the wrong type never passes: ``True`` is not an integer, ``3.0`` is not an integer, ``"1"`` is
    not a number; an integer is accepted where a number is expected;
  * numbers are finite (NaN and inf are refused everywhere);
  * a subclass that only changes a field's default keeps the range its base class declared (looked up along
    the MRO), so a range is never declared twice.
Types come from the field annotations (``int``, ``float``, ``bool``, ``str``, optionally ``| None``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ff_engine.errors import ConfigError

#: policies derive per-(block, layer) generator seeds from theirs (``seed * 1000003 + ...``): 32 bits keep that
#: far inside torch's 64-bit seed range
MAX_POLICY_SEED = 2**32 - 1

#: upper bounds of parameters whose declaration has none (or a looser one): the tighter of the two applies
#: everywhere (validation, ``GET /v1/policies``, ``--policy-arg``).  Each is past any useful value: the work a
#: policy does per block grows with these (queries scored, ranks, positions), so an unbounded one is a cost
#: amplifier for anyone who can send a request.
UPPER_BOUNDS: dict[str, float] = {
    "num_queries": 4096,  # h2o / snapkv: queries per layer per block (defaults 256 / 64)
    "n_sink": 4096,  # expected attention: sink tokens (default 4)
    "n_future_positions": 4096,  # expected attention: positions the RoPE rotation is averaged over (default 512)
    "epsilon": 10.0,  # added to attention scores (in [0, 1]) before the value-norm rescaling
    "cov_rank": 512,  # eigenpairs of a head_dim x head_dim covariance (head_dim <= 256 in every adapter)
    "merge_rank": 512,  # the same
    "sink_frames": 65536,  # latent frames (the budget must hold them anyway)
    "key_tol": 1e4,
    "value_tol": 1e4,
    "merge_key_tol": 1e4,
    "merge_value_tol": 1e4,
}

_JSON_TYPES = {"int": "integer", "float": "number", "bool": "boolean", "str": "string"}
_ARTICLES = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string"}


@dataclass(frozen=True)
class Range:
    """Allowed values of one parameter: bounds (``ge``/``gt`` below, ``le``/``lt`` above) or ``choices``."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None

    def contains(self, v) -> bool:
        if self.choices is not None:
            return v in self.choices
        return (
            (self.ge is None or v >= self.ge)
            and (self.gt is None or v > self.gt)
            and (self.le is None or v <= self.le)
            and (self.lt is None or v < self.lt)
        )

    def describe(self) -> str:
        """'>= 1', 'in [0, 1)', "one of 'cheap', 'exact'" (empty when unbounded)."""
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        lo = (self.ge, "[") if self.ge is not None else (self.gt, "(") if self.gt is not None else None
        hi = (self.le, "]") if self.le is not None else (self.lt, ")") if self.lt is not None else None
        if lo and hi:
            return f"in {lo[1]}{_num(lo[0])}, {_num(hi[0])}{hi[1]}"
        if lo:
            return f"{'>=' if lo[1] == '[' else '>'} {_num(lo[0])}"
        if hi:
            return f"{'<=' if hi[1] == ']' else '<'} {_num(hi[0])}"
        return ""


def _num(x) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def param(default: Any = dataclasses.MISSING, *, doc: str, ge=None, gt=None, le=None, lt=None, choices=None):
    """A policy dataclass field with its allowed range and a one-line description (see the module docstring)."""
    rng = Range(ge, gt, le, lt, tuple(choices) if choices is not None else None)
    return field(default=default, metadata={"range": rng, "doc": doc})


def range_of(f: dataclasses.Field) -> Range:
    """The declared range of ``f`` with its ``UPPER_BOUNDS`` cap applied (the tighter upper bound wins)."""
    rng: Range = f.metadata["range"]
    cap = UPPER_BOUNDS.get(f.name)
    if cap is None or rng.choices is not None:
        return rng
    if rng.lt is not None and rng.lt <= cap or rng.le is not None and rng.le <= cap:
        return rng
    cap = int(cap) if f.type in ("int", "int | None", int) and float(cap).is_integer() else cap
    return dataclasses.replace(rng, le=cap, lt=None)


def _declared(cls: type, name: str) -> dataclasses.Field | None:
    """The field ``name`` as first declared with a range along the MRO (a subclass may only change defaults)."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and "range" in f.metadata:
            return f
    return None


def _type_of(f: dataclasses.Field) -> tuple[str, bool]:
    """(base type name, None allowed) from the annotation: 'int | None' -> ('int', True)."""
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    parts = [p.strip() for p in t.replace("Optional[", "").rstrip("]").split("|")]
    base = [p for p in parts if p != "None"]
    if len(base) != 1 or base[0] not in _JSON_TYPES:
        raise TypeError(f"policy parameter {f.name}: annotation {t!r} is not int/float/bool/str (| None)")
    return base[0], "None" in parts


def parse_text(name: str, raw: str, f: dataclasses.Field):
    """A parameter given as text (``--policy-arg k=v``) read as its declared type: booleans as true/false/1/0,
    'none' as None where the declaration allows it; the range is checked later by the policy itself."""
    base, nullable = _type_of(f)
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if base == "bool":
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return raw.lower() in ("true", "1")
        if nullable and base == "int" and raw.lower() == "none":
            return None
        if base == "int":
            return int(raw)
        if base == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"policy parameter {name}: cannot read {raw!r} as {t}") from None
    return raw


def declared_params(cls: type) -> dict[str, dataclasses.Field]:
    """Init fields of a policy dataclass that carry a declared range, in declaration order."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.init and not f.name.startswith("_"):
            d = _declared(cls, f.name)
            if d is not None:
                out[f.name] = d
    return out


def allowed(f: dataclasses.Field) -> str:
    """Human description of a declared field's allowed values: 'an integer >= 1 or None'."""
    base, nullable = _type_of(f)
    rng = range_of(f)
    text = rng.describe() if rng.choices is not None else f"{_ARTICLES[base]} {rng.describe()}".strip()
    return text + (" or None" if nullable else "")


def check_range(name: str, value, f: dataclasses.Field) -> None:
    """Raise ``ConfigError`` unless ``value`` has the declared type of ``f`` and lies in its range."""
    base, nullable = _type_of(f)
    if value is None and nullable:
        return
    ok_type = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }[base]
    ok = ok_type and (base != "float" or math.isfinite(value)) and range_of(f).contains(value)
    if not ok:
        raise ConfigError(f"policy parameter {name} must be {allowed(f)}, got {value!r}")


def check_params(obj) -> None:
    """Check every declared parameter of a policy (or policy component) dataclass instance."""
    for name, f in declared_params(type(obj)).items():
        check_range(name, getattr(obj, name), f)


def field_schema(cls: type, name: str) -> dict:
    """JSON-schema-style description of one declared field (type, default, bounds or enum, nullable)."""
    f = declared_params(cls)[name]
    base, nullable = _type_of(f)
    rng = range_of(f)
    default = next(g for g in dataclasses.fields(cls) if g.name == name).default
    out = {
        "type": _JSON_TYPES[base],
        "default": default,
        "nullable": nullable,
        "description": f.metadata["doc"],
        "allowed": allowed(f),
    }
    for key, bound in (
        ("minimum", rng.ge),
        ("exclusiveMinimum", rng.gt),
        ("maximum", rng.le),
        ("exclusiveMaximum", rng.lt),
    ):
        if bound is not None:
            out[key] = bound
    if rng.choices is not None:
        out["enum"] = list(rng.choices)
    return out
