"""The same mixed workload on a RayCluster (or, ``--serve``, a ServeCluster) of 1 and of N workers, in one run.

Model: the embedded world model (``ModelSpec.checkpoint`` of model_adapters/world/assets/world_model.safetensors),
loaded by every worker; CPU workers, one torch thread each (``num_cpus=1`` per actor), ``--pages`` pages per
worker.  Workload (seeded): ``--streams`` streams of mixed lengths (``--frames`` choices), policies and budgets
(window 12, sink-window 12, future-forcing 24, unbounded), all submitted at once; those that do not fit wait in the
router's queue.  Each run measures:

  * aggregate latent frames/s (all frames of all streams / wall time from the first submit to the last block),
    streams finished;
  * pages in use per worker over time (sampled from ``stats()`` every ``--sample-s``);
  * snapshot cost: time workers spent writing snapshots (every ``--snapshot-every`` blocks of each stream) as a
    share of the time they spent computing blocks.

Targets: N workers >= 1.8x one worker's aggregate frames/s (where the machine has a core per worker plus the
driver's), snapshot every 8 blocks <= 2 % of block time.

    python benchmarks/cluster.py             # 1 and 2 workers, 16 streams (~5 min on 2 cores)
    python benchmarks/cluster.py --quick     # CI smoke (< 2 min)
    python benchmarks/cluster.py --serve --out benchmarks/results/cluster_serve.json   # the same on Ray Serve
"""

from __future__ import annotations

import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

from ff_engine.argtypes import OneLineParser, int_arg
from ff_engine.bench import RESULTS_DIR
from ff_engine.engine import SessionConfig
from ff_engine.models import DEFAULT_MODEL
from ff_engine.policies import make_policy
from ff_engine.serving import ModelSpec

RESULTS = RESULTS_DIR
MIX = [("window", 12), ("sink-window", 12), ("future-forcing", 24), ("unbounded", None)]


def workload(n, frame_choices, text_dim, seed=0):
    """``n`` streams cycling through ``MIX``; lengths drawn from ``frame_choices`` (unbounded streams take the
    shortest: an unbounded reservation grows with length and would hold most of a worker's pool)."""
    rng = random.Random(seed)
    cfgs = []
    for i in range(n):
        name, budget = MIX[i % len(MIX)]
        frames = rng.choice(frame_choices) if budget is not None else min(frame_choices)
        cfgs.append(
            SessionConfig(
                prompt=torch.zeros(1, text_dim),
                num_frames=frames,
                seed=i,
                policy=make_policy(name),
                budget_frames=budget,
                session_id=f"bench-{i}",
            )
        )
    return cfgs


def sample(cluster, t0):
    s = cluster.stats()
    return {
        "t": time.perf_counter() - t0,
        "pages_used": {w["name"]: w["pages_used"] for w in s["workers"]},
        "queued": s["queued"],
    }


def run(num_workers, cfgs, a):
    """One cluster of ``num_workers``: submit everything, sample pages until every stream ended.  ``--serve``: the
    engine replicas of a ``ServeCluster`` (Ray Serve) instead of ``RayCluster``'s actors, same router."""
    from ff_engine.serving import RayCluster, ServeCluster

    with tempfile.TemporaryDirectory(prefix="ff-bench-cluster-") as out_dir:
        make, count = (ServeCluster, "num_replicas") if a.serve else (RayCluster, "num_workers")
        cluster = make(
            ModelSpec.checkpoint(DEFAULT_MODEL),
            **{count: num_workers},
            num_pages=a.pages,
            page_size=a.page_size,
            max_batch=a.max_batch,
            snapshot_every=a.snapshot_every,
            output_dir=out_dir,
        )
        try:
            t0 = time.perf_counter()
            handles = [cluster.submit(c) for c in cfgs]
            samples = []
            while not all(h.status().terminal for h in handles):
                samples.append(sample(cluster, t0))
                time.sleep(a.sample_s)
            wall = time.perf_counter() - t0
            time.sleep(2 * a.sample_s)
            samples.append(sample(cluster, t0))  # the end state, as the workers' last reports tell it
            stats = cluster.stats()
            states = [h.status().state for h in handles]
            audits = cluster.audit()
        finally:
            cluster.shutdown()
    frames = sum(3 * h.status().blocks_done for h in handles)
    busy = sum(w["busy_s"] for w in stats["workers"])
    cpu = sum(w["busy_cpu_s"] for w in stats["workers"])
    snap = sum(w["snapshot_s"] for w in stats["workers"])
    return {
        "workers": num_workers,
        "wall_s": wall,
        "latent_frames": frames,
        "aggregate_fps": frames / wall,
        "worker_cores": cpu / wall,  # cores the workers' step threads actually got, on average
        "frames_per_worker_cpu_s": frames / cpu if cpu else 0.0,
        "streams_finished": states.count("finished"),
        "streams": len(states),
        "pages_leaked": sum(x["pages_used"] for x in audits),
        "snapshots": sum(w["snapshots"] for w in stats["workers"]),
        "block_time_s": busy,
        "snapshot_time_s": snap,
        "snapshot_share": snap / busy if busy else 0.0,
        "persist_time_s": sum(w["persist_s"] for w in stats["workers"]),
        "per_worker": [per_worker(w, wall) for w in stats["workers"]],
        "samples": samples,
    }


def per_worker(w, wall):
    """What one worker did: its blocks, mean batch, seconds per step, the share of the wall time it was computing
    (``busy_share``: the router kept it fed) and the share of that time its thread actually ran on a core
    (``cpu_share``: below 1 when the core is shared with other processes)."""
    return {
        "name": w["name"],
        "blocks": w["blocks"],
        "steps": w["steps"],
        "mean_batch": w["blocks"] / w["steps"] if w["steps"] else 0.0,
        "seconds_per_step": w["busy_s"] / w["steps"] if w["steps"] else 0.0,
        "busy_share": w["busy_s"] / wall,
        "cpu_share": w["busy_cpu_s"] / w["busy_s"] if w["busy_s"] else 0.0,
        "snapshot_s": w["snapshot_s"],
        "snapshots": w["snapshots"],
    }


def plot(out, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = out["runs"]
    fig, ax = plt.subplots(1, len(runs) + 1, figsize=(5 * (len(runs) + 1), 4))
    for i, r in enumerate(runs):
        for name in r["samples"][0]["pages_used"] if r["samples"] else []:
            ax[i].plot([s["t"] for s in r["samples"]], [s["pages_used"][name] for s in r["samples"]], label=name)
        ax[i].axhline(out["pages_per_worker"], color="gray", ls=":", label="pool")
        ax[i].set(xlabel="seconds", ylabel="pages in use", title=f"{r['workers']} worker(s): pages per worker")
        ax[i].legend()
    ax[-1].bar([f"{r['workers']} ({r['worker_cores']:.2f} cores)" for r in runs], [r["aggregate_fps"] for r in runs])
    ax[-1].set(
        xlabel="workers (cores their threads got)",
        ylabel="aggregate latent frames / s",
        title=f"speedup {out['speedup']:.2f}x; per worker CPU-second {out['cpu_efficiency']:.2f}x",
    )
    fig.suptitle(
        f"{out['streams']} mixed streams, world model, CPU workers (1 thread each), {out['machine']['cores']}-core box; "
        f"snapshots every {out['snapshot_every']} blocks: {100 * out['snapshot_share']:.2f} % of block time"
    )
    fig.tight_layout()
    fig.savefig(png, dpi=90)


def _parser() -> OneLineParser:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--serve", action="store_true", help="engine replicas on Ray Serve (ServeCluster)")
    ap.add_argument("--workers", type=int_arg(2), default=2, help="N (compared with 1)")
    ap.add_argument("--streams", type=int_arg(1), default=16)
    ap.add_argument("--frames", type=int_arg(3), nargs="+", default=[24, 48, 72, 96])
    ap.add_argument("--pages", type=int_arg(1), default=1200, help="pages per worker")
    ap.add_argument("--page-size", type=int_arg(1), default=32)
    ap.add_argument("--max-batch", type=int_arg(1), default=4)
    ap.add_argument("--snapshot-every", type=int_arg(0), default=8)
    ap.add_argument("--sample-s", type=float, default=0.1)
    ap.add_argument("--out", default=str(RESULTS / "cluster.json"))
    return ap


def _run_all(a) -> list[dict]:
    """One run with 1 worker, one with ``a.workers``, on a local Ray instance shut down after."""
    import ray

    ray.init(num_cpus=max(a.workers, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    try:
        from model_adapters import registry

        text_dim = registry.load(DEFAULT_MODEL).cfg.text_dim
        cfgs = workload(a.streams, a.frames, text_dim)
        runs = []
        for n in (1, a.workers):
            runs.append(run(n, cfgs, a))
            r = runs[-1]
            print(
                f"{n} worker(s): {r['aggregate_fps']:.1f} latent frames/s, {r['streams_finished']}/{r['streams']} "
                f"finished, snapshot {100 * r['snapshot_share']:.2f} % of block time, workers got "
                f"{r['worker_cores']:.2f} cores",
                flush=True,
            )
    finally:
        if a.serve:
            from ray import serve

            serve.shutdown()
        ray.shutdown()
    return runs


def _summary(a, runs: list[dict]) -> dict:
    return {
        "benchmark": "cluster",
        "cluster": "ServeCluster (Ray Serve)" if a.serve else "RayCluster (Ray core)",
        "quick": a.quick,
        "streams": a.streams,
        "frames": a.frames,
        "pages_per_worker": a.pages,
        "page_size": a.page_size,
        "max_batch": a.max_batch,
        "snapshot_every": a.snapshot_every,
        "model": "world-model (embedded)",
        "machine": {"cpu": platform.machine(), "cores": os.cpu_count(), "torch_threads_per_worker": 1},
        "runs": runs,
        "speedup": runs[1]["aggregate_fps"] / runs[0]["aggregate_fps"],
        # frames per CPU-second of the workers, N over 1: what distribution costs, whatever cores the box gave
        "cpu_efficiency": runs[1]["frames_per_worker_cpu_s"] / runs[0]["frames_per_worker_cpu_s"],
        "snapshot_share": max(r["snapshot_share"] for r in runs),
    }


def main(argv=None):
    a = _parser().parse_args(argv)
    if a.quick:
        a.streams, a.frames = 6, [24, 36]
    runs = _run_all(a)
    out = _summary(a, runs)
    print(
        f"speedup {out['speedup']:.2f}x with {a.workers} workers; frames per worker CPU-second "
        f"{out['cpu_efficiency']:.2f}x",
        flush=True,
    )
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    plot(out, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
