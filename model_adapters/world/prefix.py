"""The ground truth of the world a world model was trained on: what ``generate`` prefills and compares against.

A world model is recognised by its decoder (``world-codec``) and its action vocabulary: the scroll world's
(``scroll.ACTIONS``) is world v4, none is the procedural pan world of v2/v3.  Other models have no world here.
"""

from __future__ import annotations

import torch

from model_adapters.world import procedural, scroll


def world_seed(seed: int) -> int:
    """The world ``generate --seed`` shows: a held-out one (training draws seeds below ``EVAL_SEED_BASE``)."""
    return scroll.EVAL_SEED_BASE + seed


def world_of(cfg) -> str | None:
    """"scroll", "procedural" or None (not an in-repo world model)."""
    if getattr(cfg, "decoder", None) != "world-codec":
        return None
    return "scroll" if tuple(getattr(cfg, "actions", ()) or ()) == scroll.ACTIONS else "procedural"


def default_prefix_frames(cfg) -> int:
    """The scroll world's whole-panorama pan; 0 (generation from noise, as before) for the procedural world."""
    return scroll.PREFIX_FRAMES if world_of(cfg) == "scroll" else 0


def prefix_actions(cfg, frames: int) -> list[int]:
    """The actions of a ``frames``-frame prefix of this model's world (none for a world without actions)."""
    return scroll.prefix_actions(frames) if world_of(cfg) == "scroll" else []


def truth(cfg, seed: int, frames: int, actions: list[int] | None = None) -> torch.Tensor:
    """Latents [frames, C, H, W] of the world with this seed (under ``actions`` in the scroll world)."""
    if world_of(cfg) == "scroll":
        acts = list(actions or [])
        acts = (acts + [acts[-1] if acts else 0] * frames)[:frames]
        return procedural.encode(scroll.make_clip(seed, acts).frames)
    if world_of(cfg) == "procedural":
        return procedural.encode(procedural.make_clip(seed, frames).frames)
    raise ValueError("not an in-repo world model")
