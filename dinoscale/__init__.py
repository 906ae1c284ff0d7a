"""dinoscale: distributed self-supervised pretraining of Vision Transformers."""

__version__ = "0.1.0"
