"""``ff-engine bench combine_probes``: probe runs split over policies merge into one paired comparison, and runs of
another setup are refused."""

import json

import pytest

from ff_engine.bench.combine_probes import combine

SETUP = {"seeds": 2, "history": 192, "min_gap": 30}


def _row(policy, per_seed, budget=30):
    return {"policy": policy, "budget_frames": budget, "per_seed": {
        k: {"returning_denoise_error": v, "returning_readout_denoise": v, "returning_readout_sampled": v,
            "returning_tokens_kept": v}
        for k, v in per_seed.items()}}


def _write(path, rows, setup=SETUP):
    path.write_text(json.dumps({"memory_probe_setup": setup, "model": "m", "memory_probe": rows}))
    return str(path)


def test_split_runs_merge_and_pair_against_future_forcing(tmp_path):
    unb = _row("unbounded", {"1": [0.5, 0.5], "2": [0.4]}, None)
    a = _write(tmp_path / "a.json", [unb, _row("future-forcing", {"1": [0.3, 0.2], "2": [0.1]})])
    b = _write(tmp_path / "b.json", [unb, _row("window", {"1": [0.4, 0.3], "2": [0.2]})])
    out = combine([a, b])
    diffs = {d["policy"]: d for d in out["memory_probe_vs_future_forcing"]}
    assert set(diffs) == {"unbounded", "window"}
    assert diffs["window"]["returning_denoise_error"] == pytest.approx(0.1)
    lo, hi = diffs["window"]["returning_denoise_error_ci90"]
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1)  # every paired difference is 0.1


def test_runs_of_another_setup_or_other_noise_are_refused(tmp_path):
    ff = _row("future-forcing", {"1": [0.3]})
    a = _write(tmp_path / "a.json", [ff, _row("unbounded", {"1": [0.5]}, None)])
    b = _write(tmp_path / "b.json", [_row("unbounded", {"1": [0.6]}, None)])
    with pytest.raises(SystemExit, match="differs between runs"):
        combine([a, b])
    c = _write(tmp_path / "c.json", [ff], {**SETUP, "seeds": 3})
    with pytest.raises(SystemExit, match="setups differ"):
        combine([a, c])
