"""Merge memory-probe results of several ``quality.py --probe-only`` runs on the same seeds (e.g. the policies
split over two runs to fit the box) and recompute the paired intervals against Future Forcing.

    python benchmarks/combine_probes.py benchmarks/results/quality_probe.json \
        benchmarks/results/quality_probe_baselines.json --out benchmarks/results/quality_probe_all.json

The runs must share seeds, history and budgets: the rows both contain (the unbounded cache, the ground truth)
have to agree exactly, which is checked — the probes are deterministic, so any difference means another setup.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ff_engine.evaluation import paired_differences


def combine(paths: list[str]) -> dict:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    rows: dict[tuple, dict] = {}
    for run in runs:
        if run["memory_probe_setup"] != runs[0]["memory_probe_setup"]:
            raise SystemExit(f"probe setups differ: {run['memory_probe_setup']} vs {runs[0]['memory_probe_setup']}")
        for row in run["memory_probe"]:
            key = (row["policy"], row["budget_frames"])
            if key in rows and rows[key]["per_seed"] != row["per_seed"]:
                raise SystemExit(f"{key} differs between runs: not the same seeds / noise")
            rows[key] = row
    probe = list(rows.values())
    return {"benchmark": "quality-memory-probe", "sources": paths, "memory_probe_setup": runs[0]["memory_probe_setup"],
            "model": runs[0]["model"], "memory_probe": probe, "memory_probe_vs_future_forcing": paired_differences(probe)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    out = combine(a.inputs)
    Path(a.out).write_text(json.dumps(out, indent=1))
    for d in out["memory_probe_vs_future_forcing"]:
        cells = "  ".join(f"{m} {d[m]:+.4f} [{d[m + '_ci90'][0]:+.4f}, {d[m + '_ci90'][1]:+.4f}]"
                          for m in ("returning_denoise_error", "returning_readout_denoise"))
        print(f"{d['policy']:30s} minus future-forcing: {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
