"""``ff-engine serve`` / ``python -m ff_engine.server``: parse settings, run uvicorn."""

from __future__ import annotations

import argparse
import sys

from ff_engine.argtypes import OneLineParser
from ff_engine.errors import FFEngineError
from ff_engine.server.settings import ServerSettings, add_arguments, from_args


def make_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="ff-engine serve", description="Serve video streams over REST, WebSocket and a live viewer")
    add_arguments(ap)
    ap.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return ap


def uvicorn_config(app, settings: ServerSettings, log_level: str = "info"):
    import uvicorn

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        ws_max_size=settings.max_body_bytes,
        ws="websockets-sansio",
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
        uvicorn.Server(uvicorn_config(create_app(settings), settings, args.log_level)).run()
    except FFEngineError as exc:
        print(f"ff-engine serve: error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
