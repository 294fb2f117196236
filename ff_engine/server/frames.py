"""Latent blocks -> pixels -> JPEG: what every stream route sends.

Pixels come from ``ff_engine.video.make_decoder`` (the decoder ``ff-engine generate`` uses), so a served stream
and a generated file are the same pixels.  JPEG comes from PyAV's ``mjpeg`` encoder at a fixed qscale: the same
pixels always give the same bytes, which is how the tests compare a stream against ``Engine.generate``.
"""

from __future__ import annotations

import asyncio
import logging
from fractions import Fraction

import numpy as np

log = logging.getLogger("ff_engine.server")
UNREADABLE_RETRIES = 100  # x 0.1 s


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


class BlockRenderer:
    """A stream's blocks -> video frames and their JPEGs. One per consumer: a decoder may keep state across
    blocks (the latent preview's first frame)."""

    def __init__(self, decoder, encoder: JpegEncoder):
        self.decoder, self.encoder = decoder, encoder

    def pixels(self, latents) -> np.ndarray:
        return self.decoder.decode(latents)

    def jpegs(self, pixels: np.ndarray) -> list[bytes]:
        return [self.encoder.encode(f) for f in pixels]


async def stream_blocks(handle):
    """``handle.ablocks()``, re-opened after a block that could not be read (``OSError``): after a worker death
    the service may report a block as done before its file is back on disk (the resumed worker regenerates it).
    Blocks already yielded are skipped; after ``UNREADABLE_RETRIES`` failed re-reads the error propagates."""
    next_block, failures = 0, 0
    while True:
        try:
            async for blk in handle.ablocks():
                if blk.block < next_block:
                    continue
                next_block, failures = blk.block + 1, 0
                yield blk
            return
        except OSError as exc:
            failures += 1
            if failures > UNREADABLE_RETRIES:
                raise
            log.warning("stream %s: block %d not readable yet (%s); retrying", handle.id, next_block, exc)
            await asyncio.sleep(0.1)
