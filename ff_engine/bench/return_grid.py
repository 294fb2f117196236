"""``ff-engine bench return_grid``: what each cache policy shows when content comes back, as one picture.

One held-out world of the scroll benchmark (``ff_engine.evaluation.scroll``), one action script, one budget: the
engine prefills the whole-panorama prefix and generates under the script with each policy (the same rollouts as
``bench scroll_quality``).  Columns are the first returns after the prefix (a subject wholly back in view after
``min_gap`` frames away; where the script has fewer, frames whose returning-content share is largest); rows are the
truth and each policy's generated frame there, each labelled with that frame's pixel MSE to the truth.

    ff-engine bench return_grid [--seed-index 0] [--script back-and-forth] [--budget 6] [--columns 6]
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ff_engine.argtypes import OneLineParser, int_arg
from ff_engine.bench import RESULTS_DIR
from ff_engine.evaluation.scroll import POLICIES, SCRIPTS, SEED_BASE, Job, job_clip, rollout
from model_adapters.world import EMBEDDED_V4, scroll
from model_adapters.world import scroll_metrics as SM

DEFAULT_POLICIES = ["unbounded", "window", "sink-window", "h2o", "expected-attention", "ff-no-merge", "ff-sink3",
                    "forcing-kv"]


def return_frames(clip: scroll.ScrollClip, prefix: int, frames: int, min_gap: int, columns: int) -> list[int]:
    """Generated-frame indices (0 = the first after the prefix) to show: subject returns first, then the frames
    with the most returning content (columns back after ``min_gap`` frames away), in time order."""
    picked = sorted({t - prefix for t, _ in SM.return_events(clip, min_gap, start=prefix) if t - prefix < frames})
    if len(picked) < columns:
        share = scroll.returning_columns(clip.camera, min_gap)[prefix:prefix + frames].float().mean(1)
        for t in torch.argsort(share, descending=True).tolist():
            if all(abs(t - p) >= 8 for p in picked):
                picked.append(t)
            if len(picked) >= columns:
                break
    step = max(1, len(picked) // columns)
    return sorted(picked[::step][:columns])


def plot(truth: torch.Tensor, videos: dict[str, torch.Tensor], cols: list[int], title: str, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {"truth": truth, **videos}
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.45 * len(cols) + 1.2, 1.05 * len(rows) + 0.5),
                             squeeze=False)
    for i, (name, video) in enumerate(rows.items()):
        for j, t in enumerate(cols):
            ax = axes[i][j]
            ax.imshow(((video[t].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if name != "truth":
                ax.set_xlabel(f"{float((video[t] - truth[t]).pow(2).mean()):.3f}", fontsize=6, labelpad=1)
            if i == 0:
                ax.set_title(f"frame {t + 1}", fontsize=7)
            if j == 0:
                ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def parser() -> OneLineParser:
    ap = OneLineParser(prog="ff-engine bench return_grid", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(EMBEDDED_V4))
    ap.add_argument("--seed-index", type=int_arg(0), default=0, help="held-out world (SEED_BASE + this)")
    ap.add_argument("--script", choices=SCRIPTS, default="back-and-forth")
    ap.add_argument("--budget", type=int_arg(1), default=6, help="latent frames of cache (bounded policies)")
    ap.add_argument("--frames", type=int_arg(1), default=240)
    ap.add_argument("--columns", type=int_arg(1), default=6)
    ap.add_argument("--min-gap", type=int_arg(1), default=24)
    ap.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES, choices=list(POLICIES))
    ap.add_argument("--out", default=str(RESULTS_DIR / "world_v4d_return_grid.png"))
    return ap


def main(argv=None) -> int:
    from model_adapters import registry

    a = parser().parse_args(argv)
    model = registry.load(a.model, "world-v4")
    prefix = scroll.PREFIX_FRAMES
    base = Job(SEED_BASE + a.seed_index, a.script, "unbounded", None, a.frames, prefix, min_gap=a.min_gap)
    clip = job_clip(base)
    truth = clip.frames[prefix:prefix + a.frames]
    videos = {}
    for name in a.policies:
        job = Job(base.seed, a.script, name, None if name == "unbounded" else a.budget, a.frames, prefix,
                  min_gap=a.min_gap)
        videos[name], _ = rollout(model, job, clip)
        print(f"{name:>20}: mse {float((videos[name] - truth).pow(2).mean()):.4f}")
    cols = return_frames(clip, prefix, a.frames, a.min_gap, a.columns)
    png = Path(a.out)
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(truth, videos, cols, f"world {base.seed}, {a.script}, budget {a.budget} frames: returns (MSE to the truth "
         "under each frame)", png)
    meta = {"command": "ff-engine bench return_grid " + " ".join(argv if argv is not None else []), "seed": base.seed,
            "script": a.script, "budget": a.budget, "frames": cols, "model": a.model,
            "frame_mse": {name: [float((v[t] - truth[t]).pow(2).mean()) for t in cols] for name, v in videos.items()}}
    png.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
