"""slimc: a declarative graph-rewrite compiler for post-training quantization, built on torch.fx."""

import sys

from slimc.moved import MovedModuleFinder

__version__ = "0.1.0"

if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(MovedModuleFinder())
