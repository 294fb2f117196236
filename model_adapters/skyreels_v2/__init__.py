"""SkyReels-V2 diffusion forcing (diffusers ``SkyReelsV2Transformer3DModel``) adapter; diffusers is imported only
when a model is built."""

from model_adapters.skyreels_v2.config import PRESETS, SkyReelsV2Config

__all__ = ["PRESETS", "SkyReelsV2Config"]
