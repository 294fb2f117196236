"""Latents -> pixels -> MP4.

* ``WanVAEDecoder``: Wan2.1's VAE through diffusers ``AutoencoderKLWan``, loaded from a local directory the user
  provides (no hub access at run time).  Decodes the whole latent video at the end (Wan's VAE is causal in
  time; per-block decoding without its feature cache would seam).
* ``LatentPreviewDecoder``: no VAE available (random-weight models, CI): a fixed, honest *preview* that maps
  three latent channels to RGB and upsamples by the VAE stride; it is not a decode.
* ``Mp4Writer``: PyAV (libx264, yuv420p), frames appended as blocks finish.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ff_engine.errors import ConfigError

# Wan2.1 VAE latent normalisation (per channel mean / std of the 16 latent channels).
WAN_LATENT_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                   0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN_LATENT_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                  3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


class LatentPreviewDecoder:
    streaming = True

    def __init__(self, spatial: int = 8, temporal: int = 4):
        self.spatial, self.temporal = spatial, temporal
        self._first = True

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """latents [F, C, H, W] -> uint8 frames [T, H*s, W*s, 3]; the first latent frame of a video gives 1
        frame, later ones ``temporal`` frames (Wan's causal VAE frame count)."""
        rgb = torch.tanh(latents[:, :3].float() * 0.5) * 0.5 + 0.5
        rgb = F.interpolate(rgb, scale_factor=self.spatial, mode="nearest")
        reps = torch.full((rgb.shape[0],), self.temporal)
        if self._first:
            reps[0], self._first = 1, False
        rgb = rgb.repeat_interleave(reps, dim=0)
        return (rgb.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


class WanVAEDecoder:
    streaming = False

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"VAE path not found: {path} (--vae expects a local diffusers AutoencoderKLWan folder)")
        from diffusers import AutoencoderKLWan

        self.vae = AutoencoderKLWan.from_pretrained(str(path), local_files_only=True).eval()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        z = latents.permute(1, 0, 2, 3)[None].to(self.vae.dtype)  # [1, C, F, H, W]
        mean = torch.tensor(WAN_LATENT_MEAN).view(1, -1, 1, 1, 1)
        std = torch.tensor(WAN_LATENT_STD).view(1, -1, 1, 1, 1)
        video = self.vae.decode(z * std + mean).sample  # [1, 3, T, H, W] in [-1, 1]
        video = (video[0].permute(1, 2, 3, 0).float() * 0.5 + 0.5).clamp(0, 1)
        return (video * 255).round().to(torch.uint8).numpy()


class WorldDecoder:
    """The in-repo world model's own decoder: its latents are 2 x 2 space-to-depth pixels (lossless)."""

    streaming = True

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        from ff_engine.world.procedural import decode

        px = (decode(latents.float()) * 0.5 + 0.5).clamp(0, 1)
        px = F.interpolate(px, scale_factor=4, mode="nearest")  # 32 x 48 is tiny to look at
        return (px.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


class Mp4Writer:
    def __init__(self, path: str | Path, fps: int = 16):
        import av

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fps = fps
        self._av = av
        self.container = None
        self.frames = 0

    def write(self, frames: np.ndarray) -> None:
        if self.container is None:
            h, w = frames.shape[1:3]
            self.container = self._av.open(str(self.path), mode="w")
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
        if self.container is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
            self.container.close()
            self.container = None
