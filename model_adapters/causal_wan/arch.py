"""Causal Wan2.1 in the model registry: Self-Forcing / CausVid / LongLive checkpoints and the in-repo world model."""

from __future__ import annotations

import torch

from model_adapters.causal_wan.loading import adopt
from model_adapters.causal_wan.model import PRESETS, CausalWanConfig, CausalWanModel
from model_adapters.registry import Architecture, register


def build(cfg: CausalWanConfig) -> CausalWanModel:
    model = CausalWanModel(cfg)
    with torch.no_grad():  # random weights: give the head a signal a latent preview shows (a load overwrites it)
        model.head.head.weight.normal_(0, 0.02)
    return model


def claims(keys: set, meta: dict) -> bool:
    """Wan2.1 names, or diffusers ``WanTransformer3DModel`` names (not SkyReels-V2's, which add fps conditioning)."""
    if "fps_embedding.weight" in keys or meta.get("_class_name", "").startswith("SkyReels"):
        return False
    if "img_emb.proj.1.weight" in keys:  # image-to-video (Matrix-Game's i2v causal Wan, model_adapters/matrix_game)
        return False
    wan = "patch_embedding.weight" in keys and "blocks.0.self_attn.q.weight" in keys
    diffusers = "patch_embedding.weight" in keys and "blocks.0.attn1.to_q.weight" in keys
    return wan or diffusers


def param_count(cfg: CausalWanConfig) -> int:
    """Parameters of ``CausalWanModel(cfg)`` from its config alone (no allocation)."""
    d, f, n_layers = cfg.dim, cfg.ffn_dim, cfg.num_layers
    qk_norm = 4 * d if cfg.qk_norm else 0  # norm_q, norm_k of self- and cross-attention
    cross_norm = 2 * d if cfg.cross_attn_norm else 0
    per_block = 8 * (d * d + d) + qk_norm + cross_norm + (d * f + f + f * d + d) + 6 * d
    patch = cfg.in_dim * d * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2] + d
    embed = cfg.text_dim * d + d + d * d + d + cfg.freq_dim * d + d + d * d + d + d * 6 * d + 6 * d
    out = cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2] * cfg.out_dim
    head = d * out + out + 2 * d
    return n_layers * per_block + patch + embed + head


def wan_block_flops(dim: int, ffn_dim: int, num_layers: int, text_len: int, query_tokens: int,
                    cached_tokens: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one Wan2.1 forward pass over ``query_tokens`` rows: per layer the
    self-attention projections q, k, v, o (4 N d^2), scores and weighted values over the cache and the block
    itself (2 N (L + N) d), the cross-attention projections q, o (2 N d^2; the prompt's K/V are computed once
    per prompt) and its attention over ``text_len`` keys (2 N T d), the FFN (2 N d F).  Norms, modulation, the
    patch embedding and the head are left out (under 1 % at Wan-1.3B sizes): a lower bound, as a limit must be."""
    n, ctx = query_tokens, cached_tokens + query_tokens
    macs = 4 * n * dim * dim + 2 * n * ctx * dim + 2 * n * dim * dim + 2 * n * text_len * dim + 2 * n * dim * ffn_dim
    return 2 * num_layers * macs


def forward_flops(cfg: CausalWanConfig, query_tokens: int, cached_tokens: int) -> int:
    return wan_block_flops(cfg.dim, cfg.ffn_dim, cfg.num_layers, cfg.text_len, query_tokens, cached_tokens)


def decoder(cfg, vae=None):
    from model_adapters.decoders import WanVAEDecoder, default_decoder

    if vae:
        return WanVAEDecoder(vae, latent_channels=cfg.geometry().latent_channels)
    return default_decoder(cfg)


ARCH = register(Architecture(
    name="causal-wan",
    summary="causal Wan2.1 (Self-Forcing, CausVid, LongLive; the in-repo world model)",
    config_type=CausalWanConfig,
    presets=PRESETS,
    test_preset="wan-tiny",
    default_preset="wan-1.3b",
    build=build,
    adopt=adopt,
    claims=claims,
    param_count=param_count,
    forward_flops=forward_flops,
    decoder=decoder,
))
