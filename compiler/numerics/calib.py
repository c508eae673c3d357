"""Calibration helpers: statistics from running a block on its inputs, through module hooks.

Hooks sit on leaf modules, which a block and its graph module share, so they fire when the
graph runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from slimc.ir import Block
from slimc.ir.hooks import temporary_hooks
from slimc.numerics.quant import (
    LastQuantized,
    dynamic_fake_quantize,
    fake_quantize,
    fake_quantize_weight,
    qparams_from_range,
)
from slimc.schemes import QuantScheme


def activation_channel_absmax(x: torch.Tensor) -> torch.Tensor:
    """max |x| per channel (last dimension), float32: as max(max x, −min x), two reductions in x's dtype with no
    |x| copy (a third of the time at SmolLM2's width)."""
    rows = x.detach().reshape(-1, x.shape[-1])
    return torch.maximum(rows.amax(0), rows.amin(0).neg_()).float()


@torch.no_grad()
def channel_absmax(block: Block, batches: Sequence, targets: dict[str, str], run) -> dict[str, torch.Tensor]:
    """Per-channel max |x| at leaves of the block: `targets` maps a leaf to "input" or "output".

    `run(block, batches, record)` executes the block graph on the batches; module hooks record what the leaves it
    calls see, and `record(target, x)` takes values it observes itself (a run that stops before a leaf's call).
    """
    stats: dict[str, torch.Tensor] = {}

    def record(target: str, x: torch.Tensor) -> None:
        current = activation_channel_absmax(x)
        stats[target] = current if target not in stats else torch.maximum(stats[target], current)

    with temporary_hooks() as hooks:
        for target, where in targets.items():
            module = block.graph_module.get_submodule(target)  # a node a pass inserted, such as an online rotation, too
            if where == "input":
                hooks.before(module, lambda m, args, t=target: record(t, args[0]))
            else:
                hooks.after(module, lambda m, args, out, t=target: record(t, out))
        run(block, batches, record)
    return stats


def simulate_act(x: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Activation quantization as calibration will apply it, estimated from `x` itself."""
    act = scheme.act
    if act is None:
        return x
    if act.dynamic:
        return dynamic_fake_quantize(x, act)
    scale, offset = qparams_from_range(x.min(), x.max(), act)
    return fake_quantize(x, scale, offset, act)


@contextlib.contextmanager
def simulated_quantization(block: Block, linears: dict[str, QuantScheme]) -> Iterator[None]:
    """Temporarily quantize the given Linears (round-to-nearest weights, activations as planned)."""
    saved = {}
    simulated = LastQuantized(simulate_act)  # q, k and v read one activation: quantized once
    with temporary_hooks() as hooks:
        try:
            with torch.no_grad():
                for target, scheme in linears.items():
                    linear = block.leaf(target)
                    saved[target] = linear.weight.detach().clone()
                    linear.weight.copy_(fake_quantize_weight(linear.weight, scheme.weight))
                    if scheme.act is not None:
                        hooks.before(linear, lambda m, args, s=scheme: (simulated(args[0], s),))
            yield
        finally:
            with torch.no_grad():
                for target, weight in saved.items():
                    block.leaf(target).weight.copy_(weight)
