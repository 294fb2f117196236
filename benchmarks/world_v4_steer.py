"""Does a world model follow its actions?  After the whole-panorama prefix, 24 frames are generated under one
action (left / stay / right, an unbounded cache, the model's own sampler: ``train_scroll.free_rollout``) on
held-out worlds; printed: the mean camera shift between consecutive frames (px/frame, estimated by the best
horizontal alignment, ``scroll.camera_shift``) of the generated frames and of the truth (-2 / 0 / +2).

    python benchmarks/world_v4_steer.py model_adapters/world/assets/world_v4.safetensors [MODEL ...]
"""

import sys

import torch

from model_adapters.causal_wan.loading import load_causal_wan
from model_adapters.world import scroll
from model_adapters.world.procedural import encode
from model_adapters.world.train_scroll import free_rollout, scroll_pixels

SEEDS = (1006000, 1006001)  # held-out worlds (bench world_v4's first two)


@torch.no_grad()
def run(path: str) -> dict:
    model = load_causal_wan(path, "world-v4")
    fpb, prefix = model.geometry.frames_per_block, scroll.PREFIX_FRAMES
    out = {}
    for act in ("left", "stay", "right"):
        generated, truth = [], []
        for seed in SEEDS:
            acts = torch.tensor(scroll.prefix_actions(prefix) + scroll.parse_actions(f"{act}:24"))
            n = acts.shape[0] // fpb * fpb
            clip = scroll.make_clip(seed, acts[:n])
            lat = free_rollout(model, encode(clip.frames)[None], acts[:n], prefix, None,
                               torch.Generator().manual_seed(0))
            generated.append(scroll.mean_camera_shift(scroll_pixels(lat[0, prefix - 1:n])))
            truth.append(scroll.mean_camera_shift(clip.frames[prefix - 1:n]))
        out[act] = (sum(generated) / len(generated), sum(truth) / len(truth))
    return out


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(p, {k: (round(v[0], 2), round(v[1], 2)) for k, v in run(p).items()})
