"""Which modules a traced block keeps as leaves (`call_module` nodes), and what kind of leaf each is.

The tracer keeps a module whole when `leaf_kind` names a kind; `patterns` reads the same kinds off the
graph's `call_module` nodes, so "a Linear", "a norm", "fused experts" mean one thing in both. The kinds:

- linear: `nn.Linear` and the modules slimc lowers Linears to;
- norm: a normalisation module (by type, or `Norm` in its class name) that holds no Linear: a norm
  holding one (diffusers' AdaLayerNormZero) is traced into so its Linear shows;
- experts: fused MoE experts, whose weights are 3-D `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I);
- attention: the attention kernel leaf the tracer puts into each attention module;
- quantizer: the quantize-dequantize module a pass puts on a layer's input;
- module: any other leaf: Conv/Embedding weights, rotary embeddings (their index arithmetic is noise
  in a graph), `*Experts` modules without fused weights, and modules defined by slimc (so a lowered
  block re-traces).

Classes defined above this layer declare their kind with `@register_leaf(kind)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

ModuleClass = TypeVar("ModuleClass", bound=type[nn.Module])

LEAF_KINDS: dict[type[nn.Module], str] = {
    nn.Linear: "linear",
    nn.LayerNorm: "norm",
    nn.GroupNorm: "norm",
    nn.RMSNorm: "norm",
    nn.LocalResponseNorm: "norm",
    nn.modules.batchnorm._NormBase: "norm",
    nn.Conv1d: "module",
    nn.Conv2d: "module",
    nn.Conv3d: "module",
    nn.ConvTranspose1d: "module",
    nn.ConvTranspose2d: "module",
    nn.ConvTranspose3d: "module",
    nn.Embedding: "module",
}


def register_leaf(kind: str) -> Callable[[ModuleClass], ModuleClass]:
    """Class decorator: modules of the class (and its subclasses) are leaves of `kind`."""

    def register(cls: ModuleClass) -> ModuleClass:
        LEAF_KINDS[cls] = kind
        return cls

    return register


def has_fused_expert_weights(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3


def leaf_kind(module: nn.Module) -> str | None:
    """The kind of leaf the tracer keeps `module` as, or None when it traces into the module."""
    cls = type(module)
    declared = next((LEAF_KINDS[base] for base in cls.__mro__ if base in LEAF_KINDS), None)
    if declared == "norm" or (declared is None and "Norm" in cls.__name__):
        return None if any(isinstance(m, nn.Linear) for m in module.modules()) else "norm"
    if declared is not None:
        return declared
    if has_fused_expert_weights(module):
        return "experts"
    if cls.__module__.startswith("slimc.") or "Rotary" in cls.__name__:
        return "module"
    if cls.__name__.endswith("Experts") and not isinstance(module, nn.ModuleList):
        return "module"
    return None


def is_experts_module(module: nn.Module) -> bool:
    """Whether `module` is a fused MoE experts module (see `leaf_kind`)."""
    return leaf_kind(module) == "experts"
