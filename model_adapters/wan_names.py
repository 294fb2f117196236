"""Wan2.1 parameter names <-> diffusers' names, shared by the Wan-derived architectures (causal Wan, SkyReels-V2).

The table is the inverse of diffusers' own conversion scripts (``convert_wan_to_diffusers.py``,
``convert_skyreelsv2_to_diffusers.py``): diffusers calls the cross-attention norm ``norm2`` and the FFN norm
``norm3`` where Wan calls them ``norm3`` and ``norm2``; the head's and blocks' ``modulation`` are its
``scale_shift_table``.
"""

from __future__ import annotations

import re

import torch

from model_adapters.checkpoints import rename

#: diffusers name -> Wan2.1 name (substrings; the longest match wins; norm2/norm3 swap)
DIFFUSERS_TO_WAN = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1.to_q", "self_attn.q"), ("attn1.to_k", "self_attn.k"), ("attn1.to_v", "self_attn.v"),
    ("attn1.to_out.0", "self_attn.o"), ("attn1.norm_q", "self_attn.norm_q"), ("attn1.norm_k", "self_attn.norm_k"),
    ("attn2.to_q", "cross_attn.q"), ("attn2.to_k", "cross_attn.k"), ("attn2.to_v", "cross_attn.v"),
    ("attn2.to_out.0", "cross_attn.o"), ("attn2.norm_q", "cross_attn.norm_q"), ("attn2.norm_k", "cross_attn.norm_k"),
    ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
    ("fps_projection.net.0.proj", "fps_projection.0"), ("fps_projection.net.2", "fps_projection.2"),
    ("norm2", "norm3"), ("norm3", "norm2"),
    ("proj_out", "head.head"),
)


def is_diffusers_layout(keys) -> bool:
    return any(k.startswith("condition_embedder.") or ".attn1." in k for k in keys)


def from_diffusers(sd: dict[str, torch.Tensor], notes: list[str] | None = None) -> dict[str, torch.Tensor]:
    """diffusers names -> Wan2.1 names."""
    out = rename(sd, DIFFUSERS_TO_WAN)
    out = {("head.modulation" if k == "scale_shift_table" else re.sub(r"\.scale_shift_table$", ".modulation", k)): v
           for k, v in out.items()}
    if notes is not None:
        notes.append(f"renamed {len(sd)} diffusers keys to Wan2.1 names")
    return out


def to_diffusers(sd: dict[str, torch.Tensor], notes: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Wan2.1 names -> diffusers names (the inverse of ``from_diffusers``)."""
    out = rename(sd, tuple((new, old) for old, new in DIFFUSERS_TO_WAN))
    out = {("scale_shift_table" if k == "head.modulation" else re.sub(r"\.modulation$", ".scale_shift_table", k)): v
           for k, v in out.items()}
    if notes is not None:
        notes.append(f"renamed {len(sd)} Wan2.1 keys to diffusers names")
    return out
