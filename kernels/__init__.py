"""Numerical kernels of ff-engine and their plain-torch references.

Every kernel here has a torch reference in the same module family; GPU (Triton) versions are only ever
compared against those references.  ``ff_engine`` calls into this package; nothing here imports ``ff_engine``.

Without CUDA, Triton kernels can only run in Triton's interpreter (tests, rehearsals), and Triton reads
``TRITON_INTERPRET`` once, when it is first imported -- by us or by PyTorch's compiler (FlexAttention's eager path
imports it).  So on a machine without CUDA this package sets ``TRITON_INTERPRET=1`` before anything can import
Triton; nothing else uses Triton on such a machine.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.attention_ref import attention_with_lse, combine_lse
from kernels.dispatch import expected_attention_scores, implementation, move_slots, use, write_slots
from kernels.scoring_ref import proxy_factors

__all__ = ["attention_with_lse", "combine_lse", "expected_attention_scores", "implementation", "move_slots",
           "proxy_factors", "use", "write_slots"]
