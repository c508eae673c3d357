"""Shipped YAML configs, one folder per model family (`slimc configs` lists them)."""

from importlib import resources
from pathlib import Path


def shipped_configs() -> dict[str, Path]:
    """Shipped configs by their name relative to the configs folder (e.g. llm/w8a8_dynamic.yaml)."""
    root = resources.files(__name__)
    found = {}
    for family in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")):
        for item in sorted(family.iterdir()):
            if item.name.endswith(".yaml"):
                found[f"{family.name}/{item.name}"] = Path(str(item))
    return found
