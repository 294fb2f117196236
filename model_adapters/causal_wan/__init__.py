"""Causal Wan2.1 (Self-Forcing / CausVid / LongLive) adapter."""

from model_adapters.causal_wan.loading import load_causal_wan, save_checkpoint
from model_adapters.causal_wan.model import PRESETS, CausalWanConfig, CausalWanModel, PromptState

__all__ = ["PRESETS", "CausalWanConfig", "CausalWanModel", "PromptState", "load_causal_wan", "save_checkpoint"]
