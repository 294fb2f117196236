"""The adapter conformance test: every registered architecture, at its ``test_preset``, against the contract of
``model_adapters/base.py``.  A new architecture is covered by registering it; this file is the checklist of
``docs/adapters.md``:

1. the K/V it hands the engine match its declared geometry (shapes, one call per layer, positions frame-major);
2. its ``rope.phases`` describe exactly the rotation of the q/k it emits (Future Forcing relies on it);
3. a batch of streams equals the same streams one at a time;
4. the paged engine with the Unbounded policy equals an independent dense loop over its own forward;
5. every cache policy runs it to the end, under budget, and returns every page;
6. bad input is one ``FFEngineError`` line; the registry's parameter count, decoder and checkpoint round trip hold.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from ff_engine.engine import Engine, SessionConfig
from ff_engine.engine.sampler import FlowMatchSchedule
from ff_engine.errors import FFEngineError
from ff_engine.policies import POLICIES, Unbounded, make_policy
from model_adapters import checkpoints, registry
from model_adapters.base import StateSpec, StreamStates, rotate_pairs

ARCHS = sorted(registry.architectures())


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    arch = registry.architecture(request.param)
    m = registry.build(arch.presets[arch.test_preset], seed=0)
    with torch.no_grad():  # random weights everywhere (some layers start at zero), so the checks mean something
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def prompt_for(model, seed=0, length=5):
    cfg = model.cfg
    if not cfg.conditional:
        return torch.zeros(1, cfg.text_dim)
    return torch.randn(min(length, cfg.text_len), cfg.text_dim, generator=torch.Generator().manual_seed(seed))


def block_input(model, seqs=1, seed=0):
    g = model.geometry
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(seqs, g.frames_per_block, g.latent_channels, *g.latent_hw, generator=gen)


class Recorder:
    """A ``SelfAttentionFn`` that attends within the block and records what the adapter handed over."""

    def __init__(self):
        self.calls = []

    def __call__(self, layer, q, k, v, q_pre, positions):
        self.calls.append((layer, q, k, v, q_pre, positions))
        return dense(q, k, v)


def dense(q, k, v):
    rep = q.shape[1] // k.shape[1]  # grouped-query attention: kv heads shared by groups of query heads
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                          v.transpose(0, 1)[None])[0].transpose(0, 1)


def test_kv_match_the_declared_geometry(model):
    g, rec = model.geometry, Recorder()
    starts = [0, 2 * g.frames_per_block]
    x = block_input(model, seqs=2)
    ps = [model.encode_prompt(prompt_for(model, i)) for i in range(2)]
    with torch.no_grad():
        out = model.forward(x, torch.full((2, g.frames_per_block), 500.0), ps, starts, rec)
    assert out.shape == x.shape
    assert [c[0] for c in rec.calls] == list(range(g.num_layers))
    n = 2 * g.tokens_per_block
    for _, q, k, v, q_pre, pos in rec.calls:
        assert q.shape == q_pre.shape == (n, g.num_heads, g.head_dim)
        assert k.shape == v.shape == (n, g.num_kv_heads, g.head_dim)
        assert pos.shape == (n, 3) and pos.dtype == torch.int32
    pos = rec.calls[0][5].long()
    gh, gw = g.token_grid
    for i, start in enumerate(starts):
        f, h, w = torch.meshgrid(torch.arange(start, start + g.frames_per_block), torch.arange(gh), torch.arange(gw),
                                 indexing="ij")
        want = torch.stack([f, h, w], -1).reshape(-1, 3)
        assert torch.equal(pos[i * g.tokens_per_block:(i + 1) * g.tokens_per_block], want)


def test_rope_phases_describe_the_emitted_rotation(model):
    rec = Recorder()
    with torch.no_grad():
        model.forward(block_input(model), torch.full((1, model.geometry.frames_per_block), 250.0),
                      [model.encode_prompt(prompt_for(model))], [7 * model.geometry.frames_per_block], rec)
    for _, q, k, _, q_pre, pos in rec.calls:
        angles = model.rope.phases(pos)
        assert angles.shape == (q.shape[0], q.shape[-1] // 2)
        assert (rotate_pairs(q_pre, angles) - q).abs().max() <= 1e-4 * max(1.0, float(q.abs().max()))


def generate(model, policy, budget, frames, seeds, page_size=8):
    e = Engine(model, num_pages=400, page_size=page_size, backend="torch")
    sessions = [e.add_session(SessionConfig(prompt=prompt_for(model, s), num_frames=frames, seed=s, policy=policy,
                                            budget_frames=budget)) for s in seeds]
    while e.sessions:
        for r in e.step():
            assert r.error is None, r.error
        for s in sessions:
            if s.id in e.sessions and budget is not None:
                assert all(e.cache.num_tokens(s.id, layer) <= budget * model.geometry.tokens_per_frame
                           for layer in range(model.geometry.num_layers))
    assert e.cache.pool.num_free == e.cache.num_pages
    return [torch.cat(s.latents) for s in sessions]


def test_batched_streams_equal_sequential(model):
    frames = 2 * model.geometry.frames_per_block
    window = make_policy("window")
    budget = model.geometry.frames_per_block
    together = generate(model, window, budget, frames, seeds=[1, 2])
    alone = [generate(model, window, budget, frames, seeds=[s])[0] for s in (1, 2)]
    for a, b in zip(together, alone):
        assert (a - b).abs().max() <= 1e-4


class DenseCache:
    """The whole past K/V of every layer in contiguous tensors (no pages, no policy)."""

    def __init__(self, layers):
        self.k, self.v, self.write = [None] * layers, [None] * layers, False

    def __call__(self, layer, q, k, v, q_pre, positions):
        kk = k if self.k[layer] is None else torch.cat([self.k[layer], k])
        vv = v if self.v[layer] is None else torch.cat([self.v[layer], v])
        if self.write:
            self.k[layer], self.v[layer] = kk, vv
        return dense(q, kk, vv)


def dense_loop(model, prompt, frames, init, steps_noise):
    """Self-Forcing's loop over the adapter's own forward, the model's own schedule and context noise."""
    g, sched = model.geometry, FlowMatchSchedule.for_model(model)
    cache, ps, noise, out = DenseCache(g.num_layers), model.encode_prompt(prompt), list(steps_noise), []
    fpb, steps = g.frames_per_block, sched.denoising_timesteps
    cn = float(model.cfg.context_noise)
    spec = declared_state(model)  # adapter-declared per-stream state, held here as the engine holds it
    state = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in spec.items()}

    def kw(write):
        return {"stream_state": StreamStates([state], write)} if spec else {}
    for b in range(frames // fpb):
        x = init[b * fpb:(b + 1) * fpb][None]
        for i, t in enumerate(steps):
            tt = torch.full((1, fpb), float(t))
            flow = model.forward(x, tt, [ps], [b * fpb], cache, **kw(False))
            x0 = sched.to_x0(x, flow, tt)
            if i < len(steps) - 1:
                eps = noise.pop(0)[None] if sched.stochastic else x0 + flow
                x = sched.add_noise(x0, eps, torch.full((1, fpb), float(steps[i + 1])))
        out.append(x0[0])
        clean = x0 if cn == 0 else sched.add_noise(x0, noise.pop(0)[None], torch.full((1, fpb), cn))
        cache.write = True
        model.forward(clean, torch.full((1, fpb), cn), [ps], [b * fpb], cache, **kw(True))
        cache.write = False
    return torch.cat(out)


def test_unbounded_equals_its_dense_reference(model):
    g = model.geometry
    frames = 3 * g.frames_per_block
    gen = torch.Generator().manual_seed(5)
    init = torch.randn(frames, g.latent_channels, *g.latent_hw, generator=gen)
    noise = [torch.randn(g.frames_per_block, g.latent_channels, *g.latent_hw, generator=gen) for _ in range(40)]
    prompt = prompt_for(model, 3)
    with torch.no_grad():
        ref = dense_loop(model, prompt, frames, init, noise)
    e = Engine(model, num_pages=400, page_size=7, backend="torch")
    out = e.generate(SessionConfig(prompt=prompt, num_frames=frames, policy=Unbounded(), initial_noise=init,
                                   step_noise=noise))
    assert (out - ref).abs().max() <= 1e-4


def declared_state(model) -> dict:
    spec = getattr(model, "stream_state_spec", None)
    return dict(spec()) if callable(spec) else {}


def test_declared_state_is_held_per_stream(model):
    """Adapter-declared per-stream state (docs/adapters.md): declared sizes, reserved at admission, changed only by
    the cache-writing pass, isolated between streams, snapshotted and restored bit-identically, freed on cancel."""
    spec = declared_state(model)
    assert all(isinstance(v, StateSpec) for v in spec.values())
    e = Engine(model, num_pages=400, page_size=8, backend="torch")
    fpb = model.geometry.frames_per_block
    a, b = (e.add_session(SessionConfig(prompt=prompt_for(model, i), num_frames=3 * fpb, seed=i,
                                        policy=make_policy("window"), budget_frames=fpb)) for i in (1, 2))
    assert e.state_bytes_per_stream == sum(v.nbytes for v in spec.values())
    assert e.stream_state_bytes() == 2 * e.state_bytes_per_stream
    if spec:
        assert all(tuple(a.stream_state[k].shape) == v.shape and a.stream_state[k].dtype == v.dtype
                   and not a.stream_state[k].any() for k, v in spec.items())
        before = {k: t.clone() for k, t in a.stream_state.items()}
        with torch.no_grad():  # a denoising step reads the state and leaves it as it was
            e.forward_block([a, b], torch.stack([a.block_noise(), b.block_noise()]),
                            torch.full((2, fpb), 500.0), write=False)
        assert all(torch.equal(before[k], a.stream_state[k]) for k in before)
        assert all(a.stream_state[k].data_ptr() != b.stream_state[k].data_ptr() for k in spec)
    e.step()
    snap = e.snapshot(a.id)
    rest = e.step([a.id])[0].latents
    e2 = Engine(model, num_pages=400, page_size=8, backend="torch")
    r = e2.restore(type(snap).from_bytes(snap.to_bytes()))
    if spec:
        assert all(torch.equal(r.stream_state[k], snap.tensors[f"state.{k}"]) for k in spec)
    assert torch.equal(e2.step([r.id])[0].latents, rest)
    for eng in (e, e2):
        for sid in list(eng.sessions):
            eng.cancel(sid)
        assert eng.stream_state_bytes() == 0 and eng.cache.pool.num_free == eng.cache.num_pages


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_runs(model, name):
    policy = make_policy(name)
    fpb = model.geometry.frames_per_block
    budget = policy.sink_frames + fpb if policy.bounded else None
    (out,) = generate(model, policy, budget, frames=policy.sink_frames + 3 * fpb, seeds=[4])
    assert torch.isfinite(out).all() and out.shape[1:] == (model.geometry.latent_channels, *model.geometry.latent_hw)


def test_bad_input_is_one_ffengine_error(model):
    g, cfg = model.geometry, model.cfg
    ps = model.encode_prompt(prompt_for(model))
    x, t = block_input(model), torch.full((1, g.frames_per_block), 500.0)
    bad = [
        lambda: model.forward(x[:, :, :-1], t, [ps], [0], Recorder()),  # wrong channels
        lambda: model.forward(x, t[:, :1], [ps], [0], Recorder()),  # timesteps not [S, F]
        lambda: model.forward(x, t, [ps, ps], [0], Recorder()),  # one prompt per sequence
        lambda: model.encode_prompt(torch.randn(2, cfg.text_dim + 1)),
        lambda: model.encode_prompt(torch.randn(cfg.text_len + 1, cfg.text_dim)),
        lambda: model.encode_prompt(torch.full((1, cfg.text_dim), float("nan"))),
    ]
    for call in bad:
        with pytest.raises(FFEngineError) as ei:
            call()
        assert "\n" not in str(ei.value)
    e = Engine(model, num_pages=100, page_size=8, backend="torch")
    with pytest.raises(FFEngineError):
        e.add_session(SessionConfig(prompt=torch.randn(3, cfg.text_dim + 2), num_frames=g.frames_per_block))
    assert not e.sessions and e.cache.pool.num_free == 100


def test_registry_entry_is_consistent(model, tmp_path):
    arch = registry.architecture_of(model)
    weights = arch.weights_module(model)
    assert registry.param_count(model.cfg) == sum(p.numel() for p in weights.parameters())
    assert model.geometry == model.cfg.geometry()
    g = model.geometry
    latents = torch.randn(g.frames_per_block, g.latent_channels, *g.latent_hw)
    frames = registry.make_decoder(model).decode(latents)
    assert frames.dtype.name == "uint8" and frames.shape[-1] == 3 and frames.ndim == 4
    checkpoints.save_clean(weights.state_dict(), tmp_path / "m.safetensors", registry.config_dict(model.cfg))
    back = registry.load(tmp_path / "m.safetensors")  # no preset: architecture and config travel in the file
    assert back.cfg == model.cfg
    ps, x = prompt_for(model), block_input(model)
    t = torch.full((1, g.frames_per_block), 300.0)
    with torch.no_grad():
        a = model.forward(x, t, [model.encode_prompt(ps)], [0], Recorder())
        b = back.forward(x, t, [back.encode_prompt(ps)], [0], Recorder())
    assert torch.equal(a, b)
    assert math.isfinite(float(a.abs().max()))
