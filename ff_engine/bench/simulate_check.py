"""``ff-engine bench simulate_check``: the simulation's latencies against a real two-replica run of the same trace.

A seeded trace (Poisson arrivals; streams of 4-16 blocks; small window reservations and large unbounded ones, so
that some wait for pages) runs twice on a real ``RayCluster`` of 2 CPU workers (the embedded world model, one
torch thread each, no snapshots) and then in ``bench simulate``'s ``Simulation`` with the same placement and
admission code.  The simulation gets the trace as the first real run submitted it (arrival times, blocks, each
stream's reservation from ``Engine.pages_that_fit``) and a block time measured in that run (the workers' busy time
over the stream-blocks they computed; a round costs the sum of its streams' block costs, each stream weighed by
its block time run alone, ``solo_block_s``).

Compared per stream: admission order and rejections, time to first frame (submit to the first block as the
router sees it) and time to finish.  The box's own noise is the difference between the two real runs on the
same trace; the simulation is "within the noise" where its per-stream error against the first run is no larger.

    ff-engine bench simulate_check [--streams 16] [--rate 1.0] [--seed 0]
"""

from __future__ import annotations

import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from ff_engine.argtypes import OneLineParser, int_arg
from ff_engine.bench import RESULTS_DIR


def trace_configs(a, model):
    """(arrival offsets, SessionConfigs): Poisson arrivals at ``a.rate``; every third stream unbounded."""
    from ff_engine.engine import SessionConfig
    from ff_engine.models import load_prompt
    from ff_engine.policies import Unbounded, Window

    rng, t, out = random.Random(a.seed), 0.0, []
    for i in range(a.streams):
        t += rng.expovariate(a.rate)
        blocks = rng.randint(4, 16)
        big = i % 3 == 0
        prompt = load_prompt(model, seed=i)  # the model's default prompt (zeros when unconditional)
        out.append((t, SessionConfig(prompt=prompt, num_frames=3 * blocks, seed=i, policy=Unbounded() if big else
                                     Window(), budget_frames=None if big else 6, session_id=f"s{i}")))
    return out


def real_run(model_path: str, trace, a) -> dict:
    """Submit each stream at its offset to a fresh 2-worker ``RayCluster``; poll every 10 ms for first blocks."""
    from ff_engine.errors import Overloaded
    from ff_engine.serving import ModelSpec, RayCluster

    with tempfile.TemporaryDirectory(prefix="ff-simcheck-") as out_dir:
        cluster = RayCluster(ModelSpec.checkpoint(model_path), num_workers=2, num_pages=a.pages, page_size=a.page_size,
                             max_batch=a.max_batch, snapshot_every=0, max_queue=a.max_queue, output_dir=out_dir)
        try:
            rows, handles, pending = {}, {}, list(trace)
            t0 = time.perf_counter()
            while True:
                now = time.perf_counter() - t0
                while pending and pending[0][0] <= now:
                    _, cfg = pending.pop(0)
                    rows[cfg.session_id] = {"id": cfg.session_id, "submitted": time.perf_counter() - t0,
                                            "blocks": cfg.num_frames // 3}
                    try:
                        handles[cfg.session_id] = cluster.submit(cfg)
                    except Overloaded:
                        rows[cfg.session_id]["rejected"] = True
                now = time.perf_counter() - t0
                for sid, h in handles.items():
                    st, row = h.status(), rows[sid]
                    if st.blocks_done >= 1 and "ttff_s" not in row:
                        row["ttff_s"] = now - row["submitted"]
                    if st.terminal and "finish_s" not in row:
                        row["finish_s"], row["state"] = now - row["submitted"], st.state
                if not pending and all("finish_s" in rows[sid] for sid in handles):
                    break
                time.sleep(0.01)
            stats = cluster.stats()
            order = list(cluster.router.admission_log)
        finally:
            cluster.shutdown()
    busy = sum(w["busy_s"] for w in stats["workers"])
    blocks = sum(w["blocks"] for w in stats["workers"])
    return {"streams": list(rows.values()), "admission_order": order, "block_s": busy / blocks, "busy_s": busy,
            "mean_batch": blocks / max(1, sum(w["steps"] for w in stats["workers"])),
            "rejections": [r["id"] for r in rows.values() if r.get("rejected")]}


def solo_block_s(engine, cfg) -> float:
    """Mean seconds per block of ``cfg`` run alone on ``engine`` (an unbounded cache's blocks cost more as it
    grows, a window's do not: the simulation weighs each stream's blocks by this)."""
    t0 = time.perf_counter()
    engine.generate(cfg)
    return (time.perf_counter() - t0) / (cfg.num_frames // 3)


def simulated(real: dict, pages: dict[str, int], solo: dict[str, float], a) -> dict:
    """The ``Simulation`` of the same trace (arrivals as ``real`` submitted them): stream i's block costs
    ``k * solo[i]``, with the one factor ``k`` that makes the trace's total compute equal ``real``'s workers' busy
    time (what running beside another worker and the driver on shared cores adds)."""
    from ff_engine.bench.simulate import Simulation, parser

    sim_args = parser().parse_args(["--replicas", "2", "--pages", str(a.pages), "--max-queue", str(a.max_queue),
                                    "--max-batch", str(a.max_batch), "--profile", "cpu-world"])
    rows = real["streams"]
    admitted = [r for r in rows if not r.get("rejected")]
    k = real["busy_s"] / sum(solo[r["id"]] * r["blocks"] for r in admitted)
    profile = {"block_s": k, "batch_cost": (0.0, 1.0), "source": "measured in this run"}
    sim = Simulation(sim_args, "most-free", park=False, profile=profile,
                     trace=[(r["submitted"], r["blocks"], pages[r["id"]], solo[r["id"]]) for r in rows])
    out = sim.run()
    streams = []
    for i, r in enumerate(rows):
        s = sim.streams[i]
        streams.append({"id": r["id"], "ttff_s": None if s.first_block_at is None else s.first_block_at - s.arrival,
                        "finish_s": None if s.finished_at is None else s.finished_at - s.arrival})
    return {"streams": streams, "admission_order": [rows[i]["id"] for i in out["admission_order"]],
            "rejections": [rows[i]["id"] for i in out["rejections"]], "contention_factor": k}


def errors(x: dict, y: dict, key: str) -> list[float]:
    """|x - y| of ``key`` per stream both measured."""
    ys = {s["id"]: s.get(key) for s in y["streams"]}
    return [abs(s[key] - ys[s["id"]]) for s in x["streams"] if s.get(key) is not None and ys.get(s["id"]) is not None]


def summary(real1: dict, real2: dict, sim: dict) -> dict:
    def stats(xs):
        xs = sorted(xs)
        return {"median": statistics.median(xs), "p90": xs[min(len(xs) - 1, int(0.9 * len(xs)))], "n": len(xs)}

    out = {}
    for key in ("ttff_s", "finish_s"):
        noise, err = stats(errors(real1, real2, key)), stats(errors(real1, sim, key))
        out[key] = {"noise_real_vs_real": noise, "error_sim_vs_real": err,
                    "within_noise": err["median"] <= noise["median"] and err["p90"] <= noise["p90"]}
    out["same_admission_order"] = {"real_vs_real": real1["admission_order"] == real2["admission_order"],
                                   "sim_vs_real": sim["admission_order"] == real1["admission_order"]}
    out["same_rejections"] = {"real_vs_real": real1["rejections"] == real2["rejections"],
                              "sim_vs_real": sim["rejections"] == real1["rejections"]}
    return out


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.6))
    r1, r2, sim = (result[k] for k in ("real_1", "real_2", "simulated"))
    for ax, key, title in zip(axes, ("ttff_s", "finish_s"), ("time to first frame (s)", "time to finish (s)")):
        base = {s["id"]: s.get(key) for s in r1["streams"]}
        for other, label, marker in ((r2, "real run 2", "o"), (sim, "simulation", "x")):
            pts = [(base[s["id"]], s[key]) for s in other["streams"] if s.get(key) is not None and base.get(s["id"])]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=label, marker=marker, s=18)
        hi = max([v for v in base.values() if v] + [1.0])
        ax.plot([0, hi], [0, hi], lw=0.8, color="grey")
        ax.set(title=title, xlabel="real run 1", ylabel="real run 2 / simulation")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def parser() -> OneLineParser:
    ap = OneLineParser(prog="ff-engine bench simulate_check", description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int_arg(2), default=16)
    ap.add_argument("--rate", type=float, default=1.0, help="arrivals per second (enough that streams queue)")
    ap.add_argument("--pages", type=int_arg(1), default=800, help="pages per worker")
    ap.add_argument("--page-size", type=int_arg(1), default=32)
    ap.add_argument("--max-batch", type=int_arg(1), default=2)
    ap.add_argument("--max-queue", type=int_arg(0), default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS_DIR / "simulate_check.json"))
    return ap


def main(argv=None):
    import ray
    import torch

    from ff_engine.engine import Engine
    from ff_engine.models import DEFAULT_MODEL
    from model_adapters import registry

    a = parser().parse_args(argv)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    model = registry.load(DEFAULT_MODEL)
    trace = trace_configs(a, model)
    probe = Engine(model, num_pages=a.pages, page_size=a.page_size, backend="torch")
    pages = {cfg.session_id: probe.pages_that_fit(cfg) for _, cfg in trace}
    torch.set_num_threads(1)
    solo = {cfg.session_id: solo_block_s(probe, cfg) for _, cfg in trace}
    ray.init(num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    try:
        real1 = real_run(DEFAULT_MODEL, trace, a)
        real2 = real_run(DEFAULT_MODEL, trace, a)
    finally:
        ray.shutdown()
    sim = simulated(real1, pages, solo, a)
    result = {"benchmark": "simulate_check", "args": {k: v for k, v in vars(a).items() if k != "out"},
              "machine": {"cores": os.cpu_count()}, "pages": pages, "solo_block_s": solo, "real_1": real1, "real_2": real2,
              "simulated": sim, "summary": summary(real1, real2, sim)}
    Path(a.out).write_text(json.dumps(result, indent=1))
    plot(result, Path(a.out).with_suffix(".png"))
    for key, s in result["summary"].items():
        print(f"{key}: {s}")
    return result


if __name__ == "__main__":
    main()
