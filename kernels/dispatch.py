"""One entry point per kernel: the Triton version for CUDA tensors, the plain-torch reference for anything else.

The Triton modules are imported only when a CUDA tensor arrives, so ``kernels`` imports with PyTorch alone.
"""

from __future__ import annotations

import importlib

import torch

from kernels import compaction_ref, scoring_ref


def _impl(ref, triton_module: str, t: torch.Tensor):
    return importlib.import_module(triton_module) if t.is_cuda else ref


def expected_attention_scores(key_cache, value_cache, log_mass, slots, seg_starts, mu, u, lam, value_norm: bool,
                              aggregation: str, extra_lse=None):
    """See ``kernels.scoring_ref.expected_attention_scores``."""
    impl = _impl(scoring_ref, "kernels.scoring_triton", key_cache)
    return impl.expected_attention_scores(key_cache, value_cache, log_mass, slots, seg_starts, mu, u, lam, value_norm,
                                          aggregation, extra_lse)


def move_slots(key_cache, value_cache, positions, log_mass, src, dst) -> None:
    """See ``kernels.compaction_ref.move_slots``."""
    _impl(compaction_ref, "kernels.compaction_triton", key_cache).move_slots(key_cache, value_cache, positions,
                                                                             log_mass, src, dst)


def write_slots(key_cache, value_cache, log_mass, slots, k, v, lm) -> None:
    """See ``kernels.compaction_ref.write_slots``."""
    _impl(compaction_ref, "kernels.compaction_triton", key_cache).write_slots(key_cache, value_cache, log_mass, slots,
                                                                              k, v, lm)
