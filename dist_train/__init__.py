"""dist-train: PyTorch-native distributed training with decoupled (local-learning) stages."""

__version__ = "0.1.0"
