"""Free rollouts on the scroll world (world model v4): what each cache policy keeps, scored against the truth.

For each held-out seed and action script (``steady``: laps to the right; ``back-and-forth``: runs of 48-144 frames
each way with random pauses), the engine prefills the ground-truth prefix (a pan over the whole panorama), then
generates ``--frames`` frames under the script with each policy at each budget.  After the prefix every frame is
determined by what was seen, so each generated frame is scored against the truth:

* pixel MSE on returning content (columns back after >= ``--min-gap`` frames away) and on continuing content, per
  lap (96 frames), over frames 1-48 and 193-240;
* returning subjects: colour and shape read out at the first frame each is wholly back in view;
* flat-pixel share and edge sharpness against the real frames'; wall time per block.
Paired 90 % seed-bootstrap intervals of every policy minus Future Forcing and minus faithful Expected Attention.

    python benchmarks/scroll_quality.py --seeds 8 --budgets 6 12 24 --workers 2 --out benchmarks/results/world_v4_rollouts.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ff_engine.engine import Engine, SessionConfig
from ff_engine.engine.engine import reservation_pages
from ff_engine.policies import make_policy
from model_adapters.world import scroll
from model_adapters.world import scroll_metrics as SM
from model_adapters.world.procedural import decode, encode

RESULTS = Path(__file__).parent / "results"
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "model_adapters" / "world" / "assets" / "world_v4.safetensors"
SEED_BASE = scroll.EVAL_SEED_BASE + 4000  # held-out worlds (training draws from scroll.TRAIN_SEEDS only)
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
    "future-forcing": ("future-forcing", {}),
    "ff-no-merge": ("future-forcing", {"merge": "none"}),
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


def rollout(model, job: Job) -> tuple[torch.Tensor, float]:
    """(generated pixel frames after the prefix [frames, 3, H, W], wall seconds per generated block)."""
    clip = job_clip(job)
    total = clip.frames.shape[0]
    cfg = SessionConfig(prompt=torch.zeros(1, model.cfg.text_dim), num_frames=total, seed=job.seed,
                        policy=policy_for(job.policy, job.budget), budget_frames=job.budget,
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


def score(px: torch.Tensor, job: Job) -> dict:
    """Every measure of one rollout against its ground truth."""
    clip = job_clip(job)
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
    px, seconds = rollout(model, job)
    return {**asdict(job), **score(px, job), "seconds_per_block": seconds}


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
    xs = [x for x in xs if x == x]
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
            d = torch.tensor([a[m] - b[m] for a, b in pairs if a[m] == a[m] and b[m] == b[m]], dtype=torch.float64)
            if not d.numel():
                continue
            boot = d[torch.randint(d.numel(), (resamples, d.numel()), generator=g)].mean(1)
            item[m] = float(d.mean())
            item[m + "_ci90"] = [float(boot.quantile(0.05)), float(boot.quantile(0.95))]
        out.append(item)
    return out


# ---- running ------------------------------------------------------------------------------------------------
_MODEL = None


def _init(path: str) -> None:
    global _MODEL
    from model_adapters import registry

    torch.set_num_threads(1)
    _MODEL = registry.load(path, "world-v4")


def _call(job: Job) -> dict:
    return run_job(_MODEL, job)


def run_all(model_path: str, jobs: list[Job], workers: int, progress: bool = True):
    """Yield each job's row as it finishes (``workers`` spawned processes, one model and one thread each)."""
    from tqdm import tqdm

    if workers <= 1:
        _init(model_path)
        torch.set_num_threads(max(1, torch.get_num_threads()))
        it = (_call(j) for j in jobs)
        yield from tqdm(it, total=len(jobs), desc="scroll rollouts", disable=not progress)
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers, initializer=_init, initargs=(model_path,)) as pool:
        yield from tqdm(pool.imap_unordered(_call, jobs), total=len(jobs), desc="scroll rollouts",
                        disable=not progress)


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["budget"] for r in rows if r["budget"] is not None})
    fig, axes = plt.subplots(1, max(1, len(budgets)), figsize=(4.2 * max(1, len(budgets)), 3.2), squeeze=False)
    for ax, b in zip(axes[0], budgets):
        for policy in dict.fromkeys(r["policy"] for r in rows):
            rs = [r for r in rows if r["policy"] == policy and (r["budget"] == b or policy == "unbounded")]
            if rs:
                curve = torch.tensor([r["mse_curve"] for r in rs]).mean(0)
                ax.plot(curve.numpy(), label=policy, lw=1)
        ax.set(title=f"budget {b} frames", xlabel="generated frame", ylabel="pixel MSE to the truth", yscale="log")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--scripts", nargs="+", default=list(SCRIPTS), choices=SCRIPTS)
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    ap.add_argument("--budgets", nargs="+", type=int, default=[6, 12, 24])
    ap.add_argument("--frames", type=int, default=240)
    ap.add_argument("--prefix", type=int, default=scroll.PREFIX_FRAMES)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "world_v4_rollouts.json"))
    a = ap.parse_args(argv)
    jobs = [Job(SEED_BASE + i, script, policy, None if policy == "unbounded" else b, a.frames, a.prefix)
            for i in range(a.seeds) for script in a.scripts for policy in a.policies
            for b in ([None] if policy == "unbounded" else a.budgets)]
    jobs = list(dict.fromkeys(jobs))
    out = {"command": "python benchmarks/scroll_quality.py " + " ".join(argv if argv is not None else []),
           "model": a.model, "truth": [truth_row(j) for j in dict.fromkeys(
               Job(j.seed, j.script, "unbounded", None, j.frames, j.prefix) for j in jobs)]}
    rows = []
    t0 = time.perf_counter()
    for row in run_all(a.model, jobs, a.workers):
        rows.append(row)
    out.update(rows=rows, summary=summarise(rows), seconds=time.perf_counter() - t0,
               vs_future_forcing=paired(rows, "future-forcing"), vs_expected_attention=paired(rows, "expected-attention"))
    path = Path(a.out)
    path.write_text(json.dumps(out, indent=1))
    plot(rows, path.with_suffix(".png"))
    for s in out["summary"]:
        print(f"{s['policy']:>20} budget {s['budget']!s:>4} {s['script']:>15}: mse {s['mse']:.4f} returning "
              f"{s['mse_returning']:.4f} continuing {s['mse_continuing']:.4f} returns read {s['return_both']:.2f} "
              f"({s['returns']}) flat {s['flat_share']:.2f} edges {s['edge_sharpness']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
