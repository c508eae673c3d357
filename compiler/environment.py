"""The libraries slimc reaches into, the version ranges it was tested with, and what this machine has.

slimc depends on internals of torch (fx, onnx export), transformers (modeling code, masks, checkpoint
conversion), diffusers, compressed-tensors and onnx/onnxscript/onnxruntime. The range each was tested
with is its requirement in pyproject.toml (lower bound: the oldest version tested; upper bound: below
the next untested minor), read back here from the installed package's metadata, so there is one list.
A version outside its range is allowed (a new model may need a newer transformers) but warned about.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

TESTED_LIBRARIES = ("torch", "transformers", "diffusers", "compressed-tensors", "onnx", "onnxscript", "onnxruntime")
COMPATIBILITY_DOC = "docs/compatibility.md"


@dataclass(frozen=True)
class LibraryStatus:
    name: str
    installed: str | None  # None: not installed
    tested: SpecifierSet | None  # None: slimc's metadata names no range (not installed as a package)

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


def tested_ranges() -> dict[str, SpecifierSet]:
    """The tested range of each library slimc reaches into, from slimc's installed requirements."""
    try:
        requirements = importlib.metadata.requires("slimc") or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    ranges = {}
    for line in requirements:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        if requirement.name in TESTED_LIBRARIES and requirement.name not in ranges:
            ranges[requirement.name] = requirement.specifier
    return ranges


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def library_statuses() -> list[LibraryStatus]:
    ranges = tested_ranges()
    return [LibraryStatus(name, installed_version(name), ranges.get(name)) for name in TESTED_LIBRARIES]


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
