"""Policy overhead (statistics + scoring + merge + compaction) as a share of block time, in the engine.

A one-layer causal-Wan model with Wan's head geometry (12 heads x 128, dim 1536) and Wan's 480x832 latent grid
(1560 tokens per latent frame); budget 21 frames; page size 32; the default CPU attention backend.  For each
policy: the cache is filled with 21 frames by real clean passes of the model (which also feed the policy's
query statistics), then one whole block is generated (4 denoising passes + the cache-writing pass + the
policy's compression) and the time inside the policy (``observe`` + ``compress``) is divided by the block time.
Overhead is per layer on both sides, so one layer measures the same ratio as thirty.

    python benchmarks/policy_overhead.py           # Wan shapes (~6 min on 2 cores)
    python benchmarks/policy_overhead.py --quick   # 1/10 of the grid, for CI smoke
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from ff_engine.argtypes import OneLineParser, int_arg
from ff_engine.bench import RESULTS_DIR
from ff_engine.engine import Engine, SessionConfig
from ff_engine.policies import make_policy
from model_adapters import registry

RESULTS = RESULTS_DIR
SPECS = [
    ("window", {}),
    ("expected-attention", {}),
    ("future-forcing", {}),
    ("future-forcing", {"fused_scoring": True}),
    ("future-forcing", {"page_candidates": True}),
    ("future-forcing", {"page_candidates": True, "page_rank": "bound"}),
    ("future-forcing", {"merge": "affine"}),
    ("future-forcing", {"form": "exact", "samples": 8}),
]


#: where the policy's time goes (nested in ``compress``; reported each on its own, so they do not add up to it):
#: ``observe`` on the policy, each other phase on the innermost stage of its composition that has it
PHASES = ("observe", "projected", "candidates", "head_logits", "fused_importance", "merge")
CACHE_PHASES = ("update", "compact")


class Timed:
    """Wraps a session's policy methods and sums the seconds spent in them (``seconds``: observe + compress, wall;
    ``cpu_seconds``: the process's CPU time, which other processes on a shared machine inflate far less);
    ``phases`` sums the wall seconds of each of ``PHASES`` the policy has and of the cache's ``CACHE_PHASES``."""

    def __init__(self, policy, cache, names=("observe", "compress")):
        self.seconds = self.cpu_seconds = 0.0
        self.phases: dict[str, float] = {}
        for n in names:
            setattr(policy, n, self._wrap(getattr(policy, n), None))
        stages = policy.chain() if hasattr(policy, "chain") else [policy]
        owners = [(n, policy if n == "observe" else next((s for s in reversed(stages) if hasattr(s, n)), None))
                  for n in PHASES] + [(n, cache) for n in CACHE_PHASES]
        for n, obj in owners:
            if obj is not None and hasattr(obj, n):
                self.phases[n] = 0.0
                setattr(obj, n, self._wrap(getattr(obj, n), n))

    def _wrap(self, fn, phase):
        def inner(*a, **kw):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                dt = time.perf_counter() - t0
                if phase is None:
                    self.seconds += dt
                    self.cpu_seconds += time.process_time() - c0
                else:
                    self.phases[phase] += dt
        return inner


def run(spec, model, budget, page_size, backend):
    name, params = spec
    policy = make_policy(name, **params)
    g = model.geometry
    e = Engine(model, num_pages=g.num_layers * e_pages(budget, g, page_size), page_size=page_size, backend=backend)
    s = e.add_session(SessionConfig(prompt=torch.randn(16, model.cfg.text_dim), num_frames=budget + 2 * g.frames_per_block,
                                    policy=policy, budget_frames=budget))
    gen = torch.Generator().manual_seed(0)
    while s.start_frame < budget:  # fill the cache with real K/V (clean passes), as generation would
        if err := e.commit_block([s], torch.randn((1, *s.block_shape), generator=gen), record=False):
            raise RuntimeError(f"cache fill failed: {err}")
    timer = Timed(s.policy, e.cache)
    t0, c0 = time.perf_counter(), time.process_time()
    e.step([s.id])
    block_s, block_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    out = {"policy": name, "params": params, "block_s": block_s, "policy_s": timer.seconds,
           "overhead": timer.seconds / block_s, "block_cpu_s": block_cpu_s, "policy_cpu_s": timer.cpu_seconds,
           "overhead_cpu": timer.cpu_seconds / block_cpu_s, "phases_s": timer.phases,
           "cache_tokens": e.cache.num_tokens(s.id, 0)}
    if hasattr(s.policy, "stats"):
        out["policy_stats"] = dict(s.policy.stats)
    e.cancel(s.id)
    return out


def e_pages(budget, g, page_size):
    return -(-((budget + g.frames_per_block) * g.tokens_per_frame) // page_size) + 1


def main(argv=None):
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-frames", type=int_arg(1), default=21)
    ap.add_argument("--page-size", type=int_arg(1), default=32)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", default=str(RESULTS / "policy_overhead.json"))
    ap.add_argument("--only", type=int_arg(0, len(SPECS) - 1), nargs="+", default=list(range(len(SPECS))),
                    help="indices into SPECS to run (default: all)")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    grid = (16, 24) if a.quick else (60, 104)
    cfg = registry.get_preset("wan-cpu-small").with_(num_layers=1, latent_hw=grid, text_len=16)
    model = registry.build(cfg)
    rows = []
    for spec in [SPECS[i] for i in a.only]:
        r = run(spec, model, a.budget_frames, a.page_size, a.backend)
        rows.append(r)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
    result = {"benchmark": "policy_overhead", "quick": a.quick, "heads": cfg.num_heads, "head_dim": cfg.head_dim,
              "tokens_per_frame": model.geometry.tokens_per_frame, "budget_frames": a.budget_frames,
              "page_size": a.page_size, "layers": cfg.num_layers,
              "machine": {"cpu": platform.machine(), "threads": torch.get_num_threads()}, "rows": rows}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
