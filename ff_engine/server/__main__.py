"""``ff-engine serve`` / ``python -m ff_engine.server``: parse settings, run uvicorn."""

from __future__ import annotations

import argparse
import sys

from ff_engine.argtypes import OneLineParser
from ff_engine.errors import ConfigError, FFEngineError
from ff_engine.server.settings import ServerSettings, add_arguments, from_args


def make_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="ff-engine serve", description="Serve video streams over REST, WebSocket and a live viewer")
    add_arguments(ap)
    ap.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return ap


def uvicorn_config(app, settings: ServerSettings, log_level: str = "info"):
    import uvicorn

    from ff_engine.server.connections import guarded_h11

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        http=guarded_h11(settings.header_timeout, settings.max_connections_per_client),
        ws_max_size=settings.max_body_bytes,
        ws="websockets-sansio",
        ws_ping_interval=settings.ws_ping_interval,
        ws_ping_timeout=settings.ws_ping_timeout,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=5,
        server_header=False,
    )


def main(argv=None) -> int:
    import uvicorn

    from ff_engine.server.app import create_app

    args = make_parser().parse_args(argv)
    try:
        settings = from_args(args)
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
            print(f"ff-engine serve: warning: listening on {settings.host} without --api-key", file=sys.stderr)
        if settings.ingress_replicas:
            return serve_on_ray_serve(settings)
        runtime = build_runtime(settings)
    except FFEngineError as exc:
        print(f"ff-engine serve: error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    try:
        uvicorn.Server(uvicorn_config(create_app(settings, runtime), settings, args.log_level)).run()
    finally:
        runtime.service.shutdown()
    return 0


def serve_on_ray_serve(settings: ServerSettings) -> int:
    """``--ingress-replicas N``: the hub and N ingress replicas on Ray Serve (``hub.deploy``), until Ctrl-C."""
    import time

    from ray import serve

    from ff_engine.server.hub import deploy

    try:
        url = deploy(settings)
    except FFEngineError:
        raise
    except Exception as exc:  # noqa: BLE001 - a deployment that did not come up: one line
        raise ConfigError(f"--ingress-replicas: Serve did not start the app: {str(exc).strip().splitlines()[0][:200]}")
    print(f"ff-engine serve: {settings.ingress_replicas} ingress replicas on {url} (Ray Serve)", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


def build_runtime(settings: ServerSettings):
    """Model, service and prompts, built before uvicorn starts, so that a bad ``--model``, a missing
    ``--prompts-dir`` or an unreachable ``--ray`` cluster is one line and exit 2 (as the CLI's errors), not a
    traceback from the app's startup.  Raises ``FFEngineError``."""
    from ff_engine.server.runtime import Runtime

    try:
        return Runtime(settings)
    except FFEngineError:
        raise
    except (OSError, ConnectionError, ValueError, RuntimeError, KeyError) as exc:
        what = "--ray " + settings.ray if settings.ray and "ray" in type(exc).__module__ + str(exc).lower() else ""
        hint = "; start one with 'ray start --head' or use --ray local" if what else ""
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"{what or '--model ' + (settings.model or 'default')}: {first}{hint}") from None


if __name__ == "__main__":
    sys.exit(main())
