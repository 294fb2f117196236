"""Why a world-model checkpoint does or does not hold its world: three measurements on *training* seeds only.

    python benchmarks/world_diagnostics.py model_adapters/world/assets/world_model.safetensors other.safetensors \
        --out benchmarks/results/world_diagnostics.json

1. **Next-block prediction, teacher-forced** (``next_block_error``): clean ground-truth context (27 frames of
   each seed from frame 40, the training passes' masked attention), every block noised to sigma, one x0
   prediction; pixel MSE of the last block (it has 8 blocks of context) and of the first (none: the
   unconditional guess), beside the error of copying the last context frame.  The world is nearly deterministic
   from its past, so at sigma = 1 a model that uses its context well predicts far better than copying; one that
   does not stays near the unconditional error.
2. **Where attention looks** (``attention_to_previous_frame``): for the last frame's queries at sigma = 1, per
   layer and head, the mean largest attention weight, the weight on the previous frame and on the same token
   position one frame back.  A diffuse head (largest weight ~1 % of thousands of keys) can only blur its context.
3. **Free continuation through the engine** (``continuation``): ``--frames`` frames after a 24-frame ground-truth
   prefix with the unbounded cache; pixel MSE against the truth over the first 3 / 12 / all generated frames, the
   share of frames showing one of the world's subjects (``metrics.subject_sightings``) beside the truth's, and the
   drift curve.

Why a script and not a test: it explains a checkpoint (a debugging tool for training runs), it asserts nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ff_engine.argtypes import OneLineParser, int_arg
from ff_engine.evaluation import rollout
from ff_engine.policies import make_policy
from model_adapters.world import metrics as M
from model_adapters.world.procedural import decode, encode, make_clip
from model_adapters.world.train import _TeacherForcingAttention, qk_gains

SEEDS = (123, 4567, 777, 31337)  # training seeds (procedural.TRAIN_SEEDS), never evaluation seeds
START = 40
FPB = 3


def _clips(frames: int, start: int = START) -> tuple[torch.Tensor, torch.Tensor]:
    lat = torch.stack([encode(make_clip(s, frames, start=start).frames) for s in SEEDS])
    return lat, torch.arange(frames).repeat(len(SEEDS), 1) + start


def _teacher_forced(model, x0, times, sigma: float, attn, rng) -> torch.Tensor:
    """x0 prediction of every block noised to ``sigma`` from the clean context (the training passes)."""
    b, f = x0.shape[:2]
    prompts = [model.encode_prompt(torch.zeros(1, model.cfg.text_dim))] * b
    model.forward(x0, torch.zeros(b, f), prompts, list(times), attn)
    attn.noisy = True
    xt = (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=rng)
    return xt - sigma * model.forward(xt, torch.full((b, f), sigma * 1000), prompts, list(times), attn)


def _pixels(lat: torch.Tensor) -> torch.Tensor:
    return decode(lat.flatten(0, 1))


@torch.no_grad()
def next_block_error(model, sigmas=(0.3, 0.6, 0.9, 1.0)) -> dict:
    x0, times = _clips(9 * FPB)
    b, f = x0.shape[:2]
    truth_last, truth_first = _pixels(x0[:, -FPB:]), _pixels(x0[:, :FPB])
    copy = _pixels(x0[:, -FPB - 1:-FPB].expand(-1, FPB, -1, -1, -1).contiguous())
    out = {"copy_last_frame": (copy - truth_last).pow(2).mean().item(), "by_sigma": {}}
    rng = torch.Generator().manual_seed(0)
    for s in sigmas:
        attn = _TeacherForcingAttention(b, f, model.geometry.tokens_per_frame, FPB)
        pred = _teacher_forced(model, x0, times, s, attn, rng)
        out["by_sigma"][str(s)] = {"last_block": (_pixels(pred[:, -FPB:]) - truth_last).pow(2).mean().item(),
                                   "first_block": (_pixels(pred[:, :FPB]) - truth_first).pow(2).mean().item()}
    return out


@torch.no_grad()
def attention_to_previous_frame(model) -> list[dict]:
    x0, times = _clips(4 * FPB)
    b, f = x0.shape[:2]
    tpf = model.geometry.tokens_per_frame
    rows = []

    class Probe(_TeacherForcingAttention):
        def __call__(self, layer, q, k, v, q_pre_rope, positions):
            out = super().__call__(layer, q, k, v, q_pre_rope, positions)
            if self.noisy:
                qq = q.reshape(self.b, self.n, *q.shape[1:]).transpose(1, 2)[:, :, -tpf:]
                keys = self.clean_kv[layer][0]
                mask = torch.where(self.past[-tpf:], 0.0, float("-inf"))
                w = torch.softmax(qq @ keys.transpose(-1, -2) / qq.shape[-1] ** 0.5 + mask, -1)
                prev = w[..., (f - FPB - 1) * tpf:(f - FPB) * tpf]  # the last context frame
                rows.append({"layer": layer, "max_weight": w.amax(-1).mean((0, 2)).tolist(),
                             "previous_frame": prev.sum(-1).mean((0, 2)).tolist(),
                             "same_position": prev.diagonal(dim1=-2, dim2=-1).mean((0, 2)).tolist()})
            return out

    _teacher_forced(model, x0, times, 1.0, Probe(b, f, tpf, FPB), torch.Generator().manual_seed(0))
    return rows


@torch.no_grad()
def continuation(model, frames: int, prefix: int = 24) -> dict:
    per_seed = []
    for seed in SEEDS:
        clip = make_clip(seed, prefix + frames)
        lat = rollout(model, encode(clip.frames), prefix, frames, make_policy("unbounded"), None, seed, page_size=16)
        px, truth = decode(lat[prefix:]), clip.frames[prefix:]
        world = M.world_from_truth(clip.identity, 0)
        seen = [M.colour_presence(M.subject_sightings(x)[0], world)["world_presence"] for x in (px, truth)]
        per_seed.append({"seed": seed, **{f"mse_{n}": (px[:n] - truth[:n]).pow(2).mean().item() for n in (3, 12)},
                         "mse_all": (px - truth).pow(2).mean().item(), "world_presence": seen[0],
                         "truth_world_presence": seen[1], "drift_curve": M.drift_curve(px)})
    keys = [k for k in per_seed[0] if k not in ("seed", "drift_curve")]
    return {"frames": frames, "prefix": prefix, "per_seed": per_seed,
            "mean": {k: sum(r[k] for r in per_seed) / len(per_seed) for k in keys}}


def diagnose(path: str, frames: int) -> dict:
    from model_adapters.causal_wan import load_causal_wan

    model = load_causal_wan(path, preset="world-tiny").eval()
    gains = {n: p.detach().abs().mean().item() for n, p in qk_gains(model)}
    return {"checkpoint": path, "qk_gain_mean": gains, "next_block_error": next_block_error(model),
            "attention_to_previous_frame": attention_to_previous_frame(model),
            "continuation": continuation(model, frames)}


def main(argv=None) -> int:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--frames", type=int_arg(M.DRIFT_WINDOW), default=48, help="generated frames after the prefix")
    ap.add_argument("--out", default=None, help="write the JSON here (default: print it)")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    report = {"seeds": list(SEEDS), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "checkpoints": [diagnose(p, a.frames) for p in a.checkpoints]}
    text = json.dumps(report, indent=1)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
        for c in report["checkpoints"]:
            nb, cont = c["next_block_error"], c["continuation"]["mean"]
            print(f"{c['checkpoint']}: next block @sigma=1 {nb['by_sigma']['1.0']['last_block']:.4f} (copy "
                  f"{nb['copy_last_frame']:.4f}, unconditional {nb['by_sigma']['1.0']['first_block']:.4f}); "
                  f"continuation mse3 {cont['mse_3']:.4f} mse12 {cont['mse_12']:.4f} all {cont['mse_all']:.4f}, "
                  f"subjects in {cont['world_presence']:.0%} of frames (truth {cont['truth_world_presence']:.0%})")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
