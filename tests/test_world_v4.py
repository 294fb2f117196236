"""World v4: the scroll world's ground truth, the model changes it needs (per-axis RoPE, q/k gain init, actions) and
actions through the engine (validation, steering, snapshots)."""

import math

import pytest
import torch
from tests_helpers import dense_attention

from ff_engine.engine import Engine, SessionConfig
from ff_engine.errors import ConfigError
from ff_engine.policies import make_policy
from model_adapters.causal_wan import PRESETS, CausalWanModel, load_causal_wan, save_checkpoint
from model_adapters.causal_wan.model import Rope3D
from model_adapters.world import scroll
from model_adapters.world.procedural import encode


def model_v4(seed=0, **over):
    torch.manual_seed(seed)
    return CausalWanModel(PRESETS["world-v4"].with_(**over)).eval()


# ---- the world ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [3, 1_000_017])
def test_after_the_prefix_every_frame_is_determined_by_what_the_prefix_showed(seed):
    """Rebuild the panorama from the prefix frames alone, then render every later frame from that rebuild: it must
    equal the truth exactly, under any actions (nothing after the prefix is new)."""
    g = torch.Generator().manual_seed(seed)
    acts = torch.tensor(scroll.prefix_actions() + scroll.back_and_forth_script(g, 240))
    clip = scroll.make_clip(seed, acts)
    p = scroll.PREFIX_FRAMES
    rebuilt = torch.full((3, scroll.H, scroll.PANORAMA_W), float("nan"))
    for t in range(p):
        rebuilt[:, :, (clip.camera[t] + torch.arange(scroll.W)) % scroll.PANORAMA_W] = clip.frames[t]
    assert not rebuilt.isnan().any(), "the prefix must show every column of the panorama"
    for t in range(p, acts.shape[0]):
        assert torch.equal(rebuilt[:, :, (clip.camera[t] + torch.arange(scroll.W)) % scroll.PANORAMA_W], clip.frames[t])
    again = scroll.make_clip(seed, acts)
    assert torch.equal(again.frames, clip.frames) and torch.equal(again.visible, clip.visible)


def test_camera_follows_the_actions_and_subjects_return():
    acts = torch.tensor(scroll.parse_actions("stay:3,right:96,left:10,stay:5"))
    clip = scroll.make_clip(5, acts)
    steps = (clip.camera[1:] - clip.camera[:-1]) % scroll.PANORAMA_W
    want = torch.tensor([0 if a == 0 else (scroll.PANORAMA_W - 2 if a == 1 else 2) for a in acts[1:].tolist()])
    assert torch.equal(steps, want)
    assert clip.visible.any(0).all(), "a full lap shows every subject"
    assert clip.visible.float().mean() < 0.6, "and each is out of view for part of it"
    gaps = scroll.returning_columns(scroll.camera_path(0, torch.tensor(scroll.prefix_actions() + [2] * 96)))
    assert not gaps[: scroll.PREFIX_FRAMES - 30].any() and gaps[-24:].all(), "after a lap everything returns"


@pytest.mark.parametrize(("script", "want"), [("right:12", 2.0), ("left:12", -2.0), ("stay:12", 0.0)])
def test_camera_shift_reads_the_true_motion(script, want):
    """The steering measure (``benchmarks/world_v4_steer.py``, the viewer test) on the world's own frames, at its
    resolution and on 4x nearest-upscaled frames pooled back (the served MP4's pixels); a still picture reads as
    no motion."""
    clip = scroll.make_clip(7, torch.tensor(scroll.parse_actions(script)))
    assert scroll.mean_camera_shift(clip.frames) == want
    big = torch.nn.functional.interpolate(clip.frames, scale_factor=4, mode="nearest")
    assert scroll.mean_camera_shift(torch.nn.functional.avg_pool2d(big, 4)) == want
    assert scroll.mean_camera_shift(clip.frames[:1].expand_as(clip.frames)) == 0.0  # a still picture
    assert scroll.mean_camera_shift(torch.zeros_like(clip.frames)) == 0.0  # and a featureless one
    with pytest.raises(ValueError, match="2 frames"):
        scroll.mean_camera_shift(clip.frames[:1])


@pytest.mark.parametrize("bad", ["right", "jump:3", "right:0", "right:3,,left:2", "left:-1"])
def test_bad_action_scripts_are_one_line_errors(bad):
    with pytest.raises(ConfigError, match="actions"):
        scroll.parse_actions(bad)


def test_action_script_file(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("right\nright\nstay\n")
    assert scroll.parse_actions(str(f)) == [2, 2, 0]
    assert scroll.parse_actions("right:2,stay:1") == [2, 2, 0]


# ---- the model ------------------------------------------------------------------------------------------------
def test_default_rope_bases_are_bit_identical_to_the_single_base():
    for name in ("wan-1.3b", "wan-tiny", "world-tiny"):
        cfg = PRESETS[name]
        b = Rope3D(cfg.head_dim, cfg.rope_frames)
        c = Rope3D(cfg.head_dim, cfg.rope_frames, theta=cfg.rope_theta, theta_space=cfg.rope_theta_space)
        assert all(torch.equal(x, y) for x, y in zip(b.inv_freq, c.inv_freq))
        assert CausalWanModel.rope_dtype == torch.float64


def test_spatial_base_changes_only_spatial_frequencies():
    r = Rope3D(64, theta=10000.0, theta_space=20.0)
    base = Rope3D(64)
    assert torch.equal(r.inv_freq[0], base.inv_freq[0])
    assert not torch.equal(r.inv_freq[1], base.inv_freq[1]) and torch.equal(r.inv_freq[1], r.inv_freq[2])


def test_qk_gains_start_where_the_config_says():
    m = model_v4()
    assert torch.all(m.blocks[0].self_attn.norm_q.weight == 2.0)
    assert torch.all(m.blocks[0].cross_attn.norm_q.weight == 1.0)


def _forward(m, actions=None, frames=3):
    torch.manual_seed(1)
    x = torch.randn(2, frames, 12, 16, 24)
    t = torch.full((2, frames), 500.0)
    prompts = [m.encode_prompt(torch.zeros(1, 16))] * 2
    kw = {} if actions is None else {"actions": actions}
    with torch.no_grad():
        return m.forward(x, t, prompts, [0, 6], dense_attention, **kw)


def test_zero_initialised_actions_leave_outputs_unchanged():
    with_actions = model_v4()
    without = model_v4(actions=())
    shared = {k: v for k, v in with_actions.state_dict().items() if not k.startswith("action_embedding")}
    assert shared.keys() == without.state_dict().keys()
    assert all(torch.equal(v, without.state_dict()[k]) for k, v in shared.items())
    ref = _forward(without)
    assert torch.equal(_forward(with_actions, torch.tensor([[0, 1, 2], [2, 2, 1]])), ref)
    with torch.no_grad():
        with_actions.action_embedding.weight.normal_()
    assert not torch.equal(_forward(with_actions, torch.tensor([[0, 1, 2], [2, 2, 1]])), ref)


def test_actions_are_refused_where_the_model_has_none_and_checked_where_it_has():
    with pytest.raises(ConfigError, match="takes no actions"):
        _forward(model_v4(actions=()), torch.zeros(2, 3, dtype=torch.long))
    m = model_v4()
    for bad in (torch.zeros(2, 2, dtype=torch.long), torch.full((2, 3), 3), torch.zeros(2, 3)):
        with pytest.raises(ConfigError, match="actions"):
            _forward(m, bad)


def test_checkpoint_round_trip_keeps_the_action_vocabulary(tmp_path):
    m = model_v4()
    with torch.no_grad():
        m.action_embedding.weight.normal_()
    save_checkpoint(m, tmp_path / "w.safetensors")
    back = load_causal_wan(tmp_path / "w.safetensors", preset="world-tiny")
    assert back.cfg.actions == ("stay", "left", "right") and back.cfg.rope_theta_space == 20.0
    assert torch.equal(_forward(back, torch.tensor([[0, 1, 2], [2, 2, 1]])),
                       _forward(m, torch.tensor([[0, 1, 2], [2, 2, 1]])))


# ---- actions through the engine -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def v4():
    m = model_v4(seed=2)
    with torch.no_grad():
        m.action_embedding.weight.normal_(std=0.5)  # actions must make a difference for these tests to mean anything
    return m


def _cfg(actions, frames=15, policy="window", budget=6, **kw):
    return SessionConfig(prompt=torch.zeros(1, 16), num_frames=frames, seed=4, policy=make_policy(policy),
                         budget_frames=budget, actions=actions, **kw)


def test_engine_refuses_actions_for_a_model_without_them():
    torch.manual_seed(0)
    plain = CausalWanModel(PRESETS["world-tiny"]).eval()
    eng = Engine(plain, num_pages=64, page_size=16, backend="torch")
    with pytest.raises(ConfigError, match="takes no actions"):
        eng.add_session(_cfg([0, 1]))


@pytest.mark.parametrize("bad", [[3], [-1], [0.5], ["right"], [True], "right:3"])
def test_engine_refuses_bad_actions_with_one_line(v4, bad):
    eng = Engine(v4, num_pages=64, page_size=16, backend="torch")
    with pytest.raises(ConfigError, match="actions"):
        eng.add_session(_cfg(bad))
    assert not eng.sessions


def test_actions_steer_and_set_actions_equals_a_request_that_had_them(v4):
    eng = Engine(v4, num_pages=128, page_size=16, backend="torch")
    a = eng.generate(_cfg([2] * 15))
    b = eng.generate(_cfg([1] * 15))
    assert not torch.equal(a, b), "the actions reach the model"
    held = eng.generate(_cfg([2]))  # the last action is held
    assert torch.equal(held, a)
    s = eng.add_session(_cfg([2] * 6))
    eng.step([s.id])
    eng.step([s.id])
    with pytest.raises(ConfigError, match="from_frame"):
        eng.set_actions(s.id, [1], from_frame=3)
    assert eng.set_actions(s.id, [1] * 9) == 2
    while s.id in eng.sessions and not eng.sessions[s.id].done:
        eng.step([s.id])
    steered = torch.cat(s.latents)
    assert torch.equal(steered, eng.generate(_cfg([2] * 6 + [1] * 9)))


def test_snapshot_carries_the_actions_as_they_stand(v4):
    eng = Engine(v4, num_pages=128, page_size=16, backend="torch")
    full = eng.generate(_cfg([2] * 6 + [1] * 9, policy="future-forcing"))
    s = eng.add_session(_cfg([2] * 6, policy="future-forcing"))
    eng.step([s.id])
    eng.set_actions(s.id, [2] * 3 + [1] * 9)
    eng.step([s.id])
    snap = eng.snapshot(s.id)
    eng.cancel(s.id)
    other = Engine(v4, num_pages=128, page_size=16, backend="torch")
    r = other.restore(type(snap).from_bytes(snap.to_bytes()))
    assert r.actions == [2] * 6 + [1] * 9
    while not r.done:
        other.step([r.id])
    assert torch.equal(torch.cat(r.latents), full)


def test_prefill_then_generate_under_actions(v4):
    clip = scroll.make_clip(7, scroll.prefix_actions(6) + [2] * 9)
    eng = Engine(v4, num_pages=256, page_size=16, backend="torch")
    s = eng.add_session(_cfg(clip.actions.tolist(), frames=15, policy="unbounded", budget=None))
    eng.prefill(s.id, encode(clip.frames[:6]))
    while not s.done:
        eng.step([s.id])
    out = torch.cat(s.latents)
    assert out.shape == (15, 12, 16, 24) and torch.equal(out[:6], encode(clip.frames[:6]))


# ---- the CLI --------------------------------------------------------------------------------------------------
def test_generate_from_a_world_prefix_under_actions_and_a_side_by_side_comparison(tmp_path):
    import av

    from ff_engine.cli import main

    out = tmp_path / "v.mp4"
    assert main(["generate", "--model", "world-v4", "--random-weights", "--frames", "6", "--prefix-frames", "6",
                 "--actions", "right:3,left:3", "--policy", "window", "--budget-frames", "6", "--backend", "torch",
                 "--out", str(out), "--quiet"]) == 0
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 6, "the video holds the generated frames, not the prefix"
    cmp = tmp_path / "c.mp4"
    assert main(["generate", "--model", "world-v4", "--random-weights", "--frames", "3", "--prefix-frames", "6",
                 "--compare", "window,unbounded", "--budget-frames", "6", "--backend", "torch",
                 "--out", str(cmp), "--quiet"]) == 0
    with av.open(str(cmp)) as c:
        frames = list(c.decode(video=0))
    assert len(frames) == 3 and frames[0].width >= 3 * 192, "truth + two tiles side by side"


@pytest.mark.parametrize("argv, message", [
    (["--model", "world-tiny", "--actions", "right:3"], "takes no actions"),
    (["--model", "wan-tiny", "--prefix-frames", "3"], "needs an in-repo world model"),
    (["--model", "world-v4", "--prefix-frames", "4"], "multiple of the block"),
    (["--model", "world-v4", "--actions", "fly:3"], "unknown action"),
    (["--model", "world-v4", "--compare", "window"], "2 to 8 distinct"),
])
def test_generate_refuses_bad_world_inputs_with_one_line(argv, message, tmp_path, capsys):
    from ff_engine.cli import main

    out = tmp_path / "v.mp4"
    assert main(["generate", "--random-weights", "--frames", "3", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


# ---- the measures and the free-rollout benchmark --------------------------------------------------------------
def test_scroll_measures_credit_the_truth_and_penalise_a_blur():
    from model_adapters.world import scroll_metrics as SM

    p = scroll.PREFIX_FRAMES
    clip = scroll.make_clip(1_000_123, scroll.prefix_actions() + scroll.steady_script(120))
    truth = clip.frames[p:]
    events = SM.return_events(clip, 24, start=p)
    assert events, "a lap brings every subject back"
    assert SM.return_readouts(truth, clip, events, p)["both"] == 1.0
    split = SM.split_errors(truth, truth, clip.camera, p)
    assert split["mse_returning"] == 0.0 and split["returning_share"] > 0.5
    blur = torch.nn.functional.avg_pool2d(truth, 5, 1, 2)
    assert SM.flat_share(blur) < SM.flat_share(truth) - 0.3
    assert SM.edge_sharpness(blur) < 0.5 * SM.edge_sharpness(truth)
    assert SM.split_errors(blur, truth, clip.camera, p)["mse_returning"] > 0


def test_scroll_rollout_job_scores_an_engine_rollout(v4):
    from ff_engine.evaluation.scroll import Job, paired, run_job, summarise

    rows = [run_job(v4, Job(1_004_000, "steady", name, 6, 6, 6)) for name in ("window", "ff-no-merge")]
    for r in rows:
        assert len(r["mse_curve"]) == 6 and all(math.isfinite(x) and x >= 0 for x in r["mse_curve"])
        assert r["seconds_per_block"] > 0
    assert {s["policy"] for s in summarise(rows)} == {"window", "ff-no-merge"}
    (diff,) = paired(rows, "ff-no-merge")
    assert diff["policy"] == "window" and diff["mse"] == pytest.approx(rows[0]["mse"] - rows[1]["mse"])


def test_return_grid_shows_subject_returns_in_order_and_fills_up_with_returning_frames():
    """``bench return_grid``'s columns: every subject return of the rollout window that fits, then frames with
    the most returning content, sorted, inside the generated frames, never two within 8 frames of fill-ins."""
    from ff_engine.bench.return_grid import return_frames
    from ff_engine.evaluation.scroll import SEED_BASE, Job, job_clip
    from model_adapters.world import scroll_metrics as SM

    job = Job(SEED_BASE, "back-and-forth", "unbounded", None, 240, scroll.PREFIX_FRAMES)
    clip = job_clip(job)
    returns = sorted({t - job.prefix for t, _ in SM.return_events(clip, 24, start=job.prefix) if t - job.prefix < 240})
    cols = return_frames(clip, job.prefix, 240, 24, columns=6)
    assert cols == sorted(cols) and len(cols) == 6 and all(0 <= t < 240 for t in cols)
    assert set(returns[:6]) <= set(cols) or set(cols) <= set(returns)
    few = return_frames(clip, job.prefix, 240, 24, columns=len(returns) + 3)
    assert set(returns) <= set(few) and len(few) == len(returns) + 3
