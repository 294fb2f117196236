"""Paired comparisons with a bootstrap over seeds, and NaN-aware means.

Policies are compared on identical inputs (same seeds, same noise), so the paired difference is much tighter than
each policy's own seed spread; seeds are resampled with everything measured on them, as those are not independent.
"""

from __future__ import annotations

import math
import statistics

import torch

from ff_engine.evaluation.probe import PROBE_METRICS


def paired_differences(probe, reference="future-forcing", resamples=2000, metrics=PROBE_METRICS):
    """Every policy minus ``reference`` on the same probes (same seeds, same returns, same noise): the mean
    difference of each of ``metrics`` and a 90 % interval from a bootstrap over seeds (seeds resampled with their
    probes, as the probes of one seed are not independent).  Policies are compared on identical probes, so this
    is much tighter than the seed spread of each policy's own mean."""
    ref = {r["budget_frames"]: r for r in probe if r["policy"] == reference}
    g = torch.Generator().manual_seed(0)
    out = []
    for r in probe:
        base = ref.get(r["budget_frames"]) or next(iter(ref.values()), None)
        if base is None or r is base or r["policy"] == "ground-truth":
            continue
        seeds = sorted(set(r["per_seed"]) & set(base["per_seed"]))
        if not seeds:  # no seed had a return to probe
            continue
        item = {"policy": r["policy"], "budget_frames": r["budget_frames"], "reference": reference}
        for m in metrics:
            diffs = [[a - b for a, b in zip(r["per_seed"][k][m], base["per_seed"][k][m])] for k in seeds]
            sums = torch.tensor([sum(d) for d in diffs], dtype=torch.float64)
            counts = torch.tensor([len(d) for d in diffs], dtype=torch.float64)
            idx = torch.randint(len(seeds), (resamples, len(seeds)), generator=g)
            boot = sums[idx].sum(1) / counts[idx].sum(1).clamp_min(1)
            item[m] = float(sums.sum() / counts.sum())
            item[m + "_ci90"] = [float(boot.quantile(0.05)), float(boot.quantile(0.95))]
        out.append(item)
    return out


def mean_std(vals):
    vals = [v for v in vals if not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), 0.0, 0
    return statistics.mean(vals), (statistics.pstdev(vals) if len(vals) > 1 else 0.0), len(vals)
