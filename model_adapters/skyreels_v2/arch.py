"""SkyReels-V2 diffusion forcing in the model registry (diffusers' ``SkyReelsV2Transformer3DModel``)."""

from __future__ import annotations

from model_adapters.causal_wan.arch import wan_block_flops
from model_adapters.registry import Architecture, register
from model_adapters.skyreels_v2.config import PRESETS, SkyReelsV2Config
from model_adapters.skyreels_v2.loading import adopt


def build(cfg: SkyReelsV2Config):
    from model_adapters.skyreels_v2.model import SkyReelsV2Adapter  # imports diffusers

    return SkyReelsV2Adapter(cfg)


def claims(keys: set, meta: dict) -> bool:
    """diffusers' SkyReels-V2 layout (its config names the class) or SkyReels' own release (fps conditioning keys)."""
    if meta.get("_class_name") == "SkyReelsV2Transformer3DModel":
        return True
    return "fps_embedding.weight" in keys and ("patch_embedding.weight" in keys)


def param_count(cfg: SkyReelsV2Config) -> int:
    """Parameters of diffusers' ``SkyReelsV2Transformer3DModel`` for this config, without building it."""
    d, f = cfg.dim, cfg.ffn_dim
    patch = cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
    attn = 4 * (d * d + d) + 2 * d  # q, k, v, out + RMS norm_q / norm_k
    block = 2 * attn + (d * f + f + f * d + d) + 6 * d + (2 * d if cfg.cross_attn_norm else 0)
    embed = cfg.in_channels * d * patch + d  # patch embedding
    embed += cfg.freq_dim * d + d + d * d + d + d * 6 * d + 6 * d  # time embedder (2 linears) + time projection
    embed += cfg.text_dim * d + d + d * d + d  # text embedder
    fps = 2 * d + (d * d + d) + (d * 6 * d + 6 * d) if cfg.inject_sample_info else 0  # embedding + linear-silu FFN
    head = d * cfg.out_channels * patch + cfg.out_channels * patch + 2 * d
    return cfg.num_layers * block + embed + fps + head



def forward_flops(cfg: SkyReelsV2Config, query_tokens: int, cached_tokens: int) -> int:
    """Wan2.1's block structure (``causal_wan.arch.wan_block_flops``); the fps embedding is not a matmul per token."""
    return wan_block_flops(cfg.dim, cfg.ffn_dim, cfg.num_layers, cfg.text_len, query_tokens, cached_tokens)

def decoder(cfg, vae=None):
    from model_adapters.decoders import LatentPreviewDecoder, WanVAEDecoder

    if vae:
        return WanVAEDecoder(vae, latent_channels=cfg.geometry().latent_channels)
    g = cfg.geometry()
    return LatentPreviewDecoder(g.vae_stride[1], g.vae_stride[0])


ARCH = register(Architecture(
    name="skyreels-v2",
    summary="SkyReels-V2 diffusion forcing (diffusers SkyReelsV2Transformer3DModel, block-causal)",
    config_type=SkyReelsV2Config,
    presets=PRESETS,
    test_preset="skyreels-v2-tiny",
    default_preset="skyreels-v2-df-1.3b-540p",
    build=build,
    adopt=adopt,
    claims=claims,
    param_count=param_count,
    forward_flops=forward_flops,
    decoder=decoder,
    weights_module=lambda model: model.transformer,
))
