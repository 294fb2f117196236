import json

import torch
from test_engine import tiny_model

from ff_engine.analysis import analyze_queries, drift
from ff_engine.cli import main


def test_drift_is_zero_for_constant_means_and_grows_with_change():
    mu = torch.randn(3, 8)
    assert max(drift([mu, mu, mu])["relative_drift"]) == 0.0
    d = drift([mu, mu * 1.1, mu * 1.5])["relative_drift"]
    assert abs(d[1] - 0.1) < 1e-5 and abs(d[2] - 0.5) < 1e-5


def test_analyze_records_every_layer_and_writing_block(tmp_path):
    m = tiny_model()
    r = analyze_queries(m, torch.randn(3, 256), num_frames=12, budget_frames=3, backend="torch")
    assert r["blocks"] == 3 and set(r["layers"]) == {0, 1}
    for v in r["layers"].values():
        assert len(v["pre_rope"]["relative_drift"]) == 3 and v["pre_rope"]["relative_drift"][0] == 0.0


def test_analyze_cli(tmp_path, capsys):
    rc = main(["analyze", "queries", "--model", "wan-tiny", "--random-weights", "--frames", "9", "--budget-frames", "3",
               "--out-dir", str(tmp_path)])
    assert rc == 0 and (tmp_path / "query_drift.png").is_file()
    assert json.loads((tmp_path / "query_drift.json").read_text())["blocks"] == 2
