"""Free-rollout metrics of ``model_adapters.world.metrics``: drift (no ground-truth alignment), subjects read from
generated frames (colour, shape, returning-subject identity) and VBench-style background consistency."""

import math

import pytest
import torch

from ff_engine.errors import ConfigError
from model_adapters.world import metrics as M
from model_adapters.world.procedural import EVAL_SEED_BASE, PALETTE, SHAPES, H, W, make_clip


def test_frechet_distance_of_known_gaussians():
    one = torch.ones(1, 1, dtype=torch.float64)
    assert M.frechet_distance(torch.zeros(1), one, torch.zeros(1), one) == pytest.approx(0.0, abs=1e-9)
    # N(0, 1) vs N(1, 4): 1 + 1 + 4 - 2 * 2 = 2
    assert M.frechet_distance(torch.zeros(1), one, torch.ones(1), 4 * one) == pytest.approx(2.0)


def test_ground_truth_holds_its_world_by_the_drift_metric():
    """Real video of held-out worlds: the mean drift curve is flat (last / first ~ 1), single clips scatter."""
    curves = torch.tensor([M.drift_curve(make_clip(EVAL_SEED_BASE + k, 240).frames) for k in range(16)])
    assert curves.shape == (16, 10) and bool((curves > 0).all())
    mean = curves.mean(0)
    assert 0.85 <= float(mean[-1] / mean[0]) <= 1.18
    assert 0.8 <= float((curves[:, -1] / curves[:, 0]).mean()) <= 1.25
    assert float(mean.max() / mean.min()) < 1.3  # no window of real video drifts


def test_a_clip_that_turns_into_noise_or_static_or_a_flat_colour_drifts():
    clip = make_clip(EVAL_SEED_BASE + 1, 240).frames
    g = torch.Generator().manual_seed(0)
    noise = clip.clone()
    noise[120:] = torch.rand(120, 3, H, W, generator=g) * 2 - 1
    static = clip.clone()  # the patch-grid look of a drifting model: 4 x 4-pixel blocks of noise on the frame
    static[120:] += 0.3 * torch.randn(120, 3, H // 4, W // 4, generator=g).repeat_interleave(4, 2).repeat_interleave(4, 3)
    flat = clip.clone()
    flat[120:] = clip[120:].mean((0, 2, 3), keepdim=True)
    base = M.drift_curve(clip)
    for bad, ratio, above in ((noise, 5.0, 3.0), (static.clamp(-1, 1), 1.5, 1.2), (flat, 2.0, 1.5)):
        curve = M.drift_curve(bad)
        assert curve[:5] == pytest.approx(base[:5])  # the first half is the same video
        assert M.drift_ratio(curve) > ratio  # the criterion (last window <= 1.5x the first) fails
        assert min(curve[5:]) > above * max(base)  # every bad window is further than any real one


def test_drift_curve_rejects_too_few_frames():
    with pytest.raises(ConfigError, match="window"):
        M.drift_curve(torch.zeros(10, 3, H, W))
    assert len(M.drift_curve(torch.zeros(50, 3, H, W))) == 2  # a trailing partial window is dropped
    assert math.isnan(M.drift_ratio([]))


def _draw(shape: int, colour: int, y: int, x: int, frame: torch.Tensor | None = None) -> torch.Tensor:
    frame = torch.full((3, H, W), -0.2) if frame is None else frame
    m = M.subject_mask(shape)
    frame[:, y:y + 9, x:x + 9][:, m] = PALETTE[colour][:, None]
    return frame


def test_read_shape_reads_whole_subjects_and_refuses_cut_ones():
    for s in range(len(SHAPES)):
        px = _draw(s, 0, 10, 20)
        colours, shapes = M.subject_sightings(px[None])
        assert colours[0].nonzero().flatten().tolist() == [0] and int(shapes[0, 0]) == s
    cut = torch.zeros(H, W, dtype=torch.bool)
    cut[10:19, W - 5:] = True  # a square with only 5 columns in view
    assert M.read_shape(cut) == -1
    scattered = torch.zeros(H, W, dtype=torch.bool)
    scattered[2, 2] = scattered[20, 30] = True
    assert M.read_shape(scattered) == -1 and M.read_shape(torch.zeros(H, W, dtype=torch.bool)) == -1


def test_coloured_static_is_no_subject_but_a_subject_among_it_is():
    frame = torch.full((3, H, W), -0.2)
    scattered = torch.randperm(H * W, generator=torch.Generator().manual_seed(0))[:60]
    frame.view(3, -1)[:, scattered] = PALETTE[0][:, None]  # 60 red pixels spread over the frame: static
    assert not M.subject_sightings(frame[None])[0].any()
    colours, _ = M.subject_sightings(_draw(1, 0, 10, 20, frame.clone())[None])  # plus a red disc
    assert colours[0].nonzero().flatten().tolist() == [0]


def test_sightings_of_ground_truth_read_the_true_shapes():
    clip = make_clip(EVAL_SEED_BASE + 3, 120)
    colours, shapes = M.subject_sightings(clip.frames)
    truth = {int(i) // len(SHAPES): int(i) % len(SHAPES) for i in clip.identity}
    read = [(p, int(shapes[t, p])) for t, p in colours.nonzero().tolist() if shapes[t, p] >= 0]
    assert len(read) > 10 and all(p in truth and s == truth[p] for p, s in read)


def _track(events: dict[int, list[int]], T: int = 60, P: int = len(PALETTE)):
    """colours [T, P] detected over the given frame lists; shapes unreadable unless set by the caller."""
    colours = torch.zeros(T, P, dtype=torch.bool)
    for p, frames in events.items():
        colours[frames, p] = True
    return colours, torch.full((T, P), -1, dtype=torch.long)


def test_returning_identity_consistency_counts_who_comes_back():
    world = M.World({0: 1, 2: -1}, {0: 2, 2: 6})  # colour 0 is a disc; colour 2's shape was never readable
    colours, shapes = _track({0: [0, 1, 2, *range(40, 45)], 2: [5, 6]})
    assert M.returning_events(colours, world, min_gap=24) == [(40, 0)]
    assert M.returning_identity_consistency(colours, shapes, world, min_gap=24) == 1.0  # the disc is back
    shapes[40, 0] = 0  # ...but read as a square: another subject in the world's colour
    assert M.returning_identity_consistency(colours, shapes, world, min_gap=24) == 0.0
    colours, shapes = _track({0: [0, 1, 2, *range(40, 45)], 4: [50, 51]})  # and a colour the world never had
    assert M.returning_identity_consistency(colours, shapes, world, min_gap=24) == 0.5
    assert math.isnan(M.returning_identity_consistency(*_track({0: list(range(60))}), world, min_gap=24))
    assert math.isnan(M.returning_identity_consistency(colours, shapes, M.World({}, {}), min_gap=24))


def test_the_first_established_subjects_define_a_world_from_noise():
    colours, shapes = _track({1: [30, 31, 35, 70], 3: [7], 5: [40, 50, 60, 100], 0: [80, 81, 82]}, T=110)
    shapes[30:32, 1] = 2
    world = M.world_from_sightings(colours, shapes, num_subjects=2, min_frames=3, window=24)
    # colour 3 is a fleck; colour 0 comes third, when the world already has its two subjects
    assert world == M.World({1: 2, 5: -1}, {1: 35, 5: 60})
    # counted: colour 1 back at 70 (yes), colour 0 at 80 (foreign), colour 5 back at 100 (yes); not colour 5's
    # first appearance at 40, which is part of what defined it
    assert M.returning_events(colours, world, min_gap=24) == [(70, 1), (80, 0), (100, 5)]
    assert M.returning_identity_consistency(colours, shapes, world, min_gap=24) == pytest.approx(2 / 3)


def test_ground_truth_continuations_are_consistent_with_their_world():
    for k in range(4):
        clip = make_clip(EVAL_SEED_BASE + k, 264)
        colours, shapes = M.subject_sightings(clip.frames)
        world = M.world_from_truth(clip.identity, prefix=24)
        got = M.returning_identity_consistency(colours, shapes, world, 24)
        assert got == 1.0 or math.isnan(got)
        assert M.world_colour_consistency(colours, world) == 1.0  # the looser sighting tolerance sees no foreign subject


def test_colour_presence_reads_world_and_foreign_colours():
    colours, _ = _track({0: list(range(24)), 5: list(range(24, 36))}, T=48)
    out = M.colour_presence(colours, M.World({0: 0}, {0: 0}), window=24)
    assert out["world_presence"] == 0.5 and out["foreign_presence"] == 0.25
    assert out["world_presence_curve"] == [1.0, 0.0] and out["frames_per_colour"][5] == 12


def test_background_consistency_ignores_moving_subjects():
    """A subject crossing a still scene: the whole-frame features change, the background features do not."""
    scene = make_clip(EVAL_SEED_BASE + 3, 1).frames[0]
    scene = scene.clamp(-0.5, 0.5)  # no palette colour in the scene itself
    frames = torch.stack([_draw(0, 1, 12, 2 + 3 * t, scene.clone()) for t in range(12)])
    assert M.background_consistency(frames) > 0.95  # (cells the subject covers whole take the mean background)
    assert M.subject_consistency(frames) < M.background_consistency(frames) - 0.1
    assert M.background_consistency(frames[:1]) == 1.0
