"""Pixels -> MP4 and JPEG (the decoders that make pixels from latents are the model's: ``model_adapters.decoders``).

* ``JpegEncoder`` / ``decode_jpeg``: one frame <-> JPEG bytes (PyAV mjpeg), what the server streams and the client
  reads back; here, below both, so the client never imports the server.
* ``Mp4Writer``: PyAV (libx264, yuv420p), frames appended as blocks finish, into a temporary file that becomes
  the output only when complete.
* ``side_by_side``: labelled tiles of several videos of the same length in one frame (``generate --compare``).
"""

from __future__ import annotations

import contextlib
import os
from fractions import Fraction
from pathlib import Path

import numpy as np

from ff_engine.errors import ConfigError
from ff_engine.outputs import OutputFolder, check_folder_target, create_exclusive, temporary_beside


def check_output_file(path: str | Path, what: str = "output") -> Path:
    """Refuse, without creating anything, an output path that can never become the video: an existing folder or
    non-regular file (``/dev/full``), a suffix other than ``.mp4``, a file where a parent folder must be.
    Writability is proven by ``Mp4Writer`` creating its temporary file (``os.access`` is wrong for root and
    read-only mounts alike)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is an existing folder; give a file name ending in .mp4")
    if path.exists() and not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} exists and is not a regular file")
    if path.suffix.lower() != ".mp4":
        raise ConfigError(f"{what} {str(path)!r} must end in .mp4 (the writer makes H.264 MP4)")
    check_folder_target(path.absolute().parent, what)
    return path


class Mp4Writer:
    """H.264 MP4 through PyAV, written to a hidden temporary file beside ``path`` and renamed to ``path`` by
    ``close()`` once complete (atomic within a filesystem): a failed or interrupted run never leaves a playable
    partial video under the final name.  ``abort()`` discards the temporary file and the folders this writer
    created.  Folders and the temporary file are created in ``__init__``, so an unwritable destination fails
    before any frame is computed."""

    def __init__(self, path: str | Path, fps: int = 16, what: str = "output"):
        """``what`` names the path in errors (the CLI passes its flag)."""
        import av

        self.path = check_output_file(path, what)
        self.fps = fps
        self._av = av
        self.container = None
        self.frames = 0
        self._folder = OutputFolder(self.path.absolute().parent, f"{what} folder")
        self.tmp = temporary_beside(self.path.absolute())
        try:
            create_exclusive(self.tmp)
        except OSError as exc:
            self._folder.discard()
            raise ConfigError(f"{what} {str(self.path)!r}: cannot create a file there: {exc.strerror or exc}") from None

    def write(self, frames: np.ndarray) -> None:
        if self.container is None:
            h, w = frames.shape[1:3]
            self.container = self._av.open(str(self.tmp), mode="w", format="mp4")
            self.stream = self.container.add_stream("libx264", rate=self.fps)
            self.stream.width, self.stream.height = w - w % 2, h - h % 2
            self.stream.pix_fmt = "yuv420p"
        for f in frames:
            img = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(f[: self.stream.height, : self.stream.width]),
                                                   format="rgb24")
            for packet in self.stream.encode(img):
                self.container.mux(packet)
            self.frames += 1

    def close(self) -> None:
        """Finish the container and move it to ``path`` (nothing is written when no frame was); idempotent.  If
        finishing fails (a full disk), the temporary file is discarded and the error raised."""
        try:
            if self.container is not None:
                for packet in self.stream.encode():
                    self.container.mux(packet)
                self.container.close()
                self.container = None
            if self.tmp.exists() and self.frames:
                os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        if not self.frames:
            self.abort()

    def abort(self) -> None:
        """Discard what was written: the temporary file and any folder this writer created; idempotent."""
        if self.container is not None:
            with contextlib.suppress(Exception):  # a broken container is being thrown away anyway
                self.container.close()
            self.container = None
        self.tmp.unlink(missing_ok=True)
        self._folder.discard()


LABEL_HEIGHT = 14  # pixels of the label bar above each tile


def side_by_side(tiles: list[tuple[str, np.ndarray]], scale: int = 1, gap: int = 2) -> np.ndarray:
    """uint8 frames [T, H', W', 3]: the videos of ``tiles`` ((label, uint8 [T, H, W, 3]) of equal shapes) next to
    each other, each upscaled ``scale`` times (nearest: small world-model frames stay crisp) under a label bar."""
    from PIL import Image, ImageDraw

    shapes = {t.shape for _, t in tiles}
    if len(shapes) != 1:
        raise ConfigError(f"side_by_side needs videos of one shape, got {sorted(shapes)}")
    frames = [np.repeat(np.repeat(t, scale, axis=1), scale, axis=2) for _, t in tiles]
    T, H, W, _ = frames[0].shape
    out = np.full((T, H + LABEL_HEIGHT, len(tiles) * (W + gap) - gap, 3), 16, dtype=np.uint8)
    for i, ((label, _), f) in enumerate(zip(tiles, frames)):
        x = i * (W + gap)
        bar = Image.new("RGB", (W, LABEL_HEIGHT), (16, 16, 16))
        ImageDraw.Draw(bar).text((3, 1), label[: max(1, W // 6)], fill=(235, 235, 235))
        out[:, :LABEL_HEIGHT, x:x + W] = np.asarray(bar)[None]
        out[:, LABEL_HEIGHT:, x:x + W] = f
    return out


class JpegEncoder:
    """One frame [H, W, 3] uint8 -> JPEG bytes (PyAV mjpeg, yuvj420p, constant qscale ``quality``)."""

    def __init__(self, quality: int = 3):
        self.quality = quality

    def encode(self, frame: np.ndarray) -> bytes:
        import av

        h, w = frame.shape[:2]
        ctx = av.CodecContext.create("mjpeg", "w")
        ctx.width, ctx.height, ctx.pix_fmt = w - w % 2, h - h % 2, "yuvj420p"
        ctx.time_base = Fraction(1, 25)
        ctx.options = {"qmin": str(self.quality), "qmax": str(self.quality)}
        img = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[: ctx.height, : ctx.width]), format="rgb24")
        return b"".join(bytes(p) for p in ctx.encode(img) + ctx.encode(None))


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes -> [H, W, 3] uint8 (PyAV), for clients and tests."""
    import io

    import av

    with av.open(io.BytesIO(data), format="mjpeg") as c:
        return next(c.decode(video=0)).to_ndarray(format="rgb24")
