"""The pass contract and registry.

A pass is a pydantic model: its typed fields are the YAML keys of its pipeline step, so
validation and the `slimc passes` listing come from one place. It works one block at a time.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from slimc.errors import ConfigError
from slimc.ir.calls import block_output, hidden_of, rebind_hidden, rotate_hidden
from slimc.ir.capture import BlockInput
from slimc.report import RunReport
from slimc.schemes import QuantScheme

if TYPE_CHECKING:
    from slimc.config import SlimcConfig
    from slimc.ir import Block, Program

PASSES: dict[str, type[Pass]] = {}
ENTRY_POINT_GROUP = "slimc.passes"


class Pass(BaseModel):
    """Base class of passes.

    - ``requires``: names of passes that must run earlier in the pipeline;
    - ``preserves_function``: the pass changes weights but not what the block computes, so the
      pipeline checks the block's output before and after it (the equivalence check);
    - ``check``: cross-checks against the whole config (e.g. that named schemes exist);
    - ``prepare`` / ``finish``: once, before the first block and after the last;
    - ``run_block``: the work, on one block whose calibration inputs are in ``ctx``.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    preserves_function: ClassVar[bool] = False

    def check(self, config: SlimcConfig, step_index: int) -> None:
        """Raise ConfigError if the pass cannot work with this config."""

    def prepare(self, program: Program, ctx: Context) -> None:
        """Once, before the first block."""

    def run_block(self, block: Block, ctx: Context) -> None:
        raise NotImplementedError

    def finish(self, program: Program, ctx: Context) -> None:
        """Once, after the last block."""

    def stream_rotation(self) -> torch.Tensor | None:
        """The orthogonal matrix R this pass applies to the hidden states passed between blocks, if any.

        Such a pass rotates the calibration inputs in `prepare`; the equivalence check then
        expects block(x) == block_before(x Rᵀ) R.
        """
        return None


def register_pass(name: str):
    """Class decorator: make a pass available to YAML pipelines under `name`."""

    def decorate(cls: type[Pass]) -> type[Pass]:
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise TypeError(f"@register_pass({name!r}) must decorate a subclass of slimc.passes.Pass")
        cls.name = name
        PASSES[name] = cls
        return cls

    return decorate


def load_builtin_passes() -> None:
    importlib.import_module("slimc.passes")
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name not in PASSES:
            cls = entry.load()
            register_pass(entry.name)(cls)


def pass_class(reference: str) -> type[Pass]:
    """A registered pass by name, or a user's pass by `package.module:ClassName`."""
    load_builtin_passes()
    if ":" in reference:
        module_name, _, class_name = reference.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ConfigError(f"pass {reference!r}: cannot import module {module_name!r} ({error}); is it on PYTHONPATH?") from None
        cls = getattr(module, class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
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


class Context:
    """What a pass sees while working on a block: the program, the config, the block's inputs."""

    def __init__(self, program: Program, config: SlimcConfig, steps: Sequence[Pass], report: RunReport) -> None:
        self.program = program
        self.config = config
        self.steps = steps
        self.report = report
        self.device = torch.device(config.model.device)
        self.inputs: list[BlockInput] = []

    @torch.no_grad()
    def run(self, block: Block, batches: Sequence[BlockInput] | None = None) -> list[torch.Tensor]:
        """The block graph's outputs (see `block_output`) on (some of) its calibration inputs."""
        batches = self.inputs if batches is None else batches
        return [block_output(block.traced(*args, **kwargs)) for args, kwargs in batches]

    def planned_scheme(self, qualified_name: str) -> tuple[str, QuantScheme] | None:
        """The scheme a later step will give a layer, so earlier steps (smoothing) can aim for it."""
        for step in self.steps:
            scheme_for = getattr(step, "scheme_for", None)
            if scheme_for is not None:
                found = scheme_for(qualified_name, self.config)
                if found is not None:
                    return found
        return None

    def rotate_stream(self, rotation: torch.Tensor) -> None:
        """Rotate the hidden states of the current calibration inputs: x -> x R."""
        self.inputs = [rebind_hidden(batch, rotate_hidden(hidden_of(batch), rotation)) for batch in self.inputs]
