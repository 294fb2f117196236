"""``ff-engine bench world_v4``: world-model checkpoints measured on held-out scroll worlds, side by side.

For each checkpoint: the teacher-forced next-block error (the truth as context, one step from pure noise) under
random actions and under a steady pan, against copying the last frame; and the free-running error after the
whole-panorama prefix with an unbounded cache and with a 24-frame window (the model's own sampler, no engine:
the trainer's go/no-go measure on held-out seeds).  Used for the ablation of the model changes (patch, spatial
RoPE base, q/k gain initialisation) trained on the same budget.

    ff-engine bench world_v4 --models model_adapters/world/assets/world_v4.safetensors ablation.safetensors
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ff_engine.bench import RESULTS_DIR
from model_adapters import registry
from model_adapters.world import EMBEDDED_V4, scroll
from model_adapters.world.train_scroll import free_running_error, teacher_forced_error

SEED_BASE = scroll.EVAL_SEED_BASE + 6000  # held-out worlds


def measure(path: str, seeds: list[int], frames: int) -> dict:
    model = registry.load(path, "world-v4").eval()
    cfg = model.cfg
    row = {"model": path, "patch": list(cfg.patch_size), "rope_theta_space": cfg.rope_theta_space,
           "qk_gain_init": cfg.qk_gain_init, "sample_steps": list(cfg.sample_steps)}
    meta = Path(path).with_suffix(".train.json")
    if meta.exists():
        m = json.loads(meta.read_text())
        row.update(steps=m.get("step"), train_minutes=round(m.get("seconds", 0) / 60, 1), command=m.get("command"))
    for name, script in (("random", None), ("steady", "right:24")):
        tf = teacher_forced_error(model, seeds, 1.0, script)
        row[f"teacher_forced_{name}"] = tf["next_block_mse"]
        row[f"copy_last_{name}"] = tf["copy_last_frame"]
        row[f"ratio_{name}"] = tf["next_block_mse"] / tf["copy_last_frame"]
    for name, window in (("unbounded", None), ("window24", 24)):
        free = free_running_error(model, seeds, script=f"right:{frames}", window_frames=window)
        row[f"free_{name}"] = free["mse"]
        row[f"free_{name}_curve"] = free["mse_per_frame"]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(prog="ff-engine bench world_v4", description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=[str(EMBEDDED_V4)])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--frames", type=int, default=120, help="free-running frames after the prefix")
    ap.add_argument("--out", default=str(RESULTS_DIR / "world_v4_checks.json"))
    a = ap.parse_args(argv)
    seeds = [SEED_BASE + i for i in range(a.seeds)]
    t0 = time.perf_counter()
    rows = [measure(m, seeds, a.frames) for m in a.models]
    out = {"command": "ff-engine bench world_v4 " + " ".join(argv if argv is not None else []), "seeds": seeds,
           "rows": rows, "seconds": time.perf_counter() - t0}
    Path(a.out).write_text(json.dumps(out, indent=1))
    for r in rows:
        print(f"{Path(r['model']).name}: teacher-forced random {r['teacher_forced_random']:.4f} "
              f"({r['ratio_random']:.2f}x copy), steady {r['teacher_forced_steady']:.4f} ({r['ratio_steady']:.2f}x "
              f"copy); free-running unbounded {r['free_unbounded']:.4f}, window 24 {r['free_window24']:.4f}")
    return out
