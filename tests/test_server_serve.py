"""``ff-engine serve --ray local --ray-serve``: the server over a real ``ServeCluster`` (two CPU engine replicas on
Ray Serve, snapshots every 2 blocks).  Killing the replica that runs a stream mid-stream: the stream resumes on the
other replica (its frames still exactly ``Engine.generate``'s), Serve starts a replacement, and the server's
health counts it."""

from __future__ import annotations

import time

import pytest
from server_support import LiveServer, torch_threads
from test_server_ray import REQ, reference_jpegs

from ff_engine.client import Client

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    try:
        with (
            torch_threads(1),
            LiveServer(tmp_path_factory.mktemp("serve"), backend="torch", ray="local", ray_serve=True, workers=2,
                       snapshot_every=2, num_pages=512) as srv,
        ):
            yield srv
    finally:
        serve.shutdown()
        ray.shutdown()


def test_a_killed_replica_resumes_its_stream_and_serve_replaces_it(server):
    with Client(server.url) as c:
        assert c.health()["workers_alive"] == 2
        v = c.submit(**REQ)
        deadline = time.monotonic() + 120
        while (st := c.status(v["id"]))["blocks_done"] < 5:
            assert time.monotonic() < deadline and st["status"] in ("queued", "running"), st
            time.sleep(0.05)
        replica = st["worker"]
        actor = next(a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith("#" + replica))
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
        st = c.wait(v["id"], timeout=180)
        assert st["status"] == "finished" and st["resumed"] >= 1 and st["worker"] != replica, st
        assert [jpeg for _, jpeg in c.frames(v["id"])] == reference_jpegs(server)
        deadline = time.monotonic() + 180
        while c.health()["workers_alive"] < 2:  # Serve's replacement joined the router
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert server.service.stats()["workers_added"] == 1
        w = c.submit(**{**REQ, "frames": 12, "seed": 12})
        assert c.wait(w["id"], timeout=120)["status"] == "finished"
