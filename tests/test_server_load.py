"""The load test's CI mode (``benchmarks/load.py --quick``): a real server subprocess on 127.0.0.1, ~12 s of
concurrent REST + WebSocket streams with cancels, hostile requests and an overload burst; nothing leaks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_load_quick(tmp_path):
    out = tmp_path / "load.json"
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "load.py"), "--quick", "--out", str(out)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert out.is_file(), r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert r.returncode == 0, (res["error_samples"], r.stderr[-2000:])
    assert res["errors"] == 0 and res["leaked_pages"] == 0 and res["active_at_end"] == 0
    assert res["served"] >= 1 and res["rejected"] >= 1 and res["cancelled"] >= 1 and res["hostile_requests"] >= 10
    assert res["ttff_s"]["n"] >= 1 and res["server_rss_mb"]["end"] > 0
    assert out.with_suffix(".png").is_file()
    assert res["costly_refused"] >= 1 and res["slowloris"]["closed_by_server"] >= 1  # each answered, none held
    ia = res["interactive"]  # users steering the world model: steer, park, fork, roll back
    assert ia["sessions"] >= 1 and ia["steers"] >= 1 and ia["parked_at_end"] == 0
    assert ia["parked"] == ia["resumed"] == ia["paused_long"] and ia["forked"] == ia["forks"]
