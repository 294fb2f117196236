"""The in-repo procedural video worlds, their codec, metrics and the world models' training script.

A model like any other: its architecture is the causal Wan of ``model_adapters/causal_wan`` (presets
``world-tiny`` / ``world-small`` / ``world-v4``), its decoder is registered in the model registry
(``decoder="world-codec"``), and the engine never imports this package.
"""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
EMBEDDED_CHECKPOINT = ASSETS / "world_model.safetensors"  # v3: the procedural pan world (procedural.py)
EMBEDDED_V4 = ASSETS / "world_v4.safetensors"  # v4: the scroll world steered by actions (scroll.py)
