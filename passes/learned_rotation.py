"""Learning rotate's residual rotation R1 and its per-layer head rotations R2 (SpinQuant-style) before they are
folded: the helper of `rotate: {learn: ...}`.

R1 and each attention layer's R2 start from the randomized Hadamards and descend one end-to-end loss: the KL
divergence, on calibration sequences, of the next-token distribution of the model as it will be quantized (in the
basis x·R1, each layer's values in v·R2, the online Hadamard before the down projections that rotate adds, weights
and activations fake-quantized by the plan's schemes with straight-through rounding) from the float model's. Each
step is a Cayley transform on the orthogonal group, so every rotation stays one and folding them leaves the float
function unchanged. The model as it will be is rotate's folding itself: the same layers (`stream_layers`) and the
same functions (numerics.folding).

The model runs block by block, as the compile does: a forward without gradients keeps each block's call (its
hidden states in), then the backward goes from the head to the embeddings one block at a time, recomputing that
block with gradients for the rotations only. So memory holds one block's weights and activations, the calls of every block on
the learning sequences and the float model's log-probabilities on them, and a streamed model is read twice a step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import fx, nn
from torch.func import functional_call

from slimc.errors import PassError
from slimc.ir import Block, Program
from slimc.ir.calls import block_output, hidden_of, rebind_hidden, rotate_hidden, row_count, to_device
from slimc.ir.capture import BlockInput
from slimc.ir.hooks import temporary_hooks
from slimc.ir.tracer import trace_block
from slimc.numerics import folding
from slimc.numerics.cayley import cayley_step
from slimc.numerics.hadamard import KroneckerRotation, OnlineHadamard
from slimc.numerics.quant import ste_dynamic_fake_quantize, ste_fake_quantize_weight
from slimc.pass_base import Context
from slimc.patterns import Consumer, find_ov_pairs, find_residual_stream, find_up_down_pairs
from slimc.patterns.fold import consumer_weight_name, norm_has_affine_weight
from slimc.patterns.graph import propagate_shapes
from slimc.schemes import QuantScheme


class RotationLearning(BaseModel):
    """SpinQuant-style learning of rotate's R1 and, with `heads` (where rotate has R2), each attention layer's R2:
    `iterations` Cayley steps on the first `samples` calibration sequences (rounded up to whole calibration
    batches), each turning every rotation by about `lr` radians down the gradient, decaying linearly to 0."""

    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(20, ge=1)
    lr: float = Field(0.2, gt=0.0)
    samples: int = Field(8, ge=1)
    heads: bool = True


@dataclass
class LearnedRotations:
    """What learning gives rotate: R1, each learned R2 by its v projection's qualified name, and the loss of the
    Hadamard start and of the rotations kept (the lowest met)."""

    residual: torch.Tensor
    heads: dict[str, torch.Tensor]
    start_loss: float
    loss: float


@dataclass
class StreamLayers:
    """What of one block the rotations reach (rotate folds into it, the learner models it): parameter names (in the
    block) of the stream's readers and writers, the norms before the readers, and the rotations added inside."""

    block: Block
    norm_readers: dict[str, list[str]] = field(default_factory=dict)  # norm target -> the weights it feeds
    readers: list[str] = field(default_factory=list)  # every weight reading the stream (norm_readers' too)
    writers: list[tuple[str, str | None]] = field(default_factory=list)  # (weight, bias) writing the stream
    heads: list[tuple[str, str, int]] = field(default_factory=list)  # (v_proj, o_proj, head_dim)
    online: dict[str, OnlineHadamard] = field(default_factory=dict)  # down projection -> its online Hadamard

    def parameter(self, name: str | None) -> torch.Tensor | None:
        return None if name is None else self.block.module.get_parameter(name)


def _writer_tensors(block: Block, consumer: Consumer) -> tuple[str, str | None]:
    """The names of a writer's weight and bias (None if it has none)."""
    weight, bias = ("down_proj", "down_proj_bias") if consumer.kind == "experts" else ("weight", "bias")
    has_bias = getattr(block.leaf(consumer.target), bias, None) is not None
    return f"{consumer.target}.{weight}", f"{consumer.target}.{bias}" if has_bias else None


def stream_layers(block: Block, gm: fx.GraphModule, heads: bool, online_down: bool) -> StreamLayers:
    """What rotate folds into in `block`, whose graph (with shapes propagated) is `gm`: R2 on `heads`, the online
    Hadamard before the down projections if `online_down`."""
    stream = find_residual_stream(gm)
    if stream.problem:
        raise PassError(f"rotate: block {block.name}: {stream.problem}, so the residual stream cannot be rotated")
    layers = StreamLayers(block)
    for group in stream.norms:
        layers.norm_readers[group.norm] = [consumer_weight_name(c) for c in group.consumers]
    layers.readers = [w for weights in layers.norm_readers.values() for w in weights] + \
        [consumer_weight_name(c) for c in stream.direct_readers]
    layers.writers = [_writer_tensors(block, c) for c in stream.writers]
    if heads:
        layers.heads = [(pair.v, pair.o, pair.head_dim) for pair in find_ov_pairs(gm)]
    if online_down:
        for pair in find_up_down_pairs(gm):
            layers.online[pair.down] = OnlineHadamard(block.leaf(pair.down).in_features)
    return layers


def _kl(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p_reference || p_logits), both given as (..., vocab); reference as log-probabilities."""
    log_q = F.log_softmax(logits.float(), dim=-1)
    return (reference.exp() * (reference - log_q)).sum(-1).mean()


class RotationLearner:
    """Learns R1 (and R2 per layer) for `program` on `ctx`'s first calibration batches; `head_rotation(head_dim)` is
    rotate's Hadamard R2 (the start of the learned ones)."""

    def __init__(self, program: Program, ctx: Context, options: RotationLearning, heads: bool, online_down: bool,
                 head_rotation: Callable[[int], KroneckerRotation]) -> None:
        if ctx.stage_inputs is None or not len(ctx.inputs):
            raise PassError("rotate: learn needs the calibration inputs of the first block, which a resumed compile "
                            "does not have; compile again without --resume, or drop `learn`")
        self.program, self.ctx, self.options = program, ctx, options
        self.device = ctx.device
        self.heads, self.online_down, self.head_rotation = heads, online_down, head_rotation
        count = math.ceil(options.samples / row_count(ctx.inputs[0]))  # calibration batches are of equal size
        self.positions = [p for p, index in enumerate(ctx.batch_ids) if index < count]
        self.batches = ctx.world.sum(torch.tensor(float(len(self.positions)))).item()
        self.blocks = program.stages[0].blocks
        self.layers: list[StreamLayers] = []
        self.reference: list[torch.Tensor] = []  # the float model's log-probabilities, per batch

    def learn(self, start: torch.Tensor) -> LearnedRotations:
        """The rotations of the lowest loss met, from the orthogonal R1 `start` and the Hadamard R2."""
        with self._head_on_device():
            self._float_reference()
            rotation = start.to(torch.float64)  # on the CPU, in float64: devices without float64 too
            heads = {layers.block.qualified(v): self.head_rotation(head_dim).matrix()
                     for layers in self.layers for v, _, head_dim in layers.heads} if self.options.heads else {}
            losses, kept = [], []
            for step in range(self.options.iterations):
                loss, gradient, head_gradients = self._loss(rotation, heads, gradient=True)
                losses.append(loss)
                kept.append((rotation, heads))
                # one step for R1 and every R2 together, each moving by its share of the gradient
                rotation, *stepped = cayley_step([rotation, *heads.values()], [gradient, *head_gradients.values()],
                                                 self.options.lr * (1 - step / self.options.iterations))
                heads = dict(zip(heads, stepped, strict=True))
            losses.append(self._loss(rotation, heads, gradient=False)[0])
            kept.append((rotation, heads))
        best = min(range(len(losses)), key=losses.__getitem__)  # the first of equals: the start if no step helped
        rotation, heads = kept[best]
        return LearnedRotations(rotation.cpu(), {v: r2.cpu() for v, r2 in heads.items()}, losses[0], losses[best])

    # --- the model, block by block -------------------------------------------------------------------------

    def _first_calls(self) -> list[BlockInput]:
        return [to_device(self.ctx.inputs[p], self.device) for p in self.positions]

    def _run(self, block: Block, call: BlockInput, overrides: dict[str, torch.Tensor] | None = None) -> Any:
        if overrides is None:
            return block.module(*call[0], **call[1])
        return functional_call(block.module, overrides, call[0], call[1], strict=False)

    def _following(self, index: int, batch: int, outputs: Any) -> BlockInput | torch.Tensor:
        """What block `index`'s outputs on `batch` pass on: the next block's call, or the hidden states the head reads."""
        if index + 1 < len(self.blocks):  # the leaves taken from the first block's call may be elsewhere
            return to_device(self.ctx.stage_inputs.next_inputs(index + 1, self.positions[batch], outputs), self.device)
        return block_output(outputs)

    @contextlib.contextmanager
    def _on_device(self, block: Block) -> Iterator[None]:
        """The block's weights while inside: read if streamed, on the processing device (both undone after)."""
        moved = self.device.type != "cpu"
        with self.program.reading(block):
            if moved:
                block.module.to(self.device)
            try:
                yield
            finally:
                if moved:
                    block.module.to("cpu")

    @contextlib.contextmanager
    def _head_on_device(self) -> Iterator[None]:
        head, norm = self._head()
        device = head.weight.device
        head.to(self.device), norm.to(self.device)
        try:
            yield
        finally:
            head.to(device), norm.to(device)

    @torch.no_grad()
    def _float_reference(self) -> None:
        """The float model's log-probabilities on the learning batches, and each block's layers from its graph."""
        calls = self._first_calls()
        for index, block in enumerate(self.blocks):
            with self._on_device(block):
                traced = trace_block(block.module, *calls[0], name=block.name)  # for the patterns: the pipeline traces its own
                propagate_shapes(traced.graph_module, traced.flatten_inputs(*calls[0]))
                self.layers.append(stream_layers(block, traced.graph_module, self.heads, self.online_down))
                calls = [self._following(index, b, self._run(block, call)) for b, call in enumerate(calls)]
        head, norm = self._head()
        self.reference = [F.log_softmax(head(norm(hidden)).float(), dim=-1) for hidden in calls]

    def _head(self) -> tuple[nn.Module, nn.Module]:
        model = self.program.model
        norm = model.get_submodule(self.program.head_norm) if self.program.head_norm is not None else nn.Identity()
        return model.get_submodule(self.program.head), norm

    def _loss(self, rotation: torch.Tensor, heads: dict[str, torch.Tensor], gradient: bool
              ) -> tuple[float, torch.Tensor | None, dict[str, torch.Tensor] | None]:
        """The quantized model's loss with R1 = `rotation` and the R2 by qualified v projection = `heads` (the Hadamard
        where absent), summed over processes, and, if `gradient`, its gradients in R1 and in each R2."""
        leaf = rotation.clone().requires_grad_(gradient)
        head_leaves = {v: r2.clone().requires_grad_(gradient) for v, r2 in heads.items()}

        def working() -> torch.Tensor:  # R1 as the model multiplies by it, a new node of each graph
            return leaf.to(self.device, torch.float32)

        first = self._first_calls()
        with torch.no_grad():
            r = working()
            calls = [[rebind_hidden(call, rotate_hidden(hidden_of(call), r)) for call in first]]
            for index, (block, layers) in enumerate(zip(self.blocks, self.layers, strict=True)):
                with self._on_device(block), self._quantizers(layers):
                    overrides = self._rotated(layers, r, head_leaves)
                    calls.append([self._following(index, b, self._run(block, call, overrides)) for b, call in enumerate(calls[-1])])
        total, grads = 0.0, []
        for hidden, reference in zip(calls.pop(), self.reference, strict=True):
            hidden = hidden.detach().requires_grad_(gradient)
            with torch.set_grad_enabled(gradient):
                loss = _kl(self._quantized_head(hidden, working()), reference) / self.batches
            if gradient:
                loss.backward()
                grads.append(hidden.grad)
            total += loss.item()
        total = self.ctx.world.sum(torch.tensor(total)).item()
        if not gradient:
            return total, None, None
        for index in reversed(range(len(self.blocks))):
            block, layers, block_calls = self.blocks[index], self.layers[index], calls.pop()
            with self._on_device(block), self._quantizers(layers):
                overrides = self._rotated(layers, working(), head_leaves)
                for b, call in enumerate(block_calls):
                    hidden = hidden_of(call).detach().requires_grad_()
                    following = self._following(index, b, self._run(block, rebind_hidden(call, hidden), overrides))
                    passed = following if isinstance(following, torch.Tensor) else hidden_of(following)
                    torch.autograd.backward(passed, grads[b], retain_graph=b + 1 < len(block_calls))
                    grads[b] = hidden.grad
        for call, grad in zip(first, grads, strict=True):
            torch.autograd.backward(rotate_hidden(hidden_of(call), working()), grad)
        return total, self._summed_gradient(leaf), {v: self._summed_gradient(r2) for v, r2 in head_leaves.items()}

    def _summed_gradient(self, leaf: torch.Tensor) -> torch.Tensor:
        """A rotation's gradient over all processes (a process without learning batches has none of its own)."""
        return self.ctx.world.sum(leaf.grad if leaf.grad is not None else torch.zeros_like(leaf))

    # --- the rotated, fake-quantized weights --------------------------------------------------------------

    def _scheme(self, block: Block, target: str) -> QuantScheme | None:
        assigned = self.ctx.plan.scheme(block.qualified(target))
        return None if assigned is None else assigned.scheme

    def _rotated(self, layers: StreamLayers, r: torch.Tensor, heads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The block's tensors as rotate will leave them, R1 = r and R2 = `heads` by qualified v projection (the
        Hadamard where absent), fake-quantized where the plan quantizes them."""
        block = layers.block
        base: dict[str, torch.Tensor] = {}
        overrides: dict[str, torch.Tensor] = {}

        def weight(name: str) -> torch.Tensor:
            if name not in base:
                base[name] = folding.precise(layers.parameter(name))
            return base[name]

        for norm_target, weights in layers.norm_readers.items():
            norm = block.leaf(norm_target)
            if norm_has_affine_weight(norm):
                overrides[f"{norm_target}.weight"] = torch.ones_like(norm.weight)
                for name in weights:
                    base[name] = folding.scaled_inputs(weight(name), norm.weight.detach())
        for v_target, o_target, head_dim in layers.heads:
            r2, bias = heads.get(block.qualified(v_target), self.head_rotation(head_dim)), block.leaf(v_target).bias
            base[f"{v_target}.weight"], v_bias = folding.rotated_outputs(weight(f"{v_target}.weight"), folding.precise(bias), r2)
            if v_bias is not None:
                overrides[f"{v_target}.bias"] = v_bias
            base[f"{o_target}.weight"] = folding.rotated_inputs(weight(f"{o_target}.weight"), r2)
        for down, transform in layers.online.items():
            base[f"{down}.weight"] = folding.rotated_inputs(weight(f"{down}.weight"), transform.rotation())
        for name in layers.readers:
            overrides[name] = folding.rotated_inputs(weight(name).float(), r)
        for name, bias in layers.writers:
            overrides[name], folded_bias = folding.rotated_outputs(
                weight(name).float(), None if bias is None else layers.parameter(bias).float(), r)
            if bias is not None:
                overrides[bias] = folded_bias
        for name, tensor in base.items():
            overrides.setdefault(name, tensor.float())
        for target, module in block.module.named_modules():
            scheme = self._scheme(block, target)
            name = f"{target}.weight"
            if isinstance(module, nn.Linear) and scheme is not None:
                overrides[name] = ste_fake_quantize_weight(overrides.get(name, module.weight), scheme.weight)
        return {name: tensor.to(layers.parameter(name).dtype) for name, tensor in overrides.items()}

    @contextlib.contextmanager
    def _quantizers(self, layers: StreamLayers) -> Iterator[None]:
        """Hooks quantizing the inputs of the block's quantized Linears, behind the online Hadamard where it has one."""
        block = layers.block
        with temporary_hooks() as hooks:
            for target, module in block.module.named_modules():
                scheme = self._scheme(block, target) if isinstance(module, nn.Linear) else None
                transform = layers.online.get(target)
                act = None if scheme is None else scheme.act
                if transform is None and act is None:
                    continue

                def before(_module, args, transform=transform, act=act):
                    x = args[0] if transform is None else transform.to(args[0].device)(args[0])
                    return (x if act is None else ste_dynamic_fake_quantize(x, act), *args[1:])

                hooks.before(module, before)
            yield

    def _quantized_head(self, hidden: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The logits of the head as rotate leaves it (the final norm's scale in its weight, which reads x·R1)."""
        head, norm = self._head()
        weight = head.weight.float()
        if norm_has_affine_weight(norm):
            weight = folding.scaled_inputs(weight, norm.weight)
            normed = functional_call(norm, {"weight": torch.ones_like(norm.weight)}, (hidden,))
        else:
            normed = norm(hidden)
        weight = folding.rotated_inputs(weight, r)
        scheme = self.ctx.plan.scheme(self.program.head)
        if scheme is not None:
            weight = ste_fake_quantize_weight(weight, scheme.scheme.weight)
            if scheme.scheme.act is not None:
                normed = ste_dynamic_fake_quantize(normed, scheme.scheme.act)
        return F.linear(normed, weight.to(head.weight.dtype), head.bias)

