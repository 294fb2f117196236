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
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ff_engine import checksum
from ff_engine.errors import FFEngineError


class CorruptFile(FFEngineError):
    """A stored block that fails its checksum or cannot be parsed (the message names the file)."""

SNAPSHOT_NAME = "snapshot.ffsnap"


def stream_dir(output_dir: str | Path, stream_id: str) -> Path:
    return Path(output_dir) / stream_id


def block_path(output_dir: str | Path, stream_id: str, block: int) -> Path:
    return stream_dir(output_dir, stream_id) / f"block_{block:05d}.safetensors"


def snapshot_path(output_dir: str | Path, stream_id: str) -> Path:
    return stream_dir(output_dir, stream_id) / SNAPSHOT_NAME


def write_block(output_dir: str | Path, stream_id: str, block: int, latents: torch.Tensor) -> Path:
    """Persist one finished block atomically; returns its path.  The temporary name is unique per call
    (``mkstemp``), not per process: two writers of the same block in one process (a resumed worker beside the
    one it replaces, both in-process) would otherwise share it, and the second ``os.replace`` fail with
    "No such file" (or install the other writer's half-written file)."""
    path = block_path(output_dir, stream_id, block)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        tensors = {"latents": latents.detach().to("cpu", torch.float32).contiguous()}
        save_file(tensors, tmp, metadata={checksum.KEY: checksum.tensors_digest(tensors)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def missing_blocks(output_dir: str | Path, stream_id: str, blocks: int) -> list[int]:
    """Which of blocks ``0 .. blocks - 1`` have no file (a snapshot covering them is only safe when none)."""
    return [i for i in range(blocks) if not block_path(output_dir, stream_id, i).exists()]


def read_block(output_dir: str | Path, stream_id: str, block: int) -> torch.Tensor:
    """A persisted block's latents, its checksum verified (``CorruptFile`` naming the file otherwise)."""
    path = block_path(output_dir, stream_id, block)
    try:
        with safe_open(str(path), "pt") as f:
            recorded = (f.metadata() or {}).get(checksum.KEY)
        tensors = load_file(str(path))
        checksum.verify(tensors, recorded, f"block file {str(path)!r}")
    except ValueError as exc:
        raise CorruptFile(str(exc)) from None
    except OSError:
        raise  # a missing or unreadable file is not a corrupt one (callers tell those apart)
    except Exception as exc:  # noqa: BLE001 - safetensors' structural errors: the same one-line refusal
        raise CorruptFile(f"block file {str(path)!r} is not a readable safetensors file: {exc}") from None
    return tensors["latents"]


def write_snapshot(output_dir: str | Path, stream_id: str, snapshot) -> Path:
    """Save a ``SessionSnapshot`` over the stream's previous one (``SessionSnapshot.save`` is atomic)."""
    path = snapshot_path(output_dir, stream_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    snapshot.save(path)
    return path


def remove_snapshot(output_dir: str | Path, stream_id: str) -> None:
    """A stream that ended needs no snapshot any more (its blocks stay)."""
    snapshot_path(output_dir, stream_id).unlink(missing_ok=True)
