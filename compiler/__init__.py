"""slimc: a declarative graph-rewrite compiler for post-training quantization, built on torch.fx."""

__version__ = "0.1.0"
