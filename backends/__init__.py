"""Output formats. A backend writes a lowered Program in one format and knows nothing of how scales were found.

A backend is a pydantic model whose fields are its YAML options (`export: [{format: mindie, ...}]`),
registered by format name.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from slimc.ir import Program
    from slimc.schemes import ShapeRule

BACKENDS: dict[str, type[Backend]] = {}


class Backend(BaseModel):
    """Base class of output formats; subclasses add their options as typed fields."""

    model_config = ConfigDict(extra="forbid")
    format_name: ClassVar[str] = ""
    # The weight shapes the format's layouts can hold, beyond what the schemes need (`slimc.schemes.SHAPE_RULES`);
    # `compile` checks them on the plan before calibrating.
    shape_rules: ClassVar[tuple[ShapeRule, ...]] = ()

    def write(self, program: Program, out_dir: Path) -> list[Path]:
        """Write the program into the (existing, empty) directory; return the written files."""
        raise NotImplementedError

    def verify(self, program: Program, out_dir: Path) -> None:
        """Read the written files back with the format's own reader; raise ExportError on a mismatch."""
        raise NotImplementedError


def register_backend(name: str):
    def decorate(cls: type[Backend]) -> type[Backend]:
        cls.format_name = name
        BACKENDS[name] = cls
        return cls

    return decorate


def backend_class(name: str) -> type[Backend]:
    from slimc.errors import ConfigError

    _load_builtin_backends()
    if name not in BACKENDS:
        raise ConfigError(f"unknown export format {name!r}; available: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name]


def _load_builtin_backends() -> None:
    from slimc.backends import mindie, onnx, vllm  # noqa: F401
