"""``ff-engine bench scroll_quality``: free rollouts of every cache policy on world model v4's scroll world.

Every policy at every budget on held-out seeds and two kinds of action script, scored against the truth
(``ff_engine.evaluation.scroll``); JSON and a plot of the error over time per policy under ``benchmarks/results``.

    ff-engine bench scroll_quality --seeds 8 --budgets 6 12 24 --workers 2 --out benchmarks/results/world_v4_rollouts.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ff_engine.bench import RESULTS_DIR
from ff_engine.evaluation.scroll import (
    POLICIES,
    SCRIPTS,
    SEED_BASE,
    TRAINING_SEED_BASE,
    Job,
    paired,
    run_job,
    summarise,
    truth_row,
)
from model_adapters.world import EMBEDDED_V4, scroll

# ---- running ------------------------------------------------------------------------------------------------
_MODEL = None


def _init(path: str, threads: int = 1) -> None:
    """Load the model once per process; spawned workers take one thread each (they share the cores)."""
    global _MODEL
    from model_adapters import registry

    torch.set_num_threads(threads)
    _MODEL = registry.load(path, "world-v4")


def _call(job: Job) -> dict:
    return run_job(_MODEL, job)


def run_all(model_path: str, jobs: list[Job], workers: int, progress: bool = True):
    """Yield each job's row as it finishes (``workers`` spawned processes, one model and one thread each)."""
    if not jobs:
        return
    from tqdm import tqdm

    if workers <= 1:
        _init(model_path, torch.get_num_threads())
        it = (_call(j) for j in jobs)
        yield from tqdm(it, total=len(jobs), desc="scroll rollouts", disable=not progress)
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers, initializer=_init, initargs=(model_path,)) as pool:
        yield from tqdm(pool.imap_unordered(_call, jobs), total=len(jobs), desc="scroll rollouts",
                        disable=not progress)


def resumable(log: Path, model_path: str, jobs: list[Job], workers: int):
    """``run_all`` whose rows are appended to ``log`` as they finish; a re-run of the same command reads them back
    and runs only the missing jobs (a long benchmark survives a stopped session).  The log names its model."""
    done: dict[Job, dict] = {}
    if log.exists():
        lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
        if lines and lines[0].get("model") != model_path:
            raise SystemExit(f"{log}: rows of another model ({lines[0].get('model')}); delete it or change --out")
        for row in lines[1:]:
            job = Job(**{k: row[k] for k in Job.__dataclass_fields__})
            done[job] = row
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(json.dumps({"model": model_path}) + "\n")
    wanted = set(jobs)
    yield from (row for job, row in done.items() if job in wanted)
    with log.open("a") as f:
        for row in run_all(model_path, [j for j in jobs if j not in done], workers):
            f.write(json.dumps(row) + "\n")
            f.flush()
            yield row


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
    ap.add_argument("--model", default=str(EMBEDDED_V4))
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--scripts", nargs="+", default=list(SCRIPTS), choices=SCRIPTS)
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    ap.add_argument("--budgets", nargs="+", type=int, default=[6, 12, 24])
    ap.add_argument("--frames", type=int, default=240)
    ap.add_argument("--prefix", type=int, default=scroll.PREFIX_FRAMES)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seed-set", choices=("held-out", "training"), default="held-out",
                    help="held-out worlds (report) or training worlds (decide: tune only on these)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "world_v4_rollouts.json"))
    a = ap.parse_args(argv)
    base = SEED_BASE if a.seed_set == "held-out" else TRAINING_SEED_BASE
    jobs = [Job(base + i, script, policy, None if policy == "unbounded" else b, a.frames, a.prefix)
            for i in range(a.seeds) for script in a.scripts for policy in a.policies
            for b in ([None] if policy == "unbounded" else a.budgets)]
    jobs = list(dict.fromkeys(jobs))
    out = {"command": "ff-engine bench scroll_quality " + " ".join(argv if argv is not None else []),
           "model": a.model, "truth": [truth_row(j) for j in dict.fromkeys(
               Job(j.seed, j.script, "unbounded", None, j.frames, j.prefix) for j in jobs)]}
    t0 = time.perf_counter()
    rows = list(resumable(Path(a.out).with_suffix(".rows.jsonl"), a.model, jobs, a.workers))
    out.update(rows=rows, summary=summarise(rows), seconds=time.perf_counter() - t0,
               vs_future_forcing=paired(rows, "ff-sink3"), vs_expected_attention=paired(rows, "expected-attention"))
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
