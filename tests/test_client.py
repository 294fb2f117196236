"""``ff_engine.client``: the async client against a real server, and the MJPEG parser on split chunks."""

from __future__ import annotations

import asyncio

import av
import pytest
from server_support import LiveServer, torch_threads

from ff_engine.client import AsyncClient, Client, MjpegParser, ServerError


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with torch_threads(1), LiveServer(tmp_path_factory.mktemp("client"), backend="torch") as srv:
        yield srv


def test_mjpeg_parser_handles_any_chunking():
    parts = [b"\xff\xd8" + bytes([i]) * (10 + i) + b"\xff\xd9" for i in range(5)]
    body = (
        b"".join(
            f"--ffframe\r\nContent-Type: image/jpeg\r\nContent-Length: {len(p)}\r\nX-Frame: {i}\r\n\r\n".encode()
            + p
            + b"\r\n"
            for i, p in enumerate(parts)
        )
        + b"--ffframe--\r\n"
    )
    for size in (1, 3, 7, 64, len(body)):
        parser = MjpegParser()
        got = [part for i in range(0, len(body), size) for part in parser.feed(body[i : i + size])]
        assert [jpeg for _, jpeg in got] == parts and [h["X-Frame"] for h, _ in got] == ["0", "1", "2", "3", "4"]


def test_async_client_submit_iterate_cancel_save(server, tmp_path):
    async def scenario():
        async with AsyncClient(server.url) as c:
            v = await c.submit(frames=9, seed=1, policy="window", budget_frames=6)
            frames = [part async for part in c.frames(v["id"])]
            path = await c.save(v["id"], tmp_path / "a.mp4")
            rt = await c.realtime(frames=9, seed=1, include_latents=True)
            async with rt:
                blocks = [b async for b in rt]
            long = await c.submit(frames=900, seed=2)
            await c.cancel(long["id"])
            st = await c.wait(long["id"], timeout=30)
            with pytest.raises(ServerError) as e:
                await c.submit(frames=0)
            return frames, path, blocks, rt.done, st, e.value

    frames, path, blocks, done, st, err = asyncio.run(scenario())
    assert len(frames) == 9 and [h["X-Block"] for h, _ in frames] == ["0"] * 3 + ["1"] * 3 + ["2"] * 3
    with av.open(str(path)) as cont:
        assert sum(1 for _ in cont.decode(video=0)) == 9
    assert [b.index for b in blocks] == [0, 1, 2] and blocks[0].latents.shape == (3, 12, 16, 24)
    assert [j for b in blocks for j in b.frames] == [j for _, j in frames]  # same seed: same JPEGs on both routes
    assert blocks[0].pixels()[0].shape == (128, 192, 3)
    assert done["state"] == "finished" and st["status"] == "cancelled"
    assert err.status == 422 and err.param == "frames"


def test_sync_client_errors_carry_the_field(server):
    with Client(server.url) as c:
        with pytest.raises(ServerError) as e:
            c.realtime(frames=3, policy="nope")
        assert e.value.param == "policy" and e.value.status == 422
        with pytest.raises(ServerError) as e:
            c.save("vid_" + "1" * 32, "/tmp/never.mp4")
        assert e.value.status == 404
