"""Matrix-Game 2.0 in the model registry: the action-conditioned causal Wan with adapter-declared action caches."""

from __future__ import annotations

from model_adapters.causal_wan.arch import wan_block_flops
from model_adapters.matrix_game.config import PRESETS, MatrixGameConfig
from model_adapters.matrix_game.loading import adopt, is_matrix_game
from model_adapters.registry import Architecture, register


def build(cfg: MatrixGameConfig):
    from model_adapters.matrix_game.model import MatrixGameModel

    return MatrixGameModel(cfg)


def claims(keys: set, meta: dict) -> bool:
    return is_matrix_game(keys) or meta.get("_class_name") == "CausalWanModel" and "action_config" in meta


def _linear(i: int, o: int, bias: bool = True) -> int:
    return i * o + (o if bias else 0)


def action_params(cfg: MatrixGameConfig) -> int:
    """Parameters of one ActionModule."""
    d, win, b = cfg.dim, cfg.action_window, cfg.qkv_bias
    n = 0
    if cfg.keyboard_dim:
        hid, kc = cfg.keyboard_embed_dim, cfg.keyboard_hidden_dim
        n += _linear(cfg.keyboard_dim, hid) + _linear(hid, hid)
        n += 2 * (kc // cfg.action_heads) if cfg.qk_norm else 0
        n += _linear(d, kc, b) + _linear(hid * win, 2 * kc, b) + _linear(kc, d, b)
    if cfg.mouse_dim:
        mc = cfg.mouse_hidden_dim
        n += _linear(cfg.mouse_dim * win + d, mc) + _linear(mc, mc) + 2 * mc
        n += _linear(mc, 3 * mc, b) + (2 * (mc // cfg.action_heads) if cfg.qk_norm else 0) + _linear(mc, d, b)
    return n


def param_count(cfg: MatrixGameConfig) -> int:
    """Parameters of ``MatrixGameModel(cfg)`` from its config alone."""
    d, f = cfg.dim, cfg.ffn_dim
    qk_norm = 4 * d if cfg.qk_norm else 0
    cross_norm = 2 * d if cfg.cross_attn_norm else 0
    per_block = 8 * (d * d + d) + qk_norm + cross_norm + (d * f + f + f * d + d) + 6 * d
    patch = cfg.in_dim * d * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2] + d
    embed = cfg.freq_dim * d + d + d * d + d + d * 6 * d + 6 * d
    img = 2 * cfg.img_dim + _linear(cfg.img_dim, cfg.img_dim) + _linear(cfg.img_dim, d) + 2 * d
    out = cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2] * cfg.out_dim
    head = d * out + out + 2 * d
    return cfg.num_layers * per_block + len(cfg.action_blocks) * action_params(cfg) + patch + embed + img + head


def forward_flops(cfg: MatrixGameConfig, query_tokens: int, cached_tokens: int) -> int:
    """Wan2.1's block FLOPs (cross-attention over the ``img_len`` image tokens) plus, per action layer and query
    token, the mouse MLP / qkv / projection, the keyboard query / projection and both attentions over at most
    ``local_attn_size`` frames (the per-frame keyboard K/V and embedding are negligible).  A lower bound."""
    wan = wan_block_flops(cfg.dim, cfg.ffn_dim, cfg.num_layers, cfg.img_len, query_tokens, cached_tokens)
    n, d, w, win = query_tokens, cfg.dim, cfg.local_attn_size, cfg.action_window
    macs = 0
    if cfg.mouse_dim:
        mc = cfg.mouse_hidden_dim
        macs += n * ((cfg.mouse_dim * win + d) * mc + mc * mc + 3 * mc * mc + mc * d + 2 * w * mc)
    if cfg.keyboard_dim:
        kc = cfg.keyboard_hidden_dim
        macs += n * (d * kc + kc * d + 2 * w * kc)
    return wan + 2 * len(cfg.action_blocks) * macs


def decoder(cfg, vae=None):
    from model_adapters.decoders import WanVAEDecoder, default_decoder

    if vae:
        return WanVAEDecoder(vae, latent_channels=cfg.geometry().latent_channels)
    return default_decoder(cfg)


ARCH = register(Architecture(
    name="matrix-game", summary="Matrix-Game 2.0 (action-conditioned image-to-video causal Wan, keyboard + mouse)",
    config_type=MatrixGameConfig, presets=PRESETS, test_preset="matrix-game-tiny",
    default_preset="matrix-game-2-universal", build=build, adopt=adopt, claims=claims, param_count=param_count,
    forward_flops=forward_flops, decoder=decoder,
))
