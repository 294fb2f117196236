"""Where a stream's output lives on disk: one safetensors file per finished block, and its latest snapshot.

Layout under the service's ``output_dir``::

    <output_dir>/<stream_id>/block_00000.safetensors   # {"latents": [F, C, H, W] float32}, one per block
    <output_dir>/<stream_id>/snapshot.ffsnap           # the latest SessionSnapshot (only while the stream runs)

Every file is written to a temporary name in the same directory and renamed into place (``os.replace`` is atomic
on POSIX), so a reader (a consumer, or the worker that resumes a stream after another one died) sees either the
whole file or none of it.  A block file is written before its block is reported, so everything a consumer was
ever shown is on disk.  With several machines, ``output_dir`` must be a filesystem they share (NFS, a mounted
bucket): recovery reads the snapshot a dead worker wrote.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SNAPSHOT_NAME = "snapshot.ffsnap"


def stream_dir(output_dir: str | Path, stream_id: str) -> Path:
    return Path(output_dir) / stream_id


def block_path(output_dir: str | Path, stream_id: str, block: int) -> Path:
    return stream_dir(output_dir, stream_id) / f"block_{block:05d}.safetensors"


def snapshot_path(output_dir: str | Path, stream_id: str) -> Path:
    return stream_dir(output_dir, stream_id) / SNAPSHOT_NAME


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_block(output_dir: str | Path, stream_id: str, block: int, latents: torch.Tensor) -> Path:
    """Persist one finished block atomically; returns its path."""
    path = block_path(output_dir, stream_id, block)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    save_file({"latents": latents.detach().to("cpu", torch.float32).contiguous()}, str(tmp))
    os.replace(tmp, path)
    return path


def read_block(output_dir: str | Path, stream_id: str, block: int) -> torch.Tensor:
    return load_file(str(block_path(output_dir, stream_id, block)))["latents"]


def write_snapshot(output_dir: str | Path, stream_id: str, snapshot) -> Path:
    """Save a ``SessionSnapshot`` over the stream's previous one (``SessionSnapshot.save`` is atomic)."""
    path = snapshot_path(output_dir, stream_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    snapshot.save(path)
    return path


def remove_snapshot(output_dir: str | Path, stream_id: str) -> None:
    """A stream that ended needs no snapshot any more (its blocks stay)."""
    snapshot_path(output_dir, stream_id).unlink(missing_ok=True)
