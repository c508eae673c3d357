"""Shipped YAML configs, one folder per model family (`slimc configs` lists them)."""

from importlib import resources
from pathlib import Path

from slimc.errors import SlimcError


def shipped_configs() -> dict[str, Path]:
    """Shipped configs by their name relative to the configs folder (e.g. llm/w8a8_dynamic.yaml)."""
    root = resources.files(__name__)
    found = {}
    for family in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")):
        for item in sorted(family.iterdir()):
            if item.name.endswith(".yaml"):
                found[f"{family.name}/{item.name}"] = Path(str(item))
    return found


def resolve_config_path(name: str | Path) -> Path:
    """A config path as given, else a shipped config by name (`llm/w8a8_dynamic.yaml`)."""
    path = Path(name)
    if path.exists():
        return path
    shipped = shipped_configs()
    name = str(name)
    for key in (name, name.removeprefix("configs/"), f"{name.removeprefix('configs/')}.yaml"):
        if key in shipped:
            return shipped[key]
    raise SlimcError(f"config {name!r} not found; give a path, or one of the shipped configs (slimc configs): {', '.join(shipped)}")
