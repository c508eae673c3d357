"""AutoRound: learn how each weight of a block rounds, and how far each weight range is clipped, by signed gradient
descent on the block's output error (Cheng et al., 2023, "Optimize Weight Rounding via Signed Gradient Descent for
the Quantization of LLMs").

Each weight (out, in) gets rounding offsets V (out, in) in [-0.5, 0.5] and, per stored scale entry, factors in
[0.5, 1] that shrink the minimum and the maximum of its range; its quantized value is

    scale, offset = qparams_from_range(min · min_factor, max · max_factor)
    codes = clamp(round(W / scale + V + offset), qmin, qmax),   W ≈ (codes - offset) · scale

All of a block's weights are learned together, to bring the block's output with quantized weights (and quantized
activations, as the scheme says) to the float block's output on the block's calibration inputs. The codes, scales
and offsets come back in the stored shapes of `quant.quantize_weight`, so lowering and export treat them as
round-to-nearest ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call

from slimc.distributed import World
from slimc.ir import Block
from slimc.ir.calls import block_output
from slimc.ir.capture import BlockInput
from slimc.ir.hooks import temporary_hooks
from slimc.numerics.quant import expand_to_weight, qparams_from_range, round_through, weight_range
from slimc.schemes import TensorScheme

SMALLEST_FACTOR = 0.5  # the range may shrink to half its minimum and maximum, as in the paper


class LearnedRounding:
    """The rounding of one weight (out, in) being learned: `offsets` (out, in) and, with `tune_range`, `min_factor`
    and `max_factor` in the stored scale's shape (per_tensor (1, 1), per_channel (out, 1), per_group (out, in / g)),
    float32 on the weight's device. `parameter` is the module tensor the weight is (`expert` its index in fused
    experts' weights, else None)."""

    def __init__(self, parameter: nn.Parameter, expert: int | None, scheme: TensorScheme, tune_range: bool) -> None:
        self.parameter, self.expert, self.scheme = parameter, expert, scheme
        weight = self.weight
        self.low, self.high = weight_range(weight, scheme)
        self.offsets = torch.zeros(weight.shape, device=weight.device, requires_grad=True)
        self.min_factor = torch.ones_like(self.low, requires_grad=tune_range)
        self.max_factor = torch.ones_like(self.high, requires_grad=tune_range)

    @property
    def weight(self) -> torch.Tensor:
        return (self.parameter if self.expert is None else self.parameter[self.expert]).detach()

    def learned(self) -> list[torch.Tensor]:
        """The tensors signed gradient descent moves."""
        return [t for t in (self.offsets, self.min_factor, self.max_factor) if t.requires_grad]

    def clamp_(self) -> None:
        with torch.no_grad():
            self.offsets.clamp_(-0.5, 0.5)
            self.min_factor.clamp_(SMALLEST_FACTOR, 1.0)
            self.max_factor.clamp_(SMALLEST_FACTOR, 1.0)

    def _qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and offset of the clipped range (the offset's rounding passes no gradient: inside the code range
        the offset cancels out of the dequantized value)."""
        return qparams_from_range(self.low * self.min_factor, self.high * self.max_factor, self.scheme)

    def _unrounded_codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """W / scale + V + offset (out, in), and the scale and offset in their stored shapes."""
        scale, offset = self._qparams()
        shape = self.offsets.shape
        full_scale, full_offset = expand_to_weight(scale, shape, self.scheme), expand_to_weight(offset, shape, self.scheme)
        return self.weight.float() / full_scale + self.offsets + full_offset, scale, offset

    def fake_quantized(self) -> torch.Tensor:
        """The quantized weight (out, in), float32, differentiable in the learned tensors."""
        values, scale, offset = self._unrounded_codes()
        shape = values.shape
        codes = round_through(values).clamp(self.scheme.qmin, self.scheme.qmax)
        return (codes - expand_to_weight(offset, shape, self.scheme)) * expand_to_weight(scale, shape, self.scheme)

    @torch.no_grad()
    def quantize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes int8 (out, in), scale, offset) of the learned rounding, in `quant.quantize_weight`'s stored shapes."""
        values, scale, offset = self._unrounded_codes()
        return torch.round(values).clamp_(self.scheme.qmin, self.scheme.qmax).to(torch.int8), scale, offset


@contextlib.contextmanager
def straight_through(quantizers: Sequence[nn.Module]) -> Iterator[None]:
    """While open, the quantizers' outputs pass gradients on as if they were their inputs, so a weight's rounding
    learns from the block's output through the activation quantizers that follow it."""
    with temporary_hooks() as hooks:
        for quantizer in quantizers:
            hooks.after(quantizer, lambda m, args, out: args[0] + (out - args[0]).detach())
        yield


def learn_rounding(block: Block, inputs: Sequence[BlockInput], targets: Sequence[torch.Tensor],
                   roundings: list[LearnedRounding], quantizers: Sequence[nn.Module], *, iterations: int, lr: float,
                   batches_per_step: int, seed: int, world: World) -> float:
    """Learn `roundings` (in place) so that the block, with those weights quantized and `quantizers` as they are set,
    computes `targets` (the float block's outputs) from `inputs`: at each step `batches_per_step` of this process's
    batches, picked with `seed`; the gradients' sum over the processes; each learned tensor moved by lr_t against the
    sign of its gradient, lr_t falling linearly from `lr` to 0; the learned tensors of the step with the lowest loss
    are kept. Returns that loss (the mean squared error summed over the processes' batches of that step)."""
    learned = [t for rounding in roundings for t in rounding.learned()]
    names = _parameter_names(block.traced)
    by_parameter: dict[int, list[LearnedRounding]] = {}
    for rounding in roundings:
        by_parameter.setdefault(id(rounding.parameter), []).append(rounding)
    generator = torch.Generator().manual_seed(seed)
    best_loss, best = float("inf"), [t.detach().clone() for t in learned]
    with straight_through(quantizers):
        for step in range(iterations):
            picked = torch.randperm(len(inputs), generator=generator)[:batches_per_step].tolist()
            gradients = [torch.zeros_like(t) for t in learned]
            loss = torch.zeros((), dtype=torch.float64, device=gradients[0].device)
            for index in picked:
                args, kwargs = inputs[index]
                weights = {names[key]: _substitute(group) for key, group in by_parameter.items()}
                output = block_output(functional_call(block.traced, weights, args, kwargs, strict=False))
                batch_loss = torch.nn.functional.mse_loss(output.float(), targets[index].float())
                # the learned tensors' gradients only: the block's own parameters keep no .grad
                for total, gradient in zip(gradients, torch.autograd.grad(batch_loss, learned, materialize_grads=True), strict=True):
                    total += gradient
                loss += batch_loss.detach()
            gradients, loss = _summed(gradients, loss, world)
            if float(loss) < best_loss:
                best_loss, best = float(loss), [t.detach().clone() for t in learned]
            rate = lr * (1 - step / iterations)
            with torch.no_grad():
                for tensor, gradient in zip(learned, gradients, strict=True):
                    tensor.sub_(rate * gradient.sign())
            for rounding in roundings:
                rounding.clamp_()
    with torch.no_grad():
        for tensor, kept in zip(learned, best, strict=True):
            tensor.copy_(kept)
    return best_loss


def _summed(gradients: list[torch.Tensor], loss: torch.Tensor, world: World) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The gradients and the loss summed over the processes, in one collective."""
    if world.size == 1:
        return gradients, loss
    summed = world.sum(torch.cat([g.reshape(-1) for g in gradients] + [loss.reshape(1).to(gradients[0])]))
    parts = summed[:-1].split([g.numel() for g in gradients])
    return [part.reshape(g.shape) for part, g in zip(parts, gradients, strict=True)], summed[-1]


def _substitute(group: list[LearnedRounding]) -> torch.Tensor:
    """The module tensor of `group`'s weights with their quantized values: a Linear's weight, or fused experts'
    weights (experts, out, in) stacked from each expert's."""
    parameter = group[0].parameter
    if group[0].expert is None:
        return group[0].fake_quantized().to(parameter.dtype)
    quantized = {rounding.expert: rounding.fake_quantized() for rounding in group}
    return torch.stack([quantized[e] if e in quantized else parameter[e].detach().float() for e in range(parameter.shape[0])]
                       ).to(parameter.dtype)


def _parameter_names(module: nn.Module) -> dict[int, str]:
    """A name under `module` of each of its parameters, by identity."""
    names: dict[int, str] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), name)
    return names
