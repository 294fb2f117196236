"""World v4: a scroll world whose camera is steered by actions and whose every frame after the prefix is known.

A seamless cyclic panorama (sky, ground, landmarks, subjects with an identity = shape x colour, all fixed in world
coordinates) is seen through a 48-pixel-wide camera.  Each frame's action is the camera's velocity into that frame:
``stay`` (0), ``left`` (-2 px) or ``right`` (+2 px).  With 4-pixel tokens the camera moves half a token per frame
and a whole token every two frames, so *continuing* content is a shifted copy of what was just seen.  After a prefix
that pans over the whole panorama (``PREFIX_FRAMES``), every later frame is determined by what was seen: content
that comes back into view after tens of frames out of it (*returning* content: landmarks, subjects) can only come
from the cache.  That is the test bed cache policies need: an unbounded cache can reproduce everything, a window
shorter than a lap must invent what it evicted.

Frames are 32 x 48 RGB in [-1, 1] with the v3 world's codec (``procedural.encode`` / ``decode``: 2 x 2
space-to-depth, lossless).  Ground truth per frame: camera position, each subject's identity, centre and
visibility (the same ``Clip`` fields the metrics read, plus ``camera`` and ``actions``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ff_engine.actions import parse_actions as _parse_actions
from model_adapters.world.procedural import PALETTE, SHAPES, identity_of, subject_mask

H, W = 32, 48
PANORAMA_W = 192  # four views; a lap at full speed is 96 frames
STEP_PX = 2  # camera step per frame at full speed
ACTIONS = ("stay", "left", "right")  # the model's action vocabulary; index 0 is the default (no input)
VELOCITY = (0, -1, 1)  # camera steps per frame of each action
NUM_SUBJECTS = 2
SUBJECT_SIZE = 9
# the smallest whole number of 3-frame blocks whose rightward pan shows every column of the panorama
PREFIX_FRAMES = 3 * math.ceil(((PANORAMA_W - W) // STEP_PX + 1) / 3)
TRAIN_SEEDS = range(100_000)
EVAL_SEED_BASE = 1_000_000  # held-out seeds start here; training never draws from them


@dataclass
class ScrollClip:
    frames: torch.Tensor  # [T, 3, H, W] in [-1, 1]
    identity: torch.Tensor  # [S] identity id per subject
    centre: torch.Tensor  # [T, S, 2] (y, x) in frame pixels
    visible: torch.Tensor  # [T, S] bool (at least a 3 x 3 piece in view)
    camera: torch.Tensor  # [T] left edge of the view in panorama pixels (mod PANORAMA_W)
    actions: torch.Tensor  # [T] action index per frame


@dataclass(frozen=True)
class World:
    """A seed's panorama and where its subjects stand."""

    panorama: torch.Tensor  # [3, H, PANORAMA_W]
    identity: torch.Tensor  # [S]
    subject_xy: torch.Tensor  # [S, 2] (y, x) centre in panorama pixels
    camera0: int  # the camera's left edge in the first frame


def _seamless_wave(g: torch.Generator, x: torch.Tensor) -> torch.Tensor:
    """A sum of two sinusoids with whole numbers of periods over the panorama: the cyclic seam is invisible."""
    k = torch.randint(1, 4, (2,), generator=g)
    p = 2 * math.pi * torch.rand(2, generator=g)
    return (torch.sin(2 * math.pi * k[0] * x + p[0]) + 0.5 * torch.sin(2 * math.pi * k[1] * x + p[1])) / 1.5


def _backdrop(g: torch.Generator) -> tuple[torch.Tensor, int]:
    """Muted sky and ground with flat colour bands (real frames are mostly flat with sharp edges)."""
    x = torch.arange(PANORAMA_W, dtype=torch.float32) / PANORAMA_W
    pano = torch.zeros(3, H, PANORAMA_W)
    sky = 0.25 * (torch.rand(3, generator=g) - 0.5) + torch.tensor([0.1, 0.25, 0.5])
    ground = 0.3 * (torch.rand(3, generator=g) - 0.5) + torch.tensor([-0.25, -0.1, -0.45])
    horizon = int(H * (0.6 + 0.15 * torch.rand(1, generator=g)))
    hills = (horizon - 3 - 3 * (_seamless_wave(g, x) + 1)).round().long()  # a skyline of the world's own shape
    rows = torch.arange(H)[:, None]
    pano[:] = sky[:, None, None]
    pano[:, (rows >= hills[None, :]) & (rows < horizon)] = (0.5 * sky + 0.5 * ground)[:, None]
    pano[:, horizon:] = ground[:, None, None]
    return pano, horizon


def _landmarks(g: torch.Generator, pano: torch.Tensor, horizon: int, count: int = 7) -> None:
    """Posts and blocks of distinct tones standing on the horizon, wrapping around the seam."""
    for _ in range(count):
        w = int(3 + 9 * torch.rand(1, generator=g))
        h = int(5 + 12 * torch.rand(1, generator=g))
        x0 = int(PANORAMA_W * torch.rand(1, generator=g))
        tone = (torch.rand(1, generator=g) * 1.4 - 0.7).expand(3) + 0.2 * (torch.rand(3, generator=g) - 0.5)
        cols = torch.arange(x0, x0 + w) % PANORAMA_W
        pano[:, horizon - h:horizon, cols] = tone[:, None, None]
        if w >= 6:  # a window: a landmark is recognisable by its inside, not only by its outline
            pano[:, horizon - h + 2:horizon - h + 4, cols[2:-2]] = (-tone)[:, None, None]


def make_world(seed: int, num_subjects: int = NUM_SUBJECTS) -> World:
    """The world of one seed (deterministic): panorama with landmarks and subjects spread around the lap."""
    g = torch.Generator().manual_seed(seed)
    pano, horizon = _backdrop(g)
    _landmarks(g, pano, horizon)
    colours = torch.randperm(len(PALETTE), generator=g)[:num_subjects]
    shapes = torch.randint(len(SHAPES), (num_subjects,), generator=g)
    identity = torch.tensor([identity_of(int(c), int(s)) for c, s in zip(colours, shapes)])
    offset = float(PANORAMA_W * torch.rand(1, generator=g))
    xy = torch.empty(num_subjects, 2)
    for i in range(num_subjects):  # evenly spread (jittered): each subject leaves the view for tens of frames
        xy[i, 1] = (offset + PANORAMA_W * (i + 0.3 * float(torch.rand(1, generator=g))) / num_subjects) % PANORAMA_W
        xy[i, 0] = 6 + (horizon - 10) * float(torch.rand(1, generator=g))
        mask = subject_mask(int(shapes[i]), SUBJECT_SIZE)
        r0, c0 = round(float(xy[i, 0])) - SUBJECT_SIZE // 2, round(float(xy[i, 1])) - SUBJECT_SIZE // 2
        rows = torch.arange(r0, r0 + SUBJECT_SIZE).clamp(0, H - 1)
        cols = torch.arange(c0, c0 + SUBJECT_SIZE) % PANORAMA_W
        patch = pano[:, rows][:, :, cols]
        patch[:, mask] = PALETTE[colours[i]][:, None]
        pano[:, rows[:, None], cols[None, :]] = patch
    camera0 = STEP_PX * int(torch.randint(PANORAMA_W // STEP_PX, (1,), generator=g))
    return World(pano.clamp(-1, 1), identity, xy, camera0)


def camera_path(camera0: int, actions: torch.Tensor) -> torch.Tensor:
    """Left edge of the view per frame: frame 0 at ``camera0``, frame t moved by frame t's action (mod the lap)."""
    steps = torch.tensor(VELOCITY)[actions.long()] * STEP_PX
    steps[0] = 0
    return (camera0 + torch.cumsum(steps, 0)) % PANORAMA_W


def render(world: World, actions: torch.Tensor) -> ScrollClip:
    """The frames the camera sees under ``actions`` [T] (indices into ``ACTIONS``), with their ground truth."""
    actions = torch.as_tensor(actions, dtype=torch.long)
    cam = camera_path(world.camera0, actions)
    cols = (cam[:, None] + torch.arange(W)[None, :]) % PANORAMA_W  # [T, W]
    frames = world.panorama[:, :, cols].permute(2, 0, 1, 3).contiguous()  # [3, H, T, W] -> [T, 3, H, W]
    fx = (world.subject_xy[None, :, 1] - cam[:, None].float()) % PANORAMA_W  # [T, S]
    fx = torch.where(fx > PANORAMA_W - SUBJECT_SIZE, fx - PANORAMA_W, fx)  # entering from the left edge
    centre = torch.stack([world.subject_xy[None, :, 0].expand_as(fx), fx], dim=-1)
    half = SUBJECT_SIZE // 2
    lo, hi = (fx.round() - half).clamp(min=0), (fx.round() + half + 1).clamp(max=W)
    visible = (hi - lo) >= 3
    return ScrollClip(frames, world.identity, centre, visible, cam, actions)


def make_clip(seed: int, actions, num_subjects: int = NUM_SUBJECTS) -> ScrollClip:
    return render(make_world(seed, num_subjects), torch.as_tensor(actions, dtype=torch.long))


# ---- action scripts -------------------------------------------------------------------------------------------
def parse_actions(script: str, names: tuple[str, ...] = ACTIONS, max_frames: int = 1_000_000) -> list[int]:
    """``ff_engine.actions.parse_actions`` with this world's action names by default."""
    return _parse_actions(script, names, max_frames)


def prefix_actions(frames: int = PREFIX_FRAMES) -> list[int]:
    """The prefix's actions: a rightward pan (frame 0's action moves nothing) that shows the whole panorama."""
    return [ACTIONS.index("right")] * frames


def random_actions(g: torch.Generator, frames: int, mean_run: float = 24.0) -> list[int]:
    """Runs of one action with geometric-ish lengths (3 .. ~3 * mean_run frames): moving most of the time
    (right 0.45, left 0.35, stay 0.2), so clips see laps, reversals and pauses."""
    out: list[int] = []
    probs = torch.tensor([0.2, 0.35, 0.45])
    while len(out) < frames:
        a = int(torch.multinomial(probs, 1, generator=g))
        n = 3 + int(-mean_run * math.log(max(1e-6, float(torch.rand(1, generator=g)))))
        out += [a] * n
    return out[:frames]


def steady_script(frames: int, direction: str = "right") -> list[int]:
    """Steady laps in one direction."""
    return [ACTIONS.index(direction)] * frames


def back_and_forth_script(g: torch.Generator, frames: int) -> list[int]:
    """Back and forth with random gaps: a run right or left of 48-144 frames, a pause of 0-24, the other way."""
    out: list[int] = []
    direction = int(torch.randint(1, 3, (1,), generator=g))
    while len(out) < frames:
        out += [direction] * int(torch.randint(48, 145, (1,), generator=g))
        out += [0] * int(torch.randint(0, 25, (1,), generator=g))
        direction = 3 - direction
    return out[:frames]


# ---- which content returns ------------------------------------------------------------------------------------
def stint_gaps(camera: torch.Tensor) -> torch.Tensor:
    """[T, W]: for each frame's pixel column, how many frames its world column had been out of view before the
    current continuous stint in view began (1 while it never left; a huge number when first seen in this stint).
    Content that entered the view after a long absence stays *returning* while it remains in view: a model that got
    it wrong on its return copies the mistake forward, so the whole stint is scored as returning content."""
    T = camera.shape[0]
    seen = torch.full((PANORAMA_W,), -10**6, dtype=torch.long)
    gap = torch.full((PANORAMA_W,), 10**6, dtype=torch.long)
    out = torch.empty(T, W, dtype=torch.long)
    for t in range(T):
        cols = (camera[t] + torch.arange(W)) % PANORAMA_W
        away = t - seen[cols]
        gap[cols] = torch.where(away > 1, away, gap[cols])
        out[t] = gap[cols]
        seen[cols] = t
    return out


def returning_columns(camera: torch.Tensor, min_gap: int = 24) -> torch.Tensor:
    """[T, W] bool: pixel columns in a stint that began with a return after at least ``min_gap`` frames out of view
    (content seen before, then away): what only a cache that kept it can reproduce."""
    gap = stint_gaps(camera)
    return (gap >= min_gap) & (gap < 10**5)


# ---- does a video follow its actions --------------------------------------------------------------------------
def camera_shift(a: torch.Tensor, b: torch.Tensor, max_shift: int = 4) -> int:
    """The horizontal shift s (pixels, last axis = width) that best aligns frame ``b`` with frame ``a``: the
    camera moved right by s between them (``right``: +2, ``left``: -2, ``stay``: 0 in this world); among equally good
    shifts (a featureless picture) the smallest."""
    def err(s: int) -> float:
        if s >= 0:
            return float((a[..., s:] - b[..., : b.shape[-1] - s]).pow(2).mean())
        return float((a[..., : a.shape[-1] + s] - b[..., -s:]).pow(2).mean())

    return min(range(-max_shift, max_shift + 1), key=lambda s: (round(err(s), 9), abs(s)))  # a tie: the least motion


def mean_camera_shift(frames: torch.Tensor) -> float:
    """Mean ``camera_shift`` between consecutive frames of ``frames`` [T, ..., W] (px/frame; T >= 2)."""
    if frames.shape[0] < 2:
        raise ValueError(f"need at least 2 frames to estimate a shift, got {frames.shape[0]}")
    shifts = [camera_shift(frames[i - 1], frames[i]) for i in range(1, frames.shape[0])]
    return sum(shifts) / len(shifts)
