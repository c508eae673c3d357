"""slimc: a declarative graph-rewrite compiler for post-training quantization, built on torch.fx.

The Python API (docs/api.md) is `slimc.compile`, `slimc.evaluate`, `slimc.load_config` and `slimc.trace`, with
`slimc.CompileResult`; it is imported on first use, so that `import slimc` stays light (no torch).
"""

import importlib
import sys

from slimc.moved import MovedModuleFinder

__version__ = "0.1.0"

API = ("CompileResult", "compile", "evaluate", "load_config", "trace")

if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(MovedModuleFinder())


def __getattr__(name: str):
    if name in API:
        # By name, not by an import statement: slimc.commands is the top layer and imports `slimc` itself.
        return getattr(importlib.import_module("slimc.commands.api"), name)
    raise AttributeError(f"module 'slimc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *API])
