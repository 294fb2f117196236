"""Request and event models: every field typed strictly, bounded, and unknown fields refused.

Bounds come in two layers: absolute caps here (so no request can ask for unbounded work), and the served
server's own limits (``RequestLimits``: ``--max-seconds``, the model's block size) through ``request_model(limits)``.
No RoPE table bounds a stream (adapters compute angles for any frame); memory does, at admission.
Policy parameters are validated by a pydantic model built from the policy's declared fields
(``ff_engine.policies.policy_schema``): a name the policy does not declare, a wrong type or a value out of its
range is refused before anything is built.  A ``ValidationError`` becomes one message naming the field
(``first_error``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from ff_engine.errors import ConfigError

MAX_FRAMES_CAP = 2**31 - 2**16  # latent frames: int32 token positions (engine.MAX_STREAM_FRAMES); --max-seconds binds
MAX_SECONDS_CAP = 86400.0  # the largest --max-seconds
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
EVENT_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
MAX_ACTIONS = 65536  # per-frame entries of one request or control (a held last entry covers the rest)
MAX_COND_WIDTH = 64  # values per conditioning row (Matrix-Game: keyboard 4-7, mouse 2)
Action = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")] | Annotated[int, Field(ge=0, le=1023)]
Rows = list[Annotated[list[Annotated[float, Field(allow_inf_nan=False)]], Field(min_length=1,
                                                                                 max_length=MAX_COND_WIDTH)]]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


@dataclass(frozen=True)
class RequestLimits:
    """What the server allows: latent frames (``--max-seconds`` in the model's latent frames), latent frames per
    second of video, block size."""

    max_frames: int
    latent_fps: float  # latent frames per second of video
    frames_per_block: int
    default_seconds: float = 5.0
    default_budget_frames: int = 6

    @property
    def max_seconds(self) -> float:
        return self.max_frames / self.latent_fps


class VideoRequest(Strict):
    """``POST /v1/videos`` and the generation fields of ``session.start``."""

    model: str | None = Field(None, max_length=256, description="must name the served model when given")
    seconds: float | None = Field(None, gt=0, le=MAX_SECONDS_CAP, allow_inf_nan=False)
    frames: int | None = Field(None, ge=1, le=MAX_FRAMES_CAP, description="latent frames (instead of seconds)")
    seed: int = Field(0, ge=0, le=2**63 - 1)
    policy: str = Field("window", pattern=r"^[a-z0-9-]{1,64}$")
    policy_params: dict[str, Any] = Field(default_factory=dict, max_length=32)
    budget_frames: int | None = Field(None, ge=0, le=MAX_FRAMES_CAP, description="latent frames of KV kept")
    prompt: str | None = Field(None, pattern=NAME_PATTERN, description="name of a server-side prompt embedding")
    actions: list[Action] | None = Field(None, max_length=MAX_ACTIONS,
                                         description="per latent frame, action names or indices; the last is held")
    conditioning: dict[str, Rows] | None = Field(None, max_length=8, description="per-pixel-frame rows by field")
    prefix_frames: int | None = Field(None, ge=0, le=4096, description="in-repo world models: latent frames of "
                                      "the world (seed) prefilled and streamed first; 0 / None: from noise")

    @model_validator(mode="after")
    def _one_length(self):
        if self.seconds is not None and self.frames is not None:
            raise FieldError("frames", "give seconds or frames, not both")
        return self

    @model_validator(mode="after")
    def _policy_params(self):
        self.policy_params = validate_policy_params(self.policy, self.policy_params)
        return self

    def latent_frames(self, geometry, limits: RequestLimits) -> int:
        """``frames``, or ``seconds`` (default ``limits.default_seconds``) in the model's latent frames."""
        if self.frames is not None:
            return self.frames
        return geometry.latent_frames(self.seconds if self.seconds is not None else limits.default_seconds)


_LIMITED: dict[tuple, type[VideoRequest]] = {}


def request_model(limits: RequestLimits, base: type[VideoRequest] = VideoRequest) -> type[VideoRequest]:
    """``base`` with the served model's bounds on ``seconds``, ``frames`` and ``budget_frames``."""
    key = (limits, base)
    if key not in _LIMITED:
        _LIMITED[key] = create_model(
            f"{base.__name__}For{limits.max_frames}",
            __base__=base,
            seconds=(float | None, Field(None, gt=0, le=limits.max_seconds, allow_inf_nan=False)),
            frames=(int | None, Field(None, ge=1, le=limits.max_frames)),
            budget_frames=(int | None, Field(None, ge=0, le=limits.max_frames)),
        )
    return _LIMITED[key]


# ---- policy parameters -------------------------------------------------------------------------------------
_TYPES = {"integer": int, "number": float, "boolean": bool, "string": str}
_BOUNDS = {"minimum": "ge", "maximum": "le", "exclusiveMinimum": "gt", "exclusiveMaximum": "lt"}


def policy_schema(name: str) -> dict:
    """``ff_engine.policies.policy_schema`` (``ConfigError`` for an unknown policy)."""
    from ff_engine.policies import policy_schema as schema

    return schema(name)


@functools.lru_cache(maxsize=64)
def policy_params_model(name: str) -> type[BaseModel]:
    """A strict pydantic model of the policy's declared parameters (JSON-schema type, bounds, enum)."""
    specs = {}
    for pname, f in policy_schema(name)["parameters"].items():
        typ: Any = Literal[tuple(f["enum"])] if f.get("enum") else _TYPES[f["type"]]
        if f.get("nullable"):
            typ = typ | None
        bounds = {kw: f[key] for key, kw in _BOUNDS.items() if key in f and not f.get("enum")}
        if f["type"] == "number":
            bounds["allow_inf_nan"] = False
        if f["type"] == "string" and not f.get("enum"):
            bounds["max_length"] = 256
        specs[pname] = (typ, Field(None, **bounds))
    return create_model(f"PolicyParams_{name.replace('-', '_')}", __base__=Strict, **specs)


def validate_policy_params(policy: str, params: dict) -> dict:
    """The given parameters, checked against the policy's declared fields; raises ``ValueError`` (pydantic
    turns it into a validation error) naming ``policy`` or ``policy_params.<name>``."""
    try:
        model = policy_params_model(policy)
    except ConfigError as exc:
        raise FieldError("policy", str(exc).removeprefix("policy: ")) from None
    try:
        checked = model.model_validate(params)
    except ValidationError as exc:
        field, msg = first_error(exc)
        raise FieldError(f"policy_params.{field}" if field else "policy_params", msg) from None
    return {k: getattr(checked, k) for k in params}


class FieldError(ValueError):
    """A validator's error that names its field (pydantic's own location is the model for model validators)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def first_error(exc: ValidationError) -> tuple[str, str]:
    """``(field path, message)`` of a pydantic error, the path dotted (``policy_params.horizon``)."""
    err = exc.errors(include_url=False)[0]
    ctx_err = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_err, FieldError):
        return ctx_err.field, str(ctx_err).split(": ", 1)[1]
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("constrained-"))  # union member tags
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    elif err["type"] == "json_invalid":
        msg = "body is not valid JSON (" + err["msg"].removeprefix("Invalid JSON: ") + ")"
    return loc, msg


# ---- WebSocket client events (vLLM-Omni /v1/realtime/video shapes) ---------------------------------------------
class ClientEvent(Strict):
    event_id: str | None = Field(None, pattern=EVENT_ID_PATTERN)


class SessionStart(VideoRequest):
    type: Literal["session.start"]
    event_id: str | None = Field(None, pattern=EVENT_ID_PATTERN)
    slow_client: Literal["wait", "drop"] = "wait"
    include_latents: bool = False


class ControlBody(Strict):
    """``POST /v1/videos/{id}/update`` and the fields of ``session.update``: what changes from the stream's next
    block on.  ``actions`` steer an action-conditioned model (names or indices per latent frame, the last one
    held); ``conditioning`` replaces per-pixel-frame rows from the end of what the stream holds; ``paused``
    stops or restarts it (a paused stream is parked after ``--park-after`` seconds; an action resumes it)."""

    prompt: str | None = Field(None, pattern=NAME_PATTERN)
    actions: list[Action] | None = Field(None, min_length=1, max_length=MAX_ACTIONS)
    conditioning: dict[str, Rows] | None = Field(None, min_length=1, max_length=8)
    paused: bool | None = None


class RollbackBody(Strict):
    blocks: int = Field(1, ge=1, le=64, description="blocks to undo (at most the server's --undo-blocks)")


class SessionUpdate(ControlBody):
    type: Literal["session.update"]
    event_id: str | None = Field(None, pattern=EVENT_ID_PATTERN)
    policy_params: dict[str, Any] | None = Field(None, max_length=32)


class SessionFork(ClientEvent):
    type: Literal["session.fork"]


class SessionRollback(RollbackBody):
    type: Literal["session.rollback"]
    event_id: str | None = Field(None, pattern=EVENT_ID_PATTERN)


class SessionCancel(ClientEvent):
    type: Literal["session.cancel", "session.stop"]


class SessionPing(ClientEvent):
    type: Literal["session.ping"]


class SessionResume(ClientEvent):
    type: Literal["session.resume"]
    session_id: str = Field(pattern=r"^vid_[0-9a-f]{32}$")
    from_block: int | None = Field(None, ge=0, le=MAX_FRAMES_CAP)
    include_latents: bool = False


CLIENT_EVENTS = {
    "session.start": SessionStart,
    "session.update": SessionUpdate,
    "session.fork": SessionFork,
    "session.rollback": SessionRollback,
    "session.cancel": SessionCancel,
    "session.stop": SessionCancel,
    "session.ping": SessionPing,
    "session.resume": SessionResume,
}
