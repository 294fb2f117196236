"""``ff-engine serve --ray local --ray-serve --ingress-replicas 2``: the FastAPI app as two stateless Serve
replicas behind Serve's HTTP proxy, the streams in one hub replica (``ff_engine/server/hub.py``) over a real
``ServeCluster``.  Killing *every* ingress replica mid-stream loses nothing: the stream goes on in the hub, Serve
starts replacements, and a client reconnecting by id gets its status, its frames (exactly ``Engine.generate``'s)
and its file; a WebSocket session whose ingress died is resumed by id on another replica from the next block."""

from __future__ import annotations

import socket

import httpx
import pytest
from server_support import torch_threads, world_model
from test_server_ray import REQ, reference_jpegs
from tests_helpers import until

from ff_engine.client import Client, ServerError
from ff_engine.server.runtime import Runtime
from ff_engine.server.settings import ServerSettings

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
INGRESS = "ff-engine-ingress"


class _Reference:
    """What ``reference_jpegs`` reads of a server: its settings and a runtime (model, decoder, limits)."""

    def __init__(self, settings):
        self.settings = settings
        self.runtime = Runtime(settings, service=object(), model=world_model())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def hub_server(tmp_path_factory):
    from ff_engine.server.hub import deploy

    settings = ServerSettings(output_dir=str(tmp_path_factory.mktemp("ingress") / "serve"), backend="torch",
                              ray="local", ray_serve=True, workers=1, ingress_replicas=2, snapshot_every=2,
                              num_pages=512, port=_free_port()).validate()
    try:
        with torch_threads(1):
            ray.init(num_cpus=3, include_dashboard=False)
            url = deploy(settings)
            yield url, _Reference(settings)
    finally:
        serve.shutdown()
        ray.shutdown()


def _ingress_actors() -> list:
    return [ray.get_actor(a["name"], namespace=a["namespace"])
            for a in ray.util.list_named_actors(all_namespaces=True) if f"#{INGRESS}#" in a["name"]]


def _kill_every_ingress_replica() -> None:
    actors = _ingress_actors()
    assert len(actors) == 2
    for actor in actors:
        ray.kill(actor, no_restart=True)


def _answering(c: Client, video_id: str):
    """The stream's status once some ingress replica answers again (None while none does)."""
    try:
        return c.status(video_id)
    except (httpx.HTTPError, ServerError):
        return None


def test_killing_every_ingress_replica_mid_stream_loses_no_stream(hub_server):
    url, ref = hub_server
    with Client(url) as c:
        assert c.health()["status"] == "ok"
        v = c.submit(**REQ)
        until(lambda: c.status(v["id"])["blocks_done"] >= 3, 120, 0.05, "3 blocks before the kill")
        _kill_every_ingress_replica()
        until(lambda: _answering(c, v["id"]), 180, 0.2, "a replacement ingress replica answers")
        st = c.status(v["id"])
        assert st["id"] == v["id"] and st["status"] in ("running", "finished"), st
        st = c.wait(v["id"], timeout=180)
        assert st["status"] == "finished" and st["resumed"] == 0, st  # the engine never noticed
        assert [jpeg for _, jpeg in c.frames(v["id"])] == reference_jpegs(ref)
        r = c.http.get(f"/v1/videos/{v['id']}/file")
        assert r.status_code == 200 and r.content[4:8] == b"ftyp"
        until(lambda: len(_ingress_actors()) == 2, 180, 0.2, "Serve replaced both ingress replicas")
        assert "ff_engine_frames_generated_total" in c.metrics()  # the hub's exposition


def test_a_websocket_session_resumes_by_id_after_its_ingress_replica_died(hub_server):
    url, ref = hub_server
    expected = reference_jpegs(ref)
    with Client(url) as c:
        live = c.realtime(**REQ)
        got = []
        for blk in live:
            got += blk.frames
            if blk.index == 1:
                break
        _kill_every_ingress_replica()
        until(lambda: _answering(c, live.id), 180, 0.2, "a replacement ingress replica answers")
        with c.resume(live.id, from_block=2) as again:
            assert again.started["from_block"] == 2
            for blk in again:
                got += blk.frames
        assert again.done is not None and got == expected
        with pytest.raises(ServerError) as err:  # another id is still unknown, through any replica
            c.resume("vid_" + "0" * 32)
        assert err.value.status == 404


def test_ingress_replicas_need_ray_serve_and_errors_cross_the_hop_as_themselves():
    import pickle

    from ray.exceptions import RayTaskError

    from ff_engine.errors import ConfigError, Overloaded
    from ff_engine.server.hub import _cause
    from ff_engine.server.stream_registry import KeyLimit

    with pytest.raises(ConfigError, match="--ingress-replicas needs --ray-serve"):
        ServerSettings(ray="local", ingress_replicas=2).validate()
    for exc in (KeyLimit("this key already has 8 unfinished streams", 1.5), Overloaded("queue full", 2.0)):
        back = pickle.loads(pickle.dumps(exc))  # as Ray carries it from the hub to an ingress replica
        assert type(back) is type(exc) and str(back) == str(exc) and back.retry_after == exc.retry_after
        wrapped = RayTaskError("submit", "Traceback ...", exc)
        assert _cause(wrapped) is exc and _cause(exc) is exc


def test_controls_forks_and_their_errors_cross_the_hub(hub_server):
    url, _ = hub_server
    with Client(url) as c:
        v = c.submit(**{**REQ, "frames": 90, "seed": 5})
        until(lambda: c.status(v["id"])["blocks_done"] >= 2, 120, 0.05, "an undo history to roll back into")
        assert c.update(v["id"], paused=True)["changed"] == ["paused"]
        f = c.fork(v["id"])
        assert f["id"] != v["id"] and f["request"]["forked_from"] == v["id"]
        assert isinstance(c.rollback(v["id"], blocks=1)["to_block"], int)
        with pytest.raises(ServerError) as deep:
            c.rollback(v["id"], blocks=64)
        assert deep.value.status == 422
        with pytest.raises(ServerError) as gone:
            c.fork("vid_" + "0" * 32)
        assert gone.value.status == 404
        c.update(v["id"], paused=False)
        c.update(f["id"], paused=False)
        assert c.wait(v["id"], timeout=180)["status"] == c.wait(f["id"], timeout=180)["status"] == "finished"
        with pytest.raises(ServerError) as ended:
            c.update(v["id"], paused=True)
        assert ended.value.status == 409
