"""Causal Wan2.1 video transformer (the Self-Forcing / CausVid / LongLive family) as an ff-engine adapter.

Module and parameter names follow the Wan2.1 / Self-Forcing state_dict exactly (``patch_embedding``,
``text_embedding.{0,2}``, ``time_embedding.{0,2}``, ``time_projection.1``, ``blocks.{i}.self_attn.{q,k,v,o}``,
``blocks.{i}.self_attn.norm_{q,k}``, ``blocks.{i}.cross_attn.*``, ``blocks.{i}.norm3``, ``blocks.{i}.ffn.{0,2}``,
``blocks.{i}.modulation``, ``head.head``, ``head.modulation``), so real checkpoints load unchanged.

Only the self-attention differs from a dense implementation: it calls the engine's ``SelfAttentionFn``,
which attends to the paged cache and decides what gets written.  Verified call-by-call against golden traces
recorded from the Self-Forcing reference code (``tests/test_causal_wan_golden.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from ff_engine.errors import ConfigError
from model_adapters.base import SelfAttentionFn, VideoGeometry


@dataclass(frozen=True)
class CausalWanConfig:
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    patch_size: tuple[int, int, int] = (1, 2, 2)
    latent_hw: tuple[int, int] = (60, 104)  # 480 x 832 pixels / VAE stride 8
    frames_per_block: int = 3
    rope_frames: int = 1024
    vae_stride: tuple[int, int, int] = (4, 8, 8)  # latent -> pixels (time, h, w); the decoder's business
    fps: int = 16
    # the sampling schedule the model was trained for (Self-Forcing: 4 warped steps of the shift-5 table)
    sample_steps: tuple[int, ...] = (1000, 750, 500, 250)
    sample_shift: float = 5.0
    sample_stochastic: bool = True  # re-noise with fresh noise between steps (Self-Forcing) or Euler/DDIM
    context_noise: float = 0.0  # timestep at which finished blocks are written to the cache (Self-Forcing: 0)
    decoder: str = "wan-vae"  # how latents become pixels: "wan-vae" (Wan2.1's VAE) or "world-codec" (model_adapters.world)
    conditional: bool = True  # False: trained without text; the engine feeds a zero prompt
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    # RoPE base per axis: Wan uses 10000 for time and space; a small spatial base lets a head on a small token grid
    # point at one spatial offset (10000 leaves most spatial pairs nearly unrotated across an 8 x 12 grid)
    rope_theta: float = 10000.0
    rope_theta_space: float = 10000.0
    # initial gain of the self-attention q/k RMSNorms (training only; loaded weights override it): with q/k norm a
    # logit is bounded by sqrt(head_dim) * g_q * g_k, so gains of 1 force diffuse attention on thousands of keys
    qk_gain_init: float = 1.0
    # action vocabulary of an action-conditioned world model (empty: no actions).  Each frame's action is embedded
    # and added to its timestep embedding (AdaLN-style, as LingBot-World conditions on the camera); the embedding
    # starts at zero, so a model that never saw actions computes exactly what it did without them.  The first
    # action is the default (no input).
    actions: tuple[str, ...] = ()

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ConfigError(f"dim {self.dim} must be divisible by num_heads {self.num_heads}")
        hd = self.dim // self.num_heads
        if hd % 2:
            raise ConfigError(f"head_dim {hd} must be even for RoPE")
        if self.latent_hw[0] % self.patch_size[1] or self.latent_hw[1] % self.patch_size[2]:
            raise ConfigError(f"latent_hw {self.latent_hw} must be divisible by the patch {self.patch_size[1:]}")
        if self.patch_size[0] != 1:
            raise ConfigError("temporal patch size must be 1 for block-causal generation")
        if len(set(self.actions)) != len(self.actions):
            raise ConfigError(f"action names must be distinct, got {list(self.actions)}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def geometry(self) -> VideoGeometry:
        return VideoGeometry(
            num_layers=self.num_layers, num_heads=self.num_heads, num_kv_heads=self.num_heads,
            head_dim=self.head_dim, latent_channels=self.in_dim, latent_hw=tuple(self.latent_hw),
            patch=tuple(self.patch_size), frames_per_block=self.frames_per_block, max_frames=self.rope_frames,
            vae_stride=tuple(self.vae_stride), fps=self.fps,
        )

    def with_(self, **kw) -> CausalWanConfig:
        return replace(self, **kw)

    @property
    def num_actions(self) -> int:
        return len(self.actions)


PRESETS: dict[str, CausalWanConfig] = {
    # Wan2.1-T2V-1.3B as used by Self-Forcing / CausVid / LongLive, 480 x 832.
    "wan-1.3b": CausalWanConfig(),
    # Wan head geometry (12 x 128) with fewer layers and a small grid: runs on a CPU.
    "wan-cpu-small": CausalWanConfig(dim=1536, ffn_dim=2048, num_layers=2, text_len=64, latent_hw=(16, 24)),
    # The geometry of the Self-Forcing golden traces: 2 heads x 128 (real RoPE split), 24 tokens per frame.
    "wan-tiny": CausalWanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_len=16, text_dim=256,
                                latent_hw=(8, 12)),
    # The in-repo world model (model_adapters/world): 2 x 64 heads, 4 layers, 96 tokens per frame, latents are the
    # world's 2 x 2 space-to-depth pixels (12 channels), one latent frame per video frame.
    "world-tiny": CausalWanConfig(dim=128, ffn_dim=512, num_heads=2, num_layers=4, in_dim=12, out_dim=12,
                                  freq_dim=64, text_dim=16, text_len=1, latent_hw=(16, 24), vae_stride=(1, 2, 2), fps=8,
                                  decoder="world-codec", conditional=False,
                                  sample_steps=(1000, 875, 750, 625, 500, 375, 250, 125), sample_shift=2.0,
                                  sample_stochastic=False, context_noise=50.0),
    # A larger world model for a GPU's training budget (3 x 64 heads, 6 layers, 3.9 M parameters, 16 MB in float32).
    "world-small": CausalWanConfig(dim=192, ffn_dim=768, num_heads=3, num_layers=6, in_dim=12, out_dim=12,
                                   freq_dim=64, text_dim=16, text_len=1, latent_hw=(16, 24), vae_stride=(1, 2, 2),
                                   fps=8, decoder="world-codec", conditional=False,
                                   sample_steps=(1000, 875, 750, 625, 500, 375, 250, 125), sample_shift=2.0,
                                   sample_stochastic=False, context_noise=100.0),
    # World model v4 (model_adapters/world/scroll.py): a scroll world whose camera moves by actions.  Patch (1, 4, 2)
    # makes a token 8 x 4 pixels, so the camera's 2-pixel step is half a token and a whole token every two frames:
    # continuing content is a copy from two frames back, one column on.  48 tokens per frame, spatial RoPE base 20
    # (the 4 x 12 grid's offsets are distinguishable), q/k gains start at 2 (a head can put most of its weight on
    # one key), actions left / stay / right.
    "world-v4": CausalWanConfig(dim=128, ffn_dim=512, num_heads=2, num_layers=4, in_dim=12, out_dim=12,
                                freq_dim=64, text_dim=16, text_len=1, latent_hw=(16, 24), vae_stride=(1, 2, 2), fps=8,
                                patch_size=(1, 4, 2), decoder="world-codec", conditional=False,
                                sample_steps=(1000, 500), sample_shift=2.0, sample_stochastic=False,
                                context_noise=50.0, rope_theta_space=20.0, qk_gain_init=2.0,
                                actions=("stay", "left", "right")),
}


# ---- pieces ------------------------------------------------------------------------------------------
def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """Wan's timestep embedding: [cos, sin] of t * 10000^(-i/half), computed in float64."""
    half = dim // 2
    pos = t.to(torch.float64)
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    ang = torch.outer(pos, freqs)
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=1)


def rope_apply(x: torch.Tensor, angles) -> torch.Tensor:
    """Rotate adjacent pairs of x [N, H, D] by angles [N, D/2] (or a precomputed ``(cos, sin)`` pair of
    [N, 1, D/2] float64 tensors); float64 math as the reference, x's dtype out."""
    cos, sin = angles if isinstance(angles, tuple) else rope_cos_sin(angles, x.device)
    xd = x.to(cos.dtype).reshape(*x.shape[:-1], -1, 2)
    re, im = xd[..., 0], xd[..., 1]
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2).to(x.dtype)


def rope_cos_sin(angles: torch.Tensor, device=None, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angles once per forward (every layer and both q and k reuse them), in ``dtype`` (float64
    as the reference; the world trainer uses float32, a quarter of its step time on CPU)."""
    return torch.cos(angles)[:, None].to(device, dtype), torch.sin(angles)[:, None].to(device, dtype)


def grid_positions(times: torch.Tensor, token_grid: tuple[int, int]) -> torch.Tensor:
    """RoPE positions (frame, row, col) int32 [len(times) * gh * gw] of every token of frames ``times``."""
    gh, gw = token_grid
    f, h, w = torch.meshgrid(times, torch.arange(gh), torch.arange(gw), indexing="ij")
    return torch.stack([f, h, w], dim=-1).reshape(-1, 3).to(torch.int32)


def unpatchify(x: torch.Tensor, frames: int, token_grid: tuple[int, int], patch_size, out_dim: int) -> torch.Tensor:
    """Head output [S, frames * gh * gw, pt * ph * pw * out_dim] -> latents [S, frames * pt, out_dim, H, W]."""
    gh, gw = token_grid
    pt, ph, pw = patch_size
    s = x.shape[0]
    x = x.reshape(s, frames, gh, gw, pt, ph, pw, out_dim)
    x = torch.einsum("sfhwpqrc->sfpchqwr", x)
    return x.reshape(s, frames * pt, out_dim, gh * ph, gw * pw)


class Rope3D:
    """Wan's 3D RoPE on adjacent (interleaved) pairs: head_dim/2 pairs split [t, h, w] = [c - 2(c//3), c//3, c//3]
    (22/21/21 for head_dim 128), temporal index absolute.

    Endless streams: the reference looks angles up in a table of ``table_frames`` (1024) rows, which ends a stream
    there.  Attention under RoPE depends only on the offset between a query's and a key's frame, so re-rotating
    every cached key when positions wrap would leave every output unchanged; the same outputs come for free by
    computing the angle ``frame * inv_freq`` for any frame — the very float64 product the table holds, so below
    the table every angle is bit-identical to the lookup (golden traces) and past it no key is ever re-rotated.
    ``max_frames`` is None: no frame limit (Future Forcing rotates its proxy to any future frame)."""

    def __init__(self, head_dim: int, table_frames: int = 1024, theta: float = 10000.0,
                 theta_space: float | None = None):
        c = head_dim // 2
        self.split = (c - 2 * (c // 3), c // 3, c // 3)
        d_t = head_dim - 4 * (head_dim // 6)
        d_s = 2 * (head_dim // 6)
        self.table_frames = table_frames  # the reference's table length: informational
        self.max_frames = None
        bases = (theta, theta if theta_space is None else theta_space, theta if theta_space is None else theta_space)
        self.inv_freq = tuple(1.0 / torch.pow(base, torch.arange(0, d, 2, dtype=torch.float64).div(d))
                              for base, d in zip(bases, (d_t, d_s, d_s)))

    def phases(self, positions: torch.Tensor) -> torch.Tensor:
        """Angles [N, head_dim/2] (float64) for integer positions [N, 3] = (frame, h, w), any frame."""
        p = positions.to(torch.float64).cpu()
        return torch.cat([p[:, i, None] * self.inv_freq[i][None] for i in range(3)], dim=1)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x).type_as(x)


class _Attn(nn.Module):
    """Projections shared by self- and cross-attention (names as in Wan)."""

    def __init__(self, cfg: CausalWanConfig):
        super().__init__()
        d = cfg.dim
        self.q, self.k, self.v, self.o = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.norm_q = RMSNorm(d, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(d, cfg.eps) if cfg.qk_norm else nn.Identity()


class CausalWanBlock(nn.Module):
    def __init__(self, cfg: CausalWanConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.norm1 = LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = _Attn(cfg)
        self.norm3 = LayerNorm(d, eps=cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = _Attn(cfg)
        self.norm2 = LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def cross_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, hd = self.cfg.num_heads, self.cfg.head_dim
        k = self.cross_attn.norm_k(self.cross_attn.k(context)).unflatten(-1, (n, hd))
        v = self.cross_attn.v(context).unflatten(-1, (n, hd))
        return k, v

    def forward(self, x, e0, frames, layer, rope_angles, positions, cross_k, cross_v, attention: SelfAttentionFn):
        # x [S, L, dim]; e0 [S, F, 6, dim] per-frame modulation; cross_k/v [S, T, H, D]
        e = self.modulation_terms(e0)
        x = self.self_attention(x, e, frames, layer, rope_angles, positions, attention)
        x = self.cross_attention(x, cross_k, cross_v)
        return self.feed_forward(x, e, frames)

    # The three residual branches, separately callable so derived blocks (Matrix-Game's ActionModule between the
    # cross-attention and the FFN) reuse them unchanged.
    def modulation_terms(self, e0):
        return (self.modulation.unsqueeze(1) + e0).chunk(6, dim=2)  # each [S, F, 1, dim]

    @staticmethod
    def _mod(h, shift, scale, frames):
        return (h.unflatten(1, (frames, h.shape[1] // frames)) * (1 + scale) + shift).flatten(1, 2)

    @staticmethod
    def _gate(h, g, frames):
        return (h.unflatten(1, (frames, h.shape[1] // frames)) * g).flatten(1, 2)

    def self_attention(self, x, e, frames, layer, rope_angles, positions, attention: SelfAttentionFn):
        s, l, d = x.shape
        n, hd = self.cfg.num_heads, self.cfg.head_dim
        h = self._mod(self.norm1(x), e[0], e[1], frames)
        sa = self.self_attn
        q = sa.norm_q(sa.q(h)).reshape(s * l, n, hd)
        k = sa.norm_k(sa.k(h)).reshape(s * l, n, hd)
        v = sa.v(h).reshape(s * l, n, hd)
        y = attention(layer, rope_apply(q, rope_angles), rope_apply(k, rope_angles), v, q, positions)
        return x + self._gate(sa.o(y.reshape(s, l, d)), e[2], frames)

    def cross_attention(self, x, cross_k, cross_v):
        n, hd = self.cfg.num_heads, self.cfg.head_dim
        ca = self.cross_attn
        cq = ca.norm_q(ca.q(self.norm3(x))).unflatten(-1, (n, hd))
        co = F.scaled_dot_product_attention(cq.transpose(1, 2), cross_k.transpose(1, 2), cross_v.transpose(1, 2))
        return x + ca.o(co.transpose(1, 2).flatten(2))

    def feed_forward(self, x, e, frames):
        return x + self._gate(self.ffn(self._mod(self.norm2(x), e[3], e[4], frames)), e[5], frames)


class CausalHead(nn.Module):
    def __init__(self, cfg: CausalWanConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e, frames):
        shift, scale = (self.modulation.unsqueeze(1) + e.unsqueeze(2)).chunk(2, dim=2)  # e [S, F, dim]
        h = self.norm(x).unflatten(1, (frames, x.shape[1] // frames))
        return self.head(h * (1 + scale) + shift).flatten(1, 2)


@dataclass
class PromptState:
    """Cross-attention K/V of every layer for one prompt, computed once (not part of the page budget)."""

    k: list[torch.Tensor] = field(default_factory=list)  # per layer [T, H, D]
    v: list[torch.Tensor] = field(default_factory=list)


class CausalWanModel(nn.Module):
    rope_dtype = torch.float64  # the reference's RoPE precision; training may trade it for speed (train_scroll)

    def __init__(self, cfg: CausalWanConfig):
        super().__init__()
        self.cfg = cfg
        self.geometry = cfg.geometry()
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, d * 6))
        self.blocks = nn.ModuleList([CausalWanBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = CausalHead(cfg)
        self.rope = Rope3D(cfg.head_dim, cfg.rope_frames, theta=cfg.rope_theta, theta_space=cfg.rope_theta_space)
        if cfg.actions:
            self.action_embedding = nn.Embedding(cfg.num_actions, d)
            nn.init.zeros_(self.action_embedding.weight)
        if cfg.qk_gain_init != 1.0:
            for blk in self.blocks:
                for norm in (blk.self_attn.norm_q, blk.self_attn.norm_k):
                    nn.init.constant_(norm.weight, cfg.qk_gain_init)

    # ---- adapter contract (differentiable: the engine calls it under no_grad, training does not) ----
    def encode_prompt(self, text_embeds: torch.Tensor) -> PromptState:
        """text_embeds [L, text_dim] (umT5 features, L <= text_len) -> per-layer cross-attention K/V."""
        cfg = self.cfg
        if text_embeds.dim() == 3 and text_embeds.shape[0] == 1:
            text_embeds = text_embeds[0]
        if text_embeds.dim() != 2 or text_embeds.shape[1] != cfg.text_dim or text_embeds.shape[0] > cfg.text_len:
            raise ConfigError(
                f"text embeddings must be [L <= {cfg.text_len}, {cfg.text_dim}] (text_len, text_dim), "
                f"got {tuple(text_embeds.shape)}"
            )
        if not torch.isfinite(text_embeds).all():
            raise ConfigError("text embeddings contain NaN or inf")
        w = self.patch_embedding.weight
        ctx = torch.zeros(cfg.text_len, cfg.text_dim, dtype=w.dtype, device=w.device)
        ctx[: text_embeds.shape[0]] = text_embeds.to(ctx)  # padded to text_len as Wan does
        ctx = self.text_embedding(ctx)
        state = PromptState()
        for blk in self.blocks:
            k, v = blk.cross_kv(ctx)
            state.k.append(k)
            state.v.append(v)
        return state

    def token_positions(self, start_frame, frames: int) -> torch.Tensor:
        """RoPE positions (frame, row, col) of ``frames`` frames starting at ``start_frame``; training may pass a
        sequence of ``frames`` frame indices instead (sparse clips: distant past + recent frames)."""
        if isinstance(start_frame, int):
            times = torch.arange(start_frame, start_frame + frames)
        else:
            times = torch.as_tensor(start_frame, dtype=torch.long).reshape(-1)
            if times.numel() != frames:
                raise ConfigError(f"need one frame index per frame ({frames}), got {times.numel()}")
        return grid_positions(times, self.geometry.token_grid)

    def action_ids(self, actions, s: int, frames: int, device) -> torch.Tensor | None:
        """Per-frame action indices [S * F] (None for a model without actions); ``actions`` [S, F] integers in
        ``[0, num_actions)`` or None (the default action, index 0, everywhere)."""
        cfg = self.cfg
        if not cfg.actions:
            if actions is not None:
                raise ConfigError("this model takes no actions (its config declares none)")
            return None
        if actions is None:
            return torch.zeros(s * frames, dtype=torch.long, device=device)
        a = torch.as_tensor(actions)
        if a.shape != (s, frames) or a.is_floating_point() or a.dtype == torch.bool:
            raise ConfigError(f"actions must be integers [S, F] = [{s}, {frames}], got {tuple(a.shape)} {a.dtype}")
        if a.numel() and (int(a.min()) < 0 or int(a.max()) >= cfg.num_actions):
            raise ConfigError(f"actions must be indices in [0, {cfg.num_actions}) of {list(cfg.actions)}")
        return a.reshape(-1).to(device=device, dtype=torch.long)

    def forward(self, latents, timesteps, prompts, start_frames, attention: SelfAttentionFn, actions=None):
        cfg = self.cfg
        s, frames, c, hh, ww = latents.shape
        if c != cfg.in_dim or (hh, ww) != tuple(cfg.latent_hw) or frames < 1:
            raise ConfigError(
                f"latents must be [S, F, {cfg.in_dim}, {cfg.latent_hw[0]}, {cfg.latent_hw[1]}], got {tuple(latents.shape)}"
            )
        if timesteps.shape != (s, frames):
            raise ConfigError(f"timesteps must be [S, F] = [{s}, {frames}], got {tuple(timesteps.shape)}")
        if len(prompts) != s or len(start_frames) != s:
            raise ConfigError(f"need one prompt and one start frame per sequence ({s})")
        w = self.patch_embedding.weight
        x = self.patch_embedding(latents.permute(0, 2, 1, 3, 4).to(w.dtype))  # [S, dim, F, h, w]
        x = x.flatten(2).transpose(1, 2)  # [S, L, dim]
        positions = torch.cat([self.token_positions(sf, frames) for sf in start_frames])
        angles = rope_cos_sin(self.rope.phases(positions), w.device, self.rope_dtype)

        e = self.time_embedding(sinusoidal_embedding(cfg.freq_dim, timesteps.flatten()).to(w.dtype))
        ids = self.action_ids(actions, s, frames, w.device)
        if ids is not None:
            e = e + self.action_embedding(ids)
        e0 = self.time_projection(e).unflatten(1, (6, cfg.dim)).unflatten(0, (s, frames))
        for i, blk in enumerate(self.blocks):
            ck = torch.stack([p.k[i] for p in prompts])
            cv = torch.stack([p.v[i] for p in prompts])
            x = blk(x, e0, frames, i, angles, positions, ck, cv, attention)
        x = self.head(x, e.unflatten(0, (s, frames)), frames)
        return self.unpatchify(x, frames)

    def unpatchify(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        return unpatchify(x, frames, self.geometry.token_grid, self.cfg.patch_size, self.cfg.out_dim)


