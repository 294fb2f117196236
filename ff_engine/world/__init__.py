"""The in-repo procedural video world, its codec, metrics and the world model's training script."""
