"""SkyReels-V2 diffusion-forcing configs and presets (importing this needs no diffusers).

The fields named as in diffusers' ``SkyReelsV2Transformer3DModel`` config are passed to it unchanged; the rest
say how ff-engine runs the model.  ``frames_per_block`` is diffusers' ``num_frame_per_block`` (the pipeline's
``causal_block_size``): the transformer's block-causal mask makes frame block b attend to blocks <= b, which is
exactly a KV cache of the finished blocks, so the engine serves it block by block.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ff_engine.errors import ConfigError
from model_adapters.base import VideoGeometry

#: SkyReels-V2's recommended 30 sampling steps (its pipeline: UniPC, flow shift 8); ff-engine takes Euler steps
#: on the same shifted timestep grid (``sample_stochastic=False``)
THIRTY_STEPS = tuple(round(1000 - 1000 * i / 30) for i in range(30))


@dataclass(frozen=True)
class SkyReelsV2Config:
    # -- diffusers SkyReelsV2Transformer3DModel fields (T2V diffusion forcing) --
    num_attention_heads: int = 12
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 8960
    num_layers: int = 30
    patch_size: tuple[int, int, int] = (1, 2, 2)
    cross_attn_norm: bool = True
    qk_norm: str = "rms_norm_across_heads"
    eps: float = 1e-6
    inject_sample_info: bool = True  # fps conditioning (DF-1.3B has it, the 14B models do not)
    rope_max_seq_len: int = 1024
    # -- how ff-engine runs it --
    frames_per_block: int = 5  # num_frame_per_block / causal_block_size
    text_len: int = 512  # umT5 tokens, zero-padded as the pipeline pads them
    latent_hw: tuple[int, int] = (68, 120)  # 544 x 960 (540P) / VAE stride 8
    vae_stride: tuple[int, int, int] = (4, 8, 8)
    fps: int = 24  # the pipeline's default; its fps embedding index is 0 for 16 fps and 1 otherwise
    sample_steps: tuple[int, ...] = THIRTY_STEPS
    sample_shift: float = 8.0
    sample_stochastic: bool = False
    context_noise: float = 0.0  # the pipeline's addnoise_condition conditions history at timestep ~20 (optional)
    decoder: str = "wan-vae"
    conditional: bool = True

    def __post_init__(self):
        hd = self.attention_head_dim
        if hd % 2 or hd < 6:
            raise ConfigError(f"attention_head_dim must be even and >= 6 for the 3D RoPE, got {hd}")
        if self.patch_size[0] != 1:
            raise ConfigError("patch_size[0] (temporal patch) must be 1 for block-causal generation")
        if self.latent_hw[0] % self.patch_size[1] or self.latent_hw[1] % self.patch_size[2]:
            raise ConfigError(f"latent_hw {self.latent_hw} must be divisible by the patch {self.patch_size[1:]}")
        if self.frames_per_block < 2:
            raise ConfigError("frames_per_block (causal_block_size) must be >= 2: with 1, diffusers runs SkyReels-V2 "
                              "without its causal mask (every frame attends to every other), which no KV cache serves")
        if self.qk_norm != "rms_norm_across_heads":
            raise ConfigError(f"qk_norm must be 'rms_norm_across_heads' (SkyReels-V2's), got {self.qk_norm!r}")

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def fps_id(self) -> int:
        """The fps embedding index diffusers' SkyReels-V2 pipelines feed: 0 for 16 fps, 1 for anything else."""
        return 0 if self.fps == 16 else 1

    def geometry(self) -> VideoGeometry:
        return VideoGeometry(
            num_layers=self.num_layers, num_heads=self.num_attention_heads, num_kv_heads=self.num_attention_heads,
            head_dim=self.attention_head_dim, latent_channels=self.in_channels, latent_hw=tuple(self.latent_hw),
            patch=tuple(self.patch_size), frames_per_block=self.frames_per_block, max_frames=self.rope_max_seq_len,
            vae_stride=tuple(self.vae_stride), fps=self.fps,
        )

    def diffusers_config(self) -> dict:
        """Keyword arguments of ``SkyReelsV2Transformer3DModel`` (T2V: no image conditioning)."""
        return {
            "patch_size": tuple(self.patch_size), "num_attention_heads": self.num_attention_heads,
            "attention_head_dim": self.attention_head_dim, "in_channels": self.in_channels,
            "out_channels": self.out_channels, "text_dim": self.text_dim, "freq_dim": self.freq_dim,
            "ffn_dim": self.ffn_dim, "num_layers": self.num_layers, "cross_attn_norm": self.cross_attn_norm,
            "qk_norm": self.qk_norm, "eps": self.eps, "image_dim": None, "added_kv_proj_dim": None,
            "rope_max_seq_len": self.rope_max_seq_len, "pos_embed_seq_len": None,
            "inject_sample_info": self.inject_sample_info, "num_frame_per_block": self.frames_per_block,
        }

    def with_(self, **kw) -> SkyReelsV2Config:
        return replace(self, **kw)


PRESETS: dict[str, SkyReelsV2Config] = {
    # Skywork/SkyReels-V2-DF-1.3B-540P (diffusers config: 12 x 128 heads, 30 layers, ffn 8960, fps conditioning),
    # 544 x 960, causal blocks of 5 latent frames (the pipeline's recommended causal_block_size).
    "skyreels-v2-df-1.3b-540p": SkyReelsV2Config(),
    # Skywork/SkyReels-V2-DF-14B-540P and -720P: 40 x 128 heads, 40 layers, ffn 13824, no fps conditioning.
    "skyreels-v2-df-14b-540p": SkyReelsV2Config(num_attention_heads=40, num_layers=40, ffn_dim=13824,
                                                inject_sample_info=False),
    "skyreels-v2-df-14b-720p": SkyReelsV2Config(num_attention_heads=40, num_layers=40, ffn_dim=13824,
                                                inject_sample_info=False, latent_hw=(90, 160)),
    # Tiny random-weight geometry for tests: 2 x 64 heads, 2 layers, 2-frame blocks, 24 tokens per frame.
    "skyreels-v2-tiny": SkyReelsV2Config(num_attention_heads=2, attention_head_dim=64, num_layers=2, ffn_dim=256,
                                         text_dim=64, freq_dim=64, text_len=16, latent_hw=(8, 12),
                                         frames_per_block=2, sample_steps=(1000, 750, 500, 250)),
}
