"""The in-repo procedural video worlds, their codec, metrics and the world models' training script.

A model like any other: its architecture is the causal Wan of ``model_adapters/causal_wan`` (presets
``world-tiny`` / ``world-small`` / ``world-v4``), its decoder is registered in the model registry
(``decoder="world-codec"``), and the engine never imports this package.
"""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
EMBEDDED_CHECKPOINT = ASSETS / "world_model.safetensors"  # v3: the procedural pan world (procedural.py)
# v4: the scroll world steered by actions (scroll.py).  The default is stage 3 (world_v4d, docs/world_model.md):
# world_v4 (stage 1, which does not follow its actions) and world_v4c (stage 2) stay for the results made with them.
EMBEDDED_V4 = ASSETS / "world_v4d.safetensors"
