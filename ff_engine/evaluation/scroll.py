"""Free rollouts on the scroll world (world model v4): what each cache policy keeps, scored against the truth.

The library half of ``ff-engine bench scroll_quality`` (``ff_engine/bench/scroll_quality.py`` runs it).

For each held-out seed and action script (``steady``: laps to the right; ``back-and-forth``: runs of 48-144 frames
each way with random pauses), the engine prefills the ground-truth prefix (a pan over the whole panorama), then
generates ``--frames`` frames under the script with each policy at each budget.  After the prefix every frame is
determined by what was seen, so each generated frame is scored against the truth:

* pixel MSE on returning content (columns back after >= ``--min-gap`` frames away) and on continuing content, per
  lap (96 frames), over frames 1-48 and 193-240;
* returning subjects: colour and shape read out at the first frame each is wholly back in view;
* flat-pixel share and edge sharpness against the real frames'; wall time per block.
Paired 90 % seed-bootstrap intervals of every policy minus Future Forcing and minus faithful Expected Attention.

    ff-engine bench scroll_quality --seeds 8 --budgets 6 12 24 --workers 2
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from ff_engine.engine import Engine, SessionConfig
from ff_engine.engine.engine import reservation_pages
from ff_engine.policies import make_policy
from model_adapters.world import scroll
from model_adapters.world import scroll_metrics as SM
from model_adapters.world.procedural import decode, encode

SEED_BASE = scroll.EVAL_SEED_BASE + 4000  # held-out worlds (training draws from scroll.TRAIN_SEEDS only)
TRAINING_SEED_BASE = scroll.TRAIN_SEEDS.start + 50_000  # worlds training may have drawn: decide settings on these
SCRIPTS = ("steady", "back-and-forth")
LAP = scroll.PANORAMA_W // scroll.STEP_PX
POLICIES = {  # name -> (registered policy, params); the budget-dependent ones are filled in by ``policy_for``
    "unbounded": ("unbounded", {}),
    "window": ("window", {}),
    "sink-window": ("sink-window", {"sink_frames": 3}),
    "deep-sink": ("deep-sink", {}),
    "h2o": ("h2o", {"num_queries": 64}),
    "snapkv": ("snapkv", {"num_queries": 64}),
    "expected-attention": ("expected-attention", {}),
    "ff-no-merge": ("future-forcing", {"merge": "none", "sink_frames": 0}),  # the default in session 17
    "ff-log-mass": ("future-forcing", {"merge": "log-mass", "sink_frames": 0}),  # the default until session 17
    "ff-merge-tight": ("future-forcing", {"merge": "log-mass", "merge_key_tol": 0.1, "merge_value_tol": 0.2,
                                          "sink_frames": 0}),
    "ff-sink1": ("future-forcing", {"sink_frames": 1}),  # the first latent frame(s) always kept (attention sink)
    "ff-sink3": ("future-forcing", {"sink_frames": 3}),  # = future-forcing's default since session 18
    "ff-no-value-norm": ("future-forcing", {"value_norm": False, "sink_frames": 0}),  # scores not value-weighted
    "forcing-kv": ("forcing-kv", {}),  # Ji et al. 2026's segment-similarity pruning, the reference's defaults
}


def policy_for(name: str, budget: int | None):
    base, params = POLICIES[name]
    if name == "deep-sink":
        params = {"sink_frames": max(3, (budget // 2) // 3 * 3)}
    return make_policy(base, **params)


@dataclass(frozen=True)
class Job:
    seed: int
    script: str
    policy: str
    budget: int | None
    frames: int
    prefix: int
    page_size: int = 16
    min_gap: int = 24


def script_actions(seed: int, script: str, frames: int) -> list[int]:
    if script == "steady":
        return scroll.steady_script(frames)
    if script == "back-and-forth":
        return scroll.back_and_forth_script(torch.Generator().manual_seed(seed), frames)
    raise ValueError(f"unknown script {script!r}; choose from {SCRIPTS}")


def job_clip(job: Job) -> scroll.ScrollClip:
    return scroll.make_clip(job.seed, scroll.prefix_actions(job.prefix) + script_actions(job.seed, job.script,
                                                                                         job.frames))


def rollout(model, job: Job, clip: scroll.ScrollClip, policy=None) -> tuple[torch.Tensor, float]:
    """(generated pixel frames after the prefix [frames, 3, H, W], wall seconds per generated block) of ``job`` on
    its ground truth ``clip`` (``job_clip``); ``policy``: this object instead of ``job.policy``'s (an observer)."""
    total = clip.frames.shape[0]
    cfg = SessionConfig(prompt=torch.zeros(1, model.cfg.text_dim), num_frames=total, seed=job.seed,
                        policy=policy or policy_for(job.policy, job.budget), budget_frames=job.budget,
                        actions=clip.actions.tolist())
    engine = Engine(model, num_pages=reservation_pages(model.geometry, job.page_size, cfg), page_size=job.page_size,
                    backend="torch")
    s = engine.add_session(cfg)
    engine.prefill(s.id, encode(clip.frames[:job.prefix]))
    t0, blocks = time.perf_counter(), s.num_blocks - s.block
    while s.id in engine.sessions:
        (result,) = engine.step([s.id])
        if result.error:
            raise RuntimeError(f"{job}: {result.error}")
    seconds = (time.perf_counter() - t0) / blocks
    return decode(torch.cat(s.latents)[job.prefix:].float()), seconds


def score(px: torch.Tensor, job: Job, clip: scroll.ScrollClip) -> dict:
    """Every measure of one rollout against its ground truth ``clip``."""
    p, truth = job.prefix, clip.frames[job.prefix:]
    err = (px - truth).pow(2).mean((1, 2, 3))
    row = {"mse": float(err.mean()), "mse_1_48": float(err[:48].mean()), "mse_193_240": float(err[192:240].mean())
           if err.shape[0] >= 240 else float("nan"),
           "mse_per_lap": [float(err[i:i + LAP].mean()) for i in range(0, err.shape[0], LAP)],
           "mse_curve": [round(float(x), 5) for x in err],
           "flat_share": SM.flat_share(px), "edge_sharpness": SM.edge_sharpness(px)}
    row.update(SM.split_errors(px, truth, clip.camera, p, job.min_gap))
    events = SM.return_events(clip, job.min_gap, start=p)
    reads = SM.return_readouts(px, clip, events, p)
    row.update({f"return_{k}": v for k, v in reads.items()})
    return row


def run_job(model, job: Job) -> dict:
    clip = job_clip(job)
    px, seconds = rollout(model, job, clip)
    return {**asdict(job), **score(px, job, clip), "seconds_per_block": seconds}


def truth_row(job: Job) -> dict:
    clip = job_clip(job)
    truth = clip.frames[job.prefix:]
    reads = SM.return_readouts(truth, clip, SM.return_events(clip, job.min_gap, start=job.prefix), job.prefix)
    return {"seed": job.seed, "script": job.script, "flat_share": SM.flat_share(truth),
            "edge_sharpness": SM.edge_sharpness(truth), **{f"return_{k}": v for k, v in reads.items()}}


# ---- statistics ---------------------------------------------------------------------------------------------
METRICS = ("mse", "mse_returning", "mse_continuing", "mse_1_48", "mse_193_240", "return_both", "return_colour",
           "flat_share", "edge_sharpness", "seconds_per_block")


def _nanmean(xs):
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["policy"], r["budget"], r["script"]), []).append(r)
    out = []
    for (policy, budget, script), rs in sorted(groups.items(), key=lambda kv: (str(kv[0][1]), kv[0][2], kv[0][0])):
        item = {"policy": policy, "budget": budget, "script": script, "seeds": len(rs)}
        item.update({m: _nanmean([r[m] for r in rs]) for m in METRICS})
        item["returns"] = sum(r["return_returns"] for r in rs)
        out.append(item)
    return out


def paired(rows: list[dict], reference: str, resamples: int = 2000) -> list[dict]:
    """Every policy minus ``reference`` on the same (seed, script, budget): mean and 90 % seed-bootstrap interval."""
    ref = {(r["seed"], r["script"], r["budget"]): r for r in rows if r["policy"] == reference}
    g = torch.Generator().manual_seed(0)
    groups: dict[tuple, list[tuple[dict, dict]]] = {}
    for r in rows:
        base = ref.get((r["seed"], r["script"], r["budget"]))
        if base is not None and r["policy"] != reference:
            groups.setdefault((r["policy"], r["budget"], r["script"]), []).append((r, base))
    out = []
    for (policy, budget, script), pairs in sorted(groups.items(), key=lambda kv: (str(kv[0][1]), kv[0][2], kv[0][0])):
        item = {"policy": policy, "budget": budget, "script": script, "reference": reference}
        for m in ("mse", "mse_returning", "mse_continuing", "return_both"):
            d = torch.tensor([a[m] - b[m] for a, b in pairs if not (math.isnan(a[m]) or math.isnan(b[m]))],
                             dtype=torch.float64)
            if not d.numel():
                continue
            boot = d[torch.randint(d.numel(), (resamples, d.numel()), generator=g)].mean(1)
            item[m] = float(d.mean())
            item[m + "_ci90"] = [float(boot.quantile(0.05)), float(boot.quantile(0.95))]
        out.append(item)
    return out
