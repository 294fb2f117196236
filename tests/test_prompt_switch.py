"""LongLive's prompt switch with KV re-cache (``Engine.switch_prompt``): equal to a dense reference of the re-cache,
under every policy, with the page count unchanged."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_engine import noises, tiny_model

from ff_engine.engine import Engine, SessionConfig
from ff_engine.engine.recache import longlive_default_frames
from ff_engine.engine.sampler import FlowMatchSchedule
from ff_engine.errors import ConfigError
from ff_engine.policies import POLICIES, SinkWindow, Unbounded, make_policy


class DenseStore:
    """Every frame's K/V per layer, contiguous and in frame order (global attention, no pages)."""

    def __init__(self, layers, tokens_per_frame):
        self.k, self.v, self.tpf = [None] * layers, [None] * layers, tokens_per_frame
        self.mode, self.span = "attend", None

    def __call__(self, layer, q, k, v, q_pre, positions):
        k_old, v_old = self.k[layer], self.v[layer]
        if self.mode == "recache":  # attend to frames before the pass, then overwrite the pass's frames
            a, b = (f * self.tpf for f in self.span)
            k_all, v_all = torch.cat([k_old[:a], k]), torch.cat([v_old[:a], v])
            self.k[layer] = torch.cat([k_old[:a], k, k_old[b:]])
            self.v[layer] = torch.cat([v_old[:a], v, v_old[b:]])
        else:
            k_all = k if k_old is None else torch.cat([k_old, k])
            v_all = v if v_old is None else torch.cat([v_old, v])
            if self.mode == "write":
                self.k[layer], self.v[layer] = k_all, v_all
        return F.scaled_dot_product_attention(q.transpose(0, 1)[None], k_all.transpose(0, 1)[None],
                                              v_all.transpose(0, 1)[None])[0].transpose(0, 1)


def dense_switch(model, prompts, blocks_before, blocks_after, recache, init, step_noise):
    g, sched = model.geometry, FlowMatchSchedule.for_model(model)
    fpb, steps = g.frames_per_block, sched.denoising_timesteps
    store, noise, out = DenseStore(g.num_layers, g.tokens_per_frame), list(step_noise), []
    states = [model.encode_prompt(p) for p in prompts]

    def block(b, ps):
        x = init[b * fpb:(b + 1) * fpb][None]
        for i, t in enumerate(steps):
            tt = torch.full((1, fpb), float(t))
            flow = model.forward(x, tt, [ps], [b * fpb], store)
            x0 = sched.to_x0(x, flow, tt)
            if i < len(steps) - 1:
                x = sched.add_noise(x0, noise.pop(0)[None], torch.full((1, fpb), float(steps[i + 1])))
        out.append(x0[0])
        store.mode = "write"
        model.forward(x0, torch.zeros(1, fpb), [ps], [b * fpb], store)
        store.mode = "attend"

    with torch.no_grad():
        for b in range(blocks_before):
            block(b, states[0])
        video, now = torch.cat(out), blocks_before * fpb
        start = now - recache
        while start < now:  # the re-cache, block by block on the stream's grid
            end = min(now, (start // fpb + 1) * fpb)
            store.mode, store.span = "recache", (start, end)
            model.forward(video[start:end][None], torch.zeros(1, end - start), [states[1]], [start], store)
            start = end
        store.mode = "attend"
        for b in range(blocks_before, blocks_before + blocks_after):
            block(b, states[1])
    return torch.cat(out)


def run_engine(model, prompts, blocks_before, recache, policy, budget, init, step_noise, page_size=5):
    frames = init.shape[0]
    e = Engine(model, num_pages=300, page_size=page_size, backend="torch")
    s = e.add_session(SessionConfig(prompt=prompts[0], num_frames=frames, policy=policy, budget_frames=budget,
                                    initial_noise=init, step_noise=step_noise))
    for _ in range(blocks_before):
        e.step([s.id])
    held = e.cache.pages_held(s.id)
    tokens = [e.cache.num_tokens(s.id, layer) for layer in range(model.geometry.num_layers)]
    done = e.switch_prompt(s.id, prompts[1], recache)
    assert e.cache.pages_held(s.id) == held  # the re-cache keeps the page budget exactly
    assert [e.cache.num_tokens(s.id, layer) for layer in range(model.geometry.num_layers)] == tokens
    assert torch.equal(s.cfg.prompt, prompts[1])
    e.cache.check_invariants()
    while s.id in e.sessions:
        (r,) = e.step([s.id])
        assert r.error is None, r.error
    assert e.cache.pool.num_free == e.cache.num_pages
    return torch.cat(s.latents), done


@pytest.fixture(scope="module")
def setup():
    m = tiny_model()
    prompts = [torch.randn(5, m.cfg.text_dim, generator=torch.Generator().manual_seed(i)) for i in (1, 2)]
    init, steps = noises(m, 15, seed=4)
    return m, prompts, init, steps


@pytest.mark.parametrize("recache", [6, 9, 0])
def test_switch_equals_dense_reference(setup, recache):
    m, prompts, init, steps = setup
    ref = dense_switch(m, prompts, 3, 2, recache, init, steps)
    out, done = run_engine(m, prompts, 3, recache, Unbounded(), None, init, list(steps))
    assert done == recache and (out - ref).abs().max() <= 1e-4


def test_recache_changes_what_follows_and_longlive_default(setup):
    m, prompts, init, steps = setup
    with_recache, _ = run_engine(m, prompts, 3, None, Unbounded(), None, init, list(steps))
    without, _ = run_engine(m, prompts, 3, 0, Unbounded(), None, init, list(steps))
    assert torch.equal(with_recache[:9], without[:9]) and (with_recache[9:] - without[9:]).abs().max() > 1e-3
    e = Engine(m, num_pages=100, page_size=8, backend="torch")
    s = e.add_session(SessionConfig(prompt=prompts[0], num_frames=30, policy=SinkWindow(sink_frames=3),
                                    budget_frames=9))
    for _ in range(4):
        e.step([s.id])
    assert longlive_default_frames(s) == 12  # local_attn_size = budget + one block (LongLive: 12 with sink 3)
    assert e.switch_prompt(s.id, prompts[1]) == 12 - 3  # frames 0-2 are the sink: they keep their K/V


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_switch_under_every_policy(setup, name):
    m, prompts, *_ = setup
    policy = make_policy(name)
    budget = policy.sink_frames + 6 if policy.bounded else None
    frames = 3 * math.ceil(policy.sink_frames / 3) + 15  # whole blocks (forcing-kv's sink is 1 frame)
    init2, steps2 = noises(m, frames, seed=5)
    out, _ = run_engine(m, prompts, (frames - 6) // 3, None, policy, budget, init2, steps2, page_size=8)
    assert torch.isfinite(out).all() and out.shape[0] == frames


def test_bad_switches_change_nothing(setup):
    m, prompts, *_ = setup
    e = Engine(m, num_pages=100, page_size=8, backend="torch")
    s = e.add_session(SessionConfig(prompt=prompts[0], num_frames=9, policy=Unbounded()))
    e.step([s.id])
    before = e.cache.gather(s.id, 0)["k"].clone()
    for args, needle in [(("nope", prompts[1]), "not an active session"),
                         ((s.id, torch.randn(3, m.cfg.text_dim + 1)), "text embeddings"),
                         ((s.id, "a cat"), "tensor"),
                         ((s.id, prompts[1], -1), "recache_frames")]:
        with pytest.raises(ConfigError, match=needle):
            e.switch_prompt(*args)
    assert torch.equal(e.cache.gather(s.id, 0)["k"], before) and torch.equal(s.cfg.prompt, prompts[0])
