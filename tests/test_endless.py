"""Endless streams: nothing ends a stream at the RoPE table any more.  Past the table a stream computes exactly
what an unlimited table would give (attention depends on frame offsets only, so a stream shifted past the table
equals the same stream below it), a 2,000-latent-frame stream runs with a flat page count, and below the table
nothing changed (the golden traces in test_causal_wan_golden.py pass unchanged)."""

import dataclasses

import pytest
import torch
from dense_reference import dense_generate
from test_engine import noises, tiny_model

from ff_engine.engine import Engine, SessionConfig
from ff_engine.engine.recache import retain_for_recache
from ff_engine.errors import ConfigError
from ff_engine.policies import FutureForcing, SinkWindow
from model_adapters.causal_wan.model import Rope3D

TABLE = 1024


class Shifted(torch.nn.Module):
    """The same model with every frame index moved by ``offset`` (beyond the reference's RoPE table)."""

    def __init__(self, model, offset):
        super().__init__()
        self.inner, self.offset = model, offset
        self.geometry, self.cfg, self.rope = model.geometry, model.cfg, model.rope

    def encode_prompt(self, text_embeds):
        return self.inner.encode_prompt(text_embeds)

    def forward(self, latents, timesteps, prompts, start_frames, attention):
        return self.inner.forward(latents, timesteps, prompts, [s + self.offset for s in start_frames], attention)


def test_angles_below_the_table_are_the_lookup_and_continue_past_it():
    rope = Rope3D(128, TABLE)
    d = 128 - 4 * (128 // 6)
    table = torch.outer(torch.arange(TABLE, dtype=torch.float64),
                        1.0 / torch.pow(10000.0, torch.arange(0, d, 2, dtype=torch.float64).div(d)))
    frames = torch.tensor([0, 1, 511, TABLE - 1])
    pos = torch.stack([frames, torch.zeros_like(frames), torch.zeros_like(frames)], 1)
    assert torch.equal(rope.phases(pos)[:, : d // 2], table[frames])  # bit-identical to the reference's table
    far = torch.tensor([[TABLE + 5000, 3, 4]])
    assert torch.allclose(rope.phases(far)[:, : d // 2], (TABLE + 5000) * table[1][None], rtol=1e-15, atol=0)


def test_a_stream_past_the_table_equals_the_same_stream_below_it():
    """The reference's own rolling-cache loop (no pages, no policy) with every frame index moved 3,572 frames past
    the table gives the same video: attention sees frame offsets only."""
    m = tiny_model()
    prompt = torch.randn(5, m.cfg.text_dim)
    init, steps = noises(m, 12, seed=2)
    for local, sink in ((-1, 0), (6, 0), (9, 3)):
        below = dense_generate(m, prompt, 12, local, sink, init, steps)
        past = dense_generate(Shifted(m, 3 * TABLE + 500), prompt, 12, local, sink, init, steps)
        assert (below - past).abs().max() <= 1e-4, (local, sink)


def test_future_forcing_runs_across_the_table():
    """Future Forcing rotates its query proxy to frames past the table (no clamp, no error)."""
    m = tiny_model(sample_steps=(1000,))
    e = Engine(m, num_pages=200, page_size=8, backend="torch")
    s = e.add_session(SessionConfig(prompt=torch.randn(3, m.cfg.text_dim), num_frames=TABLE + 12,
                                    policy=FutureForcing(horizon=6), budget_frames=6))
    s.block = TABLE // 3 - 3  # start 9 frames before the table's end
    while s.id in e.sessions:
        for r in e.step([s.id]):
            assert r.error is None and torch.isfinite(r.latents).all()
    assert r.done and r.block * 3 > TABLE  # its last block starts past the table


def test_two_thousand_frames_with_a_flat_cache_and_bounded_host_latents():
    """The same 2,000-frame stream twice on one engine (stepped alone, so bit-identical): with ``retain_frames``
    its host latents stay within budget + one block while the stream runs, and every block equals the one kept
    with ``retain_frames=None``."""
    m = tiny_model(sample_steps=(1000,), frames_per_block=4)  # one denoising step: the test is about length
    e = Engine(m, num_pages=128, page_size=8, backend="torch")
    prompt = torch.randn(3, m.cfg.text_dim)
    cfg = SessionConfig(prompt=prompt, num_frames=2000, policy=SinkWindow(sink_frames=2), budget_frames=10)
    s = e.add_session(dataclasses.replace(cfg, retain_frames=14))
    full = e.add_session(cfg)
    reserved, held, newest = e.cache.pool.reserved(s.id), [], 0
    while s.id in e.sessions:
        (r,) = e.step([s.id])
        (r_full,) = e.step([full.id])
        assert r.error is None and torch.isfinite(r.latents).all() and torch.equal(r.latents, r_full.latents)
        kept = sum(b.shape[0] for b in s.latents)
        assert 14 <= kept <= 14 + 3 or s.block * 4 < 14  # whole blocks: at most one block minus a frame over
        assert s.latents_start_frame + kept == s.block * 4 and torch.equal(s.latents[-1], r.latents)
        if s.id in e.sessions:
            held.append(e.cache.pages_held(s.id))
            newest = int(e.cache.gather(s.id, 0)["positions"][:, 0].max())
            assert held[-1] <= reserved
    assert r.done and r.block == 499 and newest == 1995
    assert len(set(held[5:])) == 1  # the same pages from the sixth block to the 2,000th frame
    assert torch.equal(torch.cat(s.latents), torch.cat(full.latents)[s.latents_start_frame :])
    assert s.latents_start_frame == 1984 and len(full.latents) == 500
    assert e.cache.pool.num_free == e.cache.num_pages


@pytest.mark.parametrize("bad", [-1, True, 2.5, "3"])
def test_retain_frames_is_validated(bad):
    m = tiny_model()
    e = Engine(m, num_pages=50, page_size=8, backend="torch")
    with pytest.raises(ConfigError, match="retain_frames"):
        e.add_session(SessionConfig(prompt=torch.randn(3, m.cfg.text_dim), num_frames=6, retain_frames=bad))
    with pytest.raises(ConfigError, match="retain_frames"):
        e.generate(SessionConfig(prompt=torch.randn(3, m.cfg.text_dim), num_frames=6, retain_frames=3))
    assert not e.sessions and e.cache.pool.num_free == e.cache.num_pages


def test_prompt_switch_recaches_from_the_retained_window_and_refuses_dropped_frames():
    """Retaining what LongLive's re-cache reads (budget + one block) switches exactly as keeping everything;
    retaining less refuses the default re-cache with one ConfigError and changes nothing."""
    m = tiny_model()
    p0, p1 = torch.randn(5, m.cfg.text_dim), torch.randn(5, m.cfg.text_dim)
    cfg = SessionConfig(prompt=p0, num_frames=21, policy=SinkWindow(sink_frames=0), budget_frames=6, seed=4)
    outs = {}
    for retain in (None, retain_for_recache(cfg, 3), 3):
        e = Engine(m, num_pages=60, page_size=8, backend="torch")
        s = e.add_session(dataclasses.replace(cfg, retain_frames=retain))
        for _ in range(4):
            e.step([s.id])
        if retain == 3:
            before = e.cache.gather(s.id, 0)["k"].clone()
            with pytest.raises(ConfigError, match=r"recache_frames: .*frames \[9, 12\) only .*needs \[3, 12\)"):
                e.switch_prompt(s.id, p1)
            assert torch.equal(e.cache.gather(s.id, 0)["k"], before) and torch.equal(s.cfg.prompt, p0)
            assert e.switch_prompt(s.id, p1, recache_frames=3) == 3  # what the message offers works
            continue
        assert e.switch_prompt(s.id, p1) == 9
        blocks = []
        while s.id in e.sessions:
            blocks += [r.latents for r in e.step([s.id])]
        outs[retain] = torch.cat(blocks)
    assert retain_for_recache(cfg, 3) == 9 and torch.equal(outs[None], outs[9])
