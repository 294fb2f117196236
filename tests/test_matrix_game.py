"""Matrix-Game 2.0 against its reference (``tests/fixtures/matrix_game``, recorded from the unmodified
``Matrix-Game-2`` inference loop on CPU in float32; its README describes every field).

1. the model called directly with the recorded inputs reproduces every recorded call, its action caches held in
   the declared per-stream state and evicted as the reference's rolling window;
2. the same trace replayed through ``Engine`` / ``SessionConfig`` (Window policy at the recorded size, the action
   caches as engine-held adapter state), call by call, with no page or state byte left behind;
3. the released checkpoint layout (``model.`` wrapper prefix + the reference ``config.json``) loads through the
   registry; batching, snapshot/restore, cancel and poisoned actions behave per stream.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ff_engine.engine import Engine, SessionConfig
from ff_engine.engine.sampler import FlowMatchSchedule
from ff_engine.errors import ConfigError
from ff_engine.policies import make_policy
from model_adapters import registry
from model_adapters.base import StreamStates

FIX = Path(__file__).parent / "fixtures" / "matrix_game"
TOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    cond = torch.load(FIX / "conditioning.pt", weights_only=True)
    trace = torch.load(FIX / "trace_a_local6.pt", weights_only=True)
    return cond, trace


@pytest.fixture(scope="module")
def model():
    cfg = registry.get_preset("matrix-game-tiny")
    return registry.from_weights(cfg, load_file(FIX / "model.safetensors"))


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def bfchw(x):  # reference [1, C, F, H, W] -> ours [1, F, C, H, W]
    return x.permute(0, 2, 1, 3, 4)


def stream_conditioning(cond):
    return {"keyboard_cond": cond["keyboard_cond"][0], "mouse_cond": cond["mouse_cond"][0],
            "cond_concat": cond["cond_concat"][0].permute(1, 0, 2, 3)}


class WindowAttention:
    """A dense self-attention cache that keeps the newest ``keep`` tokens after each cache-writing pass."""

    def __init__(self, layers, keep):
        self.k, self.v, self.keep, self.write = [None] * layers, [None] * layers, keep, False

    def __call__(self, layer, q, k, v, q_pre, positions):
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k]), torch.cat([self.v[layer], v])
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                               v.transpose(0, 1)[None])[0].transpose(0, 1)
        if self.write:
            self.k[layer], self.v[layer] = k[-self.keep:], v[-self.keep:]
        return out


def test_trace_settings_are_the_presets(model, ref):
    _, trace = ref
    meta, cfg = trace["meta"], model.cfg
    assert cfg.local_attn_size == meta["local_attn_size"] and cfg.frames_per_block == meta["num_frame_per_block"]
    assert list(cfg.action_blocks) == meta["action_layers"] and model.geometry.tokens_per_frame == meta["frame_seq_length"]
    sched = FlowMatchSchedule.for_model(model)
    assert torch.allclose(sched.denoising_timesteps, torch.tensor(meta["denoising_step_list"]))


def test_model_reproduces_every_recorded_call(model, ref):
    cond, trace = ref
    cfg, g = model.cfg, model.geometry
    prompt = model.encode_prompt(cond["visual_context"][0])
    state = {k: torch.zeros(s.shape, dtype=s.dtype) for k, s in model.stream_state_spec().items()}
    attn = WindowAttention(cfg.num_layers, (cfg.local_attn_size - cfg.frames_per_block) * g.tokens_per_frame)
    full = stream_conditioning(cond)
    errors = []
    with torch.no_grad():
        for c in trace["calls"]:
            write = c["kind"] == "context"
            attn.write = write
            sf, n = c["current_start_frame"], c["num_action_frames"]
            assert c["cond_concat_frames"] == [sf, sf + cfg.frames_per_block]
            # the call got exactly these action prefixes; the model reads only pixel frames < n - 1 of them
            cd = {"keyboard_cond": c["keyboard_cond"][0], "mouse_cond": c["mouse_cond"][0],
                  "cond_concat": full["cond_concat"]}
            assert torch.equal(cd["keyboard_cond"], full["keyboard_cond"][:n])
            used = model._action_windows({"mouse_cond": torch.arange(n)[:, None].float()}, sf, cfg.frames_per_block,
                                         "mouse_cond", 1)
            assert int(used.max()) == n - 2
            out = model.forward(bfchw(c["input"]), c["timestep"], [prompt], [sf], attn, conditioning=[cd],
                                stream_state=StreamStates([state], write))
            errors.append(rel(out, bfchw(c["flow_pred"])))
            if write:  # the action caches hold what the reference's do after this call
                for slot, layer in enumerate(cfg.action_blocks):
                    assert int(state["filled"][slot]) == c["kv_end_after"]["mouse"][layer][1]
                    assert int(state["filled"][slot]) == c["kv_end_after"]["keyboard"][layer][1]
    print("max relative error per call:", " ".join(f"{e:.1e}" for e in errors))
    assert len(errors) == 20 and max(errors) <= TOL


def test_the_actions_matter(model, ref):
    """The trace checks something: flipping pixel frame 7's keys changes block 0 (pixel frame 8 first block 1)."""
    cond, trace = ref
    prompt = model.encode_prompt(cond["visual_context"][0])
    c = trace["calls"][0]
    base = stream_conditioning(cond)

    def run(cd):
        with torch.no_grad():
            return model.forward(bfchw(c["input"]), c["timestep"], [prompt], [0], WindowAttention(3, 0),
                                 conditioning=[cd])
    out = run(base)
    for frame, changes in ((7, True), (8, False)):
        kb = base["keyboard_cond"].clone()
        kb[frame] = 1 - kb[frame]
        assert (rel(run({**base, "keyboard_cond": kb}), out) > 1e-4) == changes


def replay_engine(model, cond, trace, policy="window", record=None, **session):
    meta = trace["meta"]
    engine = Engine(model, num_pages=64, page_size=24, backend="torch")
    fpb = model.cfg.frames_per_block
    budget = meta["local_attn_size"] - fpb
    noise = bfchw(trace["initial_noise"])[0]
    steps = [n.clone() for n in (r["noise"] for r in trace["add_noise"])]
    cfg = SessionConfig(prompt=cond["visual_context"][0], num_frames=meta["num_frames"], policy=make_policy(policy),
                        budget_frames=budget, initial_noise=noise, step_noise=steps,
                        conditioning=stream_conditioning(cond), **session)
    if record is not None:
        inner = model.forward

        def recording(x, t, prompts, starts, attention, **kw):
            out = inner(x, t, prompts, starts, attention, **kw)
            record.append((x.clone(), t.clone(), list(starts), out.clone(), kw["stream_state"].write))
            return out
        model.forward = recording
    try:
        latents = engine.generate(cfg)
    finally:
        if record is not None:
            del model.forward
    return engine, latents


def test_engine_replays_the_trace_call_by_call(model, ref):
    cond, trace = ref
    calls = []
    engine, latents = replay_engine(model, cond, trace, record=calls)
    # the engine skips the last block's cache-writing pass (no later block reads it): 19 of the 20 calls
    assert len(calls) == 19
    errors = []
    for (x, t, starts, out, write), c in zip(calls, trace["calls"]):
        assert write == (c["kind"] == "context") and starts == [c["current_start_frame"]]
        assert rel(x, bfchw(c["input"])) <= TOL and torch.allclose(t, c["timestep"])
        errors.append(rel(out, bfchw(c["flow_pred"])))
    print("engine: max relative error per call:", " ".join(f"{e:.1e}" for e in errors))
    assert max(errors) <= TOL
    assert rel(latents[None], bfchw(trace["final_latents"])) <= TOL
    assert engine.cache.pool.num_free == engine.cache.num_pages and engine.cache.pool.reserved_total == 0
    assert not engine.sessions and engine.stream_state_bytes() == 0


def test_future_forcing_runs_at_the_same_budget(model, ref):
    cond, trace = ref
    engine, latents = replay_engine(model, cond, trace, policy="future-forcing")
    assert torch.isfinite(latents).all() and latents.shape[0] == trace["meta"]["num_frames"]
    assert engine.cache.pool.num_free == engine.cache.num_pages
    assert not engine.sessions and engine.stream_state_bytes() == 0


def test_released_layout_loads_through_the_registry(model, ref, tmp_path):
    sd = load_file(FIX / "model.safetensors")
    save_file({f"model.{k}": v for k, v in sd.items()}, tmp_path / "base_distill.safetensors")
    recorded = json.loads((FIX / "config.json").read_text())["model_config"]
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    ckpt = registry.read_checkpoint(tmp_path / "base_distill.safetensors", "matrix-game-tiny")
    assert ckpt.architecture.name == "matrix-game" and ckpt.config == model.cfg
    loaded = registry.instantiate(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    ckpt = registry.read_checkpoint(tmp_path / "base_distill.safetensors")  # no preset: shapes + config.json
    assert ckpt.architecture.name == "matrix-game"
    assert ckpt.config.action_blocks == (0, 1) and ckpt.config.keyboard_dim == 4 and ckpt.config.mouse_dim == 2
    assert ckpt.config.num_heads == 2 and ckpt.config.action_heads == 2 and ckpt.config.local_attn_size == 6


@pytest.mark.parametrize("preset,keys,mouse", [("matrix-game-2-universal", 4, 2), ("matrix-game-2-gta", 2, 2),
                                               ("matrix-game-2-templerun", 7, 0)])
def test_presets(preset, keys, mouse):
    cfg = registry.get_preset(preset)
    assert (cfg.keyboard_dim, cfg.mouse_dim) == (keys, mouse) and cfg.dim == 1536 and cfg.num_layers == 30
    assert 1.4e9 < registry.param_count(cfg) < 1.8e9


# ---- the engine holds the action caches per stream ------------------------------------------------------------
def small_engine(model):
    return Engine(model, num_pages=128, page_size=24, backend="torch")


def session_cfg(cond, seed, keyboard=None, frames=6, **kw):
    p = 1 + 4 * (frames - 1)  # the pixel frames of a `frames`-latent-frame stream
    c = {k: v[:p] if k != "cond_concat" else v[:frames] for k, v in stream_conditioning(cond).items()}
    if keyboard is not None:
        c["keyboard_cond"] = keyboard[:p]
    return SessionConfig(prompt=cond["visual_context"][0], num_frames=frames, seed=seed, policy=make_policy("window"),
                         budget_frames=3, conditioning=c, **kw)


def test_state_is_declared_reserved_and_freed(model, ref):
    cond, _ = ref
    e = small_engine(model)
    spec = model.stream_state_spec()
    w, n = model.cfg.local_attn_size, model.geometry.tokens_per_frame
    assert spec["mouse_k.0"].shape == (n, w, 2, 64) and spec["keyboard_v.1"].shape == (w, 2, 64)
    s = e.add_session(session_cfg(cond, 0))
    assert e.stream_state_bytes() == e.state_bytes_per_stream > 0
    e.step([s.id])
    e.cancel(s.id)
    assert e.stream_state_bytes() == 0 and s.stream_state is None


def test_two_streams_with_different_actions_batched_equal_solo(model, ref):
    cond, _ = ref
    other = torch.flip(cond["keyboard_cond"][0], [1])

    def run(ids_cfgs, together):
        e = small_engine(model)
        ss = [e.add_session(c) for c in ids_cfgs]
        out = {s.id: [] for s in ss}
        while e.sessions:
            groups = [[s.id for s in ss if s.id in e.sessions]] if together else [[s.id] for s in ss if s.id in e.sessions]
            for grp in groups:
                for r in e.step(grp):
                    assert r.error is None
                    out[r.session_id].append(r.latents)
        return [torch.cat(out[s.id]) for s in ss]
    a, b = run([session_cfg(cond, 1, session_id="a"), session_cfg(cond, 2, other, session_id="b")], True)
    a1, = run([session_cfg(cond, 1, session_id="a")], False)
    b1, = run([session_cfg(cond, 2, other, session_id="b")], False)
    assert torch.allclose(a, a1, atol=1e-5, rtol=0) and torch.allclose(b, b1, atol=1e-5, rtol=0)
    assert rel(a, b) > 1e-3


def test_snapshot_restores_the_action_caches_bit_identically(model, ref):
    cond, _ = ref
    e = small_engine(model)
    s = e.add_session(session_cfg(cond, 3, frames=9, session_id="s"))
    e.step(["s"])
    snap = e.snapshot("s")
    assert any(k.startswith("state.mouse_k") for k in snap.tensors)
    rest = [r.latents for _ in range(2) for r in e.step(["s"])]
    e2 = small_engine(model)
    e2.restore(type(snap).from_bytes(snap.to_bytes()), "t")
    state = e2.sessions["t"].stream_state
    assert all(torch.equal(state[k], snap.tensors[f"state.{k}"]) for k in state)
    again = [r.latents for _ in range(2) for r in e2.step(["t"])]
    assert all(torch.equal(x, y) for x, y in zip(rest, again))
    assert not s.stream_state or "s" not in e.sessions


@pytest.mark.parametrize("field,poison,msg", [
    ("keyboard_cond", lambda t: t.index_fill(0, torch.tensor([3]), float("nan")), "keyboard_cond contains NaN"),
    ("mouse_cond", lambda t: torch.cat([t, t], 1), "mouse_cond must be"),
    ("keyboard_cond", lambda t: torch.cat([t, t]), "keyboard_cond has 42 pixel frames"),
])
def test_poisoned_actions_fail_their_stream_alone(model, ref, field, poison, msg):
    cond, _ = ref
    e = small_engine(model)
    good = e.add_session(session_cfg(cond, 0, session_id="good"))
    bad_cfg = session_cfg(cond, 1, session_id="bad")
    bad_cfg.conditioning[field] = poison(bad_cfg.conditioning[field])
    with pytest.raises(ConfigError, match=msg) as info:  # refused at admission, in one line
        e.add_session(bad_cfg)
    assert "\n" not in str(info.value)
    # poisoned on a running stream, past the checks: the batched forward fails that stream alone
    bad = e.add_session(session_cfg(cond, 1, session_id="bad"))
    bad.conditioning[field] = poison(bad.conditioning[field])
    results = {r.session_id: r for r in e.step(["good", "bad"])}
    assert results["bad"].error and field in results["bad"].error and "\n" not in results["bad"].error
    assert results["good"].error is None and "bad" not in e.sessions and good.id in e.sessions


def test_set_conditioning_steers_a_running_stream(model, ref):
    cond, _ = ref
    e = small_engine(model)
    c = session_cfg(cond, 0, frames=6, session_id="s")
    c.conditioning["keyboard_cond"] = c.conditioning["keyboard_cond"][:9]
    c.conditioning["mouse_cond"] = c.conditioning["mouse_cond"][:9]
    e.add_session(c)
    e.step(["s"])
    assert e.set_conditioning("s", keyboard_cond=cond["keyboard_cond"][0][9:21],
                              mouse_cond=cond["mouse_cond"][0][9:21]) == 21
    with pytest.raises(ConfigError, match="mouse_cond"):
        e.set_conditioning("s", mouse_cond=torch.zeros(3, 5))
    assert e.sessions["s"].conditioning["keyboard_cond"].shape[0] == 21


# ---- the CLI -------------------------------------------------------------------------------------------------
def test_cli_generates_with_actions_and_refuses_poisoned_ones(ref, tmp_path, capsys):
    from ff_engine.cli import main

    cond, _ = ref
    torch.save(cond["visual_context"][0].clone(), tmp_path / "img.pt")
    c = {k: v[:21].clone() if k != "cond_concat" else v[:6].clone() for k, v in stream_conditioning(cond).items()}
    torch.save(c, tmp_path / "cond.pt")
    args = ["generate", "--model", "matrix-game-tiny", "--random-weights", "--prompt-embeds", str(tmp_path / "img.pt"),
            "--frames", "6", "--policy", "window", "--budget-frames", "3", "--quiet"]
    assert main([*args, "--conditioning", str(tmp_path / "cond.pt"), "--out", str(tmp_path / "a.mp4")]) == 0
    assert (tmp_path / "a.mp4").is_file()
    c["mouse_cond"][4, 1] = float("nan")
    torch.save(c, tmp_path / "bad.pt")
    capsys.readouterr()
    assert main([*args, "--conditioning", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "b.mp4")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mouse_cond contains NaN" in err[0]


def test_fork_and_rollback_carry_the_action_caches(model, ref):
    """A fork of a Matrix-Game stream copies its adapter state (the K/V pages are shared) and continues exactly as
    the source; a rollback restores the action caches of the mark."""
    cond, _ = ref
    e = Engine(model, num_pages=128, page_size=24, backend="torch", undo_blocks=2)
    e.add_session(session_cfg(cond, 4, frames=12, session_id="s"))
    e.step(["s"])
    f = e.fork("s", "f")
    assert f.stream_state is not e.sessions["s"].stream_state
    assert all(torch.equal(f.stream_state[k], e.sessions["s"].stream_state[k]) for k in f.stream_state)
    first = [r.latents for _ in range(2) for r in e.step(["s"])]
    fork = [r.latents for _ in range(2) for r in e.step(["f"])]
    assert all(torch.equal(x, y) for x, y in zip(first, fork, strict=True))
    e.rollback("s", 2)
    again = [r.latents for _ in range(2) for r in e.step(["s"])]
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    e.cache.check_invariants()
