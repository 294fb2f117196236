"""The memory probe as pictures: what the model makes of a returning subject under each policy's cache.

For the first ``--probes`` long-gap returns in the held-out probe seeds of ``quality.py`` (the same seeds, the
same noise): the ground-truth frame of the return, the model's input (that frame noised at t = 500), and the
model's one-step prediction from it with each policy's cache (fed the ground truth up to that block).  The
subject's colour can be recognised in the noisy input only roughly; with the frames that showed it still in the
cache the model paints it back, without them it guesses.  Columns are crops around the subject.

    python benchmarks/probe_picture.py      # -> benchmarks/results/quality_probe_picture.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ff_engine.policies import make_policy
from ff_engine.world import metrics as M
from ff_engine.world.procedural import EVAL_SEED_BASE, H, W, decode, encode, make_clip

import quality

T_SHOWN = 500.0


def crop(frame: torch.Tensor, centre: torch.Tensor, size: int = 16) -> torch.Tensor:
    """A size x size crop of frame [3, H, W] around centre (y, x), shifted to stay inside the frame."""
    y = min(max(int(round(float(centre[0]))) - size // 2, 0), H - size)
    x = min(max(int(round(float(centre[1]))) - size // 2, 0), W - size)
    return frame[:, y:y + size, x:x + size]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(quality.DEFAULT_MODEL))
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--budget", type=int, default=30, help="budget in frames (30 = 25 %% of the main run's cache)")
    ap.add_argument("--policies", nargs="*", default=["window", "sink-window", "expected-attention", "future-forcing"])
    ap.add_argument("--history", type=int, default=192)
    ap.add_argument("--min-gap", type=int, default=30)
    ap.add_argument("--out", default=str(quality.RESULTS / "quality_probe_picture.png"))
    a = ap.parse_args(argv)
    from model_adapters.causal_wan import load_causal_wan

    model = load_causal_wan(a.model, preset="world-tiny")
    fpb = model.geometry.frames_per_block
    cols: list[dict] = []
    for i in range(1000):
        if len(cols) >= a.probes:
            break
        seed = EVAL_SEED_BASE + 1000 + i
        clip = make_clip(seed, a.history)
        back = M.returning_pairs(clip.visible, min_gap=a.min_gap, window=1)
        events = [(int(t), int(s)) for t, s in back.nonzero() if t >= 2 * fpb][: a.probes - len(cols)]
        if not events:
            continue
        lat = encode(clip.frames)
        starts = {t // fpb * fpb for t, _ in events}
        noise = {s0: torch.randn(lat[s0:s0 + fpb].shape, generator=torch.Generator().manual_seed(seed * 1000 + s0))
                 for s0 in starts}  # the probe's noise (quality.memory_probe)

        def predict(e, s):
            x0 = lat[s.start_frame:s.start_frame + fpb][None]
            tt = torch.full((1, fpb), T_SHOWN)
            xt = e.schedule.add_noise(x0, noise[s.start_frame][None], tt)
            return {"input": xt[0].float(),
                    "pred": e.schedule.to_x0(xt, e.forward_block([s], xt, tt, write=False), tt)[0].float()}

        rows = {}
        for name in ["unbounded"] + a.policies:
            budget = None if name == "unbounded" else a.budget
            pname, params = ("unbounded", {}) if budget is None else quality.policy_specs(budget)[name]
            _, preds = quality.rollout(model, lat, fpb, a.history - fpb, make_policy(pname, **params), budget, seed,
                                       16, teacher=lat, predict_at=starts, predict=predict)
            rows[name] = preds
        for t, s in events:
            s0, c = t // fpb * fpb, clip.centre[t, s]
            col = {"title": f"seed {seed}\nframe {t}", "ground truth": crop(clip.frames[t], c),
                   f"input (t={int(T_SHOWN)})": crop(decode(rows["unbounded"][s0]["input"])[t - s0], c)}
            for name, preds in rows.items():
                label = name if name == "unbounded" else f"{name} ({a.budget} fr)"
                col[label] = crop(decode(preds[s0]["pred"])[t - s0], c)
            cols.append(col)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [k for k in cols[0] if k != "title"]
    fig, axes = plt.subplots(len(labels), len(cols), figsize=(1.1 * len(cols) + 1.6, 1.1 * len(labels) + 0.6),
                             squeeze=False)
    for c, col in enumerate(cols):
        for r, k in enumerate(labels):
            ax = axes[r, c]
            ax.imshow(((col[k].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(k, rotation=0, ha="right", va="center", fontsize=7)
            if r == 0:
                ax.set_title(col["title"], fontsize=6)
    fig.suptitle(f"returning subjects (back after >= {a.min_gap} frames away): one-step predictions under each cache",
                 fontsize=8)
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out} ({len(cols)} returns)")


if __name__ == "__main__":
    main()
