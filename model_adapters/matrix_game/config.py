"""Matrix-Game 2.0 configs (no torch model import: the CLI lists presets before anything is built).

Matrix-Game 2.0 (SkyworkAI/Matrix-Game, folder ``Matrix-Game-2/``, MIT) is an image-to-video causal Wan2.1-1.3B,
Self-Forcing distilled, whose first ``len(action_blocks)`` blocks carry an ``ActionModule``: a mouse branch
(temporal self-attention per spatial token over a window of mouse values) and a keyboard branch (every spatial
token attends to per-frame keyboard K/V).  Field names follow the reference ``config.json`` where it has them
(``action_config`` is flattened: ``action_blocks``, ``action_heads`` ...).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ff_engine.errors import ConfigError
from model_adapters.base import VideoGeometry


@dataclass(frozen=True)
class MatrixGameConfig:
    # ---- the Wan2.1 backbone (reference CausalWanModel, model_type "i2v") ----
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 36  # noisy latent (out_dim) + image conditioning (mask 4 + image latent 16) channels
    out_dim: int = 16
    freq_dim: int = 256
    img_dim: int = 1280  # CLIP ViT-H feature width (``img_emb = MLPProj(1280, dim)``, hard-coded upstream)
    img_len: int = 257  # CLIP tokens of the conditioning image
    patch_size: tuple[int, int, int] = (1, 2, 2)
    latent_hw: tuple[int, int] = (44, 80)  # 352 x 640 pixels / VAE stride 8
    frames_per_block: int = 3
    local_attn_size: int = 6  # latent frames each cache holds, the block's own included (-1 upstream: refused)
    sink_size: int = 0
    rope_frames: int = 1024
    vae_stride: tuple[int, int, int] = (4, 8, 8)
    fps: int = 16
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    # ---- the ActionModule (reference ``action_config``) ----
    action_blocks: tuple[int, ...] = tuple(range(15))
    action_heads: int = 16  # heads_num
    keyboard_dim: int = 4  # keyboard_dim_in (0: no keyboard branch)
    mouse_dim: int = 2  # mouse_dim_in (0: no mouse branch)
    keyboard_embed_dim: int = 128  # hidden_size of keyboard_embed
    keyboard_hidden_dim: int = 1024
    mouse_hidden_dim: int = 1024
    windows_size: int = 3  # latent frames of actions each frame sees (x vae_time_compression_ratio pixel frames)
    vae_time_compression_ratio: int = 4
    action_rope_dims: tuple[int, int, int] = (8, 28, 28)  # mouse_qk_dim_list / rope_dim_list (t, h, w)
    action_rope_theta: float = 256.0
    qkv_bias: bool = False
    # ---- how ff-engine runs it (inference_universal.yaml) ----
    sample_steps: tuple[int, ...] = (1000, 666, 333)
    sample_shift: float = 5.0
    sample_stochastic: bool = True
    context_noise: float = 0.0
    decoder: str = "wan-vae"

    def __post_init__(self):
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ConfigError(f"dim {self.dim} must split into num_heads {self.num_heads} even-sized heads")
        if self.latent_hw[0] % self.patch_size[1] or self.latent_hw[1] % self.patch_size[2]:
            raise ConfigError(f"latent_hw {self.latent_hw} must be divisible by the patch {self.patch_size[1:]}")
        if self.patch_size[0] != 1:
            raise ConfigError("temporal patch size must be 1 for block-causal generation")
        if self.in_dim <= self.out_dim:
            raise ConfigError(f"in_dim {self.in_dim} must exceed out_dim {self.out_dim} (image-conditioning channels)")
        if self.local_attn_size < self.frames_per_block:
            raise ConfigError(f"local_attn_size {self.local_attn_size} must hold at least one block "
                              f"({self.frames_per_block} frames); global attention (-1) is not a Matrix-Game setting")
        if self.sink_size:
            raise ConfigError("sink_size > 0 is not served (Matrix-Game 2.0 uses 0)")
        if any(not 0 <= b < self.num_layers for b in self.action_blocks) or \
                len(set(self.action_blocks)) != len(self.action_blocks):
            raise ConfigError(f"action_blocks {list(self.action_blocks)} must be distinct layers < {self.num_layers}")
        if self.action_blocks:
            for name, width in (("keyboard_hidden_dim", self.keyboard_hidden_dim),
                                ("mouse_hidden_dim", self.mouse_hidden_dim)):
                if width % self.action_heads:
                    raise ConfigError(f"{name} {width} must be divisible by action_heads {self.action_heads}")
            if self.keyboard_dim and self.mouse_dim and self.keyboard_hidden_dim != self.mouse_hidden_dim:
                raise ConfigError("keyboard_hidden_dim and mouse_hidden_dim must be equal (one action head size)")
            if sum(self.action_rope_dims) != self.action_head_dim or any(d % 2 for d in self.action_rope_dims):
                raise ConfigError(f"action_rope_dims {list(self.action_rope_dims)} must be even and sum to the "
                                  f"action head dim {self.action_head_dim}")
        if self.keyboard_dim < 0 or self.mouse_dim < 0 or not (self.keyboard_dim or self.mouse_dim):
            raise ConfigError("a Matrix-Game model needs a keyboard or a mouse branch (keyboard_dim / mouse_dim)")

    # ---- what the engine reads ----
    @property
    def text_dim(self) -> int:  # the "prompt" is the conditioning image's CLIP features [img_len, img_dim]
        return self.img_dim

    @property
    def text_len(self) -> int:
        return self.img_len

    @property
    def conditional(self) -> bool:
        return True

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def cond_channels(self) -> int:
        return self.in_dim - self.out_dim

    @property
    def action_head_dim(self) -> int:
        width = self.mouse_hidden_dim if self.mouse_dim else self.keyboard_hidden_dim
        return width // self.action_heads

    @property
    def action_window(self) -> int:
        """Pixel frames of actions one latent frame sees: windows_size x vae_time_compression_ratio (12)."""
        return self.windows_size * self.vae_time_compression_ratio

    def pixel_frames(self, latent_frames: int) -> int:
        """Per-pixel-frame actions a stream of ``latent_frames`` is given (the reference's 1 + 4 (F - 1))."""
        return 1 + self.vae_time_compression_ratio * (latent_frames - 1) if latent_frames else 0

    def geometry(self) -> VideoGeometry:
        return VideoGeometry(
            num_layers=self.num_layers, num_heads=self.num_heads, num_kv_heads=self.num_heads,
            head_dim=self.head_dim, latent_channels=self.out_dim, latent_hw=tuple(self.latent_hw),
            patch=tuple(self.patch_size), frames_per_block=self.frames_per_block, max_frames=self.rope_frames,
            vae_stride=tuple(self.vae_stride), fps=self.fps,
        )

    def with_(self, **kw) -> MatrixGameConfig:
        return replace(self, **kw)


PRESETS: dict[str, MatrixGameConfig] = {
    # configs/distilled_model/universal: keyboard W/S/A/D (4) + mouse (2), ActionModule in blocks 0-14.
    "matrix-game-2-universal": MatrixGameConfig(),
    # configs/distilled_model/gta_drive: keyboard forward/back (2) + mouse (steering, 2).
    "matrix-game-2-gta": MatrixGameConfig(keyboard_dim=2),
    # configs/distilled_model/templerun: keyboard only (7 actions), no mouse branch.
    "matrix-game-2-templerun": MatrixGameConfig(keyboard_dim=7, mouse_dim=0),
    # The geometry of the recorded reference fixture (tests/fixtures/matrix_game): dim 128, 2 x 64 heads,
    # 3 layers (ActionModule in 0 and 1), 24 tokens per frame, a 6-frame window.
    "matrix-game-tiny": MatrixGameConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=3, latent_hw=(8, 12),
                                         action_blocks=(0, 1), action_heads=2, keyboard_embed_dim=32,
                                         keyboard_hidden_dim=128, mouse_hidden_dim=128),
}
