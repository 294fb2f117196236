"""Latent blocks -> pixels -> JPEG: what every stream route sends.

Pixels come from ``ff_engine.models.make_decoder`` (the decoder ``ff-engine generate`` uses), so a served stream
and a generated file are the same pixels.  JPEG comes from PyAV's ``mjpeg`` encoder at a fixed qscale: the same
pixels always give the same bytes, which is how the tests compare a stream against ``Engine.generate``.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from ff_engine.video import JpegEncoder, decode_jpeg  # noqa: F401 - the JPEG codec the stream routes use

log = logging.getLogger("ff_engine.server")
UNREADABLE_RETRIES = 100  # x 0.1 s


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
