import itertools
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model_adapters.world import metrics as M
from model_adapters.world.procedural import EVAL_SEED_BASE, TRAIN_SEEDS, decode, encode, make_clip

REPO = Path(__file__).resolve().parents[1]

ASSET = Path(__file__).resolve().parents[1] / "model_adapters" / "world" / "assets" / "world_model.safetensors"


def test_clips_are_deterministic_and_the_codec_is_lossless():
    a, b = make_clip(7, 30), make_clip(7, 30)
    assert torch.equal(a.frames, b.frames) and torch.equal(a.identity, b.identity)
    assert not torch.equal(a.frames, make_clip(8, 30).frames)
    assert torch.equal(make_clip(7, 10, start=20).frames, a.frames[20:30])
    assert torch.equal(decode(encode(a.frames)), a.frames)
    assert EVAL_SEED_BASE >= TRAIN_SEEDS.stop  # held-out seeds are never drawn in training


def test_subjects_leave_and_come_back_after_long_gaps():
    longest = []
    for seed in range(EVAL_SEED_BASE, EVAL_SEED_BASE + 5):
        vis = make_clip(seed, 60).visible
        for i in range(vis.shape[1]):
            v, best, run, seen = vis[:, i].tolist(), 0, 0, False
            for x in v:
                if x:
                    best, run, seen = (max(best, run) if seen else best), 0, True
                else:
                    run += 1
            longest.append(best)
    assert max(longest) >= 12  # longer than the small cache budgets the quality benchmark tests


def test_metrics_on_ground_truth():
    clip = make_clip(EVAL_SEED_BASE + 3, 60)
    assert M.identity_consistency(clip.frames, clip.identity) == 1.0  # read-out sees only the true subjects
    det = M.detected_colours(clip.frames)
    assert det.any(1).float().mean() > 0.3
    static = clip.frames[:1].repeat(5, 1, 1, 1)
    assert abs(M.subject_consistency(static) - 1.0) < 1e-5
    assert M.subject_consistency(clip.frames) < 1.0
    assert M.rollout_error(encode(clip.frames), encode(clip.frames)) == 0.0
    # another world's subjects read as foreign (first other seed whose subjects show and differ in colour)
    others = (make_clip(EVAL_SEED_BASE + k, 60) for k in range(4, 40))
    other = next(o for o in others if M.detected_colours(o.frames).any()
                 and not M.true_colours(o.identity)[M.true_colours(clip.identity)].all())
    assert M.identity_consistency(other.frames, clip.identity) < 1.0


def test_training_is_reproducible():
    from model_adapters.world.train import train

    _, c1 = train(2, batch=2, clip_frames=6, log_every=1, progress=False)
    _, c2 = train(2, batch=2, clip_frames=6, log_every=1, progress=False)
    assert [c["loss"] for c in c1] == [c["loss"] for c in c2] and all(c["loss"] > 0 for c in c1)


def test_the_committed_world_model_loads_and_generates():
    from ff_engine.engine import Engine, SessionConfig
    from ff_engine.policies import FutureForcing
    from model_adapters.causal_wan import load_causal_wan

    m = load_causal_wan(ASSET, preset="world-tiny")
    assert m.cfg.decoder == "world-codec" and ASSET.stat().st_size <= 20e6
    e = Engine(m, num_pages=400, page_size=16)
    lat = e.generate(SessionConfig(prompt=torch.zeros(1, m.cfg.text_dim), num_frames=12, policy=FutureForcing(),
                                   budget_frames=6))
    assert lat.shape == (12, 12, 16, 24) and torch.isfinite(lat).all()


def test_generate_with_the_embedded_world_model_uses_its_own_decoder(tmp_path):
    import av

    from ff_engine.cli import main

    out = tmp_path / "w.mp4"
    assert main(["generate", "--model", str(ASSET), "--policy", "future-forcing", "--budget-frames", "6",
                 "--frames", "12", "--out", str(out), "--quiet"]) == 0
    with av.open(str(out)) as c:
        assert c.streams.video[0].width == 48 * 4 and sum(1 for _ in c.decode(video=0)) == 12


def test_sparse_training_clips_keep_blocks_whole_and_time_ordered():
    from model_adapters.world.train import frame_times

    rng = torch.Generator().manual_seed(0)
    kinds = set()
    for _ in range(200):
        t = frame_times(rng, 8, 3, p_sparse=0.5, max_gap=48)
        assert len(t) == 24 and t == sorted(t) and len(set(t)) == 24
        blocks = [t[i:i + 3] for i in range(0, 24, 3)]
        assert all(b == list(range(b[0], b[0] + 3)) for b in blocks)  # every block is 3 consecutive frames
        jumps = [b2[0] - b1[-1] for b1, b2 in itertools.pairwise(blocks)]
        assert sum(j > 1 for j in jumps) <= 1 and max(jumps) <= 49
        kinds.add(max(jumps) > 1)
    assert kinds == {True, False}  # both contiguous and distant-past clips occur
    assert frame_times(rng, 8, 3, p_sparse=0.0, max_gap=48) == list(range(24))


def test_models_take_per_frame_positions_and_carry_their_sampling_schedule(tmp_path):
    from ff_engine.engine import Engine
    from ff_engine.engine.sampler import FlowMatchSchedule
    from model_adapters.causal_wan import PRESETS, CausalWanModel, load_causal_wan, save_checkpoint

    cfg = PRESETS["world-tiny"].with_(num_layers=1, context_noise=25.0)
    m = CausalWanModel(cfg)
    sparse = m.token_positions([0, 1, 2, 30, 31, 32], 6)
    assert torch.equal(sparse, torch.cat([m.token_positions(0, 3), m.token_positions(30, 3)]))
    save_checkpoint(m, tmp_path / "m.safetensors")
    back = load_causal_wan(tmp_path / "m.safetensors", preset="wan-tiny")  # the config travels in the metadata
    assert back.cfg.sample_steps == cfg.sample_steps and back.cfg.sample_shift == cfg.sample_shift
    assert back.cfg.sample_stochastic == cfg.sample_stochastic and Engine(back, num_pages=8).context_noise == 25.0
    want = FlowMatchSchedule(shift=cfg.sample_shift, steps=cfg.sample_steps).denoising_timesteps
    assert torch.equal(Engine(back, num_pages=8).schedule.denoising_timesteps, want)
    assert len(want) == 8 and want[-1] < 250  # many steps down to a small noise level (see world/train.py)
    # a Wan checkpoint without the fields keeps Self-Forcing's four warped steps
    wan = CausalWanModel(PRESETS["wan-tiny"])
    assert torch.equal(Engine(wan, num_pages=8).schedule.denoising_timesteps, FlowMatchSchedule().denoising_timesteps)


def test_quality_benchmark_runs_end_to_end(tmp_path):
    """`ff-engine bench quality` on a tiny setting: every metric present, the unbounded row scores itself 0."""
    import json

    from ff_engine.cli import main

    out = tmp_path / "q.json"
    assert main(["bench", "quality", "--seeds", "1", "--prefix", "6", "--frames", "6", "--fractions", "0.5",
                 "--policies", "window", "future-forcing", "--out", str(out), "--filmstrip-policies", "window",
                 "--filmstrip-every", "2", "--probe-seeds", "1", "--probe-history", "48", "--probe-min-gap", "9",
                 "--probe-fractions", "0.5", "--rollout-seeds", "0"]) == 0
    res = json.loads(out.read_text())
    rows = {r["policy"]: r for r in res["rows"]}
    assert set(rows) == {"unbounded", "window", "future-forcing"}
    assert rows["unbounded"]["rollout_error"] == 0.0 and rows["window"]["rollout_error"] >= 0.0
    assert len(rows["future-forcing"]["attention_error_per_layer"]) == 4
    assert out.with_suffix(".png").is_file() and (tmp_path / "q_filmstrip.png").is_file()
    probe = {r["policy"]: r for r in res["memory_probe"]}  # held-out seed 1001000 has a return at frame 42
    assert set(probe) == {"ground-truth", "unbounded", "window", "future-forcing"}
    assert probe["ground-truth"]["returning_readout_denoise"] == 1.0 and probe["window"]["probes"] == 3
    assert probe["ground-truth"]["returning_denoise_error"] == 0.0 and probe["window"]["returning_denoise_error"] > 0
    assert all(0.0 <= probe[p][m] <= 1.0 for p in probe for m in ("returning_readout_denoise", "returning_readout_sampled"))
    # what the caches held when the subject came back: all of it (unbounded), none of it (a window shorter than
    # the gap), something in between for Future Forcing
    assert probe["unbounded"]["returning_tokens_kept"] == 1.0 and probe["window"]["returning_tokens_kept"] == 0.0
    assert 0.0 <= probe["future-forcing"]["returning_tokens_kept"] <= 1.0


def test_memory_clips_show_a_return_and_where_the_subject_was_seen():
    from model_adapters.world.train import memory_frame_times, training_batch

    vis = torch.zeros(90, 1, dtype=torch.bool)
    vis[0:12, 0] = True
    vis[60:, 0] = True  # back at frame 60 after 48 frames out of view
    rng = torch.Generator().manual_seed(0)
    for _ in range(50):
        t = memory_frame_times(rng, vis, n_blocks=8, n_target=2, fpb=3, min_gap=15)
        blocks = [t[i:i + 3] for i in range(0, 24, 3)]
        assert len(t) == 24 and t == sorted(t) and all(b == list(range(b[0], b[0] + 3)) for b in blocks)
        assert 58 <= blocks[-2][0] <= 62 and blocks[-1][0] == blocks[-2][0] + 3  # the targets: the return's first frames
        assert blocks[-3][0] == blocks[-2][0] - 3  # the block just before is always there
        assert any(b[0] < 12 for b in blocks[:-3])  # and a distant block that shows the subject
    assert memory_frame_times(rng, torch.ones(90, 1, dtype=torch.bool), 8, 2, 3, 15) is None  # no return: none
    x, times = training_batch(rng, 2, 8, 3, 0.5, 48, p_memory=1.0)
    assert x.shape == (2, 24, 12, 16, 24) and bool((times.diff(dim=1) > 0).all())


def test_subject_readout_reads_the_truth_and_not_the_background():
    clip = make_clip(EVAL_SEED_BASE + 3, 90)
    assert M.identity_readout_accuracy(clip.frames, clip.identity, clip.centre, clip.visible) > 0.9
    assert M.identity_readout_accuracy(0.6 * clip.frames, clip.identity, clip.centre, clip.visible) > 0.9  # blur-proof
    assert M.identity_readout_accuracy(torch.zeros_like(clip.frames), clip.identity, clip.centre, clip.visible) == 0.0
    assert bool((M.subject_readout(clip.frames, clip.identity, clip.centre, clip.visible)[~clip.visible] == -1).all())


def test_returning_pairs_and_identity_recall_against_ground_truth():
    vis = torch.zeros(40, 1, dtype=torch.bool)
    vis[0:5, 0] = True
    vis[20:30, 0] = True  # back after 15 frames out of view
    pairs = M.returning_pairs(vis, min_gap=12, window=6)
    assert pairs[:, 0].nonzero().flatten().tolist() == list(range(20, 26))
    assert not M.returning_pairs(vis, min_gap=16).any()  # a 15-frame gap is not long enough
    clip = make_clip(EVAL_SEED_BASE + 3, 60)
    assert M.identity_recall(clip.frames, clip.identity, clip.visible) > 0.9  # the truth shows its subjects
    blank = torch.full_like(clip.frames, -0.2)
    assert M.identity_recall(blank, clip.identity, clip.visible) == 0.0
    assert M.identity_recall(clip.frames, clip.identity, torch.zeros_like(clip.visible)) != 0.0  # NaN: nothing to score


def test_memory_probe_alone_and_without_returns(tmp_path):
    """`--probe-only` skips the main seeds; a probe with no return in its history reports NaN, not a crash."""
    import json

    from ff_engine.cli import main

    out = tmp_path / "p.json"
    assert main(["bench", "quality", "--probe-only", "--probe-seeds", "2", "--probe-history", "48", "--probe-min-gap",
                 "9", "--probe-fractions", "0.5", "--prefix", "6", "--frames", "6", "--policies", "window",
                 "expected-attention", "future-forcing", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["rows"] == [] and {r["policy"] for r in res["memory_probe"]} == {
        "ground-truth", "unbounded", "window", "expected-attention", "future-forcing"}
    vs_ff = {r["policy"]: r for r in res["memory_probe_vs_future_forcing"]}
    vs_ea = {r["policy"]: r for r in res["memory_probe_vs_expected_attention"]}
    assert list(vs_ff) == ["unbounded", "window", "expected-attention"]
    assert list(vs_ea) == ["unbounded", "window", "future-forcing"]
    assert {r["reference"] for r in vs_ea.values()} == {"expected-attention"}
    for m in ("returning_denoise_error", "returning_readout_denoise"):  # the same pairs, seen from the other side
        assert vs_ea["future-forcing"][m] == pytest.approx(-vs_ff["expected-attention"][m])
    assert main(["bench", "quality", "--probe-only", "--probe-seeds", "1", "--probe-history", "12",
                 "--prefix", "6", "--frames", "6", "--policies", "window", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert all(r["probes"] == 0 for r in res["memory_probe"]) and res["memory_probe_vs_future_forcing"] == []
    assert res["memory_probe_vs_expected_attention"] == []


def test_probe_picture_runs(tmp_path):
    from ff_engine.bench import probe_picture

    png = tmp_path / "p.png"
    probe_picture.main(["--probes", "1", "--history", "48", "--min-gap", "9", "--policies", "window",
                        "--out", str(png)])
    assert png.is_file() and png.stat().st_size > 1000


def test_subject_tokens_mark_the_cells_the_subject_covers():
    from model_adapters.world.metrics import subject_tokens

    centre = torch.tensor([[16.0, 24.0], [2.0, 2.0], [16.0, 24.0]])
    visible = torch.tensor([True, True, False])
    tok = subject_tokens(0, centre, visible, (8, 12))  # identity 0: a 9 x 9 square; 4 x 4 pixel cells
    assert tok.shape == (3, 8, 12) and not tok[2].any()
    # the square spans rows 12..20, cols 20..28: cells 3..4 x 5..6 fully, the next row / column of cells by 1/4
    # (marked), the corner cell (5, 7) by 1/16 (not)
    assert tok[0].nonzero().tolist() == [[r, c] for r in range(3, 6) for c in range(5, 8) if (r, c) != (5, 7)]
    assert tok[1, 0, 0] and tok[1].sum() >= 1  # clipped at the frame's corner, still marked
    with pytest.raises(ValueError, match="does not tile"):
        subject_tokens(0, centre, visible, (5, 12))


def test_rollout_context_keeps_the_prefix_and_generates_the_rest():
    from model_adapters.causal_wan import PRESETS, CausalWanModel
    from model_adapters.world.train import rollout_context

    torch.manual_seed(0)
    model = CausalWanModel(PRESETS["world-tiny"]).eval()
    x0 = torch.rand(2, 9, 12, 16, 24) * 2 - 1
    times = torch.stack([torch.arange(9), torch.arange(9) + 40])
    out = rollout_context(model, x0, times, 1, 3, [1.0, 0.5], 0.1, torch.Generator().manual_seed(0))
    assert out.shape == x0.shape and torch.isfinite(out).all()
    assert torch.equal(out[:, :3], x0[:, :3])  # the ground-truth prefix block is kept as is
    assert (out[:, 3:] - x0[:, 3:]).abs().mean() > 0.1  # later blocks are the model's own (random weights here)
    again = rollout_context(model, x0, times, 1, 3, [1.0, 0.5], 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # seeded


def test_rollout_training_runs_and_is_reproducible():
    from model_adapters.world.train import train

    kw = {"batch": 2, "clip_frames": 6, "log_every": 1, "progress": False, "p_rollout": 1.0, "rollout_steps": 2,
          "context_noise": 0.5, "p_context_noise": 1.0}
    _, c1 = train(2, **kw)
    _, c2 = train(2, **kw)
    assert [c["loss"] for c in c1] == [c["loss"] for c in c2]
    assert all(math.isfinite(c["loss"]) for c in c1)


def test_clip_workers_are_reproducible_and_each_draws_its_own_stream():
    from model_adapters.world.train import N_TARGET, batches, train, training_batch

    kw = {"batch": 2, "n_blocks": 2, "fpb": 3, "p_sparse": 0.5, "max_gap": 24, "p_memory": 0.5, "n_target": N_TARGET}
    stream = batches(None, 2, 5, **kw)
    got = [next(stream) for _ in range(4)]
    stream.close()
    for worker in (0, 1):  # DataLoader returns the workers' batches round-robin: 0, 1, 0, 1
        rng = torch.Generator().manual_seed(5 * 7919 + worker)
        for b in got[worker::2]:
            want = training_batch(rng, **kw)
            assert torch.equal(b[0], want[0]) and torch.equal(b[1], want[1])
    assert not torch.equal(got[0][0], got[1][0])
    run = {"batch": 2, "clip_frames": 6, "log_every": 1, "progress": False, "workers": 2}
    losses = [[c["loss"] for c in train(2, **run)[1]] for _ in range(2)]
    assert losses[0] == losses[1] and all(math.isfinite(x) for x in losses[0])


def test_a_failed_training_run_leaves_no_clip_worker_behind():
    import multiprocessing

    from model_adapters.world.train import train

    def broken_checkpoint(model, curve, step):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full") as failure:
        train(3, batch=1, clip_frames=6, progress=False, workers=2, checkpoint=broken_checkpoint, checkpoint_every=1)
    deadline = time.monotonic() + 60  # the traceback (kept, as a caller logging it would) must not hold workers
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert multiprocessing.active_children() == [] and failure.traceback


def test_max_minutes_stops_training_and_the_checkpoint_says_where(tmp_path):
    import json

    from model_adapters.world.train import main

    out = tmp_path / "w.safetensors"
    assert main(["--steps", "500", "--batch", "1", "--clip-frames", "6", "--max-minutes", "0.002",
                 "--checkpoint-every", "0", "--out", str(out)]) == 0
    meta = json.loads(out.with_suffix(".train.json").read_text())
    assert meta["curve"][-1]["stopped"] == "time" and 0 < meta["step"] < 500
    assert meta["step"] == meta["curve"][-1]["step"] and "--max-minutes 0.002" in meta["command"]
    assert out.stat().st_size > 0


def test_lr_schedule_follows_steps_or_the_time_budget():
    from model_adapters.world.train import lr_factor

    assert lr_factor(0.0, 0, 10) == pytest.approx(0.1)  # warm-up by steps
    assert lr_factor(0.5, 0, 5000) == pytest.approx(0.5)  # a time budget half spent: warmed up, cosine at half
    assert lr_factor(1.0, 99, 10) == pytest.approx(0.0)


def test_train_world_runs_where_only_pytorch_is_installed(tmp_path):
    """The GPU machine has PyTorch, Triton, safetensors, tqdm: no vLLM, Ray, pydantic, FastAPI, PyAV."""
    script = f"""
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {{"vllm", "ray", "pydantic", "fastapi", "uvicorn", "av", "diffusers", "kvpress",
                                   "flash_attn", "xformers", "prometheus_client"}}:
            raise ImportError("not installed here: " + name)
sys.meta_path.insert(0, Absent())
from model_adapters.world.train import main
sys.exit(main(["--steps", "1", "--batch", "1", "--clip-frames", "6", "--workers", "1", "--checkpoint-every", "0",
               "--out", {str(tmp_path / "w.safetensors")!r}]))
"""
    p = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                       check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "w.safetensors").exists() and "vllm" not in p.stderr.lower()


def test_qk_gains_get_their_own_learning_rate():
    from model_adapters.causal_wan import PRESETS, CausalWanModel
    from model_adapters.world.train import param_groups, train

    model = CausalWanModel(PRESETS["world-tiny"])
    rest, gains = param_groups(model, 20.0)
    n_gain = 2 * PRESETS["world-tiny"].num_layers  # self-attention norm_q and norm_k of every block
    assert len(gains["params"]) == n_gain and gains["lr_mult"] == 20.0 and gains["weight_decay"] == 0.0
    assert len(rest["params"]) + n_gain == len(list(model.parameters()))
    # one step: the gains move ~20x as far as with the common learning rate (Adam's step is ~lr per weight)
    moved = {}
    for mult in (1.0, 20.0):
        m, _ = train(1, batch=1, clip_frames=6, lr=1e-3, progress=False, qk_gain_lr=mult)
        g = m.blocks[0].self_attn.norm_q.weight.detach()
        moved[mult] = (g - 1).abs().max().item()
    assert moved[20.0] > 10 * moved[1.0] > 0


def test_world_diagnostics_measure_what_they_say(tmp_path):
    from ff_engine.bench.world_diagnostics import SEEDS, diagnose
    from model_adapters.causal_wan import PRESETS, CausalWanModel, save_checkpoint

    torch.manual_seed(0)
    path = tmp_path / "random.safetensors"
    save_checkpoint(CausalWanModel(PRESETS["world-tiny"]).eval(), path)
    report = diagnose(str(path), frames=24)
    frames = torch.stack([make_clip(s, 27, start=40).frames for s in SEEDS])
    copy = (frames[:, 23:24] - frames[:, 24:27]).pow(2).mean().item()
    assert report["next_block_error"]["copy_last_frame"] == pytest.approx(copy, rel=1e-5)
    for row in report["attention_to_previous_frame"]:  # per head: probabilities, the same token within the frame
        for top, prev, same in zip(row["max_weight"], row["previous_frame"], row["same_position"]):
            assert 0 < same <= prev <= 1 and 0 < top <= 1
    assert len(report["attention_to_previous_frame"]) == PRESETS["world-tiny"].num_layers
    cont = report["continuation"]
    assert len(cont["per_seed"]) == len(SEEDS) and all(len(r["drift_curve"]) == 1 for r in cont["per_seed"])
    assert 0 < cont["mean"]["truth_world_presence"] <= 1 and cont["mean"]["mse_all"] > 0.01  # random weights
