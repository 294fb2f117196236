"""Router elasticity (``ff_engine/serving/moves.py``) on two in-process workers: a stream migrated between two
blocks ends bit-identical to the uninterrupted run (batch 1) with no block lost or repeated; drain empties a worker;
a worker added at run time takes the next streams; a paused stream stays paused where it lands; bad moves are one
clear error."""

import time

import pytest
import torch
from test_distributed import PAGE, cfg, single_engine, wait_for
from test_engine import tiny_model

from ff_engine.errors import ConfigError
from ff_engine.policies import FutureForcing, Window
from ff_engine.serving.controls import Pause
from ff_engine.serving.local import LocalEndpoint
from ff_engine.serving.router import Router
from ff_engine.serving.worker import EngineWorker

FRAMES = 24  # 8 blocks


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def endpoint(model, name, pages=60):
    return LocalEndpoint(EngineWorker(name, model, num_pages=pages, page_size=PAGE, backend="vllm-cpu", max_batch=1))


@pytest.fixture
def router(model):
    eps = [endpoint(model, "a"), endpoint(model, "b")]
    r = Router(eps, heartbeat_s=0.05)
    yield r
    r.shutdown()
    for ep in r.workers:
        ep.endpoint.kill()


def streams(n):
    return [cfg(i, FRAMES, FutureForcing() if i % 2 else Window(), 6) for i in range(n)]


def blocks_of(handle):
    return [b.block for b in handle.blocks(timeout=120)], torch.cat([b.latents for b in handle.blocks(timeout=120)])


def audit_clean(router):
    for a in router.audit():
        assert a["pages_used"] == 0 and a["pages_reserved"] == 0 and not a["sessions"], a


def test_a_migrated_stream_is_bit_identical_and_loses_no_block(router, model):
    cfgs = streams(2)
    ref = single_engine(model, cfgs, max_batch=1)
    handles = [router.submit(c) for c in cfgs]
    wait_for(lambda: handles[0].status().blocks_done >= 2)
    source = handles[0].status().worker
    move = router.migrate("s0").result(timeout=120)
    assert move["from"] == source and move["to"] != source and move["block"] >= 2
    assert move["bytes"] > 0 and move["seconds"] > 0
    for h, c in zip(handles, cfgs):
        order, lat = blocks_of(h)
        assert order == list(range(FRAMES // 3))  # every block once, in order
        assert torch.equal(lat, ref[c.session_id])
    assert handles[0].status().worker == move["to"]
    st = router.stats()
    assert st["migrated"] == 1 and st["migrate_p50_s"] == move["seconds"]
    audit_clean(router)


def test_drain_moves_every_stream_and_places_nothing_new_there(router, model):
    cfgs = streams(4)
    ref = single_engine(model, cfgs, max_batch=1)
    handles = [router.submit(c) for c in cfgs]
    wait_for(lambda: all(h.status().blocks_done >= 1 for h in handles))
    on_a = [h for h in handles if h.status().worker == "a"]
    moves = router.drain("a").result(timeout=120)
    assert len(moves) == len(on_a) and all(m["to"] == "b" for m in moves), moves
    late = router.submit(cfg(9, 6, Window(), 6))
    assert late.status().worker == "b"
    for h, c in zip(handles, cfgs):
        order, lat = blocks_of(h)
        assert order == list(range(FRAMES // 3)) and torch.equal(lat, ref[c.session_id])
    blocks_of(late)
    a = next(w for w in router.stats()["workers"] if w["name"] == "a")
    assert a["draining"] and a["active"] == 0
    audit_clean(router)


def test_an_added_worker_takes_the_next_streams(model):
    r = Router([endpoint(model, "a", pages=12)], heartbeat_s=0.05)
    try:
        first = r.submit(cfg(0, FRAMES, Window(), 6))
        r.add_worker(endpoint(model, "b"))
        second = r.submit(cfg(1, FRAMES, Window(), 6))
        assert second.status().worker == "b"  # most free pages
        with pytest.raises(ConfigError, match="already"):
            r.add_worker(endpoint(model, "b"))
        blocks_of(first), blocks_of(second)
        assert r.stats()["workers_added"] == 1
        audit_clean(r)
    finally:
        r.shutdown()
        for w in r.workers:
            w.endpoint.kill()


def test_a_paused_stream_stays_paused_where_it_lands(router):
    h = router.submit(cfg(0, FRAMES, Window(), 6))
    wait_for(lambda: h.status().blocks_done >= 1)
    router.control("s0", Pause("s0", True)).result(timeout=60)
    done = h.status().blocks_done
    move = router.migrate("s0").result(timeout=60)
    time.sleep(0.5)
    assert h.status().worker == move["to"] and h.status().blocks_done == done == move["block"]
    router.control("s0", Pause("s0", False)).result(timeout=60)
    order, _ = blocks_of(h)
    assert order == list(range(FRAMES // 3))


def test_bad_moves_are_one_clear_error(router):
    h = router.submit(cfg(0, FRAMES, Window(), 6))
    wait_for(lambda: h.status().blocks_done >= 1)
    with pytest.raises(ConfigError, match="not a live, undrained worker"):
        router.migrate("s0", to=h.status().worker)
    with pytest.raises(ConfigError, match="not a live"):
        router.migrate("s0", to="nowhere")
    with pytest.raises(ConfigError, match="no live worker named"):
        router.drain("nowhere")
    h.cancel()
    with pytest.raises(ConfigError, match="cancelled"):
        router.migrate("s0")


@pytest.mark.parametrize("placement", ["migration-aware", "most-free"])
def test_migration_aware_placement_makes_room_for_a_fragmented_request(model, placement):
    """Two 20-page workers each hold an 8-page stream: 24 free pages in all, 12 on each, and an 18-page request
    fits on neither.  Migration-aware placement moves one stream next to the other and places the request at once
    (the moved stream bit-identical); most-free makes it wait for a stream to end."""
    from ff_engine.policies import Unbounded

    r = Router([endpoint(model, "a", pages=20), endpoint(model, "b", pages=20)], heartbeat_s=0.05,
               placement=placement)
    try:
        small = [cfg(i, 60, Window(), 6) for i in range(2)]
        large = cfg(2, 24, Unbounded(), None)
        ref = single_engine(model, small + [large], max_batch=1)
        hs = [r.submit(c) for c in small]
        wait_for(lambda: all(h.status().blocks_done >= 1 for h in hs))
        assert {h.status().worker for h in hs} == {"a", "b"}
        big = r.submit(large)
        wait_for(lambda: big.status().blocks_done >= 1 or any(h.status().state == "finished" for h in hs))
        made_room = big.status().blocks_done >= 1 and all(h.status().state == "running" for h in hs)
        assert made_room == (placement == "migration-aware")
        assert r.stats()["rooms_made"] == (1 if placement == "migration-aware" else 0)
        for h, c in zip(hs + [big], small + [large]):
            order, lat = blocks_of(h)
            assert order == list(range(c.num_frames // 3)) and torch.equal(lat, ref[c.session_id])
        audit_clean(r)
    finally:
        r.shutdown()
        for w in r.workers:
            w.endpoint.kill()
