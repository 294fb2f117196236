"""Model adapters: hook AR video transformers into ff-engine's attention interface (never into pages)."""

from model_adapters.base import ARVideoAdapter, SelfAttentionFn, VideoGeometry

__all__ = ["ARVideoAdapter", "SelfAttentionFn", "VideoGeometry"]
