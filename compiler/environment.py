"""The libraries slimc reaches into, the version ranges it was tested with, and what this machine has.

slimc depends on internals of torch (fx, onnx export), transformers (modeling code, masks, checkpoint
conversion), diffusers, compressed-tensors and onnx/onnxscript/onnxruntime. The range each was tested
with is its requirement in pyproject.toml (lower bound: the oldest version tested; upper bound: below
the next untested minor), read back here from the installed package's metadata, so there is one list.
A version outside its range is allowed (a new model may need a newer transformers) but warned about.

diffusers, compressed-tensors and onnx/onnxscript/onnxruntime come with slimc's extras (`slimc[diffusion]`,
`slimc[vllm]`, `slimc[onnx]`): what needs one checks for it with `require_extra`, whose error names the
`pip install` to run, and one that is not installed is no problem until then.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from slimc.errors import MissingExtraError

TESTED_LIBRARIES = ("torch", "transformers", "diffusers", "compressed-tensors", "onnx", "onnxscript", "onnxruntime")
# Recorded in each compile's report beside the tested ones: the other libraries whose code computes the output.
RECORDED_LIBRARIES = (*TESTED_LIBRARIES, "torch_npu", "accelerate", "safetensors", "gguf", "numpy", "huggingface_hub")
COMPATIBILITY_DOC = "docs/compatibility.md"
# slimc's extras ([project.optional-dependencies] in pyproject.toml) and the modules each installs, by import name.
EXTRA_MODULES = {
    "vllm": ("compressed_tensors",),
    "onnx": ("onnx", "onnxscript", "onnxruntime"),
    "diffusion": ("diffusers",),
    "datasets": ("datasets",),
    "npu": ("torch_npu",),
}


def missing_extra(extra: str, needed_for: str) -> str | None:
    """The message for what `needed_for` names (a format, a model family, a device) when a module of the extra
    `extra` is not installed, else None. Only looks for the modules: importing onnxscript alone takes seconds."""
    missing = [module for module in EXTRA_MODULES[extra] if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    verb, pronoun = ("is", "it") if len(missing) == 1 else ("are", "them")
    return f'{", ".join(missing)} {verb} not installed, and {needed_for} needs {pronoun}: pip install "slimc[{extra}]"'


def require_extra(extra: str, needed_for: str) -> None:
    """Raise MissingExtraError naming the `pip install` to run when the extra `extra` is not installed."""
    if (message := missing_extra(extra, needed_for)) is not None:
        raise MissingExtraError(message)


@dataclass(frozen=True)
class LibraryStatus:
    name: str
    installed: str | None  # None: not installed
    tested: SpecifierSet | None  # None: slimc's metadata names no range (not installed as a package)
    extra: str | None = None  # the extra that installs it; None: every install has it

    @property
    def optional_and_absent(self) -> bool:
        """An extra's library that is not installed: nothing is wrong until something needs it."""
        return self.installed is None and self.extra is not None

    @property
    def in_range(self) -> bool:
        if self.installed is None or self.tested is None:
            return self.tested is None
        try:
            return Version(self.installed) in self.tested
        except InvalidVersion:
            return False

    def describe(self) -> str:
        tested = f"tested {range_text(self.tested)}" if self.tested else "no tested range recorded"
        return f"{self.name} {self.installed or 'not installed'} ({tested})"


def range_text(specifier: SpecifierSet) -> str:
    """'>=5.23, <5.26': lower bounds first."""
    return ", ".join(sorted((str(s) for s in specifier), key=lambda s: (not s.startswith(">"), s)))


def tested_requirements() -> dict[str, Requirement]:
    """slimc's installed requirement on each library it reaches into (its tested range, and its extra if any)."""
    try:
        lines = importlib.metadata.requires("slimc") or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    requirements = {}
    for line in lines:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        if requirement.name in TESTED_LIBRARIES and requirement.name not in requirements:
            requirements[requirement.name] = requirement
    return requirements


def tested_ranges() -> dict[str, SpecifierSet]:
    """The tested range of each library slimc reaches into, from slimc's installed requirements."""
    return {name: requirement.specifier for name, requirement in tested_requirements().items()}


def extra_of(requirement: Requirement) -> str | None:
    """The extra a requirement comes with (its marker is `extra == "onnx"`), None for a core requirement."""
    if requirement.marker is None:
        return None
    return next((extra for extra in EXTRA_MODULES if requirement.marker.evaluate({"extra": extra})), None)


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def library_statuses() -> list[LibraryStatus]:
    requirements = tested_requirements()
    statuses = []
    for name in TESTED_LIBRARIES:
        requirement = requirements.get(name)
        statuses.append(LibraryStatus(name, installed_version(name), requirement.specifier if requirement else None,
                                      extra_of(requirement) if requirement else None))
    return statuses


def library_versions() -> dict[str, str | None]:
    """Python's and each recorded library's installed version (None: not installed), for a run's report."""
    return {"python": platform.python_version(), **{name: installed_version(name) for name in RECORDED_LIBRARIES}}


def untested_versions_warning() -> str | None:
    """One line naming every installed library outside its tested range, or None when all are inside."""
    outside = [s for s in library_statuses() if s.installed is not None and not s.in_range]
    if not outside:
        return None
    return (f"untested library versions: {'; '.join(s.describe() for s in outside)}; results may differ "
            f"(see {COMPATIBILITY_DOC}, or check with `slimc doctor`)")


def free_memory_bytes() -> int | None:
    """Memory available to a new process (Linux: MemAvailable), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def existing_ancestor(path: Path) -> Path:
    """The nearest existing directory at or above `path`'s parent: where a new `path` would be created."""
    parent = Path(path).resolve().parent
    while not parent.exists():
        parent = parent.parent
    return parent


def free_disk_bytes(path: Path) -> int:
    """Free space on the file system where `path` is, or would be created."""
    return shutil.disk_usage(existing_ancestor(path)).free


def human_size(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
