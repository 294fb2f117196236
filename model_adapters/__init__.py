"""Model adapters: hook AR video transformers into ff-engine's attention interface (never into pages).

``model_adapters.registry`` is the one way in: every architecture's presets, loader, decoder and geometry
(``registry.load(path)`` reads any supported checkpoint layout of any architecture).  ``docs/adapters.md`` shows
how to add one.
"""

from model_adapters.base import ARVideoAdapter, ModelConfig, RotaryPhases, SelfAttentionFn, VideoGeometry

__all__ = ["ARVideoAdapter", "ModelConfig", "RotaryPhases", "SelfAttentionFn", "VideoGeometry"]
