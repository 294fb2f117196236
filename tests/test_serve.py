"""ServeCluster on a real local Ray Serve (3 logical CPUs, CPU engine replicas with one torch thread, tiny model).

One cluster of two replicas (batch 1, snapshots every 2 blocks, so every stream's arithmetic is a single-engine
run's) serves placement and affinity, loses a replica to ``ray.kill`` (its streams end bit-identical elsewhere;
Serve's replacement joins and takes a new stream), then scales down (the stopped replica's streams resume from its
final snapshots: no block lost, none regenerated).  A second cluster autoscales from 1 to 2 on a queue and back."""

import time

import pytest
import torch
from test_distributed import PAGE, cfg, single_engine, wait_for
from test_engine import tiny_model

from ff_engine.errors import ConfigError
from ff_engine.policies import FutureForcing, Window

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
from ff_engine.serving import ServeCluster  # needs ray[serve]

FRAMES = 36  # 12 blocks


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def ray_serve():
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def cluster(ray_serve, model, tmp_path_factory):
    c = ServeCluster(model, num_replicas=2, num_pages=60, page_size=PAGE, backend="vllm-cpu", max_batch=1,
                     snapshot_every=2, heartbeat_s=0.1, output_dir=str(tmp_path_factory.mktemp("serve")))
    yield c
    c.shutdown()


def streams(first, n, frames=FRAMES):
    return [cfg(first + i, frames, FutureForcing() if i % 2 else Window(), 6) for i in range(n)]


def finish(handle):
    blocks = list(handle.blocks(timeout=180))
    return [b.block for b in blocks], torch.cat([b.latents for b in blocks])


def replica_actor(name):
    a = next(a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith("#" + name))
    return ray.get_actor(a["name"], namespace=a["namespace"])


def test_streams_spread_by_free_pages_and_match_one_engine(cluster, model):
    cfgs = streams(0, 4)
    ref = single_engine(model, cfgs, max_batch=1)
    handles = [cluster.submit(c) for c in cfgs]
    workers = [h.status().worker for h in handles]
    assert sorted(set(workers)) == sorted(cluster.replicas()) and workers.count(workers[0]) == 2
    for h, c, w in zip(handles, cfgs, workers):
        order, lat = finish(h)
        assert order == list(range(FRAMES // 3)) and torch.equal(lat, ref[c.session_id])
        assert h.status().worker == w  # affinity: never moved
    for a in cluster.audit():
        assert a["pages_used"] == a["pages_reserved"] == 0


def test_a_killed_replica_is_replaced_and_its_streams_resume_bit_identically(cluster, model):
    cfgs = streams(10, 4)
    ref = single_engine(model, cfgs, max_batch=1)
    handles = [cluster.submit(c) for c in cfgs]
    wait_for(lambda: all(h.status().blocks_done >= 3 for h in handles))
    victim = handles[0].status().worker
    before = cluster.stats()["workers_added"]
    ray.kill(replica_actor(victim), no_restart=True)
    for h, c in zip(handles, cfgs):
        order, lat = finish(h)
        assert order == list(range(FRAMES // 3)) and torch.equal(lat, ref[c.session_id])
    moved = [h for h in handles if h.status().resumed]
    assert len(moved) == 2 and all(h.status().extra["resumed_from_block"] >= 2 for h in moved)
    wait_for(lambda: cluster.stats()["workers_added"] > before and len(cluster.replicas()) == 2, timeout=180)
    replacement = next(n for n in cluster.replicas() if n not in {victim, handles[1].status().worker})
    busy = cluster.submit(cfg(20, 300, Window(), 6))  # on the survivor or the replacement: tie broken by name
    late = cluster.submit(cfg(21, 12, Window(), 6))  # the other one: most free pages
    assert {busy.status().worker, late.status().worker} == set(cluster.replicas())
    assert replacement in {busy.status().worker, late.status().worker}
    finish(late)
    busy.cancel()


def test_scale_down_drains_the_stopped_replica_losing_and_repeating_nothing(cluster, model):
    wait_for(lambda: all(a["pages_reserved"] == 0 for a in cluster.audit()))
    cfgs = streams(30, 4)
    ref = single_engine(model, cfgs, max_batch=1)
    handles = [cluster.submit(c) for c in cfgs]
    wait_for(lambda: all(h.status().blocks_done >= 3 for h in handles))
    regenerated = cluster.stats()["blocks_regenerated"]
    cluster.scale(1)
    for h, c in zip(handles, cfgs):
        order, lat = finish(h)
        assert order == list(range(FRAMES // 3)) and torch.equal(lat, ref[c.session_id])
    wait_for(lambda: len(cluster.replicas()) == 1, timeout=120)
    assert len({h.status().worker for h in handles}) == 1
    assert sum(h.status().resumed for h in handles) == 2  # the stopped replica's two streams moved
    assert cluster.stats()["blocks_regenerated"] == regenerated  # final snapshots: nothing generated twice
    with pytest.raises(ConfigError, match="num_replicas"):
        cluster.scale(0)


def test_autoscaling_admits_a_queue_and_scales_back(ray_serve, model, tmp_path):
    serve.delete("ff-engine")  # the module's cluster, if still up
    c = ServeCluster(model, num_replicas=1, autoscale=(1, 2), num_pages=20, page_size=PAGE, backend="vllm-cpu",
                     max_batch=2, snapshot_every=4, heartbeat_s=0.1, app_name="ff-auto", output_dir=str(tmp_path))
    try:
        with pytest.raises(ConfigError, match="autoscales"):
            c.scale(2)
        handles = [c.submit(cfg(40 + i, 900, Window(), 6)) for i in range(4)]  # 2 fit one replica's pool
        assert [h.status().state for h in handles].count("queued") == 2
        wait_for(lambda: all(h.status().state == "running" for h in handles), timeout=180)
        assert len(c.replicas()) == 2 and len({h.status().worker for h in handles}) == 2
        for h in handles:
            h.cancel()
        wait_for(lambda: len(c.replicas()) == 1, timeout=180)
        time.sleep(0.5)
        assert c.stats()["workers_added"] == 1
    finally:
        c.shutdown()
