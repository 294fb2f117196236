"""Server settings: every one a ``ff-engine serve`` flag with an ``FF_ENGINE_*`` environment default.

Precedence: flag > environment > built-in default.  The built-in defaults run out of the box on a CPU: the
embedded world model, one local engine, bound to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields

from ff_engine.errors import ConfigError

ENV_PREFIX = "FF_ENGINE_"


@dataclass
class ServerSettings:
    model: str = ""  # checkpoint path or preset; "" = the embedded world model
    random_weights: bool = False
    preset: str = "wan-1.3b"
    num_pages: int = 2048
    page_size: int = 32
    backend: str = "auto"
    max_batch: int = 8
    max_queue: int = 16  # streams waiting for pages; one more is answered 429
    output_dir: str = "out/serve"
    prompts_dir: str = ""  # server-side prompt embeddings, by file stem ("" = none)
    api_key: str = ""  # "" = no key required
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 16384
    max_streams_per_key: int = 8  # streams not yet terminal, per API key
    max_records: int = 256  # terminal streams remembered (oldest forgotten first, files deleted)
    ws_queue_blocks: int = 4  # outgoing blocks buffered per WebSocket session
    jpeg_quality: int = 3  # MJPEG qscale (2 best .. 31 worst)
    ray: str = ""  # "" = local engine; "auto" or a Ray address = serve from the Ray cluster
    workers: int = 1
    ray_serve: bool = False  # with --ray: engine replicas on Ray Serve (ServeCluster) instead of Ray core actors
    autoscale_max: int = 0  # --ray-serve: autoscale between --workers and this many replicas (0 = fixed count)
    ingress_replicas: int = 0  # --ray-serve: N stateless HTTP replicas behind Serve's proxy + a hub (0 = one process)
    torch_threads: int = 0  # intra-op threads of the local engine (0 = torch's default)
    snapshot_every: int = 8  # Ray: blocks between snapshots (0 = none: a dead worker fails its streams)
    max_seconds: int = 600  # longest video one request may ask for (10 min); no RoPE table caps a stream
    max_block_cost: int = 32  # policy work units of one block (ff_engine/server/cost.py)
    max_request_cost: int = 16384  # policy work units of a whole request (blocks x units per block)
    ws_ping_interval: float = 20.0  # seconds between the server's WebSocket pings
    ws_ping_timeout: float = 120.0  # a client that answers no ping this long is closed (1011): wait's bound
    ws_resume_seconds: float = 60.0  # a wait session's stream outlives a lost connection this long (resume by id)
    ws_start_timeout: float = 10.0  # a WebSocket's first session must start within this (vLLM-Omni's default)
    ws_stall_timeout: float = 60.0  # vLLM-Omni sessions: no generation progress and no ping this long -> error
    header_timeout: float = 10.0  # seconds to send a request's headers (slowloris)
    body_timeout: float = 10.0  # seconds to send a request's body
    max_connections_per_client: int = 32  # open connections per client address
    undo_blocks: int = 4  # rollback history per stream (blocks; 0 = no rollback)
    park_after: float = 30.0  # a paused stream is parked (pages back to the pool) after this long; 0 = never

    def validate(self) -> ServerSettings:
        checks = {
            "num_pages": (1, 1 << 24),
            "page_size": (1, 4096),
            "max_batch": (1, 256),
            "max_queue": (0, 1 << 16),
            "port": (0, 65535),
            "max_body_bytes": (256, 1 << 24),
            "max_streams_per_key": (1, 1 << 16),
            "max_records": (1, 1 << 20),
            "ws_queue_blocks": (1, 1024),
            "jpeg_quality": (2, 31),
            "workers": (1, 1024),
            "autoscale_max": (0, 1024),
            "ingress_replicas": (0, 1024),
            "snapshot_every": (0, 1 << 20),
            "torch_threads": (0, 1024),
            "max_seconds": (1, 86400),
            "max_block_cost": (1, 1 << 20),
            "max_request_cost": (1, 1 << 40),
            "ws_ping_interval": (0.05, 3600),
            "ws_ping_timeout": (0.05, 3600),
            "ws_resume_seconds": (0, 3600),
            "ws_start_timeout": (0.05, 3600),
            "ws_stall_timeout": (0.05, 86400),
            "header_timeout": (0.05, 600),
            "body_timeout": (0.05, 600),
            "max_connections_per_client": (1, 1 << 16),
            "undo_blocks": (0, 64),
            "park_after": (0, 86400),
        }
        for name, (lo, hi) in checks.items():
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [{lo}, {hi}], got {v}")
        if self.ray_serve and not self.ray:
            raise ConfigError("--ray-serve needs --ray (local, auto or an address)")
        if self.ray_serve and not self.snapshot_every:
            raise ConfigError("--ray-serve needs --snapshot-every >= 1 (a replica Serve replaces must lose no stream)")
        if self.autoscale_max and (not self.ray_serve or self.autoscale_max < self.workers):
            raise ConfigError("--autoscale-max needs --ray-serve and must be >= --workers (the minimum)")
        if self.ingress_replicas and not self.ray_serve:
            raise ConfigError("--ingress-replicas needs --ray-serve (the ingress replicas are a Serve deployment)")
        return self


def _env(name: str, default):
    raw = os.environ.get(ENV_PREFIX + name.upper())
    if raw is None:
        return default
    if isinstance(default, bool):
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ConfigError(f"{ENV_PREFIX}{name.upper()} must be true or false, got {raw!r}")
        return raw.lower() in ("1", "true", "yes")
    if isinstance(default, (int, float)):
        try:
            return type(default)(raw)
        except ValueError:
            raise ConfigError(f"{ENV_PREFIX}{name.upper()} must be a number, got {raw!r}") from None
    return raw


_HELP = {
    "model": "checkpoint path or preset name (default: the embedded world model)",
    "max_queue": "streams allowed to wait for pages; beyond it POST answers 429 with Retry-After",
    "prompts_dir": "folder of prompt embeddings (.pt / .safetensors), requested by file stem",
    "api_key": "require 'Authorization: Bearer KEY' on every route but /health",
    "host": "bind address (127.0.0.1: this machine only)",
    "ray": "serve from Ray: 'auto' (join the running cluster), an address, or 'local' (start one here)",
    "ray_serve": "with --ray: engine replicas on Ray Serve (health-checked, replaced, scalable) instead of Ray actors",
    "autoscale_max": "with --ray-serve: Serve autoscales engine replicas between --workers and this (0 = fixed)",
    "ingress_replicas": "with --ray-serve: serve HTTP from N stateless Serve replicas over one hub holding the "
                        "streams (0 = HTTP and router in this process)",
    "snapshot_every": "Ray: snapshot each stream every N blocks so a dead worker's streams resume elsewhere",
    "max_block_cost": "policy work units one block may cost (policy_params that cost more: 422)",
    "max_request_cost": "policy work units a request may cost (blocks x units per block)",
    "ws_ping_timeout": "a WebSocket client that answers no ping this long is closed; a 'wait' client may pause this long",
    "ws_resume_seconds": "a 'wait' session's stream outlives a lost connection this long (session.resume by id)",
    "ws_start_timeout": "a WebSocket connection's first session.start (or session.resume) must arrive this soon",
    "ws_stall_timeout": "a vLLM-Omni session with no generation progress and no session.ping this long is stopped",
    "header_timeout": "seconds a client has to send a request's headers",
    "body_timeout": "seconds a client has to send a request's body",
    "max_connections_per_client": "open connections per client address; more are closed at once",
    "undo_blocks": "blocks of rollback history kept per stream (host memory where the policy compacts); 0 = none",
    "park_after": "seconds a paused stream keeps its pages before it is parked to host memory; 0 = never",
    "max_seconds": "longest video (seconds) a request may ask for; streams are endless, memory and this bound them",
}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """One flag per field, its default read from the environment (so ``--help`` shows the effective value)."""
    for f in fields(ServerSettings):
        default = _env(f.name, None if f.name == "api_key" else f.default)
        flag = "--" + f.name.replace("_", "-")
        shown = "set" if f.name == "api_key" and default else default  # never print a key
        help_ = f"{_HELP.get(f.name, '')} [{shown!r}; env {ENV_PREFIX}{f.name.upper()}]".lstrip()
        if isinstance(f.default, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        else:
            ap.add_argument(flag, type=type(f.default), default=default, help=help_)


def from_args(args: argparse.Namespace) -> ServerSettings:
    values = {f.name: getattr(args, f.name) for f in fields(ServerSettings)}
    if values["api_key"] is not None and not [k for k in values["api_key"].split(",") if k.strip()]:
        # --api-key "" (or an unset $KEY) would silently turn auth off
        raise ConfigError("--api-key: empty (no key in it would turn auth off); give a key or omit the flag")
    values["api_key"] = values["api_key"] or ""
    return ServerSettings(**values).validate()
