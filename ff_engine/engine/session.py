"""A video stream: its conditioning, noise, length, budget and policy, and where it is in generation."""

from __future__ import annotations

import copy
import math
import re
import uuid
from dataclasses import dataclass, field

import torch

from ff_engine.errors import ConfigError
from ff_engine.policies import CachePolicy, Unbounded

SESSION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def new_session_id() -> str:
    """A fresh id that no user-chosen id of the form ``session-<n>`` can collide with (random, 96 bits)."""
    return f"sess-{uuid.uuid4().hex[:24]}"


@dataclass
class SessionConfig:
    """One stream's request.

    prompt: text embeddings [L, text_dim] (umT5 features for Wan; precomputed, no hub needed).
    num_frames: latent frames to generate (rounded up to whole blocks).
    budget_frames: latent frames of past K/V each layer keeps between blocks (None: unbounded policy only).
    initial_noise: optional [num_frames, C, H, W]; step_noise: optional list of [F, C, H, W] tensors consumed
    in order (block 0 step 1, block 0 step 2, ...).  Both default to a per-session seeded generator.
    retain_frames: latent frames of generated latents the session keeps on the host (``Session.latents``), the most
    recent ones, in whole blocks and never less than the newest block; None keeps all (``Engine.generate`` needs
    that).  A streaming consumer that takes each block as it comes sets it so an endless stream's host memory stays
    bounded; a prompt switch re-caches only frames still retained (``recache.retain_for_recache``).
    actions: for an action-conditioned model, one action index per latent frame (into the model's
    ``cfg.actions``); frames past the end repeat the last entry (a held key), None or [] means the model's default
    action (index 0) throughout.  ``Engine.set_actions`` changes them for the next blocks of a running stream.
    prefix: optional latents [P, C, H, W] (P a whole number of blocks, counted in ``num_frames``) that the
    scheduler prefills at admission (``Engine.prefill``) and reports as the stream's first blocks: a world model's
    ground-truth opening, after which generation (and steering) continues.
    """

    prompt: torch.Tensor
    num_frames: int
    seed: int = 0
    policy: CachePolicy = field(default_factory=Unbounded)
    budget_frames: int | None = None
    initial_noise: torch.Tensor | None = None
    step_noise: list[torch.Tensor] | None = None
    session_id: str | None = None
    retain_frames: int | None = None
    actions: list[int] | None = None
    conditioning: dict | None = None
    prefix: torch.Tensor | None = None


class Session:
    """Engine-side state of one stream. Created by ``Engine.add_session`` from a request ``Engine.validate``
    accepted (lengths, seed, noise shapes), which then reserves its pages."""

    def __init__(self, cfg: SessionConfig, geometry, prompt_state, frames_per_block: int):
        self.id = cfg.session_id or new_session_id()
        self.cfg = cfg
        self.policy: CachePolicy = copy.deepcopy(cfg.policy)  # per-session state
        self.prompt_state = prompt_state
        self.frames_per_block = frames_per_block
        self.num_blocks = math.ceil(cfg.num_frames / frames_per_block)
        self.num_frames = self.num_blocks * frames_per_block
        self.block = 0  # next block to generate
        self.error: str | None = None  # why the session ended early (set by the engine), None otherwise
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.geometry = geometry
        self._step_noise = list(cfg.step_noise) if cfg.step_noise is not None else None
        self.step_noise_pos = 0  # next entry of ``step_noise`` to consume (a cursor, so a step can be undone)
        self.latents: list[torch.Tensor] = []  # one [F, C, H, W] per retained block, oldest first, contiguous
        self.latents_start_frame = 0  # the first frame of ``latents`` (frames before it were dropped)
        c, (h, w) = geometry.latent_channels, geometry.latent_hw
        self.block_shape = (frames_per_block, c, h, w)
        self.actions: list[int] = [int(a) for a in cfg.actions] if cfg.actions else []
        self.conditioning: dict = {}  # checked by the model at admission (Engine.add_session)
        self.stream_state: dict | None = None  # adapter-declared per-stream state, allocated by the engine

    def block_actions(self) -> torch.Tensor:
        """Action index per frame of the current block [F] (the last given action held past the end, 0 without)."""
        last = self.actions[-1] if self.actions else 0
        frames = range(self.start_frame, self.start_frame + self.frames_per_block)
        return torch.tensor([self.actions[f] if f < len(self.actions) else last for f in frames], dtype=torch.long)

    def set_actions(self, actions: list[int], from_frame: int) -> None:
        """Frames ``from_frame ..`` take ``actions`` (earlier frames keep theirs; a gap is filled by holding)."""
        held = self.actions + [self.actions[-1] if self.actions else 0] * max(0, from_frame - len(self.actions))
        self.actions = held[:from_frame] + [int(a) for a in actions]

    @property
    def start_frame(self) -> int:
        return self.block * self.frames_per_block

    @property
    def done(self) -> bool:
        return self.block >= self.num_blocks

    @property
    def budget_tokens(self) -> int | None:
        if self.cfg.budget_frames is None:
            return None
        return self.cfg.budget_frames * self.geometry.tokens_per_frame

    def record(self, block: torch.Tensor) -> None:
        """Keep a finished block's latents, then drop the oldest blocks beyond ``retain_frames``.

        Invariant: ``latents`` are frames ``[latents_start_frame, latents_start_frame + sum of their lengths)``,
        the newest block always among them, and with ``retain_frames`` set at most ``max(retain_frames, one
        block) + one block - 1`` frames are kept."""
        self.latents.append(block)
        keep = self.cfg.retain_frames
        if keep is None:
            return
        held = sum(b.shape[0] for b in self.latents)
        while len(self.latents) > 1 and held - self.latents[0].shape[0] >= keep:
            dropped = self.latents.pop(0).shape[0]
            held -= dropped
            self.latents_start_frame += dropped

    def block_noise(self) -> torch.Tensor:
        if self.cfg.initial_noise is not None:
            return self.cfg.initial_noise[self.start_frame : self.start_frame + self.frames_per_block].float()
        return torch.randn(self.block_shape, generator=self.generator)

    def step_noise(self) -> torch.Tensor:
        if self._step_noise is not None:
            if self.step_noise_pos >= len(self._step_noise):
                raise ConfigError("step_noise ran out: supply one tensor per intermediate denoising step")
            self.step_noise_pos += 1
            return self._step_noise[self.step_noise_pos - 1].float()
        return torch.randn(self.block_shape, generator=self.generator)
