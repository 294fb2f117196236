"""``ff-engine serve --ray``: the server over a real ``RayCluster`` (two CPU workers, snapshots every 2 blocks).
Killing the worker that runs a stream mid-stream: the stream resumes on the other worker from its snapshot, says
so in its status (``resumed``), and its frames are still exactly ``Engine.generate``'s."""

from __future__ import annotations

import time

import pytest
from server_support import LiveServer, torch_threads, world_model

from ff_engine.client import Client
from ff_engine.engine import Engine
from ff_engine.server.frames import JpegEncoder
from ff_engine.server.schemas import request_model

ray = pytest.importorskip("ray")

REQ = {"frames": 60, "seed": 11, "policy": "window", "budget_frames": 6}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    try:
        with (
            torch_threads(1),
            LiveServer(
                tmp_path_factory.mktemp("ray"), backend="torch", ray="local", workers=2, snapshot_every=2, num_pages=512
            ) as srv,
        ):
            yield srv
    finally:
        ray.shutdown()


def reference_jpegs(server) -> list[bytes]:
    cfg = server.runtime.session_config(request_model(server.runtime.limits).model_validate(REQ))
    latents = Engine(world_model(), num_pages=512, page_size=32, backend="torch").generate(cfg)
    decoder, enc = server.runtime.decoder(), JpegEncoder(server.settings.jpeg_quality)
    return [enc.encode(f) for i in range(0, len(latents), 3) for f in decoder.decode(latents[i : i + 3])]


def test_killing_the_worker_mid_stream_resumes_the_stream(server):
    with Client(server.url) as c:
        v = c.submit(**REQ)
        deadline = time.monotonic() + 120
        while (st := c.status(v["id"]))["blocks_done"] < 5:
            assert time.monotonic() < deadline and st["status"] in ("queued", "running"), st
            time.sleep(0.05)
        worker = st["worker"]
        ray.kill(server.service.actors[worker], no_restart=True)
        st = c.wait(v["id"], timeout=180)
        assert st["status"] == "finished" and st["resumed"] >= 1 and st["blocks_done"] == 20, st
        assert st["worker"] != worker and st["error"] is None
        frames = [jpeg for _, jpeg in c.frames(v["id"])]
        assert frames == reference_jpegs(server)  # resumed from the snapshot: the same video
        alive = {w["name"]: w["alive"] for w in server.service.stats()["workers"]}
        assert alive[worker] is False and sum(alive.values()) == 1
        assert c.health()["workers_alive"] == 1
        assert f'ff_engine_worker_alive{{worker="{worker}"}} 0.0' in c.metrics()
