"""Plain-torch reference of the slot copies behind compaction and merge-in-place.

``move_slots``: compaction fills each hole below the new length with a survivor from above it, so it copies
rows *within* the page storage: key, value, position and log-mass of slot ``src[i]`` go to slot ``dst[i]``.
Precondition (compaction guarantees it, the Triton kernel relies on it): ``src`` and ``dst`` are disjoint and
``dst`` has no repeats, so no row is read after it was written.

``write_slots``: merge-in-place rewrites the merged tokens' key, value and log-mass at ``slots`` from new rows.

``kernels.compaction_triton`` has the same functions with the same signatures.
"""

from __future__ import annotations

import torch


def move_slots(key_cache, value_cache, positions, log_mass, src: torch.Tensor, dst: torch.Tensor) -> None:
    """key/value_cache [slots, Hkv, D], positions [slots, 3] int32, log_mass [slots]: row src[i] -> row dst[i]."""
    for t in (key_cache, value_cache, positions, log_mass):
        t[dst] = t[src]


def write_slots(key_cache, value_cache, log_mass, slots: torch.Tensor, k, v, lm) -> None:
    """Rows ``slots`` of the storage := k, v [M, Hkv, D] and lm [M] (merged tokens, in place)."""
    key_cache[slots], value_cache[slots], log_mass[slots] = k.to(key_cache.dtype), v.to(value_cache.dtype), lm.float()
