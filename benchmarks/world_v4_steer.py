"""Does a world model follow its actions? Mean estimated camera shift (px/frame) of generated frames per action."""
import sys

import torch

from model_adapters.causal_wan.loading import load_causal_wan
from model_adapters.world import scroll
from model_adapters.world.procedural import encode
from model_adapters.world.train_scroll import (
    _generate_block,
    _WindowedCache,
    _write_block,
    scroll_pixels,
    shifted_sigma,
)


def shift_of(a, b, max_s=4):
    # b is a shifted by s px (camera moves right by s: content moves left)
    best = None
    for s in range(-max_s, max_s + 1):
        if s >= 0:
            e = (a[..., s:] - b[..., : b.shape[-1] - s]).pow(2).mean()
        else:
            e = (a[..., : a.shape[-1] + s] - b[..., -s:]).pow(2).mean()
        if best is None or e < best[0]:
            best = (float(e), s)
    return best[1]

@torch.no_grad()
def run(path, seeds=(1006000, 1006001)):
    model = load_causal_wan(path, "world-v4")
    cfg, fpb = model.cfg, model.geometry.frames_per_block
    sigmas = [shifted_sigma(t / 1000, cfg.sample_shift) for t in cfg.sample_steps]
    prefix = scroll.PREFIX_FRAMES
    out = {}
    for act in ("left", "stay", "right"):
        shifts = []
        for seed in seeds:
            acts = torch.tensor(scroll.prefix_actions(prefix) + scroll.parse_actions(f"{act}:24"))
            n = acts.shape[0] // fpb * fpb
            clip = scroll.make_clip(seed, acts[:n])
            lat = encode(clip.frames)[None]
            attn = _WindowedCache(1, None)
            g = torch.Generator().manual_seed(0)
            o = lat.clone()
            for blk in range(n // fpb):
                sl = slice(blk * fpb, (blk + 1) * fpb)
                times, a = [torch.arange(sl.start, sl.stop)], acts[sl][None]
                if sl.start >= prefix:
                    o[:, sl] = _generate_block(model, attn, torch.randn(o[:, sl].shape, generator=g), sigmas, times, a)
                _write_block(model, attn, o[:, sl], cfg.context_noise, times, a, g)
            px = scroll_pixels(o[0, prefix - 1:n])
            shifts += [shift_of(px[i - 1], px[i]) for i in range(1, px.shape[0])]
            truth = clip.frames[prefix - 1:n]
            tshift = [shift_of(truth[i - 1], truth[i]) for i in range(1, truth.shape[0])]
        out[act] = (sum(shifts) / len(shifts), sum(tshift) / len(tshift))
    return out

for p in sys.argv[1:]:
    print(p, {k: (round(v[0], 2), round(v[1], 2)) for k, v in run(p).items()})
