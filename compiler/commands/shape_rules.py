"""The plan, checked up front: which layers get which scheme, and whether their shapes fit it and the formats.

Schemes (`slimc.schemes.SHAPE_RULES`) and export formats (`Backend.shape_rules`) declare the weight shapes
they can hold, as data. `compile` plans every layer's scheme from the config's fake_quant rules over the
model's meta-device skeleton and refuses a plan that breaks a rule before a weight or a calibration sample is
read, naming the layers, the rule and the fix; `slimc compile --dry-run` prints the plan and every broken rule.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from torch import nn

from slimc.errors import ConfigError
from slimc.ir.leaves import is_experts_module
from slimc.passes.rotate import Rotate
from slimc.plan import QuantPlan
from slimc.schemes import SHAPE_RULES, QuantScheme, ShapeRule

if TYPE_CHECKING:
    from slimc.backends import Backend
    from slimc.config import SlimcConfig
    from slimc.config.steps import PassStep
    from slimc.ir import Program

SHOWN_PER_RULE = 5  # layers a compile error lists for each broken rule; --dry-run lists every one
LAYER_NUMBER = re.compile(r"(?<=\.)\d+(?=\.|$)")


@dataclass(frozen=True)
class PlannedLayer:
    """A layer the config quantizes, and the weights the formats write for it: (which, out_features, in_features)."""

    name: str
    scheme_name: str
    scheme: QuantScheme
    weights: tuple[tuple[str, int, int], ...]
    may_stay_float: bool  # False for fused experts behind an online rotation (see `plan_layers`)


@dataclass
class Plan:
    layers: list[PlannedLayer]
    float_layers: int  # Linears and fused experts inside blocks that no rule selects


@dataclass(frozen=True)
class Violation:
    layer: PlannedLayer
    weight: str  # which of the layer's weights
    out_features: int
    in_features: int
    owner: str  # "scheme", or the name of the export format whose rule it is
    rule: ShapeRule


def written_weights(layer: nn.Module) -> tuple[tuple[str, int, int], ...]:
    """(which, out, in) of what the formats write: a Linear's weight; for fused experts (E, out, in), each
    expert's gate and up projections (the two halves of gate_up_proj) and its down projection."""
    if isinstance(layer, nn.Linear):
        return (("weight", layer.out_features, layer.in_features),)
    gate_up_rows, hidden = layer.gate_up_proj.shape[-2:]
    down_rows, intermediate = layer.down_proj.shape[-2:]
    return (("each expert's gate_proj and up_proj", gate_up_rows // 2, hidden),
            ("each expert's down_proj", down_rows, intermediate))


def plan_layers(program: Program, config: SlimcConfig, steps: Sequence[PassStep]) -> Plan:
    """The scheme of every Linear and fused experts module in the program's blocks, as the pipeline will give them
    (the quantization plan it resolves), with the weights the formats write for each. Works on a meta-device
    skeleton: only names and shapes are read."""
    resolved = QuantPlan.resolve(program, config, steps)
    # The checkpoint formats record an online rotation of experts' down projections only on quantized experts
    # (`slimc.backends.checkpoint.online_rotations`), so the error must not offer to keep those float.
    online_down = any(isinstance(step, Rotate) and step.online_down for step in steps)
    layers = []
    for name, assigned in resolved.schemes.items():
        layer = program.model.get_submodule(name)
        may_stay_float = not (online_down and is_experts_module(layer))
        layers.append(PlannedLayer(name, *assigned, written_weights(layer), may_stay_float))
    return Plan(layers, len(resolved.float_layers))


def broken_rules(plan: Plan, backends: Sequence[Backend]) -> list[Violation]:
    """Every (layer weight, rule) pair where the weight's shape breaks a rule of its scheme or of an export format."""
    owners = [("scheme", SHAPE_RULES), *((backend.format_name, backend.shape_rules) for backend in backends)]
    return [Violation(layer, which, out_features, in_features, owner, rule)
            for layer in plan.layers
            for which, out_features, in_features in layer.weights
            for owner, rules in owners
            for rule in rules
            if rule.broken_by(out_features, in_features, layer.scheme)]


def exclude_globs(names: Sequence[str], planned: Sequence[str]) -> list[str]:
    """Globs selecting exactly `names` among the planned layers: layer numbers become `*` where that selects
    no other planned layer (all 48 layers' down_proj in one glob), else the name itself."""
    others = set(planned) - set(names)
    globs: dict[str, None] = {}  # in order, each once
    for name in names:
        general = LAYER_NUMBER.sub("*", name)
        globs[general if not any(fnmatchcase(other, general) for other in others) else name] = None
    return list(globs)


def describe_broken(broken: Sequence[Violation], plan: Plan, shown: int | None = None) -> list[str]:
    """Lines naming, per broken rule: whose rule it is, what it needs, the layers breaking it (the first `shown`,
    None: all), and the fixes, ending with the exclude globs that keep those layers float."""
    groups: dict[tuple[str, ShapeRule, str], list[Violation]] = {}
    for violation in broken:
        groups.setdefault((violation.owner, violation.rule, violation.layer.scheme_name), []).append(violation)
    planned = [layer.name for layer in plan.layers]
    lines = []
    for (owner, rule, scheme_name), group in groups.items():
        scheme = group[0].layer.scheme
        layers = {violation.layer.name: violation.layer for violation in group}
        names = list(layers)
        whose = f"scheme {scheme_name} ({scheme.label})" + ("" if owner == "scheme" else f" in format {owner}")
        lines.append(f"  {whose}: {rule.requirement.format(scheme=scheme)}; broken by {_layers(len(names))}:")
        listed = group if shown is None else group[:shown]
        lines += [f"    {v.layer.name}{'' if v.weight == 'weight' else f' ({v.weight})'}: out {v.out_features}, "
                  f"in {v.in_features}" for v in listed]
        if len(listed) < len(group):
            lines.append(f"    ... and {len(group) - len(listed)} more")
        fixes = [rule.fix, *([] if owner == "scheme" else [f"leave format {owner} out of export"])]
        floatable = [name for name, layer in layers.items() if layer.may_stay_float]
        if floatable:
            fixes.append(f"keep {'them' if floatable == names else 'the Linears'} float: add "
                         f"{json.dumps(exclude_globs(floatable, planned))} to the exclude list of the fake_quant rule "
                         "selecting them")
        fixed = f"    fix: {'; or '.join(fixes)}"
        lines.append(fixed if floatable == names else f"{fixed}; fused experts behind the rotate pass's online "
                     "rotation cannot stay float")
    return lines


def check_plan(plan: Plan, backends: Sequence[Backend], config: SlimcConfig) -> None:
    """Refuse a plan with a layer whose shape its scheme or an export format cannot hold, naming them all."""
    broken = broken_rules(plan, backends)
    if broken:
        count = len({violation.layer.name for violation in broken})
        raise ConfigError(f"{config.source_file}: the plan breaks shape rules of a scheme or export format in "
                          f"{_layers(count)}, found before loading the model (`slimc compile --dry-run` lists them all):\n"
                          + "\n".join(describe_broken(broken, plan, SHOWN_PER_RULE)))


def render_plan(plan: Plan, broken: Sequence[Violation], backends: Sequence[Backend]) -> str:
    """The plan for `compile --dry-run`: layers per scheme, float layers, formats, and every broken shape rule."""
    by_scheme = Counter((layer.scheme_name, layer.scheme.label) for layer in plan.layers)
    lines = ["quantized layers:", *(f"  {name} ({label}): {count}" for (name, label), count in by_scheme.items()),
             f"float layers in blocks: {plan.float_layers}",
             f"export: {', '.join(backend.format_name for backend in backends)}"]
    if broken:
        count = len({violation.layer.name for violation in broken})
        lines += [f"shape rules: broken by {_layers(count)}:", *describe_broken(broken, plan)]
    else:
        lines.append("shape rules: every quantized layer fits its scheme and the export formats")
    return "\n".join(lines)


def _layers(count: int) -> str:
    return f"{count} layer{'' if count == 1 else 's'}"
