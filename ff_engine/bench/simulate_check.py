"""``ff-engine bench simulate_check``: the simulation's latencies against a real two-replica run of the same trace.

A seeded trace (Poisson arrivals; streams of 4-16 blocks; small window reservations and large unbounded ones, so
that some wait for pages) runs ``--runs`` times (3) on a real ``RayCluster`` of 2 CPU workers (the embedded world model, one
torch thread each, no snapshots) and then in ``bench simulate``'s ``Simulation`` with the same placement and
admission code.  The simulation gets the trace as the first real run submitted it (arrival times, blocks, each
stream's reservation from ``Engine.pages_that_fit``), each stream's block times run alone (``solo_block_s``, block
by block), one contention factor (the workers' busy time in that run over those solo times) and the round overhead
measured there (a call's wall time and the router's gap to the next call, minus the blocks': Ray, starts,
persisting).  Every real run warms each worker first (``warm_up``).

Compared per stream: admission order and rejections, time to first frame (submit to the first block as the
router sees it) and time to finish.  The box's own noise is the per-stream difference between every pair of
real runs of the same trace; the simulation is "within the noise" where its per-stream error against every real
run is no larger (median and p90).

    ff-engine bench simulate_check [--streams 16] [--rate 1.0] [--seed 0]
"""

from __future__ import annotations

import dataclasses
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
            before = warm_up(cluster, trace)
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
                    rows[cfg.session_id]["submit_s"] = time.perf_counter() - t0 - rows[cfg.session_id]["submitted"]
                now = time.perf_counter() - t0
                for sid, h in handles.items():
                    st, row = h.status(), rows[sid]
                    seen = row.setdefault("block_at", [])
                    seen += [round(now - row["submitted"], 3)] * (st.blocks_done - len(seen))
                    if st.blocks_done >= 1 and "ttff_s" not in row:
                        row["ttff_s"], row["worker"] = now - row["submitted"], st.worker
                    if st.terminal and "finish_s" not in row:
                        row["finish_s"], row["state"] = now - row["submitted"], st.state
                if not pending and all("finish_s" in rows[sid] for sid in handles):
                    break
                time.sleep(0.01)
            after = worker_totals(cluster)
            order = [sid for sid in cluster.router.admission_log if sid in rows]
        finally:
            cluster.shutdown()
    t = {k: after[k] - before[k] for k in after}  # the trace's share (the warm-up streams' taken off)
    return {"streams": list(rows.values()), "admission_order": order, "block_s": t["busy_s"] / t["blocks"],
            "busy_s": t["busy_s"], "steps": t["steps"], "mean_batch": t["blocks"] / max(1, t["steps"]),
            "round_overhead_s": (t["call_s"] + t["gap_s"] - t["busy_s"]) / max(1, t["steps"]),
            "rejections": [r["id"] for r in rows.values() if r.get("rejected")]}


def worker_totals(cluster) -> dict:
    keys = ("busy_s", "call_s", "gap_s", "blocks", "steps")
    return {k: sum(w[k] for w in cluster.stats()["workers"]) for k in keys}


def warm_up(cluster, trace) -> dict:
    """One short stream on each worker before the trace (a serving replica is warm; the simulation has no
    process warm-up: a cold worker's first block cost ~0.2 s more in session 17's runs); the totals after it."""
    cfg = trace[0][1]
    n = len(cluster.stats()["workers"])
    handles = [cluster.submit(dataclasses.replace(cfg, session_id=f"warm{i}", num_frames=6)) for i in range(n)]
    for h in handles:
        for _ in h.blocks(timeout=120):
            pass
    return worker_totals(cluster)


def solo_block_s(engine, cfg) -> list[float]:
    """Seconds of each block of ``cfg`` run alone on ``engine``: an unbounded cache's blocks cost more as it grows
    (its first block is the cheapest: a mean would overstate its time to first frame), a window's do not; the
    simulation weighs each stream's block ``i`` by this."""
    session = engine.add_session(cfg)
    times = []
    while session.id in engine.sessions:
        t0 = time.perf_counter()
        (result,) = engine.step([session.id])
        times.append(time.perf_counter() - t0)
        if result.error:
            raise RuntimeError(result.error)
    return times


def shared_round_s(engine, cfgs, blocks: int = 8) -> float:
    """Seconds of a round that a batch of two shares (per-layer dispatch, the step's own work): two window
    streams' median block times alone minus their median round together.  The simulation charges it once per
    round and takes it off each block's solo time."""

    def median_round(group):
        ids = [engine.add_session(dataclasses.replace(c, session_id=f"{c.session_id}-{len(group)}",
                                                      num_frames=3 * (blocks + 1))).id for c in group]
        times = []
        for _ in range(blocks):
            t0 = time.perf_counter()
            engine.step(ids)
            times.append(time.perf_counter() - t0)
        for sid in ids:
            engine.cancel(sid)
        return statistics.median(times[2:])  # the first blocks fill the window

    return median_round(cfgs[:1]) + median_round(cfgs[1:2]) - median_round(cfgs[:2])


def simulated(real: dict, pages: dict[str, int], solo: dict[str, list], a, shared_s: float = 0.0) -> dict:
    """The ``Simulation`` of the same trace (arrivals as ``real`` submitted them): block j of stream i costs
    ``k * (solo[i][j] - shared_s)``, a round ``k * shared_s`` plus ``real``'s measured call overhead on top, with the
    one factor ``k`` that makes the trace's total compute equal ``real``'s workers' busy time (what running beside
    another worker and the driver on shared cores adds)."""
    from ff_engine.bench.simulate import Simulation, parser

    sim_args = parser().parse_args(["--replicas", "2", "--pages", str(a.pages), "--max-queue", str(a.max_queue),
                                    "--max-batch", str(a.max_batch), "--profile", "cpu-world"])
    rows = real["streams"]
    admitted = [r for r in rows if not r.get("rejected")]
    # a round: its blocks (solo times less the shared part), the shared part once, the call around them (Ray
    # call, starts, persisting, the router's loop) -- all scaled by one contention factor k fitted to busy time
    net = {sid: [max(0.0, t - shared_s) for t in ts] for sid, ts in solo.items()}
    rounds = real["steps"]
    k = real["busy_s"] / (sum(sum(net[r["id"]]) for r in admitted) + shared_s * rounds)
    profile = {"block_s": k, "batch_cost": (shared_s + real["round_overhead_s"] / k, 1.0),
               "source": "measured in this run"}
    sim = Simulation(sim_args, "most-free", park=False, profile=profile,
                     trace=[(r["submitted"], r["blocks"], pages[r["id"]], net[r["id"]]) for r in rows])
    out = sim.run()
    streams = []
    for i, r in enumerate(rows):
        s = sim.streams[i]
        streams.append({"id": r["id"], "replica": s.replica, "block_at": [round(t - s.arrival, 3) for t in s.block_at],
                        "ttff_s": None if s.first_block_at is None else s.first_block_at - s.arrival,
                        "finish_s": None if s.finished_at is None else s.finished_at - s.arrival})
    return {"streams": streams, "admission_order": [rows[i]["id"] for i in out["admission_order"]],
            "rejections": [rows[i]["id"] for i in out["rejections"]], "contention_factor": k,
            "round_overhead_s": real["round_overhead_s"], "shared_round_s": shared_s}


def errors(x: dict, y: dict, key: str) -> list[float]:
    """|x - y| of ``key`` per stream both measured."""
    ys = {s["id"]: s.get(key) for s in y["streams"]}
    return [abs(s[key] - ys[s["id"]]) for s in x["streams"] if s.get(key) is not None and ys.get(s["id"]) is not None]


def placements(run: dict) -> list[int]:
    """Each stream's worker, numbered by first use (the real workers' and simulated replicas' names differ)."""
    names: dict = {}
    return [names.setdefault(s.get("worker", s.get("replica")), len(names)) for s in run["streams"]]


def summary(reals: list[dict], sim: dict) -> dict:
    """Noise: per-stream |difference| over every pair of real runs; error: the simulation against every real run
    (it was fitted on the first one's busy time and overhead only).  Within the noise: median and p90 of the error
    no larger than the noise's."""

    def stats(xs):
        xs = sorted(xs)
        return {"median": statistics.median(xs), "p90": xs[min(len(xs) - 1, int(0.9 * len(xs)))], "n": len(xs)}

    pairs = [(x, y) for i, x in enumerate(reals) for y in reals[i + 1:]]
    out = {}
    for key in ("ttff_s", "finish_s"):
        noise = stats([e for x, y in pairs for e in errors(x, y, key)])
        err = stats([e for x in reals for e in errors(x, sim, key)])
        out[key] = {"noise_real_vs_real": noise, "error_sim_vs_real": err,
                    "within_noise": err["median"] <= noise["median"] and err["p90"] <= noise["p90"]}
    for name, fn in (("admission_order", lambda r: r["admission_order"]), ("placement", placements),
                     ("rejections", lambda r: r["rejections"])):
        out[f"same_{name}"] = {"real_vs_real": all(fn(x) == fn(reals[0]) for x in reals),
                               "sim_vs_real": all(fn(sim) == fn(x) for x in reals)}
    return out


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.6))
    reals, sim = result["real"], result["simulated"]
    others = [(r, f"real run {i + 2}", "o") for i, r in enumerate(reals[1:])] + [(sim, "simulation", "x")]
    for ax, key, title in zip(axes, ("ttff_s", "finish_s"), ("time to first frame (s)", "time to finish (s)")):
        base = {s["id"]: s.get(key) for s in reals[0]["streams"]}
        for other, label, marker in others:
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
    ap.add_argument("--runs", type=int_arg(2), default=3, help="real runs of the trace (their spread is the noise)")
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
    solo_block_s(probe, dataclasses.replace(trace[0][1], session_id="warm"))  # the process's first blocks cost more
    solo = {cfg.session_id: solo_block_s(probe, cfg) for _, cfg in trace}
    shared = shared_round_s(probe, [cfg for _, cfg in trace if cfg.budget_frames is not None])
    ray.init(num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    try:
        reals = [real_run(DEFAULT_MODEL, trace, a) for _ in range(a.runs)]
    finally:
        ray.shutdown()
    sim = simulated(reals[0], pages, solo, a, shared)
    result = {"benchmark": "simulate_check", "args": {k: v for k, v in vars(a).items() if k != "out"},
              "machine": {"cores": os.cpu_count()}, "pages": pages, "solo_block_s": solo, "real": reals,
              "simulated": sim, "summary": summary(reals, sim)}
    Path(a.out).write_text(json.dumps(result, indent=1))
    plot(result, Path(a.out).with_suffix(".png"))
    for key, s in result["summary"].items():
        print(f"{key}: {s}")
    return result


if __name__ == "__main__":
    main()
