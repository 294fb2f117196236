"""Attention backends, chosen by device and overridable by name (``get_backend``); the engine calls a backend's
``forward(AttentionBatch)`` directly."""

from __future__ import annotations

import torch

from ff_engine.attention.cuda_backends import FlashAttnBackend, VllmFlashAttnBackend, XformersBackend
from ff_engine.attention.flex import CompiledFlexAttentionBackend, FlexAttentionBackend
from ff_engine.attention.interface import AttentionBackend, AttentionBatch
from ff_engine.attention.torch_ref import TorchReferenceBackend
from ff_engine.attention.vllm_cpu import VllmCpuBackend
from ff_engine.errors import ConfigError

BACKENDS: dict[str, type[AttentionBackend]] = {
    "torch": TorchReferenceBackend,
    "flex": FlexAttentionBackend,
    "flex-compiled": CompiledFlexAttentionBackend,
    "vllm-cpu": VllmCpuBackend,
    "vllm-flash-attn": VllmFlashAttnBackend,
    "flash-attn": FlashAttnBackend,
    "xformers": XformersBackend,
}


def get_backend(name: str = "auto", device: str | torch.device = "cpu") -> AttentionBackend:
    """``auto``: on CUDA vLLM's flash-attn, or FlexAttention where vLLM is absent (flash-attn serves merged tokens
    through FlexAttention too); on CPU vLLM's CPU op; else the torch reference.  flash-attn and xformers are
    chosen by name only."""
    if name == "auto":
        order = ["vllm-flash-attn", "flex"] if torch.device(device).type == "cuda" else ["vllm-cpu"]
        for n in order:
            if BACKENDS[n].available():
                return BACKENDS[n]()
        return TorchReferenceBackend()
    if name not in BACKENDS:
        raise ConfigError(f"unknown attention backend {name!r}; choose one of {['auto', *BACKENDS]}")
    cls = BACKENDS[name]
    if not cls.available():
        raise ConfigError(f"attention backend {name!r} is not available on this machine")
    return cls()


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Names of the backends that run on ``device``'s type and are usable on this machine."""
    kind = torch.device(device).type
    return [n for n, cls in BACKENDS.items() if kind in cls.devices and cls.available()]


__all__ = ["BACKENDS", "AttentionBackend", "AttentionBatch", "available_backends", "get_backend"]
