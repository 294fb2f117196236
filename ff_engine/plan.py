"""KV-memory planning from model geometry alone: bytes per stream and streams per GPU, bounded vs unbounded."""

from __future__ import annotations

import re

from ff_engine.engine.engine import MAX_STREAM_FRAMES, stream_pages
from ff_engine.errors import ConfigError
from ff_engine.memory import kv_page_bytes

_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_bytes(text: str) -> int:
    """'80GiB', '141GB', '8e9', '1.5 TiB' -> bytes (> 0 and finite)."""
    m = re.fullmatch(r"\s*((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    value = float(m.group(1)) * _UNITS[m.group(2).lower()] if m and m.group(2).lower() in _UNITS else None
    if value is None or not 1 <= value < 2**80:
        raise ConfigError(f"--gpu-mem must look like 80GiB, 141GB or 8e9 bytes (at least 1 byte), got {text!r}")
    return int(value)


def plan(geometry, *, gpu_mem_bytes: int, budget_frames: int, seconds: float, page_size: int = 32,
         dtype_bytes: int = 2, weights_bytes: int = 0, reserve_fraction: float = 0.1) -> dict:
    """KV bytes of one stream (pages rounded up per layer) and how many streams fit in what the GPU has left
    after weights and a ``reserve_fraction`` of activations/workspace."""
    g = geometry
    if not isinstance(page_size, int) or page_size < 1:
        raise ConfigError(f"page_size must be an integer >= 1, got {page_size!r}")
    longest = MAX_STREAM_FRAMES // g.frames_per_block * g.frames_per_block  # no RoPE table: int32 positions bind
    if not 0 < seconds <= longest * g.vae_stride[0] / g.fps:  # float math first: 1e308 s is not an OverflowError
        raise ConfigError(f"seconds must be in (0, {longest * g.vae_stride[0] / g.fps:g}] ({longest} latent frames: "
                          f"int32 token positions), got {seconds:g}")
    if budget_frames < g.frames_per_block:
        raise ConfigError(f"budget_frames must be >= {g.frames_per_block} (one block), got {budget_frames}")
    frames = g.latent_frames(seconds)
    if budget_frames + g.frames_per_block >= frames:
        fix = (f"use a budget below {frames - g.frames_per_block}" if frames - g.frames_per_block > g.frames_per_block
               else "plan a longer video")
        raise ConfigError(f"budget_frames {budget_frames} plus one block ({g.frames_per_block}) holds the whole "
                          f"{frames}-frame video: a bounded cache saves nothing; {fix}")
    page_bytes = kv_page_bytes(page_size, g.num_kv_heads, g.head_dim, dtype_bytes)
    unbounded = stream_pages(g, page_size, frames, None) * page_bytes
    bounded = stream_pages(g, page_size, frames, budget_frames) * page_bytes
    avail = int(gpu_mem_bytes * (1 - reserve_fraction)) - weights_bytes
    return {
        "latent_frames": frames, "tokens_per_frame": g.tokens_per_frame, "page_size": page_size,
        "unbounded_kv_bytes_per_stream": unbounded, "bounded_kv_bytes_per_stream": bounded,
        "kv_bytes_available": max(0, avail),
        "unbounded_streams": max(0, avail) // unbounded, "bounded_streams": max(0, avail) // bounded,
        "memory_ratio": unbounded / bounded,
    }
