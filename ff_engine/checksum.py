"""Checksums of what ff-engine stores (snapshots, persisted blocks): a flipped byte is refused on load.

safetensors checks a file's structure (header, offsets, sizes) but not its values: a bit flipped in the tensor
data loads silently, and a stream restored from it would continue from corrupted K/V.  So every stored tensor
set carries a SHA-256 of its canonical content (each tensor's name, dtype, shape and bytes, in name order, plus
any metadata the file carries), written into the safetensors header and recomputed on load.
"""

from __future__ import annotations

import hashlib

import torch

KEY = "ff_engine.sha256"


def tensors_digest(tensors: dict[str, torch.Tensor], extra: str = "") -> str:
    """Hex SHA-256 of ``tensors`` (name, dtype, shape, bytes; name order) and the string ``extra``."""
    h = hashlib.sha256(extra.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def verify(tensors: dict[str, torch.Tensor], recorded: str | None, what: str, extra: str = "") -> None:
    """``ValueError`` naming ``what`` unless ``recorded`` is the digest of ``tensors`` (and ``extra``)."""
    if recorded is None:
        raise ValueError(f"{what} carries no checksum ({KEY}); refusing to trust its contents")
    if tensors_digest(tensors, extra) != recorded:
        raise ValueError(f"{what} is corrupted: its contents do not match the checksum stored with it")
