"""Quality metrics for the world model, each a small named function.

* ``identity_consistency``: pixel read-out (no learned classifier). A pixel belongs to a subject when its colour
  is within ``tol`` of a palette colour (subjects are saturated, the background is muted); a palette colour
  with at least ``min_pixels`` such pixels in a frame is a detected subject.  The score is the share of
  detected subjects whose colour is one of the clip's true subject colours: a model that forgets who was in
  the scene invents other subjects.  (Colours identify subjects within a clip: the two subjects never share
  one.)
* ``returning_recall``: of the clip's true subject colours seen in the prefix, the share that the
  continuation shows again — a model that evicted them cannot bring them back.
* ``subject_consistency``: VBench-style mean of cos(f_t, f_0) and cos(f_t, f_{t-1}); the features are a fixed
  random projection of 4x-average-pooled pixels — *not* DINO, so only comparisons between policies mean much.
* ``rollout_error``: mean squared latent difference to the unbounded-cache rollout with the same seed/noise.
* ``identity_recall`` (against ground truth, for teacher-forced predictions): where the ground truth shows a
  subject, does the model's prediction of that frame show its colour; ``returning_pairs`` restricts this to the
  first frames after a subject was out of view for a long time.
* ``subject_readout`` / ``identity_readout_accuracy`` (against ground truth, robust to blur): the mean colour of
  the pixels where the ground truth draws a subject (its shape at its true position, clipped to the frame) is
  classified as the nearest palette colour — the model's rendition of *that* subject, whether or not it is
  saturated enough for the threshold detector above.
* per-layer attention-output error: measured by ``benchmarks/quality.py`` (teacher-forced, see there).
"""

from __future__ import annotations

import torch

from ff_engine.world.procedural import PALETTE, SHAPES, H, W, subject_mask, subject_region


def detected_colours(frames: torch.Tensor, tol: float = 0.35, min_pixels: int = 6) -> torch.Tensor:
    """frames [T, 3, H, W] in [-1, 1] -> bool [T, len(PALETTE)]: which subject colours each frame shows."""
    d = (frames[:, None] - PALETTE[None, :, :, None, None]).abs().amax(2)  # [T, P, H, W] (max-channel distance)
    return ((d < tol).flatten(2).sum(-1)) >= min_pixels


def true_colours(identity: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(len(PALETTE), dtype=torch.bool)
    mask[identity // len(SHAPES)] = True
    return mask


def identity_consistency(frames: torch.Tensor, identity: torch.Tensor) -> float:
    det = detected_colours(frames)
    n = int(det.sum())
    if n == 0:
        return float("nan")
    return float(det[:, true_colours(identity)].sum()) / n


def returning_recall(prefix: torch.Tensor, continuation: torch.Tensor, identity: torch.Tensor) -> float:
    seen = detected_colours(prefix).any(0) & true_colours(identity)
    if not seen.any():
        return float("nan")
    back = detected_colours(continuation).any(0)
    return float((back & seen).sum()) / float(seen.sum())


READOUT_TOL = 0.6
_PROJ = torch.randn(3 * 8 * 12, 64, generator=torch.Generator().manual_seed(1234)) / (3 * 8 * 12) ** 0.5


def frame_features(frames: torch.Tensor) -> torch.Tensor:
    pooled = torch.nn.functional.avg_pool2d(frames.float(), 4).flatten(1)  # [T, 3*8*12]
    f = (pooled - pooled.mean(1, keepdim=True)) @ _PROJ
    return torch.nn.functional.normalize(f, dim=1)


def subject_consistency(frames: torch.Tensor) -> float:
    f = frame_features(frames)
    if f.shape[0] < 2:
        return 1.0
    to_first = (f[1:] @ f[0]).mean()
    to_prev = (f[1:] * f[:-1]).sum(1).mean()
    return float((to_first + to_prev) / 2)


def rollout_error(latents: torch.Tensor, reference: torch.Tensor) -> float:
    return float((latents.float() - reference.float()).pow(2).mean())


def returning_pairs(visible: torch.Tensor, min_gap: int = 12, window: int = 6) -> torch.Tensor:
    """bool [T, S]: subject s is back in view at frame t after at least ``min_gap`` frames out of view, and t is
    among the first ``window`` frames of that return — the moments only a model that remembers can get right."""
    T, S = visible.shape
    out = torch.zeros(T, S, dtype=torch.bool)
    for s in range(S):
        last_seen, run_start = None, None
        for t in range(T):
            if visible[t, s]:
                if run_start is None:
                    run_start = t if (last_seen is not None and t - last_seen - 1 >= min_gap) else -1
                if run_start >= 0 and t - run_start < window:
                    out[t, s] = True
                last_seen = t
            else:
                run_start = None
    return out


def identity_recall(frames: torch.Tensor, identity: torch.Tensor, pairs: torch.Tensor) -> float:
    """Against ground truth: of the (frame, subject) pairs marked in ``pairs`` [T, S], the share where
    ``frames`` show that subject's colour (pixel read-out).  NaN when no pair is marked."""
    if not pairs.any():
        return float("nan")
    det = detected_colours(frames)  # [T, P]
    colour = identity // len(SHAPES)  # [S]
    shown = det[:, colour]  # [T, S]
    return float(shown[pairs].float().mean())


def subject_pixels(frame: torch.Tensor, identity: int, centre: torch.Tensor) -> torch.Tensor:
    """[3, n]: the pixels of ``frame`` [3, H, W] where the ground truth draws the subject with this identity
    centred at ``centre`` (y, x) — its shape clipped to the frame, as ``make_clip`` renders it."""
    rows, cols, m = subject_region(subject_mask(int(identity) % len(SHAPES)), float(centre[0]), float(centre[1]))
    return frame[:, rows, cols][:, m].float()


def subject_readout(frames: torch.Tensor, identity: torch.Tensor, centre: torch.Tensor,
                    visible: torch.Tensor) -> torch.Tensor:
    """long [T, S]: the palette colour (index) nearest to the mean colour of the pixels where the ground truth
    draws subject s in frame t (``subject_pixels``); -1 where the subject is not visible or that mean is no
    subject colour (max-channel distance to every palette colour >= ``READOUT_TOL``: the background's 9 x 9
    means are all >= 0.62 away, so a model that paints background there is not credited with whatever palette
    colour happens to be nearest)."""
    T, S = visible.shape
    out = torch.full((T, S), -1, dtype=torch.long)
    for t, s in visible.nonzero().tolist():
        mean = subject_pixels(frames[t], int(identity[s]), centre[t, s]).mean(1)  # [3]
        dist = (PALETTE - mean[None]).abs().amax(1)  # max-channel distance to each subject colour
        if float(dist.min()) < READOUT_TOL:
            out[t, s] = int(dist.argmin())
    return out


def subject_error(frames: torch.Tensor, truth: torch.Tensor, identity: torch.Tensor, centre: torch.Tensor,
                  pairs: torch.Tensor) -> list[float]:
    """Per marked (frame, subject) pair in ``pairs`` [T, S]: the mean squared pixel error of ``frames`` against
    ``truth`` on that subject's ground-truth pixels (``subject_pixels``)."""
    return [float((subject_pixels(frames[t], int(identity[s]), centre[t, s])
                   - subject_pixels(truth[t], int(identity[s]), centre[t, s])).pow(2).mean())
            for t, s in pairs.nonzero().tolist()]


def readout_hits(frames: torch.Tensor, identity: torch.Tensor, centre: torch.Tensor,
                 pairs: torch.Tensor) -> torch.Tensor:
    """bool [n]: for each (frame, subject) pair marked in ``pairs`` [T, S] (row-major order), whether
    ``subject_readout`` gives the subject's true colour."""
    read = subject_readout(frames, identity, centre, pairs)
    colour = (identity // len(SHAPES))[None].expand_as(read)
    return read[pairs] == colour[pairs]


def identity_readout_accuracy(frames: torch.Tensor, identity: torch.Tensor, centre: torch.Tensor,
                              pairs: torch.Tensor) -> float:
    """Of the (frame, subject) pairs marked in ``pairs`` [T, S] (e.g. ``returning_pairs``), the share where
    ``subject_readout`` gives the subject's true colour.  NaN when no pair is marked."""
    if not pairs.any():
        return float("nan")
    return float(readout_hits(frames, identity, centre, pairs).float().mean())


def subject_tokens(identity: int, centre: torch.Tensor, visible: torch.Tensor, token_grid: tuple[int, int],
                   min_cover: float = 0.25) -> torch.Tensor:
    """bool [T, gh, gw]: the latent tokens that show this subject in each frame — those whose pixel cell (the
    frame split into the model's ``token_grid``) the drawn subject covers by at least ``min_cover``.  For
    asking a cache policy what it kept of a subject (ground truth about the cache, not about the model)."""
    gh, gw = token_grid
    if H % gh or W % gw:
        raise ValueError(f"token grid {token_grid} does not tile the {H}x{W} frame")
    mask = subject_mask(int(identity) % len(SHAPES))
    out = torch.zeros(len(visible), gh, gw, dtype=torch.bool)
    for t in visible.nonzero().flatten().tolist():
        px = torch.zeros(H, W)
        rows, cols, m = subject_region(mask, float(centre[t, 0]), float(centre[t, 1]))
        px[rows, cols] = m.float()
        out[t] = px.reshape(gh, H // gh, gw, W // gw).mean((1, 3)) >= min_cover
    return out
