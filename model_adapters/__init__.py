"""Model adapters: hook AR video transformers into ff-engine's attention interface (never into pages)."""
