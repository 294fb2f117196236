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

Free rollouts, with no ground-truth alignment (a generated world cannot be compared with the truth pixel by pixel):

* ``drift_curve`` / ``drift_ratio``: per 24-frame window, the Fréchet distance of the window's features to a bank
  of real frames of training seeds (``drift_features``: pooled-frame principal components, high-frequency energy,
  contrast); last / first window says whether the rollout held its world.
* ``subject_sightings`` (colour, and shape where ``read_shape`` can read it), the ``World`` a rollout is judged
  against (``world_from_truth`` after a prefix, ``world_from_sightings`` from noise),
  ``returning_identity_consistency`` (do subjects that come back after a long absence belong to that world?),
  ``world_colour_consistency`` and ``colour_presence`` (the colour read-out).
* ``background_consistency``: VBench-style, on pixel features that leave the subjects out (not CLIP).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from ff_engine.errors import ConfigError
from model_adapters.world.procedural import PALETTE, SHAPES, TRAIN_SEEDS, H, W, make_clip, subject_mask, subject_region


def palette_distance(frames: torch.Tensor) -> torch.Tensor:
    """frames [T, 3, H, W] -> [T, len(PALETTE), H, W]: each pixel's max-channel distance to each subject colour
    (the one nearness every colour detector here uses)."""
    return (frames[:, None] - PALETTE[None, :, :, None, None]).abs().amax(2)


def detected_colours(frames: torch.Tensor, tol: float = 0.35, min_pixels: int = 6) -> torch.Tensor:
    """frames [T, 3, H, W] in [-1, 1] -> bool [T, len(PALETTE)]: which subject colours each frame shows."""
    return ((palette_distance(frames) < tol).flatten(2).sum(-1)) >= min_pixels


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
    return _vbench_consistency(frame_features(frames))


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


# ---- drift: how far generated frames are from real ones, with no ground-truth alignment ----------------------

DRIFT_WINDOW = 24  # frames per window: one training clip
DRIFT_COMPONENTS = 16
DRIFT_POOL = 8  # 32 x 48 -> 4 x 6 cells
DRIFT_BANK_SEEDS = tuple(TRAIN_SEEDS[50_000 + 997 * i] for i in range(50))  # training seeds, never evaluation ones
DRIFT_BANK_FRAMES = 40  # per bank seed: 50 x 40 = 2,000 real frames


@dataclass(frozen=True)
class DriftSpace:
    """The fixed feature space of ``drift_features`` and the real-frame Gaussian in it, fit once on the bank."""

    pooled_mean: torch.Tensor  # [72]
    components: torch.Tensor  # [DRIFT_COMPONENTS, 72] top principal directions of the bank's pooled frames
    component_std: torch.Tensor  # [DRIFT_COMPONENTS] the bank's spread along each
    extra_mean: torch.Tensor  # [6] high-frequency energy (3) and contrast (3) on the bank
    extra_std: torch.Tensor  # [6]
    bank_mean: torch.Tensor  # [D] float64, D = DRIFT_COMPONENTS + 6
    bank_cov: torch.Tensor  # [D, D] float64


def _drift_raw(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """frames [T, 3, H, W] -> (pooled [T, 72], extras [T, 6]): the 8 x 8 average-pooled frame; per channel the
    high-frequency energy mean |x - upsampled pooled x| (what patch-grid static and noise inflate) and the
    contrast, the std of the pooled cells (what a wash-out to a flat colour deflates)."""
    x = frames.float()
    pooled = torch.nn.functional.avg_pool2d(x, DRIFT_POOL)
    up = torch.nn.functional.interpolate(pooled, scale_factor=DRIFT_POOL, mode="nearest")
    high_freq = (x - up).abs().mean((2, 3))
    contrast = pooled.flatten(2).std(2)
    return pooled.flatten(1), torch.cat([high_freq, contrast], 1)


def _bank_frames() -> torch.Tensor:
    """[2000, 3, H, W] real frames of training seeds, each seed's 40 frames starting somewhere else in its pan."""
    return torch.cat([make_clip(s, DRIFT_BANK_FRAMES, start=(i * 37) % 240).frames
                      for i, s in enumerate(DRIFT_BANK_SEEDS)])


@functools.lru_cache(maxsize=1)
def drift_space() -> DriftSpace:
    """Fit the feature space and the bank Gaussian (deterministic; once per process, ~0.3 s)."""
    pooled, extras = _drift_raw(_bank_frames())
    mean = pooled.mean(0)
    _, s, v = torch.linalg.svd(pooled - mean, full_matrices=False)
    std = s[:DRIFT_COMPONENTS] / (len(pooled) - 1) ** 0.5
    space = DriftSpace(mean, v[:DRIFT_COMPONENTS], std, extras.mean(0), extras.std(0), torch.zeros(0), torch.zeros(0))
    f = _project(space, pooled, extras)
    return dataclasses.replace(space, bank_mean=f.mean(0), bank_cov=torch.cov(f.T))


def _project(space: DriftSpace, pooled: torch.Tensor, extras: torch.Tensor) -> torch.Tensor:
    z = (pooled - space.pooled_mean) @ space.components.T / space.component_std
    return torch.cat([z, (extras - space.extra_mean) / space.extra_std], 1).double()


def drift_features(frames: torch.Tensor) -> torch.Tensor:
    """frames [T, 3, H, W] in [-1, 1] -> [T, 22] float64: 16 principal-component scores of the pooled frame and the
    6 extras, each in units of the real bank's standard deviation (so every direction counts alike)."""
    return _project(drift_space(), *_drift_raw(frames))


def _sqrt_psd(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """Fréchet (2-Wasserstein) distance between two Gaussians: |mu1 - mu2|^2 + Tr(C1 + C2 - 2 (C2^1/2 C1 C2^1/2)^1/2).
    Written here because the libraries that compute it (torchmetrics' FID, pytorch-fid) bind it to Inception
    features; the symmetric form needs only ``eigh`` of PSD matrices (no non-symmetric ``sqrtm``)."""
    r = _sqrt_psd(cov2)
    cross = torch.trace(_sqrt_psd(r @ cov1 @ r))
    return float((mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * cross)


def drift_curve(frames: torch.Tensor, window: int = DRIFT_WINDOW) -> list[float]:
    """Per consecutive ``window``-frame window of ``frames`` [T, 3, H, W] (a trailing partial window is dropped):
    the Fréchet distance between a Gaussian fit to the window's ``drift_features`` and the real-frame Gaussian of
    the bank (2,000 frames of 50 training seeds).  Lower = more like real frames of this world family.

    Design (fixed on training seeds before any evaluation): a window of one real world is itself far from the
    bank (one panorama among many), so a real clip's windows score about 20–45 — the *ratio* of a rollout's
    last to first window is what says whether it drifted.  The 16 whitened principal components alone cannot
    see a wash-out (a flat frame near the mean of all worlds is *closer* to the bank than any real view) nor
    fine static; the 3 high-frequency and 3 contrast features can.  On 40 training-seed ground-truth clips of
    240 frames the last/first ratio has median 0.97 (range 0.55–1.68): compare means over seeds, not single
    clips.  The second half replaced by uniform noise gives ~19x, by 4 x 4-patch static (std 0.3) ~3x, by a
    flat colour ~4x."""
    if window < 2 or frames.shape[0] < window:
        raise ConfigError(f"drift_curve needs window >= 2 and at least window frames, got window={window}, "
                          f"{frames.shape[0]} frames")
    space, f = drift_space(), drift_features(frames)
    out = []
    for t in range(0, f.shape[0] - window + 1, window):
        w = f[t:t + window]
        out.append(frechet_distance(w.mean(0), torch.cov(w.T), space.bank_mean, space.bank_cov))
    return out


def drift_ratio(curve: list[float]) -> float:
    """Last window's drift over the first's (1 = held the world as well as at the start)."""
    return curve[-1] / curve[0] if curve and curve[0] > 0 else float("nan")


# ---- subjects of a free rollout: who the world's subjects are, and whether the ones that come back are them ---

SHAPE_CANVAS = 11  # subject masks are 9 x 9; a readable blob's bounding box is 7..11 pixels on each side
SHAPE_MIN_IOU, SHAPE_MIN_MARGIN = 0.7, 0.08  # square vs disc overlap 0.85, so a read needs a clear margin


def _centred(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask's bounding box, centred on a SHAPE_CANVAS x SHAPE_CANVAS canvas."""
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    box = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    out = torch.zeros(SHAPE_CANVAS, SHAPE_CANVAS, dtype=torch.bool)
    y, x = (SHAPE_CANVAS - box.shape[0]) // 2, (SHAPE_CANVAS - box.shape[1]) // 2
    out[y:y + box.shape[0], x:x + box.shape[1]] = box
    return out


_SHAPE_TEMPLATES = torch.stack([_centred(subject_mask(s)) for s in range(len(SHAPES))])  # [3, 11, 11]


def read_shape(mask: torch.Tensor) -> int:
    """The shape (index into SHAPES) of a subject drawn as the pixels ``mask`` [H, W], or -1 when it cannot be
    read: the pixels do not form one compact 7..11-pixel box away from the frame's border (cut by the border,
    occluded, scattered over the frame), or no template fits it clearly (IoU >= 0.7, 0.08 ahead of the next)."""
    if not mask.any():
        return -1
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    h, w = int(rows[-1] - rows[0]) + 1, int(cols[-1] - cols[0]) + 1
    inside = rows[0] > 0 and cols[0] > 0 and rows[-1] < mask.shape[0] - 1 and cols[-1] < mask.shape[1] - 1
    if not inside or not (7 <= h <= SHAPE_CANVAS and 7 <= w <= SHAPE_CANVAS):
        return -1
    m = _centred(mask)
    iou = (m & _SHAPE_TEMPLATES).flatten(1).sum(1) / (m | _SHAPE_TEMPLATES).flatten(1).sum(1)
    top = iou.topk(2)
    ok = float(top.values[0]) >= SHAPE_MIN_IOU and float(top.values[0] - top.values[1]) >= SHAPE_MIN_MARGIN
    return int(top.indices[0]) if ok else -1


SIGHTING_TOL, SIGHTING_MIN_PIXELS = 0.5, 4  # looser than detected_colours': generated subjects are paler/smaller
SIGHTING_BOX, SIGHTING_COMPACT = 11, 0.5  # a subject is one blob: half its colour's pixels in one 11 x 11 box
NUM_SUBJECTS = 2  # every procedural world has two subjects (make_clip)


def subject_sightings(frames: torch.Tensor, tol: float = SIGHTING_TOL,
                      min_pixels: int = SIGHTING_MIN_PIXELS) -> tuple[torch.Tensor, torch.Tensor]:
    """What a free rollout draws, with no ground truth: (colours bool [T, P], shapes long [T, P]: ``read_shape`` of
    the colour's pixels, -1 where not detected or not readable).  A frame shows a subject of palette colour p when
    at least ``min_pixels`` pixels within ``tol`` (max-channel) of p lie in one ``SIGHTING_BOX``-square box and
    that box holds at least half of all of p's pixels in the frame: one compact blob, as a subject is (9 x 9),
    not coloured static scattered over a frame that has fallen apart.  The tolerance is looser than
    ``detected_colours``' 0.35 because a model draws subjects paler than the palette; on real frames of 20
    training seeds no background pixel group passes up to 0.5 (1 % of frames at 0.55)."""
    near = palette_distance(frames) < tol  # [T, P, H, W]
    T, P = near.shape[:2]
    box = torch.nn.functional.avg_pool2d(near.float().reshape(T * P, 1, H, W), SIGHTING_BOX, stride=1,
                                         padding=SIGHTING_BOX // 2, count_include_pad=True)
    densest = (box.amax((1, 2, 3)) * SIGHTING_BOX**2).round().reshape(T, P)
    colours = (densest >= min_pixels) & (densest >= SIGHTING_COMPACT * near.flatten(2).sum(-1))
    shapes = torch.full(colours.shape, -1, dtype=torch.long)
    for t, p in colours.nonzero().tolist():
        shapes[t, p] = read_shape(near[t, p])
    return colours, shapes


@dataclass(frozen=True)
class World:
    """The subjects a free rollout is judged against: ``subjects`` {colour: shape, -1 if never readable} and
    ``known_from`` {colour: the frame from which that subject counts as known — its returns are scored after it}."""

    subjects: dict[int, int]
    known_from: dict[int, int]


def world_from_truth(identity: torch.Tensor, prefix: int) -> World:
    """The world of a rollout from a ground-truth prefix of ``prefix`` frames: the clip's subjects
    (``Clip.identity``), known from the end of the prefix — all of them, also one the prefix does not show, so the
    ground truth's own continuation scores 1.0 (a model can only guess such a subject: chance credit, the same
    for every policy)."""
    subjects = {int(i) // len(SHAPES): int(i) % len(SHAPES) for i in identity.tolist()}
    return World(subjects, dict.fromkeys(subjects, prefix))


def world_from_sightings(colours: torch.Tensor, shapes: torch.Tensor, num_subjects: int = NUM_SUBJECTS,
                         min_frames: int = 3, window: int = DRIFT_WINDOW) -> World:
    """The world of a rollout from pure noise, defined by its first detections: the first ``num_subjects`` colours
    to be *established* — detected in ``min_frames`` frames within ``window`` consecutive frames (one sighting
    is a fleck, not a subject) — each known from the frame where that happens, with the shape read most often
    up to then (-1 if none was readable)."""
    known = {}
    for t in range(colours.shape[0]):
        recent = colours[max(0, t - window + 1):t + 1].sum(0)
        for p in ((recent >= min_frames) & colours[t]).nonzero().flatten().tolist():
            if p not in known and len(known) < num_subjects:
                known[p] = t
    subjects = {}
    for p, t in known.items():
        read = shapes[:t + 1, p]
        read = read[read >= 0]
        subjects[p] = int(read.mode().values) if read.numel() else -1
    return World(subjects, known)


def appearances(colours: torch.Tensor, min_gap: int, start: int = 0) -> list[tuple[int, int]]:
    """(frame, colour) where a colour is detected after at least ``min_gap`` frames without it — a subject
    coming into view (back, or for the first time).  Only frames t >= max(start, min_gap) count, so every
    event has a full ``min_gap``-frame look-back."""
    T, _ = colours.shape
    out = []
    for t in range(max(start, min_gap), T):
        for p in colours[t].nonzero().flatten().tolist():
            if not colours[t - min_gap:t, p].any():
                out.append((t, p))
    return out


def returning_events(colours: torch.Tensor, world: World, min_gap: int) -> list[tuple[int, int]]:
    """The ``appearances`` a returning-subject score counts: from the first frame a world subject is known, and
    for a world colour only after it is known (the detections that defined it are no return)."""
    if not world.known_from:
        return []
    start = min(world.known_from.values())
    return [(t, p) for t, p in appearances(colours, min_gap, start) if t > world.known_from.get(p, -1)]


def returning_identity_consistency(colours: torch.Tensor, shapes: torch.Tensor, world: World,
                                   min_gap: int = DRIFT_WINDOW) -> float:
    """Returning-subject identity consistency of a free rollout (``subject_sightings``): of the moments a subject
    comes into view after at least ``min_gap`` frames in which its identity was not seen (``returning_events``),
    the share where it is one of the ``world``'s subjects — its colour is a world colour and, where both the
    sighting's and the world subject's shape are readable, the shape matches.  A world subject coming back as
    itself counts as consistent; one coming back in another colour or shape, or a subject the world never had,
    as not.  NaN when nothing comes into view (or the world has no subject).

    ``world``: ``world_from_truth`` for a rollout from a ground-truth prefix, ``world_from_sightings`` for one
    from pure noise (its first established subjects are the world's)."""
    events = returning_events(colours, world, min_gap)
    if not events:
        return float("nan")
    subj = world.subjects
    ok = [p in subj and (int(shapes[t, p]) < 0 or subj[p] < 0 or int(shapes[t, p]) == subj[p]) for t, p in events]
    return sum(ok) / len(ok)


def world_colour_consistency(colours: torch.Tensor, world: World) -> float:
    """``identity_consistency`` against a ``World``: the share of detected subjects (frame, colour) whose colour
    is a world colour.  NaN when nothing is detected."""
    n = int(colours.sum())
    return float(colours[:, sorted(world.subjects)].sum()) / n if n else float("nan")


def colour_presence(colours: torch.Tensor, world: World, window: int = DRIFT_WINDOW) -> dict:
    """The colour read-out of a rollout: per palette colour the frames that show it; the share of frames showing
    at least one world subject (overall and per ``window``-frame window: does the world keep its subjects?) and
    the share showing a colour the world does not have."""
    mask = torch.zeros(colours.shape[1], dtype=torch.bool)
    mask[sorted(world.subjects)] = True
    shows_world = colours[:, mask].any(1).float()
    return {"frames_per_colour": colours.sum(0).tolist(),
            "world_presence": float(shows_world.mean()),
            "world_presence_curve": [float(shows_world[t:t + window].mean())
                                     for t in range(0, len(shows_world) - window + 1, window)],
            "foreign_presence": float(colours[:, ~mask].any(1).float().mean())}


# ---- VBench-style background consistency -----------------------------------------------------------------------

def background_features(frames: torch.Tensor, tol: float = 0.35) -> torch.Tensor:
    """[T, 64] unit vectors that weight the background: the frame 4x-average-pooled over its *non-subject* pixels
    only (pixels within ``tol`` of a palette colour are left out; a cell with none left takes the frame's mean
    background colour), centred, through ``frame_features``' fixed random projection.  VBench uses CLIP image
    features here; these are pixel features, *not* CLIP, so only comparisons between policies mean much."""
    x = frames.float()
    keep = (palette_distance(x) >= tol).all(1, keepdim=True).float()
    mass = torch.nn.functional.avg_pool2d(keep, 4)
    pooled = torch.nn.functional.avg_pool2d(x * keep, 4) / mass.clamp_min(1e-6)
    mean = (x * keep).sum((2, 3), keepdim=True) / keep.sum((2, 3), keepdim=True).clamp_min(1)
    pooled = torch.where(mass > 0, pooled, mean).flatten(1)
    return torch.nn.functional.normalize((pooled - pooled.mean(1, keepdim=True)) @ _PROJ, dim=1)


def _vbench_consistency(f: torch.Tensor) -> float:
    """VBench's consistency of unit feature vectors [T, D]: mean over frames t >= 1 of (cos(f_t, f_0) +
    cos(f_t, f_{t-1})) / 2."""
    if f.shape[0] < 2:
        return 1.0
    return float(((f[1:] @ f[0]) + (f[1:] * f[:-1]).sum(1)).mean() / 2)


def background_consistency(frames: torch.Tensor) -> float:
    """VBench-style background consistency (frame-to-first and frame-to-previous similarity) on
    ``background_features``."""
    return _vbench_consistency(background_features(frames))
