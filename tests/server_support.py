"""A real ``ff-engine serve`` on 127.0.0.1 (an ephemeral port) in a background thread, for the server tests.

The server is uvicorn with the app ``ff-engine serve`` builds, over the real ``LocalService`` (or a service the
test passes, e.g. a ``RayCluster``); it stops when the ``with`` block ends.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import torch

from ff_engine.server.__main__ import uvicorn_config
from ff_engine.server.app import create_app
from ff_engine.server.runtime import Runtime, build_service, load_model
from ff_engine.server.settings import ServerSettings

_MODEL = None


def world_model():
    """The embedded world model, loaded once per test process (0.2 s, but many tests)."""
    global _MODEL
    if _MODEL is None:
        _MODEL = load_model(ServerSettings())
    return _MODEL


_V4 = None


def world_v4():
    """The embedded action-steered world model (v4, ``scroll.py``), loaded once per test process."""
    global _V4
    if _V4 is None:
        from model_adapters.world import EMBEDDED_V4

        _V4 = load_model(ServerSettings(model=str(EMBEDDED_V4)))
    return _V4


@contextlib.contextmanager
def torch_threads(n: int):
    """One intra-op thread while a server test runs: on a shared 2-core box, OpenMP threads that spin against
    other processes make each tiny matmul ~30x slower; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class LiveServer:
    def __init__(self, tmp_path, service=None, model=None, **overrides):
        overrides.setdefault("num_pages", 1024)
        self.settings = ServerSettings(output_dir=str(tmp_path / "serve"), **overrides).validate()
        model = model if model is not None else world_model()
        self.service = service if service is not None else build_service(self.settings, model)
        self.runtime = Runtime(self.settings, service=self.service, model=model)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        import uvicorn

        self.app = create_app(self.settings, self.runtime)
        self.server = uvicorn.Server(uvicorn_config(self.app, self.settings, "warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 90
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)
        self.service.shutdown()
        self.sock.close()

    def pages_used(self) -> int:
        return sum(w["pages_used"] for w in self.service.stats()["workers"])
