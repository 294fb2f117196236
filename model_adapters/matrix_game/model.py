"""Matrix-Game 2.0 as an ff-engine adapter: the action-conditioned causal Wan of ``Matrix-Game-2/wan/modules``.

Parameter names are the reference ``CausalWanModel.state_dict()`` names (``patch_embedding``, ``img_emb.proj.*``,
``blocks.{i}.self_attn.*``, ``blocks.{i}.cross_attn.*``, ``blocks.{i}.action_model.*``, ``head.*``), so the
released checkpoint loads after its wrapper prefix ``model.`` is peeled.

What differs from the text-to-video causal Wan (whose block pieces are reused from ``model_adapters.causal_wan``):

* image-to-video input: the block's noisy latents (16 channels) are concatenated with 20 image-conditioning
  channels per latent frame (a mask and the VAE latent of the first image), ``conditioning["cond_concat"]``;
* the "prompt" is the conditioning image's CLIP features ``[257, 1280]``, projected by ``img_emb`` (``MLPProj``)
  into cross-attention K/V once per stream;
* an ``ActionModule`` after the cross-attention of the configured blocks.  Its two caches are **adapter-declared
  stream state** (``stream_state_spec``): the engine allocates them per stream, batches, snapshots and frees them,
  and this module reads the past and appends the block on the cache-writing pass, evicting as the reference's
  rolling window does (the newest ``local_attn_size - F`` past frames plus the block's own ``F``):
  - mouse: for every spatial token, temporal self-attention over frames; q/k/v from ``t_qkv(mouse_mlp(
    [hidden ; 12 x mouse window]))`` with a time RoPE at absolute frames (theta 256, only the first
    ``action_rope_dims[0]`` dims rotate: the spatial axes sit at position 0);
  - keyboard: every spatial token's query (``mouse_attn_q`` of the hidden state after the mouse residual)
    attends to one K/V per frame from ``keyboard_attn_kv(12 embedded key vectors)``, same time RoPE.
* actions per pixel frame: latent frame ``f`` sees the pixel frames ``[4f - 12, 4f)`` (negative = frame 0), as
  the reference slices them; a frame past the end of what a stream was given holds the last one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ff_engine.errors import ConfigError
from model_adapters.base import SelfAttentionFn, StateSpec, StreamStates
from model_adapters.causal_wan.model import (
    CausalHead,
    CausalWanBlock,
    PromptState,
    Rope3D,
    grid_positions,
    rope_apply,
    rope_cos_sin,
    sinusoidal_embedding,
    unpatchify,
)
from model_adapters.matrix_game.config import MatrixGameConfig

#: the per-stream inputs this model reads from ``SessionConfig.conditioning`` (per pixel frame / latent frame)
CONDITIONING_FIELDS = ("keyboard_cond", "mouse_cond", "cond_concat")


class ActionRMSNorm(nn.Module):
    """The ActionModule's ``WanRMSNorm``: the reference normalises and never applies its ``weight`` (kept so the
    checkpoint's key loads)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)


class ActionRope:
    """The ActionModule's RoPE over time (HunyuanVideo's ``get_nd_rotary_pos_embed`` on a [frames, 1, 1] grid):
    adjacent pairs, the first ``dims[0]`` dims rotate by ``frame * theta^(-2i/dims[0])``, the rest sit at spatial
    position 0 (no rotation)."""

    def __init__(self, head_dim: int, dims: tuple[int, int, int], theta: float):
        self.head_dim, self.dt = head_dim, dims[0]
        self.inv_freq = 1.0 / torch.pow(float(theta), torch.arange(0, self.dt, 2, dtype=torch.float64) / self.dt)

    def cos_sin(self, frames: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [T, 1, head_dim/2] for absolute frame indices [T]."""
        ang = torch.zeros(frames.numel(), self.head_dim // 2, dtype=torch.float64)
        ang[:, : self.dt // 2] = frames.to(torch.float64)[:, None] * self.inv_freq[None]
        return rope_cos_sin(ang, device)


class ActionModule(nn.Module):
    """Mouse and keyboard branches of one block (reference ``wan/modules/action_module.py`` names)."""

    def __init__(self, cfg: MatrixGameConfig):
        super().__init__()
        self.cfg = cfg
        d, H, win = cfg.dim, cfg.action_heads, cfg.action_window
        if cfg.keyboard_dim:
            hid, kc = cfg.keyboard_embed_dim, cfg.keyboard_hidden_dim
            self.keyboard_embed = nn.Sequential(nn.Linear(cfg.keyboard_dim, hid), nn.SiLU(), nn.Linear(hid, hid))
            self.key_attn_q_norm = ActionRMSNorm(kc // H) if cfg.qk_norm else nn.Identity()
            self.key_attn_k_norm = ActionRMSNorm(kc // H) if cfg.qk_norm else nn.Identity()
            self.mouse_attn_q = nn.Linear(d, kc, bias=cfg.qkv_bias)
            self.keyboard_attn_kv = nn.Linear(hid * win, 2 * kc, bias=cfg.qkv_bias)
            self.proj_keyboard = nn.Linear(kc, d, bias=cfg.qkv_bias)
        if cfg.mouse_dim:
            mc = cfg.mouse_hidden_dim
            self.mouse_mlp = nn.Sequential(nn.Linear(cfg.mouse_dim * win + d, mc), nn.GELU(approximate="tanh"),
                                           nn.Linear(mc, mc), nn.LayerNorm(mc))
            self.t_qkv = nn.Linear(mc, 3 * mc, bias=cfg.qkv_bias)
            self.img_attn_q_norm = ActionRMSNorm(mc // H) if cfg.qk_norm else nn.Identity()
            self.img_attn_k_norm = ActionRMSNorm(mc // H) if cfg.qk_norm else nn.Identity()
            self.proj_mouse = nn.Linear(mc, d, bias=cfg.qkv_bias)

    @staticmethod
    def _window(past_k, past_v, k, v, keep: int):
        """[the newest ``keep`` past frames ; the block's own] along dim -3 (frames)."""
        if keep <= 0 or past_k is None or past_k.shape[-3] == 0:
            return k, v
        return torch.cat([past_k[..., -keep:, :, :], k], dim=-3), torch.cat([past_v[..., -keep:, :, :], v], dim=-3)

    def forward(self, x, frames: int, start_frames, mouse_win, keyboard_win, past, rope: ActionRope):
        """x [S, F*N, dim]; mouse_win [S, F, 12, mouse_dim]; keyboard_win [S, F, 12, keyboard_dim];
        past: per stream a dict of its cached K/V [.., M, H, D] (M <= local_attn_size frames, oldest first) or
        None.  Returns (x + mouse + keyboard, new per-stream K/V of the block for the cache)."""
        cfg = self.cfg
        s, length, _ = x.shape
        n, H = length // frames, cfg.action_heads
        keep = cfg.local_attn_size - frames  # past frames the block sees (the reference's eviction)
        new = [{} for _ in range(s)]
        outs = []
        if cfg.mouse_dim:
            hs = x.unflatten(1, (frames, n)).transpose(1, 2)  # [S, N, F, dim]: per spatial token over time
            mw = mouse_win.flatten(2)[:, None].expand(s, n, frames, -1)  # [S, N, F, 12 * mouse_dim]
            qkv = self.t_qkv(self.mouse_mlp(torch.cat([hs, mw.to(hs.dtype)], dim=-1)))
            q, k, v = qkv.unflatten(-1, (3, H, -1)).unbind(-3)  # each [S, N, F, H, D]
            q, k = self.img_attn_q_norm(q).to(v), self.img_attn_k_norm(k).to(v)
            for i in range(s):
                cs = rope.cos_sin(torch.arange(start_frames[i], start_frames[i] + frames), x.device)
                qi, ki = _rope_frames(q[i], cs), _rope_frames(k[i], cs)  # [N, F, H, D]
                p = past[i] if past is not None else None
                kk, vv = self._window(p and p["mouse_k"], p and p["mouse_v"], ki, v[i], keep)
                o = F.scaled_dot_product_attention(qi.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2))
                outs.append(o.transpose(1, 2).transpose(0, 1).flatten(2).flatten(0, 1))  # [F*N, H*D]
                new[i]["mouse_k"], new[i]["mouse_v"] = ki, v[i]
            x = x + self.proj_mouse(torch.stack(outs))
        if cfg.keyboard_dim:
            emb = self.keyboard_embed(keyboard_win.to(x.dtype)).flatten(2)  # [S, F, 12 * hid]
            kk_all, vv_all = self.keyboard_attn_kv(emb).unflatten(-1, (2, H, -1)).unbind(-3)  # [S, F, H, D]
            q = self.mouse_attn_q(x).unflatten(-1, (H, -1))  # [S, F*N, H, D]
            q, kk_all = self.key_attn_q_norm(q).to(vv_all), self.key_attn_k_norm(kk_all).to(vv_all)
            outs = []
            for i in range(s):
                cs = rope.cos_sin(torch.arange(start_frames[i], start_frames[i] + frames), x.device)
                qi = _rope_frames(q[i].unflatten(0, (frames, n)).transpose(0, 1), cs)  # [N, F, H, D]
                ki = _rope_frames(kk_all[i][None], cs)[0]  # [F, H, D]
                p = past[i] if past is not None else None
                kk, vv = self._window(p and p["keyboard_k"], p and p["keyboard_v"], ki, vv_all[i], keep)
                # every spatial token attends to the same per-frame keyboard K/V: one attention over F*N queries
                qf = qi.transpose(0, 1).flatten(0, 1)  # [F*N, H, D] frame-major
                o = F.scaled_dot_product_attention(qf.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1))
                outs.append(o.transpose(0, 1).flatten(1))
                new[i]["keyboard_k"], new[i]["keyboard_v"] = ki, vv_all[i]
            x = x + self.proj_keyboard(torch.stack(outs))
        return x, new


def _rope_frames(x: torch.Tensor, cs) -> torch.Tensor:
    """x [N, T, H, D] rotated per frame by cos/sin [T, 1, D/2]."""
    cos, sin = cs
    nn_, t = x.shape[:2]
    flat = x.reshape(nn_ * t, *x.shape[2:])
    rep = (cos.repeat(nn_, 1, 1), sin.repeat(nn_, 1, 1))
    return rope_apply(flat, rep).reshape(x.shape)


class MLPProj(nn.Module):
    """Wan's image-feature projection ``img_emb``: LayerNorm, Linear, GELU, Linear, LayerNorm (names ``proj.*``)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(),
                                  nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim))

    def forward(self, x):
        return self.proj(x)


class MatrixGameBlock(CausalWanBlock):
    """A causal Wan block (self-attention, cross-attention, FFN reused) with an optional ``action_model``."""

    def __init__(self, cfg: MatrixGameConfig, layer: int):
        super().__init__(cfg)
        self.action_model = ActionModule(cfg) if layer in cfg.action_blocks else None


class MatrixGameModel(nn.Module):
    def __init__(self, cfg: MatrixGameConfig):
        super().__init__()
        self.cfg = cfg
        self.geometry = cfg.geometry()
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, d * 6))
        self.blocks = nn.ModuleList([MatrixGameBlock(cfg, i) for i in range(cfg.num_layers)])
        self.head = CausalHead(cfg)
        self.img_emb = MLPProj(cfg.img_dim, d)
        self.rope = Rope3D(cfg.head_dim, cfg.rope_frames)
        self.action_rope = ActionRope(cfg.action_head_dim, cfg.action_rope_dims, cfg.action_rope_theta)

    # ---- adapter-declared per-stream state ------------------------------------------------------------
    def stream_state_spec(self) -> dict[str, StateSpec]:
        """Per stream: for every action layer, the mouse K/V ``[tokens_per_frame, local_attn_size, heads, dim]``
        and the keyboard K/V ``[local_attn_size, heads, dim]``, oldest frame first, plus ``filled`` (frames held
        per action layer).  Zero-initialised; only ``forward``'s cache-writing pass changes them."""
        cfg, g = self.cfg, self.geometry
        dtype = self.patch_embedding.weight.dtype
        w, H, D, n = cfg.local_attn_size, cfg.action_heads, cfg.action_head_dim, g.tokens_per_frame
        spec = {}
        for layer in cfg.action_blocks:
            if cfg.mouse_dim:
                spec[f"mouse_k.{layer}"] = spec[f"mouse_v.{layer}"] = StateSpec((n, w, H, D), dtype)
            if cfg.keyboard_dim:
                spec[f"keyboard_k.{layer}"] = spec[f"keyboard_v.{layer}"] = StateSpec((w, H, D), dtype)
        if spec:
            spec["filled"] = StateSpec((len(cfg.action_blocks),), torch.int64)
        return spec

    def _past(self, states, layer: int, slot: int):
        if states is None:
            return None
        out = []
        for st in states.states:
            m = int(st["filled"][slot])
            out.append({name: st[f"{name}.{layer}"][..., :m, :, :] for name in ("mouse_k", "mouse_v", "keyboard_k",
                                                                             "keyboard_v") if f"{name}.{layer}" in st})
        return out

    def _append(self, states, layer: int, slot: int, new) -> None:
        """The cache-writing pass: each stream keeps its newest ``local_attn_size`` frames (the reference's
        eviction) — written in place, every slot past ``filled`` zero."""
        w = self.cfg.local_attn_size
        for st, blk in zip(states.states, new):
            m = int(st["filled"][slot])
            kept = None
            for name, t in blk.items():
                buf = st[f"{name}.{layer}"]
                seq = torch.cat([buf[..., :m, :, :], t.to(buf.dtype)], dim=-3)[..., -w:, :, :]
                buf.zero_()
                buf[..., : seq.shape[-3], :, :] = seq
                kept = seq.shape[-3]
            st["filled"][slot] = kept

    # ---- per-stream conditioning ----------------------------------------------------------------------
    def steering_rows(self) -> dict[str, int]:
        """The per-pixel-frame conditioning a user steers with, and each row's width (servers and viewers read it:
        ``keyboard_cond`` one-hot keys, ``mouse_cond`` camera deltas); the stream's pixel frames are
        ``cfg.pixel_frames(latent frames)``."""
        return {k: w for k, w in (("keyboard_cond", self.cfg.keyboard_dim), ("mouse_cond", self.cfg.mouse_dim)) if w}

    def check_conditioning(self, cond, num_frames: int | None = None) -> dict[str, torch.Tensor]:
        """Validate one stream's conditioning (``keyboard_cond [P, keyboard_dim]``, ``mouse_cond [P, mouse_dim]``
        per pixel frame, ``cond_concat [Fc, cond_channels, H, W]`` per latent frame; each optional) and return it
        as float tensors.  ``num_frames``: the stream's latent frames; actions longer than its ``1 + 4 (F - 1)``
        pixel frames are refused.  One ``ConfigError`` naming the field."""
        cfg = self.cfg
        if cond is None:
            return {}
        if not isinstance(cond, dict):
            raise ConfigError(f"conditioning must be a dict of tensors {list(CONDITIONING_FIELDS)}, got "
                              f"{type(cond).__name__}")
        unknown = sorted(set(cond) - set(CONDITIONING_FIELDS))
        if unknown:
            raise ConfigError(f"conditioning: unknown field(s) {unknown}; this model takes {list(CONDITIONING_FIELDS)}")
        out = {}
        widths = {"keyboard_cond": cfg.keyboard_dim, "mouse_cond": cfg.mouse_dim}
        most = cfg.pixel_frames(num_frames) if num_frames else None
        for name, width in widths.items():
            if name not in cond or cond[name] is None:
                continue
            t = cond[name]
            if not isinstance(t, torch.Tensor):
                t = torch.as_tensor(t, dtype=torch.float32) if isinstance(t, (list, tuple)) else None
            if t is None or t.dim() != 2 or t.shape[0] < 1 or t.shape[1] != width or not width:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(cond[name]).__name__
                raise ConfigError(f"{name} must be [pixel frames >= 1, {width}] (one row per pixel frame), got {shape}"
                                  if width else f"{name}: this model has no {name.split('_')[0]} branch")
            if most is not None and t.shape[0] > most:
                raise ConfigError(f"{name} has {t.shape[0]} pixel frames; a {num_frames}-frame stream takes at most "
                                  f"{most} (1 + {cfg.vae_time_compression_ratio} x (frames - 1))")
            t = t.to(torch.float32)
            if not torch.isfinite(t).all():
                raise ConfigError(f"{name} contains NaN or inf")
            out[name] = t
        if "keyboard_cond" in out and "mouse_cond" in out and out["keyboard_cond"].shape[0] != out["mouse_cond"].shape[0]:
            raise ConfigError(f"keyboard_cond and mouse_cond must cover the same pixel frames, got "
                              f"{out['keyboard_cond'].shape[0]} and {out['mouse_cond'].shape[0]}")
        if cond.get("cond_concat") is not None:
            t = cond["cond_concat"]
            want = (cfg.cond_channels, *cfg.latent_hw)
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] < 1 or tuple(t.shape[1:]) != want:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ConfigError(f"cond_concat must be [latent frames >= 1, {', '.join(map(str, want))}], got {shape}")
            if not torch.isfinite(t).all():
                raise ConfigError("cond_concat contains NaN or inf")
            out["cond_concat"] = t
        return out

    def _action_windows(self, cond: dict, start: int, frames: int, name: str, width: int) -> torch.Tensor:
        """[F, 12, width]: latent frame f sees pixel frames [4f - 12, 4f) (negative -> frame 0, past the given
        end -> the last given frame; none given -> zeros)."""
        r, win = self.cfg.vae_time_compression_ratio, self.cfg.action_window
        t = cond.get(name)
        if t is None:
            return torch.zeros(frames, win, width)
        f = torch.arange(start, start + frames)[:, None]
        idx = (r * f - win + torch.arange(win)[None]).clamp(0, t.shape[0] - 1)
        return t[idx]

    def _cond_frames(self, cond: dict, start: int, frames: int, device, dtype) -> torch.Tensor:
        cfg = self.cfg
        t = cond.get("cond_concat")
        if t is None:
            return torch.zeros(frames, cfg.cond_channels, *cfg.latent_hw, device=device, dtype=dtype)
        idx = torch.arange(start, start + frames).clamp(max=t.shape[0] - 1)
        return t[idx].to(device, dtype)

    # ---- adapter contract -------------------------------------------------------------------------------
    def encode_prompt(self, image_features: torch.Tensor) -> PromptState:
        """CLIP features of the conditioning image [L <= img_len, img_dim] -> cross-attention K/V of every layer."""
        cfg = self.cfg
        if image_features.dim() == 3 and image_features.shape[0] == 1:
            image_features = image_features[0]
        if image_features.dim() != 2 or image_features.shape[1] != cfg.img_dim or \
                not 1 <= image_features.shape[0] <= cfg.img_len:
            raise ConfigError(f"image features must be [L <= {cfg.img_len}, {cfg.img_dim}] (CLIP tokens, width), "
                              f"got {tuple(image_features.shape)}")
        if not torch.isfinite(image_features).all():
            raise ConfigError("image features contain NaN or inf")
        w = self.patch_embedding.weight
        ctx = self.img_emb(image_features.to(w))
        state = PromptState()
        for blk in self.blocks:
            k, v = blk.cross_kv(ctx)
            state.k.append(k)
            state.v.append(v)
        return state

    def token_positions(self, start_frame: int, frames: int) -> torch.Tensor:
        return grid_positions(torch.arange(start_frame, start_frame + frames), self.geometry.token_grid)

    def forward(self, latents, timesteps, prompts, start_frames, attention: SelfAttentionFn, conditioning=None,
                stream_state: StreamStates | None = None):
        """One block of S streams.  ``conditioning``: one dict per stream (``check_conditioning``), or None for
        none (zero actions, zero image conditioning).  ``stream_state``: the action caches the engine holds for
        each stream (``stream_state_spec``); None attends within the block only and keeps nothing."""
        cfg = self.cfg
        s, frames, c, hh, ww = latents.shape
        if c != cfg.out_dim or (hh, ww) != tuple(cfg.latent_hw) or frames < 1:
            raise ConfigError(f"latents must be [S, F, {cfg.out_dim}, {cfg.latent_hw[0]}, {cfg.latent_hw[1]}], "
                              f"got {tuple(latents.shape)}")
        if timesteps.shape != (s, frames):
            raise ConfigError(f"timesteps must be [S, F] = [{s}, {frames}], got {tuple(timesteps.shape)}")
        if len(prompts) != s or len(start_frames) != s:
            raise ConfigError(f"need one prompt and one start frame per sequence ({s})")
        if frames > cfg.local_attn_size:
            raise ConfigError(f"a block of {frames} frames exceeds local_attn_size {cfg.local_attn_size}")
        conds = [self.check_conditioning(c_) for c_ in conditioning] if conditioning is not None else [{}] * s
        if len(conds) != s:
            raise ConfigError(f"need one conditioning per sequence ({s}), got {len(conds)}")
        if stream_state is not None and len(stream_state.states) != s:
            raise ConfigError(f"need one stream state per sequence ({s}), got {len(stream_state.states)}")
        w = self.patch_embedding.weight
        cond = torch.stack([self._cond_frames(cd, sf, frames, w.device, w.dtype) for cd, sf in zip(conds, start_frames)])
        x = torch.cat([latents.to(w.dtype), cond], dim=2)  # [S, F, in_dim, H, W]: noise then image channels
        x = self.patch_embedding(x.permute(0, 2, 1, 3, 4)).flatten(2).transpose(1, 2)  # [S, L, dim]
        positions = torch.cat([self.token_positions(sf, frames) for sf in start_frames])
        angles = rope_cos_sin(self.rope.phases(positions), w.device)
        mouse = keyboard = None
        if cfg.mouse_dim:
            mouse = torch.stack([self._action_windows(cd, sf, frames, "mouse_cond", cfg.mouse_dim)
                                 for cd, sf in zip(conds, start_frames)]).to(w.device, w.dtype)
        if cfg.keyboard_dim:
            keyboard = torch.stack([self._action_windows(cd, sf, frames, "keyboard_cond", cfg.keyboard_dim)
                                    for cd, sf in zip(conds, start_frames)]).to(w.device, w.dtype)

        e = self.time_embedding(sinusoidal_embedding(cfg.freq_dim, timesteps.flatten()).to(w.dtype))
        e0 = self.time_projection(e).unflatten(1, (6, cfg.dim)).unflatten(0, (s, frames))
        for i, blk in enumerate(self.blocks):
            ck = torch.stack([p.k[i] for p in prompts])
            cv = torch.stack([p.v[i] for p in prompts])
            em = blk.modulation_terms(e0)
            x = blk.self_attention(x, em, frames, i, angles, positions, attention)
            x = blk.cross_attention(x, ck, cv)
            if blk.action_model is not None:
                slot = cfg.action_blocks.index(i)
                x, new = blk.action_model(x, frames, list(start_frames), mouse, keyboard,
                                          self._past(stream_state, i, slot), self.action_rope)
                if stream_state is not None and stream_state.write:
                    self._append(stream_state, i, slot, new)
            x = blk.feed_forward(x, em, frames)
        x = self.head(x, e.unflatten(0, (s, frames)), frames)
        return self.unpatchify(x, frames)

    def unpatchify(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        return unpatchify(x, frames, self.geometry.token_grid, self.cfg.patch_size, self.cfg.out_dim)
