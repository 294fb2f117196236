"""Pictures for the README: a filmstrip of a generated MP4, and the drift curves of a quality run.

    ff-engine generate --policy future-forcing --budget-frames 24 --seconds 30 --out out/video.mp4
    python benchmarks/filmstrip.py out/video.mp4 --out docs/filmstrip.png       # 2 rows x 10 frames, evenly spaced
    python benchmarks/filmstrip.py --drift benchmarks/results/quality.json --out docs/drift.png

The filmstrip shows the command's own output as written (decoded from the MP4 with PyAV, nothing regenerated), every
``--every``-th frame (default: spaced so ``--rows`` x ``--columns`` cells span the video), each labelled with its
frame number and time.  The drift figure plots, from ``benchmarks/quality.py``'s JSON, each policy's seed-mean drift
curve (``model_adapters.world.metrics.drift_curve``) per rollout start and budget, with the ground truth's for reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ff_engine.argtypes import OneLineParser, int_arg
from ff_engine.errors import ConfigError


def read_frames(mp4: str | Path, every: int | None, cells: int) -> tuple[list[int], list[np.ndarray], float]:
    """(frame numbers, RGB frames [h, w, 3] uint8, frames per second) of every ``every``-th frame of ``mp4`` from
    frame 0, at most ``cells`` of them; ``every=None`` spaces ``cells`` frames evenly over the whole video."""
    import av

    path = Path(mp4)
    if not path.is_file():
        raise ConfigError(f"video {str(path)!r}: no such file")
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        fps = float(stream.average_rate or 16)
        total = stream.frames or sum(1 for _ in c.decode(video=0))
    if total == 0:
        raise ConfigError(f"video {str(path)!r}: has no frames")
    step = every or max(1, (total - 1) // max(cells - 1, 1))  # every cell filled, the last near the end
    wanted = list(range(0, total, step))[:cells]
    keep, frames = set(wanted), []
    with av.open(str(path)) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i in keep:
                frames.append(frame.to_ndarray(format="rgb24"))
            if i >= wanted[-1]:
                break
    return wanted[:len(frames)], frames, fps


def filmstrip(mp4: str | Path, png: str | Path, every: int | None = None, columns: int = 10, rows: int = 2,
              title: str | None = None) -> list[int]:
    """Write a ``rows`` x ``columns`` PNG strip of ``mp4``'s frames; returns the frame numbers shown."""
    if columns < 1 or rows < 1:
        raise ConfigError(f"columns and rows must be >= 1, got {columns} x {rows}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numbers, frames, fps = read_frames(mp4, every, columns * rows)
    rows = -(-len(frames) // columns)
    h, w = frames[0].shape[:2]
    cell_w = 1.6
    fig, axes = plt.subplots(rows, columns, figsize=(cell_w * columns, cell_w * h / w * rows + 0.25 * rows + 0.3),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, n, img in zip(axes.flat, numbers, frames):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(f"frame {n} ({n / fps:.1f} s)", fontsize=7)
    fig.suptitle(title or Path(mp4).name, fontsize=8)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return numbers


def drift_figure(result: dict, png: str | Path) -> None:
    """Seed-mean drift curves of ``result`` (``benchmarks/quality.py``'s JSON): one panel per (budget, start),
    one line per policy (Future Forcing and the unbounded cache bold, ablations thin), the ground truth dashed;
    each label carries the curve's last / first window."""
    summary = result.get("rollout_summary")
    if not summary:
        raise ConfigError("the quality JSON has no free-rollout results (rollout_summary): run with --rollout-seeds >= 1")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = result["rollout_setup"]["drift_window"]
    starts = sorted({s["start"] for s in summary})
    budgets = {start: sorted({s["budget_frames"] for s in summary if s["start"] == start} - {None}) for start in starts}
    rows = max(len(b) for b in budgets.values())
    fig, axes = plt.subplots(rows, len(starts), figsize=(6.5 * len(starts), 3.6 * rows), squeeze=False)
    for (r, c), ax in np.ndenumerate(axes):
        start = starts[c]
        if r >= len(budgets[start]):
            ax.axis("off")
            continue
        budget = budgets[start][r]
        lines = [s for s in summary if s["start"] == start and s["budget_frames"] in (budget, None)]
        frac = next(s["budget_fraction"] for s in lines if s["budget_frames"] == budget)
        for s in sorted(lines, key=lambda s: s["policy"]):
            x = [window * (i + 1) for i in range(len(s["drift_curve"]))]
            bold = s["policy"] in ("future-forcing", "unbounded")
            style = {"ground-truth": {"color": "0.4", "ls": "--", "lw": 1.5}, "unbounded": {"color": "k", "lw": 2}}.get(
                s["policy"], {"lw": 2 if bold else (0.8 if s["policy"].startswith("ff-") else 1.3)})
            ax.plot(x, s["drift_curve"], marker="o", ms=2.5, label=f"{s['policy']} ({s['drift_ratio_of_means']:.2f}x)",
                    **style)
        ax.set(yscale="log", xlabel="generated frames (end of each window)", ylabel="Fréchet distance to real frames",
               title=f"from {start}, budget {budget} frames ({100 * frac:.1f} %)")
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"drift per {window}-frame window, mean over {len(result['rollout_setup']['seeds'])} held-out "
                 f"seeds (label: last / first window; lower curve = closer to real frames)", fontsize=9)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("video", nargs="?", help="MP4 to show as a filmstrip")
    ap.add_argument("--drift", metavar="QUALITY_JSON", help="plot the drift curves of this quality run instead")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--every", type=int_arg(1), default=None, help="show every n-th frame (default: evenly spaced)")
    ap.add_argument("--columns", type=int_arg(1, 40), default=10)
    ap.add_argument("--rows", type=int_arg(1, 10), default=2)
    ap.add_argument("--title", default=None)
    a = ap.parse_args(argv)
    if (a.video is None) == (a.drift is None):
        ap.error("give either a video or --drift QUALITY_JSON")
    if a.drift:
        if not Path(a.drift).is_file():
            raise ConfigError(f"--drift {a.drift!r}: no such file")
        drift_figure(json.loads(Path(a.drift).read_text()), a.out)
    else:
        shown = filmstrip(a.video, a.out, a.every, a.columns, a.rows, a.title)
        print(f"frames {shown}")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
