"""A pipeline step as the config sees it, and the registry of passes by name.

A step is a pydantic model: its typed fields are the YAML keys of its `- pass:` entry. It declares its place
in the order (`requires`, `runs_before`) and the schemes it assigns to layers (`scheme_for`), so the config
checks the order and the quantization plan is resolved without running anything. The pass contract
(`slimc.pass_base.Pass`) extends it with the work on blocks; steps are typed when the config loads.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, ClassVar, NamedTuple

from pydantic import BaseModel, ConfigDict

from slimc.errors import ConfigError
from slimc.schemes import QuantScheme

if TYPE_CHECKING:
    from slimc.config import SlimcConfig

PASSES: dict[str, type[PassStep]] = {}
ENTRY_POINT_GROUP = "slimc.passes"


class AssignedScheme(NamedTuple):
    """The scheme a step gives a layer: its name under `schemes:` and the scheme."""

    name: str
    scheme: QuantScheme


class PassStep(BaseModel):
    """What a pass is before it runs.

    - ``requires``: names of passes that must run earlier in the pipeline;
    - ``runs_before``: names of passes that, where the pipeline has them, must run later, and
      ``runs_before_reason`` says why (the config error quotes it);
    - ``check``: cross-checks against the whole config (e.g. that named schemes exist);
    - ``scheme_for``: the scheme this step gives a layer (by qualified name), if any: the
      quantization plan (`slimc.plan.QuantPlan`) asks every step, the first that answers wins.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    runs_before: ClassVar[tuple[str, ...]] = ()
    runs_before_reason: ClassVar[str] = ""

    def check(self, config: SlimcConfig, step_index: int) -> None:
        """Raise ConfigError if the pass cannot work with this config."""

    def scheme_for(self, layer: str, config: SlimcConfig) -> AssignedScheme | None:
        """The scheme this step gives the layer named `layer`; a step that quantizes nothing gives none."""
        return None


def check_order(steps: list[PassStep], index: int, config: SlimcConfig) -> None:
    """Refuse step `index` where a pass it requires is not earlier, or a pass it must run before is."""
    step = steps[index]
    earlier = steps[:index]
    missing = [name for name in step.requires if name not in {s.name for s in earlier}]
    if missing:
        raise ConfigError(f"{config.where('pipeline', index)}: pipeline.{index}: pass {step.name!r} needs "
                          f"{', '.join(repr(m) for m in missing)} earlier in the pipeline")
    misplaced = [f"{s.name} (pipeline.{i})" for i, s in enumerate(earlier) if s.name in step.runs_before]
    if misplaced:
        raise ConfigError(f"{config.where('pipeline', index)}: pipeline.{index}: {step.name} must come before "
                          f"{', '.join(misplaced)}: {step.runs_before_reason}")


def register(name: str, cls: type[PassStep]) -> None:
    cls.name = name
    PASSES[name] = cls


def load_builtin_passes() -> None:
    """Register the built-in passes (importing `slimc.passes` registers them) and those of installed packages."""
    importlib.import_module("slimc.passes")
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name not in PASSES:
            cls = entry.load()
            if not (isinstance(cls, type) and issubclass(cls, PassStep)):
                raise ConfigError(f"entry point {entry.name!r} of group {ENTRY_POINT_GROUP!r} is not a subclass of slimc.passes.Pass")
            register(entry.name, cls)


def pass_class(reference: str) -> type[PassStep]:
    """A registered pass by name, or a user's pass by `package.module:ClassName`."""
    load_builtin_passes()
    if ":" in reference:
        module_name, _, class_name = reference.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ConfigError(f"pass {reference!r}: cannot import module {module_name!r} ({error}); is it on PYTHONPATH?") from None
        cls = getattr(module, class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, PassStep)):
            raise ConfigError(f"pass {reference!r}: {module_name} has no subclass of slimc.passes.Pass named {class_name!r}")
        if not cls.name:
            cls.name = reference
        return cls
    if reference not in PASSES:
        raise ConfigError(
            f"unknown pass {reference!r}; registered passes: {', '.join(sorted(PASSES))} "
            "(or name your own as package.module:ClassName)"
        )
    return PASSES[reference]
