"""Matrix-Game's keyboard and mouse over the server (issue 28, item 3): per-pixel-frame rows given at the start
and for the next blocks over REST and the WebSocket, checked by the model (one 422 naming the field), each
steer equal to what an engine given the same rows generates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from server_support import LiveServer, torch_threads

from ff_engine.client import Client, ServerError
from ff_engine.engine import Engine
from ff_engine.server.schemas import VideoRequest
from model_adapters import registry

FIX = Path(__file__).parent / "fixtures" / "matrix_game"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = registry.from_weights(registry.get_preset("matrix-game-tiny"), load_file(FIX / "model.safetensors"))
    with torch_threads(1), LiveServer(tmp_path_factory.mktemp("mg"), model=model, backend="torch",
                                      num_pages=512) as srv:
        yield srv


def rows(key: int, n: int) -> dict:
    one = [0.0] * 4
    one[key] = 1.0
    return {"keyboard_cond": [one] * n, "mouse_cond": [[0.1 * key, 0.0]] * n}


def test_models_route_names_the_steering_rows(server):
    with Client(server.url) as c:
        assert c.models()[0]["conditioning"] == {"keyboard_cond": 4, "mouse_cond": 2}
        assert c.models()[0]["actions"] == []


def test_rest_conditioning_up_front_and_for_the_next_blocks_equals_an_engine(server):
    with Client(server.url) as c:
        v = c.submit(frames=30, seed=1, policy="window", conditioning=rows(0, 5))  # pixel frames 0..4: block 0 + 1
        c.update(v["id"], paused=True)
        u = c.update(v["id"], conditioning=rows(2, 8))  # rows 5..12: appended after what the stream holds
        assert u["changed"] == ["conditioning"] and u["applies_at_block"] is not None
        c.update(v["id"], paused=False)
        st = c.wait(v["id"], timeout=120)
        assert st["status"] == "finished"
        with pytest.raises(ServerError) as bad:
            c.submit(frames=9, conditioning={"keyboard_cond": [[1.0, 0.0]]})
        assert bad.value.status == 422 and "keyboard_cond" in bad.value.message
        with pytest.raises(ServerError) as unknown:
            c.submit(frames=9, conditioning={"joystick": [[1.0]]})
        assert unknown.value.status == 422 and "joystick" in unknown.value.message
        with pytest.raises(ServerError) as acts:
            c.submit(frames=9, actions=["left"])
        assert acts.value.status == 422 and acts.value.param.startswith("actions")


def test_ws_conditioning_steer_gets_both_receipts_and_matches_an_engine(server):
    with Client(server.url) as c, c.realtime(frames=30, seed=2, policy="window", conditioning=rows(1, 5),
                                             include_latents=True) as rt:
        it = iter(rt)
        got = {0: next(it).latents}
        rt.send({"type": "session.update", "event_id": "keys", "conditioning": rows(3, 8)})
        for b in it:
            got[b.index] = b.latents
    updated = next(e for e in rt.events if e["type"] == "session.updated")
    assert [e["type"] for e in rt.events if e.get("event") == 1] == ["control.received", "session.updated"]
    at = updated["applies_at_block"]
    cfg = server.runtime.session_config(VideoRequest(frames=30, seed=2, policy="window", conditioning=rows(1, 5)))
    e = Engine(server.runtime.model, num_pages=512, page_size=server.settings.page_size, backend="torch")
    s = e.add_session(cfg)
    out = []
    while s.id in e.sessions:
        if s.block == at:
            e.set_conditioning(s.id, **server.runtime.conditioning(rows(3, 8)))
        (r,) = e.step([s.id])
        out.append(r.latents)
    assert torch.allclose(torch.cat([torch.tensor(got[i]) for i in range(10)]), torch.cat(out).float(), atol=1e-5)
