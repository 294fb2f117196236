"""SkyReels-V2 diffusion forcing (diffusers' ``SkyReelsV2Transformer3DModel``) as an ff-engine adapter.

The model is diffusers' own module, weights under diffusers' names; its transformer blocks, cross-attention,
FFN, modulation and timestep/fps embeddings run as diffusers wrote them.  Two things are swapped in:

* every block's self-attention (``attn1``) gets ``PagedSelfAttnProcessor``, a diffusers attention processor that
  does what ``SkyReelsV2AttnProcessor`` does (projections, RMS qk-norm across heads, RoPE on adjacent pairs) and
  hands the rotated q/k to the engine's ``SelfAttentionFn`` instead of ``dispatch_attention_fn``;
* the top-level forward (about 30 lines of diffusers' ``forward``) is re-stated because diffusers computes RoPE
  from frame 0 of its input (a cached stream needs absolute frames) and broadcasts the fps embedding for a batch
  of one (the engine batches streams).

Why it is exact: with ``num_frame_per_block > 1`` diffusers applies a block-causal mask, so frame block b sees
blocks <= b only.  Running block b alone against the K/V of the finished blocks (written once by a pass at
``context_noise``) is the same computation as diffusers' full-sequence forward with those blocks clean at that
timestep (``tests/test_skyreels.py`` checks it to 1e-4 in fp32 against the unmodified diffusers module).
"""

from __future__ import annotations

import torch

from ff_engine.errors import ConfigError
from model_adapters.base import SelfAttentionFn
from model_adapters.skyreels_v2.config import SkyReelsV2Config


def _diffusers():
    try:
        from diffusers import SkyReelsV2Transformer3DModel
        from diffusers.models.transformers.transformer_skyreels_v2 import _get_qkv_projections
    except ImportError:
        raise ConfigError("SkyReels-V2 needs diffusers >= 0.35 (SkyReelsV2Transformer3DModel): "
                          "pip install 'ff-engine[vae]'") from None
    return SkyReelsV2Transformer3DModel, _get_qkv_projections


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' SkyReels-V2 ``apply_rotary_emb``: x [S, L, H, D], cos/sin [S, L, 1, D] (repeat-interleaved)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


class SkyReelsRope:
    """The model's 3D RoPE as ``RotaryPhases``: diffusers' ``SkyReelsV2RotaryPosEmbed`` frequencies (temporal
    ``head_dim - 4 (head_dim // 6)`` dims, then height and width ``2 (head_dim // 6)`` each, theta 10000), angles
    computed for any integer position (the float64 product diffusers' table holds, so no frame limit: see
    ``causal_wan.model.Rope3D`` on endless streams)."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        hw = 2 * (head_dim // 6)
        dims = (head_dim - 2 * hw, hw, hw)
        self.inv_freq = [1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64)[: d // 2] / d) for d in dims]
        self.max_frames = None

    def phases(self, positions: torch.Tensor) -> torch.Tensor:
        p = positions.to(torch.float64).cpu()
        return torch.cat([p[:, i, None] * self.inv_freq[i][None] for i in range(3)], dim=1)


class _CallState:
    """What the processors of one forward share: the engine's attention function and the tokens' positions."""

    attention: SelfAttentionFn | None = None
    positions: torch.Tensor | None = None


class PagedSelfAttnProcessor:
    """``SkyReelsV2AttnProcessor`` for self-attention, with the engine's paged attention in place of
    ``dispatch_attention_fn`` (and no mask: the block attends to [its cache ; itself])."""

    def __init__(self, layer: int, call: _CallState, qkv_projections):
        self.layer, self.call, self.qkv = layer, call, qkv_projections

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if self.call.attention is None or rotary_emb is None:
            raise ConfigError("SkyReels-V2 self-attention runs only inside the adapter's forward (engine attention)")
        query, key, value = self.qkv(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))  # [S, L, H, D]
        q_rot, k_rot = apply_rotary(q, *rotary_emb), apply_rotary(k, *rotary_emb)
        s, n, h, d = q.shape
        out = self.call.attention(self.layer, q_rot.reshape(s * n, h, d), k_rot.reshape(s * n, h, d),
                                  v.reshape(s * n, h, d), q.reshape(s * n, h, d), self.call.positions)
        out = out.reshape(s, n, h * d).type_as(q_rot)
        return attn.to_out[1](attn.to_out[0](out))


class SkyReelsV2Adapter(torch.nn.Module):
    """``ARVideoAdapter`` around a diffusers ``SkyReelsV2Transformer3DModel`` (``self.transformer``)."""

    def __init__(self, cfg: SkyReelsV2Config):
        super().__init__()
        transformer_cls, qkv = _diffusers()
        self.cfg = cfg
        self.geometry = cfg.geometry()
        self.transformer = transformer_cls(**cfg.diffusers_config())
        self.rope = SkyReelsRope(cfg.attention_head_dim)
        self._call = _CallState()
        for i, block in enumerate(self.transformer.blocks):
            block.attn1.set_processor(PagedSelfAttnProcessor(i, self._call, qkv))

    # ---- adapter contract -------------------------------------------------------------------------------
    def encode_prompt(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """umT5 features [L <= text_len, text_dim] -> the projected text context [text_len, dim] (zero-padded to
        text_len first, as the pipeline pads them); cross-attention reads it in every block."""
        cfg = self.cfg
        if text_embeds.dim() == 3 and text_embeds.shape[0] == 1:
            text_embeds = text_embeds[0]
        if text_embeds.dim() != 2 or text_embeds.shape[1] != cfg.text_dim or not 1 <= text_embeds.shape[0] <= cfg.text_len:
            raise ConfigError(f"text embeddings must be [1 <= L <= {cfg.text_len}, {cfg.text_dim}] (text_len, "
                              f"text_dim), got {tuple(text_embeds.shape)}")
        if not torch.isfinite(text_embeds).all():
            raise ConfigError("text embeddings contain NaN or inf")
        w = self.transformer.patch_embedding.weight
        ctx = torch.zeros(cfg.text_len, cfg.text_dim, dtype=w.dtype, device=w.device)
        ctx[: text_embeds.shape[0]] = text_embeds.to(ctx)
        return self.transformer.condition_embedder.text_embedder(ctx)

    def token_positions(self, start_frame: int, frames: int) -> torch.Tensor:
        gh, gw = self.geometry.token_grid
        f, h, w = torch.meshgrid(torch.arange(start_frame, start_frame + frames), torch.arange(gh), torch.arange(gw),
                                 indexing="ij")
        return torch.stack([f, h, w], dim=-1).reshape(-1, 3).to(torch.int32)

    def _check(self, latents, timesteps, prompts, start_frames) -> None:
        cfg = self.cfg
        if latents.dim() != 5 or latents.shape[2] != cfg.in_channels or tuple(latents.shape[3:]) != tuple(cfg.latent_hw) \
                or latents.shape[1] < 1:
            raise ConfigError(f"latents must be [S, F, {cfg.in_channels}, {cfg.latent_hw[0]}, {cfg.latent_hw[1]}], "
                              f"got {tuple(latents.shape)}")
        s, f = latents.shape[:2]
        if tuple(timesteps.shape) != (s, f):
            raise ConfigError(f"timesteps must be [S, F] = [{s}, {f}], got {tuple(timesteps.shape)}")
        if len(prompts) != s or len(start_frames) != s:
            raise ConfigError(f"need one prompt and one start frame per sequence ({s})")

    def forward(self, latents, timesteps, prompts, start_frames, attention: SelfAttentionFn):
        """latents [S, F, C, H, W], timesteps [S, F] -> flow [S, F, C, H, W] (diffusers' DF forward per block)."""
        self._check(latents, timesteps, prompts, start_frames)
        cfg, tr = self.cfg, self.transformer
        s, f = latents.shape[:2]
        w = tr.patch_embedding.weight
        (gh, gw), (pt, ph, pw) = self.geometry.token_grid, cfg.patch_size
        positions = torch.cat([self.token_positions(int(sf), f) for sf in start_frames])
        angles = self.rope.phases(positions)  # [S*L, D/2] float64, as diffusers' table
        cos = torch.cos(angles).repeat_interleave(2, dim=-1).float().reshape(s, -1, 1, cfg.attention_head_dim)
        sin = torch.sin(angles).repeat_interleave(2, dim=-1).float().reshape(s, -1, 1, cfg.attention_head_dim)
        hidden = tr.patch_embedding(latents.permute(0, 2, 1, 3, 4).to(w.dtype)).flatten(2).transpose(1, 2)

        no_text = torch.zeros(s, 0, cfg.text_dim, dtype=w.dtype, device=w.device)  # prompts are already projected
        temb, tproj, _, _ = tr.condition_embedder(timesteps.to(w.device), no_text)
        tproj = tproj.unflatten(-1, (6, -1))  # [S, F, 6, dim]
        if cfg.inject_sample_info:
            fps = torch.full((s,), cfg.fps_id, dtype=torch.long, device=w.device)
            tproj = tproj + tr.fps_projection(tr.fps_embedding(fps)).unflatten(1, (6, -1))[:, None]
        temb = temb.view(s, f, 1, 1, -1).repeat(1, 1, gh, gw, 1).flatten(1, 3)  # [S, L, dim]
        tproj = tproj.view(s, f, 1, 1, 6, -1).repeat(1, 1, gh, gw, 1, 1).flatten(1, 3).transpose(1, 2).contiguous()

        context = torch.stack(list(prompts)).to(w.dtype)
        self._call.attention, self._call.positions = attention, positions.to(w.device)
        try:
            for block in tr.blocks:
                hidden = block(hidden, context, tproj, (cos.to(w.device), sin.to(w.device)), None)
        finally:
            self._call.attention = self._call.positions = None

        shift, scale = (tr.scale_shift_table.unsqueeze(2) + temb.unsqueeze(1)).chunk(2, dim=1)
        hidden = (tr.norm_out(hidden.float()) * (1 + scale.squeeze(1)) + shift.squeeze(1)).type_as(hidden)
        hidden = tr.proj_out(hidden).reshape(s, f, gh, gw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = hidden.flatten(6, 7).flatten(4, 5).flatten(2, 3)  # [S, C, F, H, W]
        return out.permute(0, 2, 1, 3, 4)
