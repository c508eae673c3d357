"""Import paths of modules that moved when the core was split into sub-packages (ir, numerics, patterns,
config, commands), kept working for users' own passes and scripts: `import slimc.quant` gives
slimc.numerics.quant, with a DeprecationWarning naming the new path."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import warnings
from types import ModuleType

MOVED_MODULES = {
    **{f"slimc.{name}": f"slimc.numerics.{name}"
       for name in ("quant", "gptq", "hadamard", "observers", "modules", "calib", "fidelity")},
    **{f"slimc.{name}": f"slimc.ir.{name}" for name in ("tracer", "traced_block", "capture")},
    # slimc.compile and slimc.evaluate are the Python API's functions now: import slimc.commands.compile, .evaluate
    **{f"slimc.{name}": f"slimc.commands.{name}" for name in ("cli", "explain", "doctor", "export", "shape_rules")},
    **{f"slimc.{name}": f"slimc.frontends.{name}" for name in ("data", "media", "audio", "diffusion_data")},
    "slimc.fold": "slimc.patterns.fold",
    "slimc.msmodelslim": "slimc.config.msmodelslim",
    "slimc.frontends.hf": "slimc.ir.source",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(f"{spec.name} moved to {self.target}; import it from there", DeprecationWarning, stacklevel=2)
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        """The target module ran when it was imported."""


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds a moved module under its old name, as the module at its new one."""

    def find_spec(self, fullname: str, path, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(MOVED_MODULES[fullname]))
