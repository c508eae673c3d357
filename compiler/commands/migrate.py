"""`slimc migrate`: a config file of an older version rewritten as the current version, its comments kept."""

from __future__ import annotations

import io
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from slimc.config import config_from_data, read_yaml
from slimc.config.versions import upgrade
from slimc.errors import ConfigError


def migrated_yaml(path: Path) -> tuple[str, list[str]]:
    """The file at `path` upgraded to CONFIG_VERSION as YAML text, its comments kept, and what changed."""
    plain, lines = read_yaml(path)  # the same checks as loading (encoding, safe tags, size)
    if not isinstance(plain, dict):
        raise ConfigError(f"{path}: the config must be a mapping with keys such as version, model, pipeline")
    yaml = YAML()  # round-trip: keeps comments, key order and flow style
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)  # the shipped configs' style
    try:
        data = yaml.load(path.read_text(encoding="utf-8"))
    except YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    changes = upgrade(data, source=str(path))
    upgrade(plain, lines, source=str(path))
    config_from_data(plain, source=str(path), lines=lines)  # the upgraded file must load, its passes typed
    text = io.StringIO()
    yaml.dump(data, text)
    return text.getvalue(), changes
