"""Output formats. A backend writes a lowered Program in one format and knows nothing of how scales were found.

A backend is a pydantic model whose fields are its YAML options (`export: [{format: mindie, ...}]`),
registered by format name.
"""

from __future__ import annotations

from slimc.backends.base import BACKENDS, Backend, register_backend
from slimc.environment import require_extra
from slimc.errors import ConfigError

__all__ = ["Backend", "backend_class", "register_backend"]


def backend_class(name: str) -> type[Backend]:
    _load_builtin_backends()
    if name not in BACKENDS:
        raise ConfigError(f"unknown export format {name!r}; available: {', '.join(sorted(BACKENDS))}")
    cls = BACKENDS[name]
    if cls.extra is not None:
        require_extra(cls.extra, f"export format {name!r}")
    return cls


def _load_builtin_backends() -> None:
    from slimc.backends import mindie, onnx, vllm  # noqa: F401
