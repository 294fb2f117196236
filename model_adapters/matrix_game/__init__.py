"""Matrix-Game 2.0 (SkyworkAI, MIT): action-conditioned image-to-video causal Wan; ``arch.py`` registers it."""
