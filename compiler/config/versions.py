"""Config versions: how a config written for an older slimc becomes a current one.

Each format change is one `Migration` from version N to N + 1, declared as data: the key paths it
moves. `upgrade` applies them in order to plain data (what `load_config` reads) or to ruamel.yaml's
round-trip data (what `slimc migrate` prints, comments kept), and moves the line numbers recorded for
messages with the keys, so an error in a migrated file still points at the line the user wrote.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

from slimc.errors import ConfigError

KeyPath = tuple[str, ...]


@dataclass(frozen=True)
class Migration:
    """What changed from `from_version` to the next version, and the key moves that upgrade a file."""

    from_version: int
    summary: str
    moves: tuple[tuple[KeyPath, KeyPath], ...] = ()


MIGRATIONS = (
    Migration(1, "equivalence_tolerance moved to checks.equivalence_tolerance (checks.equivalence: false turns the "
                 "check off)", moves=((("equivalence_tolerance",), ("checks", "equivalence_tolerance")),)),
)
CONFIG_VERSION = MIGRATIONS[-1].from_version + 1
OLDEST_VERSION = MIGRATIONS[0].from_version


def upgrade(data: MutableMapping, lines: dict[tuple, int] | None = None, *, source: str = "<config>") -> list[str]:
    """Bring `data` (a config's top-level mapping) to CONFIG_VERSION in place; returns what changed, one line
    per version step (empty when the file is current). `lines` (key path -> line) is updated with the keys."""
    version = data.get("version", CONFIG_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or not OLDEST_VERSION <= version <= CONFIG_VERSION:
        raise ConfigError(f"{source}: version: this slimc reads config versions {OLDEST_VERSION} to {CONFIG_VERSION}, "
                          f"the file says {version!r}; a newer version needs a newer slimc (pip install -U slimc)")
    changes = []
    for migration in MIGRATIONS[version - OLDEST_VERSION:]:
        for old, new in migration.moves:
            _move(data, old, new, source)
            if lines is not None:
                _move_lines(lines, old, new)
        changes.append(f"version {migration.from_version} -> {migration.from_version + 1}: {migration.summary}")
    if changes:
        data["version"] = CONFIG_VERSION
    return changes


def _move(data: MutableMapping, old: KeyPath, new: KeyPath, source: str) -> None:
    parent = _lookup(data, old[:-1])
    if not isinstance(parent, MutableMapping) or old[-1] not in parent:
        return
    position = list(data).index(old[0])
    value = parent.pop(old[-1])
    comment = getattr(parent, "ca", None) and parent.ca.items.pop(old[-1], None)  # round-trip data: the key's comment
    target = data
    for depth, key in enumerate(new[:-1]):
        if key not in target:
            child = type(target)()
            if depth == 0 and hasattr(target, "insert"):  # round-trip data: where the moved key was
                target.insert(min(position, len(target)), key, child)
            else:
                target[key] = child
        target = target[key]
        if not isinstance(target, MutableMapping):
            raise ConfigError(f"{source}: {'.'.join(new[:depth + 1])} must be a section to hold {'.'.join(new)}")
    if new[-1] in target:
        raise ConfigError(f"{source}: both {'.'.join(old)} (an older name) and {'.'.join(new)} are set; keep one")
    target[new[-1]] = value
    if comment:
        target.ca.items[new[-1]] = comment


def _lookup(data: Any, path: KeyPath) -> Any:
    for key in path:
        if not isinstance(data, MutableMapping) or key not in data:
            return None
        data = data[key]
    return data


def _move_lines(lines: dict[tuple, int], old: KeyPath, new: KeyPath) -> None:
    for path in [p for p in lines if p[:len(old)] == old]:
        lines[new + path[len(old):]] = lines.pop(path)
