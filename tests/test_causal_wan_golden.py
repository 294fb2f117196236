"""The causal-Wan adapter + paged engine reproduce golden traces recorded from the Self-Forcing reference code."""

from pathlib import Path

import pytest
import torch

from ff_engine.engine import Engine, SessionConfig
from ff_engine.policies import Unbounded, Window
from model_adapters.causal_wan import load_causal_wan

FIX = Path(__file__).parent / "fixtures" / "self_forcing_reference"
TRACES = {"a_global": (Unbounded(), None), "b_local6": (Window(), 3)}


@pytest.fixture(scope="module")
def model():
    return load_causal_wan(FIX / "model.safetensors", preset="wan-tiny")


@pytest.fixture(scope="module")
def prompt():
    return torch.load(FIX / "text_context.pt", weights_only=True)["prompt_embeds"][0]


def trace(name):
    return torch.load(FIX / f"trace_{name}.pt", weights_only=True)


@pytest.mark.parametrize("backend,page_size", [("torch", 16), ("torch", 5), ("vllm-cpu", 16), ("vllm-cpu", 32)])
@pytest.mark.parametrize("name", list(TRACES))
def test_replay_every_model_call(model, prompt, name, backend, page_size):
    """Feed each recorded call's input through the paged engine: flow_pred and x0 of all 35 calls match."""
    tr = trace(name)
    policy, budget = TRACES[name]
    e = Engine(model, num_pages=400, page_size=page_size, backend=backend)
    s = e.add_session(SessionConfig(prompt=prompt, num_frames=21, policy=policy, budget_frames=budget))
    assert len(tr["calls"]) == 35
    for c in tr["calls"]:
        assert s.start_frame == c["current_start_frame"] and s.start_frame * 24 == c["current_start"]
        write = c["kind"] == "context"
        flow = e.forward_block([s], c["input"], c["timestep"], write=write)
        x0 = e.schedule.to_x0(c["input"], flow, c["timestep"])
        assert (flow - c["flow_pred"]).abs().max() <= 1e-4, (c["index"], c["kind"])
        assert (x0 - c["x0"]).abs().max() <= 1e-4, c["index"]
        if write:
            e.compress(s)  # the trace supplies the write pass itself; then the engine's own advance
            e.advance(s, None)
            # the cache holds what the reference's rolling cache attends to next: min(all, budget) frames
            kept = 24 * (s.start_frame if budget is None else min(s.start_frame, budget))
            assert all(e.cache.num_tokens(s.id, layer) == kept for layer in range(2))
    e.cancel(s.id)
    assert e.cache.pool.num_free == e.cache.num_pages


@pytest.mark.parametrize("backend", ["torch", "vllm-cpu"])
@pytest.mark.parametrize("name", list(TRACES))
def test_engine_loop_reproduces_final_latents(model, prompt, name, backend):
    tr = trace(name)
    policy, budget = TRACES[name]
    e = Engine(model, num_pages=400, page_size=16, backend=backend)
    noise = [r["noise"] for r in sorted(tr["add_noise"], key=lambda r: r["after_call"])]
    # the recorded step noise really is what the reference added: input(k+1) = (1-s) x0(k) + s noise
    r0 = tr["add_noise"][0]
    c0, c1 = tr["calls"][r0["after_call"]], tr["calls"][r0["after_call"] + 1]
    assert torch.allclose(e.schedule.add_noise(c0["x0"][0], r0["noise"], r0["timestep"]), c1["input"][0], atol=1e-6)
    out = e.generate(SessionConfig(prompt=prompt, num_frames=21, policy=policy, budget_frames=budget,
                                   initial_noise=tr["initial_noise"][0], step_noise=noise))
    assert out.shape == tr["final_latents"][0].shape
    assert (out - tr["final_latents"][0]).abs().max() <= 1e-4
    assert e.cache.pool.num_free == e.cache.num_pages and not e.sessions


def test_traces_differ_so_the_window_matters():
    a, b = trace("a_global")["final_latents"], trace("b_local6")["final_latents"]
    assert (a - b).abs().max() > 1e-2
