"""The adapter contract between an AR video transformer and ff-engine.

An adapter owns the model math (embeddings, RoPE, MLPs, cross-attention).  Its self-attention goes through a
``SelfAttentionFn`` that the engine hands to ``forward``; the adapter never sees pages, budgets or policies.
Dependencies point one way: ``model_adapters`` -> ``ff_engine.attention`` interface -> ``kernels``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class VideoGeometry:
    """What the engine needs to know about a model to page, budget and schedule it."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    latent_channels: int
    latent_hw: tuple[int, int]  # latent grid (H, W) of one frame, before patching
    patch: tuple[int, int, int]  # (t, h, w) patch size
    frames_per_block: int  # latent frames generated per AR step
    max_frames: int  # length of the temporal RoPE table (absolute frame index limit)
    vae_stride: tuple[int, int, int] = (4, 8, 8)
    fps: int = 16

    @property
    def token_grid(self) -> tuple[int, int]:
        return self.latent_hw[0] // self.patch[1], self.latent_hw[1] // self.patch[2]

    @property
    def tokens_per_frame(self) -> int:
        h, w = self.token_grid
        return h * w

    @property
    def tokens_per_block(self) -> int:
        return self.tokens_per_frame * self.frames_per_block

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V of one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def latent_frames(self, seconds: float) -> int:
        """seconds * fps / VAE temporal stride latent frames, rounded up to whole blocks (Wan: 5 s -> 21, 60 s -> 240)."""
        latent = max(1, math.ceil(round(seconds * self.fps) / self.vae_stride[0]))
        return math.ceil(latent / self.frames_per_block) * self.frames_per_block

    def video_frames(self, latent_frames: int) -> int:
        """Wan's causal VAE: the first latent frame decodes to 1 frame, every later one to 4."""
        return 1 + self.vae_stride[0] * (latent_frames - 1) if latent_frames else 0


class SelfAttentionFn(Protocol):
    def __call__(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_pre_rope: torch.Tensor,
        positions: torch.Tensor,
    ) -> torch.Tensor:
        """Self-attention of one layer for a batch of sequences (one block each, equal lengths).

        q: [S*N, H, D] and k: [S*N, Hkv, D] post-RoPE; v: [S*N, Hkv, D]; q_pre_rope: [S*N, H, D] (after
        qk-norm, before RoPE: what Future Forcing's query statistics are taken from); positions: [S*N, 3]
        int32 (absolute latent frame, h, w).  Returns [S*N, H, D].
        """


class ARVideoAdapter(Protocol):
    """What the engine calls.  See ``model_adapters/causal_wan`` for the reference implementation."""

    geometry: VideoGeometry
    #: the positional encoding as policies see it: ``rope.phases(positions [N, 3]) -> angles [N, head_dim/2]``
    #: (adjacent-pair rotation).  Future Forcing rotates its query statistics to future positions with it.
    rope: Any

    def encode_prompt(self, text_embeds: torch.Tensor) -> Any:
        """Per-prompt state computed once (e.g. cross-attention K/V of every layer)."""

    def forward(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompts: list[Any],
        start_frames: list[int],
        attention: SelfAttentionFn,
    ) -> torch.Tensor:
        """latents [S, F, C, H, W] of one block per sequence, per-frame timesteps [S, F], one prompt state and
        absolute start frame per sequence -> flow prediction [S, F, C, H, W]."""
