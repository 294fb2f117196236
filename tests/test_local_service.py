"""LocalService (the in-process StreamService) and the EngineWorker step it shares with RayCluster."""

import asyncio
import threading

import pytest
import torch
from test_engine import tiny_model

from ff_engine.engine import Engine, SessionConfig
from ff_engine.errors import ConfigError
from ff_engine.policies import FutureForcing, SinkWindow, Unbounded, Window
from ff_engine.serving import LocalService, persist
from ff_engine.serving.contract import Overloaded, UnknownStream
from ff_engine.serving.worker import EngineWorker, Start

PAGE = 16


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def cfg(i, frames=9, policy=None, budget=3, prompt=None):
    prompt = torch.randn(4, 256, generator=torch.Generator().manual_seed(i)) if prompt is None else prompt
    return SessionConfig(
        prompt=prompt, num_frames=frames, seed=i, policy=policy or Window(), budget_frames=budget, session_id=f"s{i}"
    )


def reference(model, c):
    return Engine(model, num_pages=400, page_size=PAGE, backend="vllm-cpu").generate(c)


def test_streams_equal_a_single_engine_and_every_consumer_sees_every_block(model, tmp_path):
    specs = [
        (0, 9, Window(), 3),
        (1, 15, FutureForcing(), 6),
        (2, 6, Unbounded(), None),
        (3, 12, SinkWindow(sink_frames=3), 6),
    ]
    svc = LocalService(
        model, num_pages=60, page_size=PAGE, backend="vllm-cpu", max_batch=2, output_dir=str(tmp_path), keep_blocks=2
    )
    try:
        handles = [svc.submit(cfg(*s)) for s in specs]
        seen: dict[tuple[str, int], list[int]] = {}

        def consume(h, k):
            seen[h.id, k] = [b.block for b in h.blocks(timeout=60)]

        async def consume_async(h):
            return [b async for b in h.ablocks()]

        threads = [threading.Thread(target=consume, args=(h, k)) for h in handles for k in range(2)]
        for t in threads:
            t.start()
        streamed = asyncio.run(consume_async(handles[1]))
        for t in threads:
            t.join(60)
        for h, (i, frames, policy, budget) in zip(handles, specs):
            n = h.status().num_blocks
            assert h.status().state == "finished" and seen[h.id, 0] == seen[h.id, 1] == list(range(n))
            late = list(h.blocks(timeout=30))  # a consumer that comes after the end: early blocks come from disk
            assert [b.block for b in late] == list(range(n)) and late[-1].done
            got = torch.cat([b.latents for b in late])
            assert (got - reference(model, cfg(i, frames, policy, budget))).abs().max() <= 1e-4
            assert torch.equal(persist.read_block(str(tmp_path), h.id, n - 1), late[-1].latents)
        assert [b.block for b in streamed] == list(range(handles[1].status().num_blocks))
        assert all(a["pages_used"] == 0 and a["pages_reserved"] == 0 and not a["sessions"] for a in svc.audit())
        assert svc.stats()["finished"] == 4
    finally:
        svc.shutdown()


def test_queue_bound_cancel_and_bad_requests(model):
    one = Engine(model, num_pages=400, page_size=PAGE, backend="vllm-cpu").pages_needed(cfg(0, 90, Unbounded(), None))
    svc = LocalService(model, num_pages=one, page_size=PAGE, backend="vllm-cpu", max_queue=1)
    try:
        running = svc.submit(cfg(0, 90, Unbounded(), None))  # the whole pool
        queued = svc.submit(cfg(1, 6))
        with pytest.raises(Overloaded) as exc:
            svc.submit(cfg(2, 6))
        assert exc.value.retry_after > 0 and svc.stats()["rejected"] == 1
        with pytest.raises(ConfigError, match="num_frames"):
            svc.submit(cfg(3, 0))
        with pytest.raises(UnknownStream):
            svc.get("nope")
        next(running.blocks(timeout=30))
        queued.cancel()
        running.cancel()
        running.cancel()  # idempotent
        assert running.status().state == queued.status().state == "cancelled"
        assert list(queued.blocks(timeout=5)) == []
        # a request only the model can refuse (prompt width) fails alone, beside a good one
        bad = svc.submit(cfg(4, 6, prompt=torch.randn(4, 100)))
        good = svc.submit(cfg(5, 6))
        assert len(list(good.blocks(timeout=30))) == 2 and good.status().state == "finished"
        list(bad.blocks(timeout=30))
        assert bad.status().state == "failed" and bad.status().error
        assert svc.audit()[0]["pages_used"] == 0
    finally:
        svc.shutdown()


def test_terminal_streams_are_forgotten_beyond_the_retention_bound(model):
    svc = LocalService(model, num_pages=60, page_size=PAGE, backend="vllm-cpu", max_terminal=1)
    try:
        for i in range(2):
            list(svc.submit(cfg(i, 3)).blocks(timeout=30))
        svc.submit(cfg(2, 3)).cancel()  # the third terminal stream pushes the first out
        with pytest.raises(UnknownStream):
            svc.get("s0")
        assert svc.get("s2").status().state == "cancelled"
    finally:
        svc.shutdown()


def test_a_worker_resumes_a_stream_from_its_snapshot_bit_identically(model, tmp_path):
    """What a worker death does to a stream, without Ray: worker a runs 3 blocks (snapshot after block 1), dies;
    worker b resumes from the snapshot and the stream ends exactly as the uninterrupted run."""
    c = cfg(7, 15, FutureForcing(), 6)
    ref = reference(model, c)
    kw = {
        "num_pages": 60,
        "page_size": PAGE,
        "backend": "vllm-cpu",
        "max_batch": 1,
        "snapshot_every": 2,
        "output_dir": str(tmp_path),
    }
    a = EngineWorker("a", model, **kw)
    blocks = a.step(start=[Start(c)]).results + a.step().results + a.step().results
    assert [r.block for r in blocks] == [0, 1, 2]
    assert persist.snapshot_path(str(tmp_path), "s7").exists()
    b = EngineWorker("b", model, **kw)
    report = b.step(start=[Start(c, resume=True)])
    assert report.started == {"s7": 2}
    out = report.results
    while b.engine.sessions:
        out += b.step().results
    got = torch.cat([persist.read_block(str(tmp_path), "s7", k) for k in range(2)] + [r.latents for r in out])
    assert torch.equal(got, ref)
    assert not persist.snapshot_path(str(tmp_path), "s7").exists()  # removed when the stream ended
    assert b.audit()["pages_used"] == 0


def test_a_prompt_update_equals_an_engine_switch_at_the_same_boundary(model):
    """``handle.update`` returns the block from which the new prompt is in force; the stream equals an engine run
    that calls ``switch_prompt`` at that boundary.  A bad prompt raises and changes nothing; a finished stream
    refuses an update."""
    c = cfg(7, frames=60, budget=6)
    new = torch.randn(3, 256, generator=torch.Generator().manual_seed(99))
    with LocalService(model, num_pages=400, page_size=PAGE, backend="vllm-cpu") as svc:
        h = svc.submit(c)
        blocks = h.blocks(timeout=60)
        got = [next(blocks).latents]
        with pytest.raises(ConfigError, match="text embeddings"):
            h.update(torch.randn(3, 7))
        at = h.update(new)
        got += [b.latents for b in blocks]
        assert h.status().state == "finished"
        with pytest.raises(ConfigError, match="finished"):
            h.update(new)
    assert 1 <= at < 20
    e = Engine(model, num_pages=400, page_size=PAGE, backend="vllm-cpu")
    s = e.add_session(c)
    ref = []
    while s.id in e.sessions:
        if s.block == at:
            e.switch_prompt(s.id, new)
        ref += [r.latents for r in e.step([s.id])]
    assert torch.equal(torch.cat(got), torch.cat(ref))
    assert not torch.equal(torch.cat(got), reference(model, c))  # the switch changed the stream


def test_a_snapshot_newer_than_the_blocks_on_disk_restarts_the_stream_from_block_0(model, tmp_path):
    """``started(k)`` makes blocks below k readable at once, so a resumed worker must not trust a snapshot whose
    blocks are not all on disk (here block 1's file is gone): it restarts from block 0 and rewrites them."""
    c = cfg(7, 15, FutureForcing(), 6)
    kw = {"num_pages": 60, "page_size": PAGE, "backend": "vllm-cpu", "max_batch": 1, "snapshot_every": 2}
    a = EngineWorker("a", model, output_dir=str(tmp_path), **kw)
    a.step(start=[Start(c)]), a.step()
    assert persist.snapshot_path(str(tmp_path), "s7").exists()
    persist.block_path(str(tmp_path), "s7", 1).unlink()
    b = EngineWorker("b", model, output_dir=str(tmp_path), **kw)
    report = b.step(start=[Start(c, resume=True)])
    assert report.started == {"s7": 0} and [r.block for r in report.results] == [0]
    out = report.results
    while b.engine.sessions:
        out += b.step().results
    assert not persist.missing_blocks(str(tmp_path), "s7", 5)
    assert torch.equal(torch.cat([r.latents for r in out]), reference(model, c))


def test_two_writers_of_one_block_in_one_process_both_succeed(tmp_path, monkeypatch):
    """The second writer starts while the first is between writing its temporary file and renaming it (as a
    resumed worker beside the one it replaces would): each must rename its own file, none fails "No such file"."""
    real_save, nested = persist.save_file, []

    def save_then_interleave(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        if not nested:
            nested.append(filename)
            persist.write_block(str(tmp_path), "s", 5, torch.full((1, 2), 2.0))

    monkeypatch.setattr(persist, "save_file", save_then_interleave)
    persist.write_block(str(tmp_path), "s", 5, torch.ones(1, 2))
    assert torch.equal(persist.read_block(str(tmp_path), "s", 5), torch.ones(1, 2))
    assert [p.name for p in persist.stream_dir(str(tmp_path), "s").iterdir()] == ["block_00005.safetensors"]
