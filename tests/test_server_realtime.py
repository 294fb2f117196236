"""The realtime session's slow-client policies, against a client that stops reading: ``drop`` skips frames and
counts them, ``wait`` loses nothing; either way the outgoing queue stays bounded."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from server_support import LiveServer, torch_threads

from ff_engine.client import Client, ServerError
from ff_engine.server.auth import KeyCheck
from ff_engine.server.realtime import RealtimeSession


class StalledSocket:
    """A WebSocket whose client reads nothing until ``reading`` is set (what a slow client looks like to the
    server once the kernel's socket buffers are full)."""

    def __init__(self, start: dict):
        self.scope = {"subprotocols": [], "extensions": {}}
        self.headers = {}
        self.incoming: asyncio.Queue = asyncio.Queue()
        self.incoming.put_nowait({"type": "websocket.receive", "text": json.dumps(start)})
        self.reading = asyncio.Event()
        self.sent: list = []

    async def accept(self, subprotocol=None):
        pass

    async def receive(self):
        return await self.incoming.get()

    async def send_text(self, text):
        await self.reading.wait()
        self.sent.append(json.loads(text))

    async def send_bytes(self, data):
        await self.reading.wait()
        self.sent.append(data)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with (
        torch_threads(1),
        LiveServer(tmp_path_factory.mktemp("rt"), backend="torch", ws_queue_blocks=2, max_records=2) as srv,
    ):
        yield srv


async def stalled_session(server, slow_client: str, blocks: int):
    state = server.app.state.ff
    ws = StalledSocket({"type": "session.start", "frames": 3 * blocks, "seed": 3, "slow_client": slow_client})
    session = RealtimeSession(ws, state, KeyCheck(""), server.settings)
    task = asyncio.create_task(session.run())
    while session.rec is None:
        await asyncio.sleep(0.01)
    while not session.rec.handle.status().terminal:  # the whole stream is generated while nobody reads
        assert session.out.qsize() <= server.settings.ws_queue_blocks
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    ws.reading.set()
    while not any(isinstance(m, dict) and m["type"] == "session.done" for m in ws.sent):
        await asyncio.sleep(0.01)
    await ws.incoming.put({"type": "websocket.disconnect"})
    await asyncio.wait_for(task, 10)
    return ws.sent


def run(server, coro):
    return asyncio.run_coroutine_threadsafe(coro, server.app.state.ff.loop).result(120)


def test_drop_policy_skips_frames_and_counts_them(server):
    sent = run(server, stalled_session(server, "drop", 12))
    headers = [m for m in sent if isinstance(m, dict) and m["type"] == "video.block"]
    done = sent[-1] if isinstance(sent[-1], dict) else next(m for m in reversed(sent) if isinstance(m, dict))
    assert done["type"] == "session.done" and done["state"] == "finished"
    assert done["dropped_frames"] > 0
    assert 3 * len(headers) + done["dropped_frames"] == 36  # every frame delivered or counted as dropped
    blocks = [h["block"] for h in headers]
    assert blocks == sorted(blocks) and blocks[0] == 0
    assert sum(isinstance(m, bytes) for m in sent) == 3 * len(headers)


def test_wait_policy_delivers_every_frame(server):
    sent = run(server, stalled_session(server, "wait", 8))
    headers = [m for m in sent if isinstance(m, dict) and m["type"] == "video.block"]
    assert [h["block"] for h in headers] == list(range(8))
    assert sum(isinstance(m, bytes) for m in sent) == 24
    assert next(m for m in reversed(sent) if isinstance(m, dict))["dropped_frames"] == 0


def test_old_streams_are_forgotten_with_their_files(server):
    """Bounded memory and disk: beyond ``max_records`` terminal streams the oldest go, MP4 and blocks too."""
    with Client(server.url) as c:
        ids = []
        for seed in range(4):
            ids.append(c.submit(frames=3, seed=seed)["id"])
            st = c.wait(ids[-1])
            assert st["status"] == "finished" and st["file_ready"]
        rec_dirs = [Path(server.settings.output_dir) / "blocks" / i for i in ids]
        with pytest.raises(ServerError) as e:
            c.status(ids[0])
        assert e.value.status == 404
        assert not (Path(server.settings.output_dir) / f"{ids[0]}.mp4").exists() and not rec_dirs[0].exists()
        assert c.status(ids[-1])["file_ready"] and rec_dirs[-1].is_dir()


def test_session_update_switches_the_prompt_and_the_stream_finishes(server, monkeypatch):
    """``session.update`` with a prompt name: ``session.updated`` names the block it applies at and the stream runs
    to its end; an unknown name or a policy change gets an ``error`` naming the field and changes nothing.  (The
    embedded world model is unconditional, so the catalogue is given one name for its zero prompt.)"""
    catalog = server.runtime.prompts
    real_load = catalog.load
    monkeypatch.setattr(
        catalog, "load", lambda name, seed: torch.zeros(1, 16) if name == "calm" else real_load(name, seed)
    )
    with Client(server.url) as c, c.realtime(frames=36, seed=11, policy="sink-window") as rt:
        it = iter(rt)
        next(it)
        rt.send({"type": "session.update", "event_id": "bad", "prompt": "nope"})
        rt.send({"type": "session.update", "event_id": "policy", "policy_params": {"sink_frames": 2}})
        rt.send({"type": "session.update", "event_id": "good", "prompt": "calm"})
        blocks = 1 + sum(1 for _ in it)
    assert rt.done["state"] == "finished" and blocks == 12
    errors = {e["event_id"]: e for e in rt.events if e["type"] == "error"}
    assert errors["bad"]["param"] == "prompt" and "unknown prompt" in errors["bad"]["message"]
    assert errors["policy"]["param"] == "policy_params" and errors["policy"]["code"] == "unsupported"
    updated = [e for e in rt.events if e["type"] == "session.updated"]
    assert len(updated) == 1 and updated[0]["event_id"] == "good" and 1 <= updated[0]["applies_at_block"] < 12
