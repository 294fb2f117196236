"""Measures of generated scroll-world video against its ground truth (``scroll.py``): what a cache kept shows here.

* ``split_errors``: pixel MSE to the truth on *returning* content (columns in a stint in view that began after
  ``min_gap`` frames away: only a cache that kept them can reproduce them) and on *continuing* content;
* ``return_events`` / ``return_readouts``: each time a subject comes back after ``min_gap`` frames out of view, the
  first frame it is wholly in view again; there its colour and its shape are read from the generated pixels;
* ``flat_share`` and ``edge_sharpness``: is the video sharp like the world's frames, or a blur.
"""

from __future__ import annotations

import torch

from model_adapters.world import scroll
from model_adapters.world.metrics import READOUT_TOL, read_shape, subject_pixels
from model_adapters.world.procedural import PALETTE, SHAPES

FLAT_TOL = 0.02  # a pixel is flat when it differs from its right and lower neighbours by less (in [-1, 1] units)
EDGE_QUANTILE = 0.95  # edge sharpness: the mean of the largest 5 % of neighbour differences


def _neighbour_diff(frames: torch.Tensor) -> torch.Tensor:
    """[T, H-1, W-1]: max over channels of |right| + |down| neighbour differences."""
    dx = (frames[..., :-1, 1:] - frames[..., :-1, :-1]).abs().amax(-3)
    dy = (frames[..., 1:, :-1] - frames[..., :-1, :-1]).abs().amax(-3)
    return dx + dy


def flat_share(frames: torch.Tensor) -> float:
    """Share of pixels of ``frames`` [T, 3, H, W] that are flat (real frames of the world: mostly flat areas)."""
    return float((_neighbour_diff(frames.float()) < FLAT_TOL).float().mean())


def edge_sharpness(frames: torch.Tensor) -> float:
    """Mean of the top 5 % neighbour differences: high for crisp edges, low for a blur of the same picture."""
    d = _neighbour_diff(frames.float()).flatten()
    k = max(1, int(d.numel() * (1 - EDGE_QUANTILE)))
    return float(d.topk(k).values.mean())


def split_errors(frames: torch.Tensor, truth: torch.Tensor, camera: torch.Tensor, offset: int,
                 min_gap: int = 24) -> dict:
    """Pixel MSE of generated ``frames`` [T, 3, H, W] (frames ``offset ..`` of the clip whose full camera path is
    ``camera``) on returning and on continuing columns; NaN where a class has no pixel."""
    ret = scroll.returning_columns(camera, min_gap)[offset:offset + frames.shape[0]]  # [T, W]
    err = (frames.float() - truth.float()).pow(2).mean((1, 2))  # [T, W] per column
    out = {}
    for name, mask in (("returning", ret), ("continuing", ~ret)):
        out[f"mse_{name}"] = float(err[mask].mean()) if mask.any() else float("nan")
    out["returning_share"] = float(ret.float().mean())
    return out


def return_events(clip: scroll.ScrollClip, min_gap: int = 24, start: int = 0) -> list[tuple[int, int]]:
    """(frame, subject) of every return at or after ``start``: the first frame the subject is wholly in view (a
    pixel clear of the border, so its shape can be read) after having been out of view (not even partly visible) for at least ``min_gap`` frames."""
    half = scroll.SUBJECT_SIZE // 2
    x = clip.centre[..., 1]
    whole = (x.round() - half >= 1) & (x.round() + half <= scroll.W - 2)  # [T, S]: clear of the border
    events = []
    for s in range(clip.visible.shape[1]):
        last_visible, armed = None, False
        for t in range(clip.visible.shape[0]):
            if not clip.visible[t, s]:
                continue
            if last_visible is not None and t - last_visible - 1 >= min_gap:
                armed = True
            last_visible = t
            if armed and whole[t, s]:
                if t >= start:
                    events.append((t, s))
                armed = False
    return sorted(events)


def read_subject(frame: torch.Tensor, identity: int, centre: torch.Tensor) -> tuple[int, int]:
    """(colour index or -1, shape index or -1) read from ``frame`` [3, H, W] where the truth draws this subject: the
    colour from the mean of its pixels (``READOUT_TOL`` to the palette), the shape from the pixels near that colour
    in a box around the centre (``metrics.read_shape``)."""
    mean = subject_pixels(frame, identity, centre).mean(1)
    dist = (PALETTE - mean[None]).abs().amax(1)
    colour = int(dist.argmin()) if float(dist.min()) < READOUT_TOL else -1
    if colour < 0:
        return -1, -1
    y, x = round(float(centre[0])), round(float(centre[1]))
    box = torch.zeros(frame.shape[1:], dtype=torch.bool)
    near = (frame.float() - PALETTE[colour][:, None, None]).abs().amax(0) < READOUT_TOL
    r0, c0 = max(0, y - 7), max(0, x - 7)
    box[r0:y + 8, c0:x + 8] = near[r0:y + 8, c0:x + 8]
    return colour, read_shape(box)


def return_readouts(frames: torch.Tensor, clip: scroll.ScrollClip, events: list[tuple[int, int]],
                    offset: int) -> dict:
    """Of the returns ``events`` (clip frame, subject), the share whose colour, shape and both are read correctly
    from ``frames`` (frames ``offset ..`` of the clip).  NaN without returns."""
    if not events:
        return {"returns": 0, "colour": float("nan"), "shape": float("nan"), "both": float("nan")}
    hits = []
    for t, s in events:
        ident = int(clip.identity[s])
        colour, shape = read_subject(frames[t - offset], ident, clip.centre[t, s])
        hits.append((colour == ident // len(SHAPES), shape == ident % len(SHAPES)))
    c = torch.tensor(hits, dtype=torch.float32)
    return {"returns": len(hits), "colour": float(c[:, 0].mean()), "shape": float(c[:, 1].mean()),
            "both": float(c.prod(1).mean())}
