"""gradsvc: forward passes, gradients and optimizer steps for small PyTorch models, over HTTP."""

__version__ = "0.1.0"
