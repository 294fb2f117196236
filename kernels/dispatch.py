"""One entry point per kernel: the Triton version for CUDA tensors, the plain-torch reference for anything else.

The Triton modules are imported only when a CUDA tensor arrives, so ``kernels`` imports with PyTorch alone.
``use("triton")`` (or ``FF_ENGINE_KERNELS=triton``) sends CPU tensors to the Triton kernels too, which then run
in Triton's interpreter (``TRITON_INTERPRET=1``, set by ``kernels/__init__.py`` without CUDA): how CI proves that
the engine's calls reach the kernels with the arguments they expect, before any GPU has run them.
``use("torch")`` forces the references everywhere (a GPU run's A/B).
"""

from __future__ import annotations

import contextlib
import importlib
import os

import torch

from kernels import compaction_ref, scoring_ref

CHOICES = ("auto", "torch", "triton")
_forced: list[str] = []


def implementation() -> str:
    """The active choice: the innermost ``use``, else ``FF_ENGINE_KERNELS``, else ``auto``."""
    choice = _forced[-1] if _forced else os.environ.get("FF_ENGINE_KERNELS", "auto")
    if choice not in CHOICES:
        raise ValueError(f"FF_ENGINE_KERNELS must be one of {CHOICES}, got {choice!r}")
    return choice


@contextlib.contextmanager
def use(choice: str):
    """Within the block, every kernel entry point takes ``choice`` (``auto``: Triton for CUDA tensors)."""
    if choice not in CHOICES:
        raise ValueError(f"kernel implementation must be one of {CHOICES}, got {choice!r}")
    _forced.append(choice)
    try:
        yield
    finally:
        _forced.pop()


def _impl(ref, triton_module: str, t: torch.Tensor):
    choice = implementation()
    triton = choice == "triton" or (choice == "auto" and t.is_cuda)
    return importlib.import_module(triton_module) if triton else ref


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
