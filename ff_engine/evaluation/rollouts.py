"""Free rollouts: generated frames from a ground-truth prefix or from pure noise, scored without alignment.

Jobs (``RolloutJob``), their scoring (``score_rollout``), the ground truth's own scores (the metrics' ceiling) and
the per-policy summaries and paired differences against a reference policy.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch

from ff_engine.evaluation.rollout import rollout
from ff_engine.evaluation.specs import policy_specs, to_budget
from ff_engine.evaluation.stats import mean_std, paired_differences
from ff_engine.policies import make_policy
from model_adapters.world import metrics as M
from model_adapters.world.procedural import EVAL_SEED_BASE, decode, encode, make_clip

ROLLOUT_SEED_BASE = EVAL_SEED_BASE + 2000  # held-out worlds; the main run uses +0.., the memory probe +1000..


ROLLOUT_STARTS = ("prefix", "noise")


ROLLOUT_METRICS = ["returning_identity_consistency", "identity_consistency", "drift_ratio", "drift_first",
                   "drift_last", "subject_consistency", "background_consistency", "world_presence", "foreign_presence"]


@dataclass(frozen=True)
class RolloutJob:
    """One free rollout: world ``seed``, ``start`` "prefix" (``prefix`` ground-truth frames written first) or
    "noise" (generation from pure noise, seeded by ``seed``), ``frames`` generated frames under ``policy`` (a
    ``policy_specs`` name or "unbounded") at ``budget`` frames."""

    seed: int
    start: str
    policy: str
    budget: int | None
    prefix: int
    frames: int
    page_size: int
    return_gap: int


def rollout_jobs(seeds, starts, fractions, policies, prefix, frames, page_size, return_gap, fpb) -> list[RolloutJob]:
    """Every (seed, start, policy, budget) plus each (seed, start)'s unbounded rollout; budgets are ``fractions``
    of what the unbounded cache holds at the end (prefix + generated frames, or generated frames from noise)."""
    jobs = []
    for seed in seeds:
        for start in starts:
            p = prefix if start == "prefix" else 0
            jobs.append(RolloutJob(seed, start, "unbounded", None, p, frames, page_size, return_gap))
            for b in sorted({to_budget(f, p + frames, fpb) for f in fractions}):
                jobs += [RolloutJob(seed, start, n, b, p, frames, page_size, return_gap) for n in policies]
    return jobs


def score_rollout(px: torch.Tensor, start: str, prefix: int, identity: torch.Tensor | None, return_gap: int) -> dict:
    """The free-rollout metrics of one video ``px`` [prefix + frames, 3, H, W] (ground truth first, then
    generated).  The world's subjects are the clip's (``metrics.world_from_truth``) after a prefix, and the first
    ones the rollout establishes (``metrics.world_from_sightings``) from noise; colour consistency counts the
    generated frames from the first frame a world subject is known."""
    gen = px[prefix:]
    colours, shapes = M.subject_sightings(px)
    world = M.world_from_truth(identity, prefix) if start == "prefix" else M.world_from_sightings(colours, shapes)
    known = min(world.known_from.values(), default=len(px))
    curve = M.drift_curve(gen)
    row = {"drift_curve": curve, "drift_ratio": M.drift_ratio(curve), "drift_first": curve[0], "drift_last": curve[-1],
           "identity_consistency": M.world_colour_consistency(colours[known:], world),
           "returning_identity_consistency": M.returning_identity_consistency(colours, shapes, world, return_gap),
           "returning_events": len(M.returning_events(colours, world, return_gap)),
           "subject_consistency": M.subject_consistency(gen), "background_consistency": M.background_consistency(gen),
           "world": {str(k): v for k, v in world.subjects.items()},
           "world_known_from": {str(k): v for k, v in world.known_from.items()},
           **M.colour_presence(colours[prefix:], world)}
    if prefix >= M.DRIFT_WINDOW:
        row["drift_prefix"] = M.drift_curve(px[:prefix])[-1]  # the ground truth's own level in this world
    return row


def run_rollout(model, job: RolloutJob) -> dict:
    """Generate and score one ``RolloutJob`` -> a result row (with its wall and CPU time: ``seconds``,
    ``cpu_seconds``; on a shared box the CPU time is the one to extrapolate from)."""
    t0, c0 = time.perf_counter(), time.process_time()
    clip = make_clip(job.seed, job.prefix + job.frames) if job.prefix else None
    lat = encode(clip.frames) if clip else None
    pname, params = ("unbounded", {}) if job.budget is None else policy_specs(job.budget)[job.policy]
    px = decode(rollout(model, lat, job.prefix, job.frames, make_policy(pname, **params), job.budget, job.seed,
                        job.page_size))
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    total = job.prefix + job.frames
    return {"seed": job.seed, "start": job.start, "policy": job.policy, "budget_frames": job.budget,
            "budget_fraction": None if job.budget is None else job.budget / total, "prefix": job.prefix,
            "frames": job.frames, "seconds": seconds, "cpu_seconds": cpu_seconds,
            **score_rollout(px, job.start, job.prefix, clip.identity if clip else None, job.return_gap)}


def ground_truth_rollouts(seeds, prefix, frames, return_gap) -> list[dict]:
    """The ground-truth continuation of each prefix world, scored like a rollout: the metrics' ceiling and the
    drift ratio of real video (about 1)."""
    rows = []
    for seed in seeds:
        clip = make_clip(seed, prefix + frames)
        rows.append({"seed": seed, "start": "prefix", "policy": "ground-truth", "budget_frames": None,
                     "budget_fraction": None, "prefix": prefix, "frames": frames, "seconds": 0.0, "cpu_seconds": 0.0,
                     **score_rollout(clip.frames, "prefix", prefix, clip.identity, return_gap)})
    return rows


def summarise_rollouts(rows) -> list[dict]:
    """Per (start, policy, budget): mean and seed std of each of ``ROLLOUT_METRICS`` (NaN rollouts left out,
    ``<metric>_n`` says how many counted), the seed-mean drift curve and its last / first window."""
    groups = {}
    for r in rows:
        groups.setdefault((r["start"], r["policy"], r["budget_frames"]), []).append(r)
    out = []
    for (start, p, b), rs in groups.items():
        item = {"start": start, "policy": p, "budget_frames": b, "budget_fraction": rs[0]["budget_fraction"],
                "n": len(rs), "returning_events": sum(r["returning_events"] for r in rs),
                "seconds": statistics.mean(r["seconds"] for r in rs),
                "cpu_seconds": statistics.mean(r["cpu_seconds"] for r in rs)}
        for m in ROLLOUT_METRICS:
            item[m], item[m + "_std"], item[m + "_n"] = mean_std([r[m] for r in rs])
        curve = [statistics.mean(x) for x in zip(*(r["drift_curve"] for r in rs))]
        item["drift_curve"], item["drift_ratio_of_means"] = curve, M.drift_ratio(curve)
        item["world_presence_curve"] = [statistics.mean(x) for x in zip(*(r["world_presence_curve"] for r in rs))]
        out.append(item)
    return out


def paired_rollouts(rows, reference="future-forcing") -> list[dict]:
    """Each policy (and the unbounded cache) minus ``reference`` at the same budget on the same rollouts (same
    world, same noise), per start: mean difference of each of ``ROLLOUT_METRICS`` and a 90 % interval from a
    bootstrap over seeds (``paired_differences``; a seed where either side is NaN is left out of that metric)."""
    out = []
    for start in sorted({r["start"] for r in rows}):
        mine = [r for r in rows if r["start"] == start and r["policy"] != "ground-truth"]
        for budget in sorted({r["budget_frames"] for r in mine if r["budget_frames"] is not None}):
            by = {}
            for r in mine:
                if r["budget_frames"] in (budget, None):
                    seed_values = {m: [] if math.isnan(r[m]) else [r[m]] for m in ROLLOUT_METRICS}
                    by.setdefault(r["policy"], {})[str(r["seed"])] = seed_values
            items = [{"policy": p, "budget_frames": budget, "per_seed": v} for p, v in by.items()]
            out += [dict(d, start=start) for d in paired_differences(items, reference, metrics=ROLLOUT_METRICS)]
    return out
