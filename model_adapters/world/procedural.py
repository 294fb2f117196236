"""A procedural video world where long-range memory matters and the truth is known.

Each clip (deterministic from its seed) is a camera panning back and forth over a wide panorama with
landmarks, and two subjects with a known identity (shape x colour) that move in the world and therefore leave
the view and come back — after gaps longer than the cache budgets we test.  A model that has evicted the
frames where a subject or a place was last seen has to invent it again; one that kept them can reproduce it.

Frames are 32 x 48 RGB in [-1, 1].  ``encode``/``decode`` map them losslessly to a 12 x 16 x 24 latent
(2 x 2 space-to-depth), the stand-in for a VAE: one latent frame per video frame.
Ground truth per frame: each subject's identity, centre (y, x) in the frame and visibility.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

H, W = 32, 48
PANORAMA_W = 4 * W
PALETTE = torch.tensor([  # subject colours: saturated, far from the muted background
    [1.0, -0.9, -0.9], [-0.9, 1.0, -0.9], [-0.9, -0.9, 1.0], [1.0, 1.0, -0.9], [1.0, -0.9, 1.0], [-0.9, 1.0, 1.0],
])
SHAPES = ("square", "disc", "diamond")
NUM_IDENTITIES = len(PALETTE) * len(SHAPES)
SUBJECT_SIZE = 9
TRAIN_SEEDS = range(100_000)
EVAL_SEED_BASE = 1_000_000  # held-out seeds start here; training never draws from them


@dataclass
class Clip:
    frames: torch.Tensor  # [T, 3, H, W] in [-1, 1]
    identity: torch.Tensor  # [S] identity id per subject (colour * len(SHAPES) + shape)
    centre: torch.Tensor  # [T, S, 2] (y, x) in frame pixels
    visible: torch.Tensor  # [T, S] bool


def identity_of(colour: int, shape: int) -> int:
    return colour * len(SHAPES) + shape


def subject_mask(shape: int, size: int = SUBJECT_SIZE) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    half = size / 2
    if SHAPES[shape] == "square":
        return torch.ones(size, size, dtype=torch.bool)
    if SHAPES[shape] == "disc":
        return yy**2 + xx**2 <= half**2
    return yy.abs() + xx.abs() <= half


def subject_region(mask: torch.Tensor, fy: float, fx: float) -> tuple[slice, slice, torch.Tensor]:
    """Where a subject with this ``subject_mask`` centred at (fy, fx) lands in the frame: (rows, cols, the part
    of the mask inside the frame; meaningful only when both ranges are non-empty — a subject entirely out of
    view gives empty or reversed ranges).  ``make_clip`` draws subjects here and the metrics read them back here,
    so a read-out always looks at exactly the pixels that were drawn."""
    size = mask.shape[0]
    x0, y0 = round(fx) - size // 2, round(fy) - size // 2
    xs, ys = max(0, x0), max(0, y0)
    xe, ye = min(W, x0 + size), min(H, y0 + size)
    return slice(ys, ye), slice(xs, xe), mask[ys - y0:ye - y0, xs - x0:xe - x0]


def _panorama(g: torch.Generator) -> torch.Tensor:
    """Muted smooth colours plus landmarks (grey-toned blocks and posts) so places are recognisable."""
    x = torch.linspace(0, 1, PANORAMA_W)
    y = torch.linspace(0, 1, H)
    pano = torch.zeros(3, H, PANORAMA_W)
    for c in range(3):
        a, f, p = torch.rand(3, generator=g)
        pano[c] = 0.35 * torch.sin(2 * math.pi * (1 + 3 * f) * x + 6.28 * p)[None, :] * (0.5 + a) + 0.15 * (y[:, None] - 0.5)
    horizon = int(H * (0.55 + 0.2 * torch.rand(1, generator=g)))
    pano[:, horizon:] = pano[:, horizon:] * 0.5 - 0.3  # ground
    for _ in range(10):  # landmarks
        w = int(4 + 10 * torch.rand(1, generator=g))
        h = int(6 + 14 * torch.rand(1, generator=g))
        x0 = int((PANORAMA_W - w) * torch.rand(1, generator=g))
        tone = (torch.rand(1, generator=g) * 1.2 - 0.6).expand(3) + 0.15 * (torch.rand(3, generator=g) - 0.5)
        pano[:, horizon - h:horizon, x0:x0 + w] = tone[:, None, None]
    return pano.clamp(-1, 1)


def make_clip(seed: int, num_frames: int, num_subjects: int = 2, start: int = 0) -> Clip:
    """Frames ``start`` .. ``start + num_frames - 1`` of the world with this seed."""
    g = torch.Generator().manual_seed(seed)
    pano = _panorama(g)
    cam_period = float(120 + 120 * torch.rand(1, generator=g))
    cam_phase = float(2 * math.pi * torch.rand(1, generator=g))
    colours = torch.randperm(len(PALETTE), generator=g)[:num_subjects]
    shapes = torch.randint(len(SHAPES), (num_subjects,), generator=g)
    identity = torch.tensor([identity_of(int(c), int(s)) for c, s in zip(colours, shapes)])
    base_x = torch.rand(num_subjects, generator=g) * PANORAMA_W
    amp = 20 + 30 * torch.rand(num_subjects, generator=g)
    period = 100 + 150 * torch.rand(num_subjects, generator=g)
    phase = 2 * math.pi * torch.rand(num_subjects, generator=g)
    base_y = 6 + (H - 12) * torch.rand(num_subjects, generator=g)
    frames = torch.empty(num_frames, 3, H, W)
    centre = torch.empty(num_frames, num_subjects, 2)
    visible = torch.zeros(num_frames, num_subjects, dtype=torch.bool)
    masks = [subject_mask(int(s)) for s in shapes]
    for j, t in enumerate(range(start, start + num_frames)):
        cam = (PANORAMA_W - W) / 2 * (1 + math.sin(2 * math.pi * t / cam_period + cam_phase))
        c0 = round(cam)
        img = pano[:, :, c0:c0 + W].clone()
        for i in range(num_subjects):
            wx = float(base_x[i] + amp[i] * math.sin(2 * math.pi * t / float(period[i]) + float(phase[i])))
            wx = wx % PANORAMA_W
            fx, fy = wx - c0, float(base_y[i]) + 3 * math.sin(t / 5 + i)
            centre[j, i] = torch.tensor([fy, fx])
            rows, cols, m = subject_region(masks[i], fy, fx)
            if rows.stop - rows.start >= 3 and cols.stop - cols.start >= 3:  # at least a 3 x 3 piece in view
                patch = img[:, rows, cols]
                patch[:, m] = PALETTE[colours[i]][:, None]
                visible[j, i] = True
        frames[j] = img
    return Clip(frames, identity, centre, visible)


def encode(frames: torch.Tensor) -> torch.Tensor:
    """[T, 3, 32, 48] pixels -> [T, 12, 16, 24] latents (2 x 2 space-to-depth, lossless)."""
    return torch.nn.functional.pixel_unshuffle(frames, 2)


def decode(latents: torch.Tensor) -> torch.Tensor:
    """[T, 12, 16, 24] -> [T, 3, 32, 48] in [-1, 1]."""
    return torch.nn.functional.pixel_shuffle(latents, 2).clamp(-1, 1)
