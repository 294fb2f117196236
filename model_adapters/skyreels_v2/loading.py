"""SkyReels-V2 checkpoints: diffusers' layout (``Skywork/SkyReels-V2-DF-*-Diffusers``: a folder of
``diffusion_pytorch_model*.safetensors`` with its ``config.json``) or SkyReels' original Wan-named release
(``model*.safetensors`` with ``fps_embedding`` / ``fps_projection.{0,2}``), renamed as diffusers' conversion script
does.  Geometry comes from tensor shapes; heads from the recorded config (diffusers' field names) or the preset."""

from __future__ import annotations

import math
import re

import torch

from ff_engine.errors import CheckpointError
from model_adapters import checkpoints
from model_adapters.skyreels_v2.config import SkyReelsV2Config
from model_adapters.wan_names import is_diffusers_layout, to_diffusers


def _meta(meta: dict) -> dict:
    """Recorded config fields (ours, or diffusers' config.json names, which are mostly the same)."""
    for k in ("image_dim", "added_kv_proj_dim"):
        if meta.get(k) is not None:
            raise CheckpointError(f"SkyReels-V2 {k}={meta[k]!r}: image-to-video checkpoints are not supported (T2V only)")
    meta = dict(meta)
    if "num_frame_per_block" in meta:  # diffusers' name; its default 1 means "set per call": keep the preset's
        n = meta.pop("num_frame_per_block")
        if n != 1:
            meta.setdefault("frames_per_block", n)
    return checkpoints.recorded_config(SkyReelsV2Config, meta)


def adopt(sd: dict[str, torch.Tensor], meta: dict, base: SkyReelsV2Config, notes: list[str]
          ) -> tuple[SkyReelsV2Config, dict[str, torch.Tensor]]:
    """A cleaned state dict (either layout) -> (config, diffusers-named tensors)."""
    if not is_diffusers_layout(sd):
        sd = to_diffusers(sd, notes)
    try:
        pe = sd["patch_embedding.weight"]
        layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
        kw = {
            "in_channels": pe.shape[1], "patch_size": tuple(pe.shape[2:]), "num_layers": max(layers) + 1,
            "ffn_dim": sd["blocks.0.ffn.net.0.proj.weight"].shape[0],
            "text_dim": sd["condition_embedder.text_embedder.linear_1.weight"].shape[1],
            "freq_dim": sd["condition_embedder.time_embedder.linear_1.weight"].shape[1],
            "inject_sample_info": "fps_embedding.weight" in sd,
            "cross_attn_norm": "blocks.0.norm2.weight" in sd,
        }
        kw["out_channels"] = sd["proj_out.weight"].shape[0] // math.prod(kw["patch_size"])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"not a SkyReels-V2 checkpoint: missing key {exc.args[0]}") from None
    dim = pe.shape[0]
    for k, v in _meta(meta).items():  # every recorded field the tensor shapes did not already decide
        kw.setdefault(k, v)
    if "num_attention_heads" not in kw:
        kw["num_attention_heads"] = base.num_attention_heads if base.dim == dim else max(1, dim // 128)
    kw.setdefault("attention_head_dim", dim // kw["num_attention_heads"])
    if kw["num_attention_heads"] * kw["attention_head_dim"] != dim:
        raise CheckpointError(f"SkyReels-V2 heads {kw['num_attention_heads']} x {kw['attention_head_dim']} do not "
                              f"make the checkpoint's width {dim}")
    return base.with_(**kw), sd
