"""The memory probe as pictures: what the model makes of a returning subject under each policy's cache.

For the first ``--probes`` long-gap returns in the held-out probe seeds of ``quality.py`` (the same seeds, the
same noise): the ground-truth frame of the return, the model's input (that frame noised at t = 500), and the
model's one-step prediction from it with each policy's cache (fed the ground truth up to that block).  The
subject's colour can be recognised in the noisy input only roughly; with the frames that showed it still in the
cache the model paints it back, without them it guesses.  Columns are crops around the subject.

    python benchmarks/probe_picture.py      # -> benchmarks/results/quality_probe_picture.png
"""

from __future__ import annotations

import torch

from ff_engine.argtypes import OneLineParser, int_arg
from ff_engine.bench import quality
from ff_engine.evaluation import image_grid, one_step, policy_specs, probe_noise, rollout
from ff_engine.policies import make_policy
from model_adapters.world import metrics as M
from model_adapters.world.procedural import EVAL_SEED_BASE, H, W, decode, encode, make_clip

T_SHOWN = 500.0


def crop(frame: torch.Tensor, centre: torch.Tensor, size: int = 16) -> torch.Tensor:
    """A size x size crop of frame [3, H, W] around centre (y, x), shifted to stay inside the frame."""
    y = min(max(round(float(centre[0])) - size // 2, 0), H - size)
    x = min(max(round(float(centre[1])) - size // 2, 0), W - size)
    return frame[:, y:y + size, x:x + size]


def main(argv=None):
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(quality.DEFAULT_MODEL))
    ap.add_argument("--probes", type=int_arg(1), default=8)
    ap.add_argument("--budget", type=int_arg(1), default=30, help="budget in frames (30 = 25 %% of the main run's cache)")
    ap.add_argument("--policies", nargs="*", default=["window", "sink-window", "expected-attention", "future-forcing"])
    ap.add_argument("--history", type=int_arg(1), default=192)
    ap.add_argument("--min-gap", type=int_arg(0), default=30)
    ap.add_argument("--out", default=str(quality.RESULTS / "quality_probe_picture.png"))
    a = ap.parse_args(argv)
    from model_adapters import registry

    model = registry.load(a.model, "world-tiny")
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
        noise = probe_noise(lat, seed, starts, fpb)  # the memory probe's noise

        def predict(e, s):
            xt, pred = one_step(e, s, lat[s.start_frame:s.start_frame + fpb], noise[s.start_frame], T_SHOWN)
            return {"input": xt, "pred": pred}

        rows = {}
        for name in ["unbounded"] + a.policies:
            budget = None if name == "unbounded" else a.budget
            pname, params = ("unbounded", {}) if budget is None else policy_specs(budget)[name]
            _, preds = rollout(model, lat, fpb, a.history - fpb, make_policy(pname, **params), budget, seed,
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
    labels = [k for k in cols[0] if k != "title"]
    image_grid([[col[k] for col in cols] for k in labels], labels, [col["title"] for col in cols],
                       f"returning subjects (back after >= {a.min_gap} frames away): one-step predictions under each "
                       "cache", a.out, figsize=(1.1 * len(cols) + 1.6, 1.1 * len(labels) + 0.6))
    print(f"wrote {a.out} ({len(cols)} returns)")


if __name__ == "__main__":
    main()
