import pytest
import torch
from dense_reference import dense_generate

from ff_engine.engine import Engine, SessionConfig
from ff_engine.errors import BudgetError, CheckpointError, ConfigError
from ff_engine.policies import SinkWindow, Unbounded, Window, make_policy
from model_adapters.causal_wan import PRESETS, CausalWanModel, load_causal_wan, save_checkpoint


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = PRESETS["wan-tiny"].with_(num_heads=4, text_len=8, latent_hw=(4, 6), **kw)  # 4 x 64 heads, 6 tok/frame
    m = CausalWanModel(cfg).eval()
    with torch.no_grad():  # Wan zero-inits the head; random weights everywhere make the test meaningful
        for p in m.parameters():
            if p.dim() <= 1 or p.abs().max() == 0:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def noises(model, frames, seed):
    g = torch.Generator().manual_seed(seed)
    geo = model.geometry
    shape = (geo.frames_per_block, geo.latent_channels, *geo.latent_hw)
    init = torch.randn(frames, *shape[1:], generator=g)
    steps = [torch.randn(shape, generator=g) for _ in range(3 * frames // geo.frames_per_block)]
    return init, steps


CASES = [  # policy, budget frames, sink frames (for the dense loop), page size, backend
    (Unbounded(), None, 0, 4, "torch"),   # page does not divide the 6 tokens per frame
    (Unbounded(), None, 0, 16, "vllm-cpu"),
    (Window(), 3, 0, 3, "torch"),         # divides tokens per frame
    (Window(), 6, 0, 16, "vllm-cpu"),
    (Window(), 4, 0, 5, "torch"),         # budget not a multiple of the block
    (SinkWindow(sink_frames=3), 6, 3, 7, "torch"),
    (SinkWindow(sink_frames=1), 5, 1, 32, "vllm-cpu"),
]


@pytest.mark.parametrize("policy,budget,sink,page_size,backend", CASES)
def test_paged_engine_equals_dense_reference(policy, budget, sink, page_size, backend):
    m = tiny_model()
    prompt = torch.randn(5, m.cfg.text_dim)
    frames = 18
    init, steps = noises(m, frames, seed=3)
    local = -1 if budget is None else budget + m.geometry.frames_per_block
    ref = dense_generate(m, prompt, frames, local, sink, init, steps)
    e = Engine(m, num_pages=200, page_size=page_size, backend=backend)
    out = e.generate(SessionConfig(prompt=prompt, num_frames=frames, policy=policy, budget_frames=budget,
                                   initial_noise=init, step_noise=steps))
    assert (out - ref).abs().max() <= 1e-4
    assert e.cache.pool.num_free == e.cache.num_pages


def test_policies_actually_differ():
    m = tiny_model()
    prompt = torch.randn(5, m.cfg.text_dim)
    init, steps = noises(m, 12, seed=1)
    outs = []
    for pol, b in [(Unbounded(), None), (Window(), 3), (SinkWindow(sink_frames=3), 6)]:
        e = Engine(m, num_pages=100, page_size=8, backend="torch")
        outs.append(e.generate(SessionConfig(prompt=prompt, num_frames=12, policy=pol, budget_frames=b,
                                             initial_noise=init, step_noise=list(steps))))
    assert (outs[0] - outs[1]).abs().max() > 1e-3 and (outs[0] - outs[2]).abs().max() > 1e-3


def test_budget_is_never_exceeded_and_pages_return():
    m = tiny_model()
    e = Engine(m, num_pages=64, page_size=4, backend="torch")
    s = e.add_session(SessionConfig(prompt=torch.randn(3, 256), num_frames=30, policy=Window(), budget_frames=5))
    reserved = e.cache.pool.reserved(s.id)
    while s.id in e.sessions:
        e.step()
        if s.id in e.sessions:
            assert e.cache.pages_held(s.id) <= reserved
            for layer in range(m.geometry.num_layers):
                assert e.cache.num_tokens(s.id, layer) <= 5 * 6
            e.cache.check_invariants()
    assert e.cache.pool.num_free == 64


def test_several_sessions_batched_equal_sequential():
    m = tiny_model()
    cfgs = [{"prompt": torch.randn(4, 256, generator=torch.Generator().manual_seed(i)), "num_frames": 9, "seed": i,
                 "policy": Window(), "budget_frames": 3} for i in range(3)]
    seq = [Engine(m, num_pages=100, page_size=16, backend="vllm-cpu").generate(SessionConfig(**c)) for c in cfgs]
    e = Engine(m, num_pages=100, page_size=16, backend="vllm-cpu")
    ss = [e.add_session(SessionConfig(**c)) for c in cfgs]
    while e.sessions:
        e.step()
    for s, ref in zip(ss, seq):
        assert (torch.cat(s.latents) - ref).abs().max() <= 1e-4


def test_bad_inputs_are_one_line_errors_and_leak_nothing():
    m = tiny_model()
    e = Engine(m, num_pages=20, page_size=4, backend="torch")
    p = torch.randn(3, 256)
    with pytest.raises(ConfigError, match="budget_frames 2 is below the 3 sink frames"):
        e.add_session(SessionConfig(prompt=p, num_frames=9, policy=SinkWindow(sink_frames=3), budget_frames=2))
    with pytest.raises(ConfigError, match="num_frames"):
        e.add_session(SessionConfig(prompt=p, num_frames=0))
    with pytest.raises(ConfigError, match="num_frames must be at most"):
        e.add_session(SessionConfig(prompt=p, num_frames=2**31, policy=Window(), budget_frames=3))
    with pytest.raises(ConfigError, match="text embeddings"):
        e.add_session(SessionConfig(prompt=torch.randn(3, 17), num_frames=9))
    with pytest.raises(BudgetError, match="num_pages"):
        e.add_session(SessionConfig(prompt=p, num_frames=300))  # unbounded, too long for the pool
    with pytest.raises(ConfigError, match="unknown policy"):
        make_policy("lru")
    with pytest.raises(ConfigError, match="page_size 24"):
        Engine(m, num_pages=20, page_size=24, backend="vllm-cpu")
    with pytest.raises(ConfigError, match="NaN"):
        e.add_session(SessionConfig(prompt=torch.full((3, 256), float("nan")), num_frames=9))
    assert not e.sessions and e.cache.pool.num_free == 20 and e.cache.pool.reserved_total == 0


def test_nan_weights_cancel_the_session_without_leaking():
    m = tiny_model()
    with torch.no_grad():
        m.head.head.bias.fill_(float("nan"))
    e = Engine(m, num_pages=20, page_size=4, backend="torch")
    s = e.add_session(SessionConfig(prompt=torch.randn(3, 256), num_frames=9, policy=Window(), budget_frames=3))
    r = e.step()
    assert r[0].error and "non-finite" in r[0].error and s.id not in e.sessions
    assert e.cache.pool.num_free == 20


def test_checkpoint_roundtrip_and_layouts(tmp_path):
    m = tiny_model()
    x = torch.randn(1, 3, 16, 4, 6)
    t = torch.full((1, 3), 500.0)

    def run(model):
        from tests_helpers import dense_attention
        return model.forward(x, t, [model.encode_prompt(torch.ones(2, 256))], [0], dense_attention)

    ref = run(m)
    save_checkpoint(m, tmp_path / "m.safetensors")
    assert torch.equal(run(load_causal_wan(tmp_path / "m.safetensors", preset="wan-tiny")), ref)
    # Self-Forcing layout: {'generator_ema': {'model.<key>': tensor}} in a .pt file
    torch.save({"generator_ema": {f"model.{k}": v for k, v in m.state_dict().items()}}, tmp_path / "sf.pt")
    m2 = load_causal_wan(tmp_path / "sf.pt", preset=m.cfg)
    assert torch.equal(run(m2), ref)
    # LongLive-style LoRA (peft names) merges into the base weight
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    w = sd.pop("blocks.0.self_attn.q.weight")
    a, b = torch.randn(4, 256) * 0.01, torch.randn(256, 4) * 0.01
    sd["blocks.0.self_attn.q.base_layer.weight"] = w - b @ a
    sd["blocks.0.self_attn.q.lora_A.weight"], sd["blocks.0.self_attn.q.lora_B.weight"] = a, b
    torch.save({"generator": sd}, tmp_path / "ll.pt")
    assert (run(load_causal_wan(tmp_path / "ll.pt", preset=m.cfg)) - ref).abs().max() < 1e-4


def test_wrong_checkpoint_gives_one_clear_error(tmp_path):
    m = tiny_model()
    sd = m.state_dict()
    sd["blocks.1.ffn.0.weight"] = torch.zeros(3, 3)
    del sd["head.modulation"]
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as ei:
        load_causal_wan(tmp_path / "bad.pt", preset=m.cfg)
    msg = str(ei.value)
    assert "\n" not in msg and "head.modulation" in msg and "extra.weight" in msg and "blocks.1.ffn.0.weight" in msg
    with pytest.raises(CheckpointError, match="not found"):
        load_causal_wan(tmp_path / "missing.safetensors")


def test_context_noise_renoises_the_written_block_and_euler_is_deterministic():
    """context_noise > 0 writes a re-noised x0 (Self-Forcing's context_noise), so later blocks change; the
    deterministic (Euler) schedule ignores step noise: two seeds with the same initial noise agree."""
    from ff_engine.engine.sampler import FlowMatchSchedule

    torch.manual_seed(0)
    model = CausalWanModel(PRESETS["wan-tiny"]).eval()
    prompt = torch.randn(4, model.cfg.text_dim)
    init = torch.randn(9, 16, 8, 12)

    def run(seed, **kw):
        e = Engine(model, num_pages=64, page_size=16, backend="torch", **kw)
        return e.generate(SessionConfig(prompt=prompt, num_frames=9, seed=seed, policy=make_policy("unbounded"),
                                        initial_noise=init))

    clean, noisy = run(0), run(0, context_noise=100.0)
    assert torch.allclose(clean[:3], noisy[:3]) and not torch.allclose(clean[3:], noisy[3:], atol=1e-4)
    euler = FlowMatchSchedule(stochastic=False)
    a, b = run(0, schedule=euler), run(1, schedule=euler)
    assert torch.equal(a, b) and not torch.allclose(run(0), run(1))
