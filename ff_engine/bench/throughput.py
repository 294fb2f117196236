"""Throughput of many concurrent streams, bounded caches against unbounded ones, side by side in one run.

Model: causal Wan with Wan-1.3B's head geometry (12 heads x 128, dim 1536) scaled to fit a CPU: ``--layers``
layers (default 1), ffn 2048, a 16 x 24 latent grid (96 tokens per latent frame), random weights (throughput
does not depend on them).  Attention backend: the CPU default (vLLM's CPU op).  Four experiments:

  A. latency vs length: one stream per policy to ``--frames`` latent frames (240 = 60 s at 16 fps); per-block
     latency against block index and KV bytes held against length.  Target: bounded block 80 / block 8 <= 1.1.
  B. batching: ``--batch-streams`` bounded streams batched into one forward vs run one after another.
     Target: >= 2x aggregate throughput.
  C. equal memory: a pool sized for 2 unbounded full-length streams; as many bounded streams as fit in the same
     pool run concurrently to the same length.  Target: bounded aggregate throughput >= 3x unbounded.
  D. sweep: streams (default 1, 2, 4, 8, 16) x policy at ``--sweep-frames``: aggregate and per-stream frames/s, p50/p99
     block latency, peak KV bytes, page utilisation.  Target: utilisation >= 95 %.

    python benchmarks/throughput.py            # ~10 min on 2 cores
    python benchmarks/throughput.py --quick    # < 3 min, CI smoke
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ff_engine.argtypes import OneLineParser, int_arg
from ff_engine.bench import RESULTS_DIR
from ff_engine.engine import Engine, SessionConfig
from ff_engine.engine.engine import reservation_pages
from ff_engine.engine.scheduler import Scheduler
from ff_engine.policies import make_policy
from model_adapters import registry

RESULTS = RESULTS_DIR
PAGE = 32


def policies(budget):
    return {
        "unbounded": (make_policy("unbounded"), None),
        f"window-{budget}": (make_policy("window"), budget),
        f"future-forcing-{budget}": (make_policy("future-forcing"), budget),
    }


def cfg_for(model, frames, policy, budget, seed):
    return SessionConfig(prompt=torch.randn(16, model.cfg.text_dim, generator=torch.Generator().manual_seed(seed)),
                         num_frames=frames, seed=seed, policy=policy, budget_frames=budget)


def run_streams(model, cfgs, num_pages, max_batch, track=False):
    """Run streams under one scheduler. Returns wall time, per-block latencies, peak bytes, utilisations."""
    engine = Engine(model, num_pages=num_pages, page_size=PAGE)
    sched = Scheduler(engine, max_batch=max_batch)
    for c in cfgs:
        sched.submit(c)
    lat, held, util, peak = [], [], [], 0
    t0 = time.perf_counter()
    while not sched.idle:
        ts = time.perf_counter()
        results = sched.step()
        dt = time.perf_counter() - ts
        lat.append(dt)
        used = engine.cache.pool.capacity - engine.cache.pool.num_free
        peak = max(peak, used)
        held.append(used * engine.cache.bytes_per_page())
        if engine.sessions:
            util.append(engine.cache.utilisation())
        del results
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "step_latency_s": lat, "held_bytes": held, "peak_kv_bytes": peak * engine.cache.bytes_per_page(),
            "utilisation_mean": statistics.mean(util) if util else 1.0, "utilisation_min": min(util) if util else 1.0,
            "bytes_per_page": engine.cache.bytes_per_page()}


def video_fps(model, latent_frames_total, wall):
    return model.geometry.vae_stride[0] * latent_frames_total / wall


def _parser() -> OneLineParser:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--layers", type=int_arg(1), default=1)
    ap.add_argument("--frames", type=int_arg(1), default=240)
    ap.add_argument("--budget-frames", type=int_arg(1), default=21)
    ap.add_argument("--batch-streams", type=int_arg(1), default=8)
    ap.add_argument("--sweep-frames", type=int_arg(1), default=24)
    ap.add_argument("--streams", type=int_arg(1), nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--max-streams", type=int_arg(1), default=16, help="cap on concurrent bounded streams in C")
    ap.add_argument("--only", nargs="+", choices=list("ABCD"), default=list("ABCD"),
                    help="run only these experiments; the others are kept from an existing --out file")
    ap.add_argument("--out", default=str(RESULTS / "throughput.json"))
    return ap


def main(argv=None):
    a = _parser().parse_args(argv)
    if a.quick:
        a.frames, a.sweep_frames, a.streams, a.batch_streams, a.max_streams = 30, 12, [1, 4], 4, 4
    torch.manual_seed(0)
    cfg = registry.get_preset("wan-cpu-small").with_(num_layers=a.layers, text_len=16)
    model = registry.build(cfg)
    g = model.geometry
    out = {"benchmark": "throughput", "quick": a.quick,
           "model": {"preset": "wan-cpu-small", "layers": a.layers, "heads": cfg.num_heads, "head_dim": cfg.head_dim,
                     "dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "latent_hw": list(cfg.latent_hw),
                     "tokens_per_frame": g.tokens_per_frame, "frames_per_block": g.frames_per_block},
           "page_size": PAGE, "machine": {"cpu": platform.machine(), "threads": torch.get_num_threads()}}
    pol = policies(a.budget_frames)
    path = Path(a.out)
    if set(a.only) != set("ABCD") and path.is_file():
        kept = json.loads(path.read_text())
        out = {**kept, **{k: v for k, v in out.items() if k not in ("quick",)}}
    wname = f"window-{a.budget_frames}"
    if "A" in a.only:
        latency_vs_length(a, model, pol, out)
    if "B" in a.only:
        batching(a, model, pol, out, wname)
    if "C" in a.only:
        equal_memory(a, model, pol, out, wname)
    if "D" in a.only:
        sweep(a, model, pol, out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    plot(out, path.with_suffix(".png"))
    print(f"wrote {path}")


def latency_vs_length(a, model, pol, out):
    """A. latency vs length, one stream per policy."""
    g = model.geometry
    out["latency_vs_length"] = {}
    for name, (p, b) in pol.items():
        c = cfg_for(model, a.frames, p, b, 0)
        r = run_streams(model, [c], reservation_pages(g, PAGE, c), 1)
        lat = r["step_latency_s"]
        i8, i80 = min(7, len(lat) - 1), min(79, len(lat) - 1)  # blocks 8 and 80 (3-block means around them)
        out["latency_vs_length"][name] = {"block_latency_s": lat, "held_bytes": r["held_bytes"],
                                          "ratio_block80_block8": statistics.mean(lat[i80 - 2:i80 + 1]) / statistics.mean(lat[i8 - 2:i8 + 1]),
                                          "fps": video_fps(model, a.frames, r["wall_s"])}
        print(name, "latency ratio", round(out["latency_vs_length"][name]["ratio_block80_block8"], 3), flush=True)


def batching(a, model, pol, out, wname):
    """B. batching vs one after another."""
    g = model.geometry
    p, b = pol[wname]
    cfgs = [cfg_for(model, a.sweep_frames, p, b, i) for i in range(a.batch_streams)]
    pages = sum(reservation_pages(g, PAGE, c) for c in cfgs)
    batched = run_streams(model, cfgs, pages, a.batch_streams)
    seq_wall = sum(run_streams(model, [c], reservation_pages(g, PAGE, c), 1)["wall_s"] for c in cfgs)
    total = a.sweep_frames * a.batch_streams
    out["batching"] = {"streams": a.batch_streams, "frames": a.sweep_frames, "policy": wname,
                       "batched_fps": video_fps(model, total, batched["wall_s"]),
                       "sequential_fps": video_fps(model, total, seq_wall)}
    out["batching"]["speedup"] = out["batching"]["batched_fps"] / out["batching"]["sequential_fps"]
    print("batching speedup", round(out["batching"]["speedup"], 3), flush=True)


def equal_memory(a, model, pol, out, wname):
    """C. equal memory: a pool sized for 2 unbounded full-length streams."""
    g = model.geometry
    pu, _ = pol["unbounded"]
    ucfg = [cfg_for(model, a.frames, pu, None, i) for i in range(2)]
    pool_pages = sum(reservation_pages(g, PAGE, c) for c in ucfg)
    un = run_streams(model, ucfg, pool_pages, 16)
    out["equal_memory"] = {"pool_pages": pool_pages, "pool_bytes": pool_pages * un["bytes_per_page"], "frames": a.frames,
                           "unbounded": {"streams": 2, "fps": video_fps(model, 2 * a.frames, un["wall_s"])}}
    for name in (wname,):
        p, b = pol[name]
        per = reservation_pages(g, PAGE, cfg_for(model, a.frames, p, b, 0))
        out["equal_memory"][name + "_fit"] = pool_pages // per
        n = min(a.max_streams, pool_pages // per)
        r = run_streams(model, [cfg_for(model, a.frames, p, b, i) for i in range(n)], pool_pages, 16)
        out["equal_memory"][name] = {"streams": n, "fps": video_fps(model, n * a.frames, r["wall_s"])}
        out["equal_memory"][name]["vs_unbounded"] = out["equal_memory"][name]["fps"] / out["equal_memory"]["unbounded"]["fps"]
        print(name, "equal-memory throughput vs unbounded", round(out["equal_memory"][name]["vs_unbounded"], 3), flush=True)



def sweep(a, model, pol, out):
    """D. streams x policy."""
    g = model.geometry
    out["sweep"] = []
    for name, (p, b) in pol.items():
        for n in a.streams:
            cfgs = [cfg_for(model, a.sweep_frames, p, b, i) for i in range(n)]
            r = run_streams(model, cfgs, sum(reservation_pages(g, PAGE, c) for c in cfgs), 16)
            lat = sorted(r["step_latency_s"])
            agg = video_fps(model, n * a.sweep_frames, r["wall_s"])
            row = {"policy": name, "streams": n, "frames": a.sweep_frames, "aggregate_fps": agg, "per_stream_fps": agg / n,
                   "p50_step_s": lat[len(lat) // 2], "p99_step_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
                   "peak_kv_bytes": r["peak_kv_bytes"], "utilisation_mean": r["utilisation_mean"],
                   "utilisation_min": r["utilisation_min"]}
            out["sweep"].append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)


def plot(out, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for name, r in out["latency_vs_length"].items():
        ax[0].plot(r["block_latency_s"], label=name)
        ax[1].plot([b / 2**20 for b in r["held_bytes"]], label=name)
    ax[0].set(xlabel="block index", ylabel="seconds per block", title="per-block latency vs length")
    ax[1].set(xlabel="block index", ylabel="KV MiB held", title="KV memory vs length")
    for name in {r["policy"] for r in out["sweep"]}:
        rows = [r for r in out["sweep"] if r["policy"] == name]
        ax[2].plot([r["streams"] for r in rows], [r["aggregate_fps"] for r in rows], marker="o", label=name)
    ax[2].set(xlabel="concurrent streams", ylabel="aggregate video frames / s", title="throughput vs streams")
    for x in ax:
        x.legend()
    m = out["model"]
    fig.suptitle(f"causal Wan {m['layers']} layer(s), {m['heads']}x{m['head_dim']} heads, {m['tokens_per_frame']} tok/frame, CPU")
    fig.tight_layout()
    fig.savefig(png, dpi=90)


if __name__ == "__main__":
    main()
