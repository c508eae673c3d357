"""`slimc passes` and `slimc configs`: what is registered and shipped, described from the classes and files.

A pass's parameters come from its pydantic fields: the type (a Literal's or an Enum's allowed values written
out), the default, the constraints (`Field(ge=...)`), and the fields of a nested model (fake_quant's rules).
Each listing is a dict that `--json` prints as it is and the text form renders.
"""

from __future__ import annotations

import enum
import inspect
import textwrap
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from slimc.config.steps import PASSES, load_builtin_passes
from slimc.configs import shipped_configs

WIDTH = 110
CONSTRAINTS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "min_length": "length >= {}",
               "max_length": "length <= {}", "multiple_of": "a multiple of {}"}


def first_paragraph(text: str | None) -> str:
    """The first paragraph of a docstring or comment, on one line."""
    return " ".join(inspect.cleandoc(text or "").split("\n\n")[0].split())


def type_name(annotation: Any) -> str:
    """`float`, `list[str]`, `'rtn' | 'gptq'`, `list[Rule]`, `int | None`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " | ".join(repr(value) for value in args)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(repr(member.value) for member in annotation)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(arg) for arg in args)}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _inner_types(annotation: Any) -> list[Any]:
    """The annotation and, depth first, every type it is built from."""
    return [annotation] + [inner for arg in get_args(annotation) for inner in _inner_types(arg)]


def allowed_values(annotation: Any) -> list[Any] | None:
    """The values a Literal or Enum in the annotation allows (`list[Literal[...]]`: the items'), else None."""
    for inner in _inner_types(annotation):
        if get_origin(inner) is Literal:
            return list(get_args(inner))
        if isinstance(inner, type) and issubclass(inner, enum.Enum):
            return [member.value for member in inner]
    return None


def nested_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds, alone or in a container (`list[Rule]`), if any."""
    return next((inner for inner in _inner_types(annotation)
                 if isinstance(inner, type) and issubclass(inner, BaseModel)), None)


def describe_field(field: FieldInfo) -> dict[str, Any]:
    described: dict[str, Any] = {"type": type_name(field.annotation), "required": field.is_required()}
    if not field.is_required():
        default = field.get_default(call_default_factory=True)
        described["default"] = to_jsonable_python(default)
    if (allowed := allowed_values(field.annotation)) is not None:
        described["allowed"] = to_jsonable_python(allowed)
    constraints = {name: getattr(item, name) for item in field.metadata for name in CONSTRAINTS if hasattr(item, name)}
    if constraints:
        described["constraints"] = to_jsonable_python(constraints)
    if field.description:
        described["description"] = field.description
    if (model := nested_model(field.annotation)) is not None:
        described["description"] = field.description or first_paragraph(model.__doc__)
        described["fields"] = describe_fields(model)
    return described


def describe_fields(model: type[BaseModel]) -> dict[str, dict[str, Any]]:
    return {name: describe_field(field) for name, field in model.model_fields.items()}


def pass_listing() -> dict[str, dict[str, Any]]:
    """Every registered pass (built-in and installed), by name."""
    load_builtin_passes()
    return {
        name: {
            "description": first_paragraph(cls.__doc__),
            "module": cls.__module__,
            "function_preserving": bool(getattr(cls, "preserves_function", False)),
            "requires": list(cls.requires),
            "runs_before": list(cls.runs_before),
            "parameters": describe_fields(cls),
        }
        for name, cls in sorted(PASSES.items())
    }


def config_description(path: Path) -> str:
    """The first paragraph of a config's header comment."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line[1:].strip())
    return first_paragraph("\n".join(header))


def config_listing() -> dict[str, dict[str, Any]]:
    """Every shipped config, by name: what its header says, and the passes and formats it names."""
    listing = {}
    for name, path in shipped_configs().items():
        raw = yaml.safe_load(path.read_text()) or {}
        listing[name] = {
            "path": str(path),
            "description": config_description(path),
            "schemes": list(raw.get("schemes") or {}),
            "passes": [step.get("pass") for step in raw.get("pipeline") or []],
            "export": [entry.get("format") for entry in raw.get("export") or []],
        }
    return listing


def _wrapped(text: str, first: str, indent: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=first, subsequent_indent=indent, break_on_hyphens=False) or [first.rstrip()]


def _field_lines(fields: dict[str, dict[str, Any]], indent: str) -> list[str]:
    lines = []
    for name, field in fields.items():
        line = f"{name}: {field['type']} ({'required' if field['required'] else 'default ' + repr(field['default'])})"
        if "fields" in field and not field["required"]:
            line = f"{name}: {field['type']}"  # its fields' defaults are the default
        for constraint, value in field.get("constraints", {}).items():
            words = CONSTRAINTS[constraint]
            line += f", {words.format(value)}" if "{}" in words else f", {words} {value}"
        if "description" in field:
            line += f": {field['description']}"
        lines += _wrapped(line, indent, indent + "    ")
        if "fields" in field:
            lines += _field_lines(field["fields"], indent + "    ")
    return lines


def render_passes(listing: dict[str, dict[str, Any]]) -> str:
    blocks = []
    for name, entry in listing.items():
        lines = _wrapped(f"{name}: {entry['description']}", "", "    ")
        flags = [flag for flag, on in (("function-preserving", entry["function_preserving"]),
                                        (f"needs {', '.join(entry['requires'])}", entry["requires"]),
                                        (f"before {', '.join(entry['runs_before'])}", entry["runs_before"])) if on]
        if flags:
            lines.append(f"    [{'; '.join(flags)}]")
        lines += _field_lines(entry["parameters"], "    ")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def render_configs(listing: dict[str, dict[str, Any]]) -> str:
    blocks = []
    for name, entry in listing.items():
        lines = [name, *_wrapped(entry["description"], "    ", "    ")]
        lines.append(f"    passes: {', '.join(map(str, entry['passes']))}; export: {', '.join(map(str, entry['export']))}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
