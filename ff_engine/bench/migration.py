"""Live migration's cost: a running stream moved between two workers between two blocks (``Router.migrate``).

Two in-process workers (``LocalEndpoint``: no network, so what is measured is the snapshot, the host copy and the
restore, not a transport) serve the embedded world model; streams of each policy and budget run, and each is
migrated back and forth every few blocks.  Per move: seconds from the request to the restore on the target (it
includes waiting for the source's block in flight to end), snapshot bytes; per stream: its blocks equal its
unmoved run (``torch.equal``: the move is bit-identical) and none is lost or repeated.  One JSON in
``benchmarks/results/migration.json``.

    ff-engine bench migration [--frames 96] [--moves 4]
"""

from __future__ import annotations

import json
import platform
import statistics
import time

import torch

from ff_engine.argtypes import OneLineParser, int_arg
from ff_engine.bench import RESULTS_DIR
from ff_engine.engine import SessionConfig
from ff_engine.models import DEFAULT_MODEL
from ff_engine.policies import make_policy
from ff_engine.serving import ModelSpec
from ff_engine.serving.local import LocalEndpoint
from ff_engine.serving.model_spec import materialize
from ff_engine.serving.router import Router
from ff_engine.serving.worker import EngineWorker

CASES = [("window", 12), ("future-forcing", 24), ("future-forcing", 48)]


def configs(model, frames: int) -> list[SessionConfig]:
    text_dim = model.cfg.text_dim
    return [SessionConfig(prompt=torch.zeros(1, text_dim), num_frames=frames, seed=i, policy=make_policy(name),
                          budget_frames=budget, session_id=f"mig-{i}") for i, (name, budget) in enumerate(CASES)]


def router(model, pages: int) -> Router:
    eps = [LocalEndpoint(EngineWorker(n, model, num_pages=pages, backend="auto", max_batch=1)) for n in ("a", "b")]
    return Router(eps, heartbeat_s=0.05)


def run(model, cfgs, moves: int, pages: int):
    r = router(model, pages)
    try:
        handles = [r.submit(c) for c in cfgs]
        blocks = cfgs[0].num_frames // model.geometry.frames_per_block
        every = max(1, blocks // (moves + 1))
        done, out = {h.id: 0 for h in handles}, []
        while any(h.status().state in ("queued", "running") for h in handles) and moves and len(out) < moves * len(cfgs):
            for h in handles:
                st = h.status()
                if st.state == "running" and st.blocks_done >= every * (done[h.id] + 1) and done[h.id] < moves:
                    move = r.migrate(h.id).result(timeout=600)
                    out.append({**move, "policy": h.id})
                    done[h.id] += 1
            time.sleep(0.01)
        lat = {h.id: [b for b in h.blocks(timeout=600)] for h in handles}
        ws = r.stats()["workers"]
        block_s = sum(w["busy_s"] for w in ws) / max(1, sum(w["steps"] for w in ws))
        return out, block_s, {k: ([b.block for b in v], torch.cat([b.latents for b in v])) for k, v in lat.items()}
    finally:
        r.shutdown()
        for w in r.workers:
            w.endpoint.kill()


def main(argv=None):
    ap = OneLineParser(prog="ff-engine bench migration", description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int_arg(6), default=96)
    ap.add_argument("--moves", type=int_arg(1), default=4, help="moves per stream")
    ap.add_argument("--pages", type=int_arg(16), default=2400, help="pages per worker")
    ap.add_argument("--out", default=str(RESULTS_DIR / "migration.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = materialize(ModelSpec.checkpoint(DEFAULT_MODEL))
    cfgs = configs(model, a.frames)
    _, _, reference = run(model, cfgs, 0, a.pages)
    moves, block_s, moved = run(model, cfgs, a.moves, a.pages)
    by = {}
    for m in moves:
        by.setdefault(m["stream"], []).append(m)
    streams = []
    for c, (name, budget) in zip(cfgs, CASES):
        ms = by.get(c.session_id, [])
        order, lat = moved[c.session_id]
        streams.append({
            "stream": c.session_id, "policy": name, "budget_frames": budget, "moves": len(ms),
            "seconds_median": statistics.median(m["seconds"] for m in ms) if ms else None,
            "seconds_max": max((m["seconds"] for m in ms), default=None),
            "bytes_median": statistics.median(m["bytes"] for m in ms) if ms else None,
            "every_block_once": order == list(range(len(order))),
            "bit_identical": bool(torch.equal(lat, reference[c.session_id][1])),
        })
    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread, CPU",
              "model": DEFAULT_MODEL, "frames": a.frames, "block_s_mean": block_s,
              "note": "seconds run from the request to the restore: they include waiting for the source's step in "
                      "flight and the target's (up to two block times, block_s_mean)", "streams": streams, "moves": moves}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    for s in streams:
        print(f"{s['policy']:>15} budget {s['budget_frames']:>3}: {s['moves']} moves, median "
              f"{1000 * (s['seconds_median'] or 0):.0f} ms (max {1000 * (s['seconds_max'] or 0):.0f}), "
              f"{(s['bytes_median'] or 0) / 1e6:.2f} MB, bit-identical {s['bit_identical']}, "
              f"every block once {s['every_block_once']}")
    print(f"mean block (one stream's step) {1000 * block_s:.0f} ms; a move waits for up to two of them")
    print(f"wrote {a.out}")
    return result


if __name__ == "__main__":
    main()
