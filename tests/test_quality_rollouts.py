"""Free-rollout evaluation (``ff_engine.evaluation``) and the README pictures of ``ff-engine bench filmstrip``."""

import json
import math

import numpy as np
import pytest

from ff_engine import evaluation as quality
from ff_engine.bench import filmstrip
from ff_engine.errors import ConfigError
from model_adapters.world.procedural import make_clip


def test_rollout_jobs_size_budgets_by_what_the_unbounded_cache_ends_with():
    jobs = quality.rollout_jobs([7], ["prefix", "noise"], [0.25, 0.5], ["window", "future-forcing"], prefix=24,
                                frames=240, page_size=16, return_gap=24, fpb=3)
    assert len(jobs) == 2 * (1 + 2 * 2)
    budgets = {(j.start, j.budget) for j in jobs if j.policy == "window"}
    assert budgets == {("prefix", 66), ("prefix", 132), ("noise", 60), ("noise", 120)}  # 25 / 50 % of 264 and 240
    assert {j.prefix for j in jobs if j.start == "noise"} == {0}


def test_ground_truth_scores_as_a_rollout_that_holds_its_world():
    seed = quality.ROLLOUT_SEED_BASE
    (row,) = quality.ground_truth_rollouts([seed], prefix=24, frames=96, return_gap=24)
    clip = make_clip(seed, 120)
    assert row["policy"] == "ground-truth" and len(row["drift_curve"]) == 4 and row["drift_prefix"] > 0
    assert row["identity_consistency"] in (1.0,) or math.isnan(row["identity_consistency"])
    assert row["returning_identity_consistency"] == 1.0 or row["returning_events"] == 0
    assert set(row["world"]) == {str(int(i) // 3) for i in clip.identity}
    noise = quality.score_rollout(clip.frames[24:], "noise", 0, None, 24)  # the same frames, no truth given
    assert noise["drift_curve"] == pytest.approx(row["drift_curve"]) and "drift_prefix" not in noise


def _row(seed, policy, budget, value, start="noise"):
    base = {m: 0.5 for m in quality.ROLLOUT_METRICS}
    return {**base, "seed": seed, "start": start, "policy": policy, "budget_frames": budget,
            "returning_identity_consistency": value}


def test_paired_rollouts_compare_each_policy_with_future_forcing_on_the_same_seeds():
    rows = []
    for seed in range(6):
        rows += [_row(seed, "future-forcing", 60, 0.6 + 0.05 * seed), _row(seed, "window", 60, 0.4 + 0.05 * seed),
                 _row(seed, "unbounded", None, 0.6 + 0.05 * seed)]
    rows.append(_row(9, "window", 60, float("nan")))  # a seed with no return: left out, not a crash
    paired = {r["policy"]: r for r in quality.paired_rollouts(rows)}
    assert set(paired) == {"window", "unbounded"} and paired["window"]["start"] == "noise"
    lo, hi = paired["window"]["returning_identity_consistency_ci90"]
    assert paired["window"]["returning_identity_consistency"] == pytest.approx(-0.2) and lo == pytest.approx(-0.2)
    assert hi == pytest.approx(-0.2) and paired["unbounded"]["returning_identity_consistency"] == pytest.approx(0.0)


def test_free_rollouts_and_probe_end_to_end_on_two_workers(tmp_path):
    """`ff-engine bench quality` with the free-rollout section and the memory probe, spread over two processes."""
    from ff_engine.cli import main

    out = tmp_path / "q.json"
    assert main(["bench", "quality", "--seeds", "0", "--probe-seeds", "0", "--rollout-seeds", "1",
                 "--rollout-frames", "24", "--prefix", "6", "--fractions", "0.5", "--rollout-policies", "window",
                 "future-forcing", "--workers", "2", "--out", str(out), "--probe-seeds", "2", "--probe-history", "48",
                 "--probe-min-gap", "9", "--probe-fractions", "0.5", "--policies", "window"]) == 0
    res = json.loads(out.read_text())
    got = {(r["start"], r["policy"]) for r in res["rollouts"]}
    assert got == {(s, p) for s in ("prefix", "noise") for p in ("unbounded", "window", "future-forcing")} | {
        ("prefix", "ground-truth")}
    assert all(len(r["drift_curve"]) == 1 and r["drift_ratio"] == 1.0 for r in res["rollouts"])
    assert all(0.0 <= r["background_consistency"] <= 1.0 for r in res["rollouts"])
    assert all(r["seconds"] > 0 and r["cpu_seconds"] > 0 for r in res["rollouts"] if r["policy"] != "ground-truth")
    assert {(r["start"], r["policy"]) for r in res["rollouts_vs_future_forcing"]} == {
        (s, p) for s in ("prefix", "noise") for p in ("unbounded", "window")}
    assert {s["budget_frames"] for s in res["rollout_summary"] if s["policy"] == "window"} == {15, 12}
    assert (tmp_path / "q_drift.png").stat().st_size > 1000 and not res["partial"]
    probe = {r["policy"]: r for r in res["memory_probe"]}  # the probe's seeds on the same two workers
    assert set(probe) == {"ground-truth", "unbounded", "window"} and probe["window"]["probes"] == 3
    assert list(probe["window"]["per_seed"]) == ["1001000"]  # the one seed with a return in 48 frames


def _write_mp4(path, frames=30):
    from ff_engine.video import Mp4Writer

    w = Mp4Writer(path, fps=16)
    ramp = np.linspace(0, 255, frames).astype(np.uint8)
    w.write(np.stack([np.full((48, 64, 3), v, dtype=np.uint8) for v in ramp]))
    w.close()


def test_filmstrip_shows_evenly_spaced_frames_of_the_video(tmp_path):
    mp4, png = tmp_path / "v.mp4", tmp_path / "strip.png"
    _write_mp4(mp4)
    assert filmstrip.filmstrip(mp4, png, columns=5, rows=2) == list(range(0, 30, 3))  # 29 // 9 = 3: all 10 cells
    assert png.stat().st_size > 1000
    assert filmstrip.filmstrip(mp4, png, every=10, columns=10, rows=1) == [0, 10, 20]
    numbers, frames, fps = filmstrip.read_frames(mp4, every=29, cells=3)
    assert numbers == [0, 29] and fps == 16 and frames[1].mean() > frames[0].mean() + 200  # the last frame is bright
    with pytest.raises(ConfigError, match="no such file"):
        filmstrip.filmstrip(tmp_path / "missing.mp4", png)
    with pytest.raises(SystemExit):
        filmstrip.main(["--out", str(png)])  # neither a video nor --drift
