"""Folding per-channel scales into weights, exactly: what norm fusion, smoothing and rotation share.

A consumer (see patterns.Consumer) reads a tensor on its input channels: a Linear's weight
columns, fused experts' `gate_up_proj[:, :, cols]`, or a parameter used by `F.linear` (a router).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from slimc.ir import Block
from slimc.numerics.modules import ChannelScale
from slimc.patterns.graph import Consumer

# The rows a working copy is made of at a time: 16M elements, 128 MiB in float64. Fused MoE experts (E, out, in) and
# a large vocabulary's embedding are gigabytes in bf16, so a whole-tensor float32/float64 copy would be several times that.
PART_ELEMENTS = 1 << 24


def tensor_parts(tensor: torch.Tensor, trailing: int = 1) -> Iterator[torch.Tensor]:
    """Views of `tensor` that cover it, each whole slices of its last `trailing` dimensions and at most about
    PART_ELEMENTS elements (one slice where a slice is larger); the tensor itself when it cannot be viewed so."""
    if tensor.dim() <= trailing or not tensor.is_contiguous():
        yield tensor
        return
    slices = tensor.view(-1, *tensor.shape[tensor.dim() - trailing:])
    yield from slices.split(max(1, PART_ELEMENTS // slices[0].numel()))


@torch.no_grad()
def update_in_parts(tensor: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor], trailing: int = 1) -> None:
    """tensor <- transform(tensor) in place, part by part (`tensor_parts`): `transform` must treat each slice of the
    last `trailing` dimensions on its own, so the result is the whole-tensor one with bounded working copies."""
    for part in tensor_parts(tensor, trailing):
        part.copy_(transform(part))


def consumer_weight_name(consumer: Consumer) -> str:
    """The name in the block of the weight whose last dimension is the consumer's input channels ((out, in) or (E, out, in))."""
    return {"linear": f"{consumer.target}.weight", "experts": f"{consumer.target}.gate_up_proj"}.get(consumer.kind, consumer.target)


def consumer_weight(block: Block, consumer: Consumer) -> torch.Tensor:
    return block.module.get_parameter(consumer_weight_name(consumer))


def input_channel_absmax(block: Block, consumers: list[Consumer]) -> torch.Tensor:
    """max |W[..., j]| over all consumers' weights, per input channel j."""
    maxima = []
    for consumer in consumers:
        for part in tensor_parts(consumer_weight(block, consumer).detach()):
            maxima.append(part.abs().reshape(-1, part.shape[-1]).amax(0).float())
    return torch.stack(maxima).amax(0)


@torch.no_grad()
def scale_input_channels(block: Block, consumers: list[Consumer], scale: torch.Tensor) -> None:
    """Multiply every consumer's input channels by `scale` (weights computed in float32)."""
    for consumer in consumers:
        weight = consumer_weight(block, consumer)
        update_in_parts(weight, ChannelScale(scale.to(weight.device)))


@torch.no_grad()
def scale_output_channels(linear: nn.Module, scale: torch.Tensor, rows: slice | None = None) -> None:
    """Multiply a Linear's output rows (and bias) by `scale`."""
    rows = rows or slice(None)
    weight = linear.weight
    weight[rows].copy_((weight[rows].float() * scale.to(weight.device)[:, None]).to(weight.dtype))
    if linear.bias is not None:
        linear.bias[rows].copy_((linear.bias[rows].float() * scale.to(weight.device)).to(linear.bias.dtype))


def norm_has_affine_weight(norm: nn.Module) -> bool:
    weight = getattr(norm, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 1


@torch.no_grad()
def scale_norm(norm: nn.Module, scale: torch.Tensor) -> None:
    """Multiply a norm's output channels by `scale` (its weight, and bias if any)."""
    norm.weight.copy_((norm.weight.float() * scale.to(norm.weight.device)).to(norm.weight.dtype))
    bias = getattr(norm, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.copy_((bias.float() * scale.to(bias.device)).to(bias.dtype))


def can_absorb_bias(block: Block, consumers: list[Consumer]) -> bool:
    """Whether every consumer has a bias that a shift of its input can move into."""
    return all(c.kind == "linear" and block.leaf(c.target).bias is not None for c in consumers)


@torch.no_grad()
def fold_norm(block: Block, norm_target: str, consumers: list[Consumer]) -> bool:
    """Move a norm's affine weight (and bias) into its consumers; the norm becomes scale-free.

    Returns False (and changes nothing) when the norm has a bias that a consumer cannot absorb.
    """
    norm = block.leaf(norm_target)
    if not norm_has_affine_weight(norm):
        return False
    bias = getattr(norm, "bias", None)
    has_bias = isinstance(bias, torch.Tensor) and bool(bias.detach().abs().max() > 0)
    if has_bias and not can_absorb_bias(block, consumers):
        return False
    if has_bias:
        for consumer in consumers:
            linear = block.leaf(consumer.target)
            linear.bias.copy_((linear.bias.float() + linear.weight.float() @ bias.float()).to(linear.bias.dtype))
        bias.zero_()
    scale_input_channels(block, consumers, norm.weight.detach().float())
    norm.weight.fill_(1.0)
    return True


@torch.no_grad()
def scale_modulation(linear: nn.Module, scale_rows: slice, shift_rows: slice, factor: torch.Tensor) -> None:
    """Multiply the modulated output `norm(x) · (1 + scale) + shift` by `factor` per channel, where scale and
    shift are the rows `scale_rows` and `shift_rows` of `linear`'s output:
    W_s ← W_s·f, b_s ← (1 + b_s)·f − 1 (so that 1 + scale becomes (1 + scale)·f); W_h ← W_h·f, b_h ← b_h·f."""
    factor = factor.to(linear.weight.device, torch.float32)
    bias = linear.bias
    one_plus_bias = 1.0 + bias[scale_rows].float()
    scale_output_channels(linear, factor, scale_rows)
    scale_output_channels(linear, factor, shift_rows)
    bias[scale_rows].copy_((one_plus_bias * factor - 1.0).to(bias.dtype))
