"""ff-engine: serving long autoregressive video generation under a fixed KV page budget per stream."""

__version__ = "0.1.0"
