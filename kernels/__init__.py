"""Numerical kernels of ff-engine and their plain-torch references.

Every kernel here has a torch reference in the same module family; GPU (Triton) versions are only ever
compared against those references.  ``ff_engine`` calls into this package; nothing here imports ``ff_engine``.
"""

from kernels.attention_ref import attention_with_lse, combine_lse

__all__ = ["attention_with_lse", "combine_lse"]
