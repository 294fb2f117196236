"""How a worker gets its model.

A worker process builds its own model; the driver hands it one of:

  * a ``ModelSpec``: ``"package.module:function"`` plus arguments, called in the worker (a checkpoint path is a
    few bytes to ship; every worker loads the weights itself, onto its own device);
  * an ``nn.Module``: shipped once through Ray's object store (``ray.put``) and copied by each worker — what
    tests and benchmarks do with small random-weight models that exist only in the driver.

Both are architecture-agnostic: the distributed layer never names a model family.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

from ff_engine.errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    """``factory``: ``"package.module:function"`` returning an ``nn.Module`` adapter; called as
    ``function(*args, **kwargs)`` inside the worker."""

    factory: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def checkpoint(cls, path: str, preset: str | None = None) -> ModelSpec:
        """A checkpoint of any registered architecture, any layout, loaded as the CLI and the server load it
        (``ff_engine.models.load_model``); ``preset`` supplies what its tensors cannot tell (default: its
        architecture's)."""
        return cls("ff_engine.models:load_model", (str(path),), {"preset": preset})

    def build(self) -> torch.nn.Module:
        module_name, _, fn_name = self.factory.partition(":")
        if not module_name or not fn_name:
            raise ConfigError(f"model factory must be 'package.module:function', got {self.factory!r}")
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"model factory {self.factory!r} cannot be imported: {exc}") from None
        return fn(*self.args, **self.kwargs)


def materialize(source, device: str = "cpu") -> torch.nn.Module:
    """``source``: a ``ModelSpec`` or an ``nn.Module`` (already copied into this process). Returns the model in
    eval mode on ``device`` (named apart from ``ff_engine.models.build_model``, which builds from a config)."""
    if isinstance(source, ModelSpec):
        model = source.build()
    elif isinstance(source, torch.nn.Module):
        model = source
    else:
        raise ConfigError(f"model must be a ModelSpec or an nn.Module, got {type(source).__name__}")
    return model.to(device).eval()
