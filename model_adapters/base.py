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
    max_frames: int  # length of the reference's temporal RoPE table; streams may run past it (endless streams)
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

    def latent_frames(self, seconds: float) -> int:
        """seconds * fps / VAE temporal stride latent frames, rounded up to whole blocks (Wan: 5 s -> 21, 60 s -> 240)."""
        latent = max(1, math.ceil(round(seconds * self.fps) / self.vae_stride[0]))
        return math.ceil(latent / self.frames_per_block) * self.frames_per_block

    def video_frames(self, latent_frames: int) -> int:
        """Wan's causal VAE: the first latent frame decodes to 1 frame, every later one to 4."""
        return 1 + self.vae_stride[0] * (latent_frames - 1) if latent_frames else 0


@dataclass(frozen=True)
class StateSpec:
    """One tensor of adapter-declared per-stream state (``model.stream_state_spec()`` maps names to these): the
    engine allocates ``zeros(shape, dtype)`` per stream at admission, hands it back on every call inside a
    ``StreamStates``, snapshots / restores it bit-identically, undoes a failed batched pass, and frees it with the
    stream.  Only the adapter reads or writes its contents."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class StreamStates:
    """What the engine passes ``forward`` as ``stream_state=``: one dict of the declared state tensors per stream,
    in the order of the batch, and whether this is the cache-writing pass (the only call that may change them;
    denoising steps only read)."""

    def __init__(self, states: list[dict[str, torch.Tensor]], write: bool):
        self.states, self.write = states, write


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


class RotaryPhases(Protocol):
    """The model's positional encoding as policies see it (Future Forcing rotates its query statistics with it)."""

    def phases(self, positions: torch.Tensor) -> torch.Tensor:
        """Integer positions [N, 3] (latent frame, row, column) -> rotation angles [N, head_dim / 2] float64: pair
        ``i`` of a post-RoPE query or key is the pre-RoPE pair ``(x[2i], x[2i+1])`` rotated by ``angles[:, i]``
        (adjacent pairs).  Must describe exactly the rotation of the K/V the adapter hands to the engine (the
        conformance test checks ``rotate(q_pre_rope, phases(positions)) == q``)."""


class ModelConfig(Protocol):
    """The fields of ``model.cfg`` that ff-engine reads besides the geometry (every adapter's config has them)."""

    text_dim: int  # width of the prompt embeddings ``encode_prompt`` takes: [L, text_dim]
    text_len: int  # most prompt tokens (L <= text_len)
    conditional: bool  # False: trained without text; callers feed a zero prompt [1, text_dim]
    sample_steps: tuple[int, ...]  # denoising timesteps in (0, 1000] before the shift warp (FlowMatchSchedule)
    sample_shift: float  # flow-matching shift of the timestep table (> 0)
    sample_stochastic: bool  # re-noise with fresh noise between steps (Self-Forcing) or take the Euler step
    context_noise: float  # timestep in [0, 1000] at which finished blocks are written to the cache (0 = clean)
    decoder: str  # how ``model_adapters.decoders`` turns latents into pixels: "wan-vae" or "world-codec"

    def geometry(self) -> VideoGeometry:
        """The geometry of a model built from this config (the same object as ``model.geometry``)."""


class ARVideoAdapter(Protocol):
    """Everything the engine, the CLI and the server use of a model: a ``torch.nn.Module`` with these members.

    ``model_adapters/causal_wan`` (Self-Forcing / CausVid / LongLive) and ``model_adapters/skyreels_v2``
    (SkyReels-V2 diffusion forcing through diffusers) implement it; ``tests/test_adapters_conformance.py`` checks
    an adapter against it and ``docs/adapters.md`` walks through adding one.  Invariants:

    * Self-attention of every layer goes through the ``attention`` callable with post-RoPE q/k of the block's
      tokens only; the adapter keeps no K/V between calls (the engine's pages are the only cache).
    * Token order inside a block is frame-major then row-major (``positions`` says which token is where), and
      ``geometry.tokens_per_frame`` tokens per frame.
    * Sequences of a batch are independent: ``forward`` of S sequences equals S separate calls.
    * Bad input (shapes, NaN prompts) raises ``ff_engine.errors.ConfigError`` with one line.
    """

    geometry: VideoGeometry
    cfg: ModelConfig
    rope: RotaryPhases

    def parameters(self):
        """``torch.nn.Module.parameters``: the engine takes the dtype (and device) of the first parameter as the
        dtype of the KV cache and of the latents it feeds in."""

    def encode_prompt(self, text_embeds: torch.Tensor) -> Any:
        """text_embeds [L, text_dim] (L <= text_len; [1, L, text_dim] accepted) -> per-prompt state computed once
        (e.g. cross-attention K/V of every layer), opaque to the engine and passed back in ``forward``."""

    def forward(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompts: list[Any],
        start_frames: list[int],
        attention: SelfAttentionFn,
    ) -> torch.Tensor:
        """latents [S, F, C, H, W] of one block per sequence (C = ``geometry.latent_channels``, (H, W) =
        ``geometry.latent_hw``, any F >= 1), per-frame timesteps [S, F] in [0, 1000], one prompt state and
        absolute start frame per sequence -> flow prediction [S, F, C, H, W] (x0 = x_t - sigma(t) * flow).  Calls
        ``attention(layer, ...)`` once per layer, in layer order, with S * F * tokens_per_frame tokens."""


def rotate_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x [N, H, D] with adjacent pairs rotated by angles [N, D/2] (float64 math, x's dtype out): the rotation
    ``RotaryPhases.phases`` describes, for tests and policies that need to apply it."""
    xd = x.to(torch.float64).reshape(*x.shape[:-1], -1, 2)
    cos, sin = torch.cos(angles)[:, None], torch.sin(angles)[:, None]
    re, im = xd[..., 0], xd[..., 1]
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2).to(x.dtype)
