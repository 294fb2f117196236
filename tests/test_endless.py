"""Endless streams: nothing ends a stream at the RoPE table any more.  Past the table a stream computes exactly
what an unlimited table would give (attention depends on frame offsets only, so a stream shifted past the table
equals the same stream below it), a 2,000-latent-frame stream runs with a flat page count, and below the table
nothing changed (the golden traces in test_causal_wan_golden.py pass unchanged)."""

import torch
from dense_reference import dense_generate
from test_engine import noises, tiny_model

from ff_engine.engine import Engine, SessionConfig
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


def test_two_thousand_frames_with_a_flat_cache():
    m = tiny_model(sample_steps=(1000,), frames_per_block=4)  # one denoising step: the test is about length
    e = Engine(m, num_pages=64, page_size=8, backend="torch")
    s = e.add_session(SessionConfig(prompt=torch.randn(3, m.cfg.text_dim), num_frames=2000,
                                    policy=SinkWindow(sink_frames=2), budget_frames=10))
    reserved, held, newest = e.cache.pool.reserved(s.id), [], 0
    while s.id in e.sessions:
        (r,) = e.step([s.id])
        assert r.error is None and torch.isfinite(r.latents).all()
        if s.id in e.sessions:
            held.append(e.cache.pages_held(s.id))
            newest = int(e.cache.gather(s.id, 0)["positions"][:, 0].max())
            assert held[-1] <= reserved
        s.latents.clear()  # a streaming consumer takes each block as it comes
    assert r.done and r.block == 499 and newest == 1995
    assert len(set(held[5:])) == 1  # the same pages from the sixth block to the 2,000th frame
    assert e.cache.pool.num_free == e.cache.num_pages
