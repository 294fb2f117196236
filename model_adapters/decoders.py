"""Latents -> pixels, per architecture: what ``Architecture.decoder`` returns (``registry.make_decoder``).

* ``WanVAEDecoder``: Wan2.1's VAE through diffusers ``AutoencoderKLWan``, loaded from a local directory the user
  provides (no hub access at run time).  Decodes the whole latent video at the end (Wan's VAE is causal in
  time; per-block decoding without its feature cache would seam).
* ``LatentPreviewDecoder``: no VAE available (random-weight models, CI): a fixed, honest *preview* that maps
  three latent channels to RGB and upsamples by the VAE stride; it is not a decode.
* ``WorldDecoder``: the in-repo world model's own codec.

They live with the adapters (not in ``ff_engine``) because which decoder fits is a property of the model: the
engine and the serving layers only ever see ``decoder.streaming`` and ``decoder.decode``.
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

    def __init__(self, path: str | Path, latent_channels: int | None = None):
        """Load the VAE (any failure is one ``ConfigError``); with ``latent_channels``, also refuse a VAE whose
        latent channels differ from the model's, before anything is generated."""
        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"VAE path not found: {path} (--vae expects a local diffusers AutoencoderKLWan folder)")
        try:
            from diffusers import AutoencoderKLWan
            from diffusers.utils import is_accelerate_available
        except ImportError:
            raise ConfigError("--vae needs diffusers: pip install 'ff-engine[vae]'") from None
        try:  # low_cpu_mem_usage needs accelerate; asking for it without accelerate only logs a warning
            self.vae = AutoencoderKLWan.from_pretrained(str(path), local_files_only=True,
                                                        low_cpu_mem_usage=is_accelerate_available()).eval()
        except Exception as exc:  # noqa: BLE001 - diffusers raises OSError, ValueError, JSON and torch errors here
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"--vae {str(path)!r} is not a diffusers AutoencoderKLWan folder: {reason}") from None
        z_dim = getattr(self.vae.config, "z_dim", None)
        if latent_channels is not None and z_dim != latent_channels:
            raise ConfigError(f"--vae {str(path)!r} decodes {z_dim} latent channels, the model makes {latent_channels}")

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
        from model_adapters.world.procedural import decode

        px = (decode(latents.float()) * 0.5 + 0.5).clamp(0, 1)
        px = F.interpolate(px, scale_factor=4, mode="nearest")  # 32 x 48 is tiny to look at
        return (px.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


def default_decoder(cfg):
    """The decoder of a config without a VAE folder: the world model's own codec when its config says so, else the
    latent preview (one place, so a served stream and a generated file decode the same latents to the same
    pixels)."""
    if getattr(cfg, "decoder", None) == "world-codec":
        return WorldDecoder()
    g = cfg.geometry()
    return LatentPreviewDecoder(g.vae_stride[1], g.vae_stride[0])
