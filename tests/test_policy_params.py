"""Policy parameters: every field declares its range once; ``make_policy`` refuses anything outside it with one
``ConfigError`` naming the parameter, and ``policy_schema`` publishes exactly what is enforced."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ff_engine.errors import ConfigError
from ff_engine.policies import POLICIES, make_policy, policy_params, policy_schema


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_parameter_is_declared_and_published(name):
    cls = POLICIES[name]
    init = {f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
    schema = policy_schema(name)
    json.dumps(schema)  # the server publishes it as is
    assert set(schema["parameters"]) == init == set(policy_params(name))
    assert schema["bounded"] == cls.bounded and schema["description"]
    defaults = make_policy(name)
    for p, s in schema["parameters"].items():
        assert {"type", "default", "nullable", "allowed", "description"} <= set(s)
        assert s["default"] == getattr(defaults, p)


def _bad_values(s: dict) -> list:
    """Values the schema says are not allowed: past each bound, non-finite, wrong types, outside an enum."""
    step = 1 if s["type"] == "integer" else 0.5
    bad = [None] if not s["nullable"] else []
    if s["type"] in ("integer", "number"):
        bad += [s["minimum"] - step] if "minimum" in s else []
        bad += [s["maximum"] + step] if "maximum" in s else []
        bad += [s[k] for k in ("exclusiveMinimum", "exclusiveMaximum") if k in s]
        bad += [True, "3", float("nan"), float("-inf")] + ([2.5] if s["type"] == "integer" else [])
    elif s["type"] == "boolean":
        bad += [1, "true", 0.0]
    else:
        bad += ["no-such-choice", 3]
    return bad


CASES = [
    (name, p, v)
    for name in sorted(POLICIES)
    for p, s in policy_schema(name)["parameters"].items()
    for v in _bad_values(s)
]


@pytest.mark.parametrize("name,param,value", CASES, ids=[f"{n}.{p}={v!r}" for n, p, v in CASES])
def test_values_outside_the_declared_range_are_one_config_error(name, param, value):
    with pytest.raises(ConfigError, match=rf"^policy parameter {param} must be .*, got ") as err:
        make_policy(name, **{param: value})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "name,params",
    [
        ("h2o", {"num_queries": -1}),
        ("snapkv", {"kernel": 0}),
        ("future-forcing", {"merge_key_tol": float("nan")}),
        ("future-forcing", {"candidate_oversample": float("nan")}),
        ("expected-attention-post-rope", {"merge": "mean"}),
        ("expected-attention", {"n_future_positions": 0}),
        ("deep-sink", {"sink_frames": -1}),
        ("random", {"seed": 2**70}),
    ],
)
def test_the_values_the_issue_found_accepted_are_refused(name, params):
    with pytest.raises(ConfigError, match=next(iter(params))):
        make_policy(name, **params)


def test_boundary_values_and_none_are_accepted_where_declared():
    ff = make_policy(
        "future-forcing",
        horizon=64,
        decay=0,
        window=None,
        cov_rank=None,
        candidate_oversample=1,
        merge_key_tol=0.0,
        form="moment",
    )
    assert ff.horizon == 64 and ff.window is None and ff.proxy.form == "moment"
    assert make_policy("snapkv", kernel=1024, num_queries=1).kernel == 1024
    assert policy_schema("random")["parameters"]["seed"]["allowed"] == "an integer in [0, 4294967295]"
    with pytest.raises(ConfigError, match="decay"):
        make_policy("future-forcing", decay=1.0)  # exclusive bound


def test_subclasses_keep_their_base_range_with_their_own_default():
    """PostRopeExpectedAttention only changes Future Forcing's defaults; DeepSink SinkWindow's."""
    ea = policy_schema("expected-attention-post-rope")["parameters"]
    assert ea["merge"]["default"] == "none" and ea["merge"]["enum"] == ["none", "log-mass", "affine"]
    assert policy_schema("deep-sink")["parameters"]["sink_frames"] == {
        **policy_schema("sink-window")["parameters"]["sink_frames"],
        "default": 6,
    }


def test_unknown_policy_or_parameter():
    with pytest.raises(ConfigError, match="unknown policy"):
        policy_schema("lru")
    with pytest.raises(ConfigError, match="unknown policy"):
        make_policy(["window"])
    with pytest.raises(ConfigError, match="no parameter"):
        make_policy("window", budget=3)
