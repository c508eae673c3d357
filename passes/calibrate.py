"""calibrate: fix static activation scales from the calibration data, then quantize the weights."""

from __future__ import annotations

import contextlib
import inspect
from collections import Counter
from collections.abc import Iterator
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from slimc.errors import PassError
from slimc.ir import Block
from slimc.ir.hooks import temporary_hooks
from slimc.ir.partial import ObservedPrefix
from slimc.numerics.autoround import LearnedRounding, learn_rounding
from slimc.numerics.fidelity import relative_error
from slimc.numerics.gptq import (
    HessianAccumulator,
    HessianFactor,
    QuantizedInputAccumulator,
    factor_hessian,
    gptq_quantize,
    reduce_hessians,
)
from slimc.numerics.modules import (
    EXPERT_WEIGHTS,
    FakeQuantExperts,
    FakeQuantize,
    KVCacheQuantize,
    routed_tokens,
)
from slimc.numerics.observers import reduce_observers
from slimc.numerics.quant import dequantize_weight, quantize_weight
from slimc.pass_base import Context, Pass, register_pass
from slimc.patterns import dependency_levels, find_shared_inputs, linear_roles
from slimc.report import LayerRecord
from slimc.schemes import TensorScheme


class GPTQOptions(BaseModel):
    """GPTQ settings: `damp` is the fraction of the mean Hessian diagonal added to it; `act_order`
    quantizes the columns with the largest inputs first; `block_size` columns are updated lazily. `sequential`
    quantizes a block's layers in dependency order (q/k/v, o, gate/up, down), each from the Hessian of its inputs
    with the layers before it already quantized (weights and inputs, as they will run), as the GPTQ paper's
    true-sequential option; at the cost of one more run of the block (up to those layers) per level.
    `quantized_inputs` fits each Linear with an input quantizer to its float output on its inputs as they will run,
    quantized: its weight first corrected by least squares for the inputs' quantization error, then GPTQ on the
    Hessian of the quantized inputs (`QuantizedInputAccumulator`; fused MoE experts as without it), at one more
    matrix of the Hessian's size per input, and for static inputs one more run of the block (their scales are fixed
    by the calibration run first)."""

    model_config = ConfigDict(extra="forbid")

    damp: float = Field(0.01, gt=0.0, le=1.0)
    act_order: bool = True
    block_size: int = Field(128, ge=1)
    sequential: bool = False
    quantized_inputs: bool = False


class AutoRoundOptions(BaseModel):
    """AutoRound settings: `iterations` steps of signed gradient descent per block, each on `batches_per_step`
    calibration batches (of `calibration.batch_size` samples) picked with `seed`, at a rate falling linearly from
    `lr` (1 / iterations when not given, as in the paper) to 0; `min_max_tuning` also learns how far each weight
    range is clipped, not only how each weight rounds."""

    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(200, ge=1)
    lr: float | None = Field(None, gt=0.0, le=0.5)
    batches_per_step: int = Field(2, ge=1)
    min_max_tuning: bool = True
    seed: int = Field(0, ge=0)

    @property
    def rate(self) -> float:
        return self.lr if self.lr is not None else 1.0 / self.iterations


@register_pass("calibrate")
class Calibrate(Pass):
    """Run the block on all its calibration inputs with the activation quantizers observing, fix
    their static scales, then quantize each weight at the scheme's granularity with its observer
    (minmax, percentile or mse clipping search) by `weight_algorithm`: `rtn` (round to nearest),
    `gptq` (error feedback through the Hessian of the layer's float inputs in this block, which
    already carry the quantization error of the blocks before it; per expert for fused MoE
    experts, from the tokens routed to each) or `autoround` (each weight's rounding and range
    clipping learned by signed gradient descent on the block's output error, for all the block's
    weights together, each expert's on its own). Each quantized layer's relative output error is
    measured on the first `error_batches` batches and reported.

    `route_all_experts` also sends every calibration token through every MoE expert (outputs
    discarded), so rarely routed experts get activation statistics of their own.
    """

    requires = ("fake_quant",)

    route_all_experts: bool = False
    error_batches: int = Field(1, ge=1)
    weight_algorithm: Literal["rtn", "gptq", "autoround"] = "rtn"
    gptq: GPTQOptions = GPTQOptions()
    autoround: AutoRoundOptions = AutoRoundOptions()

    def run_block(self, block: Block, ctx: Context) -> None:
        layers = {
            target: module
            for target, module in block.module.named_modules()
            if block.qualified(target) in ctx.program.quant_specs and isinstance(module, nn.Linear | FakeQuantExperts)
        }
        # The graph's quantizers: those on Linear inputs and those on the keys and values of the KV cache.
        quantizers = [m for m in block.graph_module.modules() if isinstance(m, FakeQuantize)]
        quantizers += [m for e in layers.values() if isinstance(e, FakeQuantExperts) for m in e.modules() if isinstance(m, FakeQuantize)]
        if not layers and not quantizers:
            return
        # sequential GPTQ quantizes level by level, the later levels from Hessians taken once the levels before are quantized
        levels = (dependency_levels(block.graph_module, list(layers)) if self.weight_algorithm == "gptq" and self.gptq.sequential
                  else [list(layers)])
        samples, hessians = self._observe(block, ctx, layers, quantizers, levels[0])
        before = {target: self._layer_outputs(module, samples[target], block, target, quantize_inputs=False)
                  for target, module in layers.items()}
        learned = self._learn_rounding(block, ctx, layers, quantizers) if self.weight_algorithm == "autoround" else {}
        if len(levels) > 1:
            self._quantize_in_order(block, ctx, layers, quantizers, hessians, levels)
        else:
            self._quantize_weights(block, ctx, layers, hessians, learned)
        # Roles and depth are recorded now, while the block's graph is here: a resumed or streamed compile has
        # released it by the time the report is plotted.
        roles = linear_roles(block.graph_module)
        position = ctx.program.position(block)
        for target, module in layers.items():
            after = self._layer_outputs(module, samples[target], block, target, quantize_inputs=True)
            spec = ctx.program.quant_specs[block.qualified(target)]
            spec.output_error = ctx.world.worst([relative_error(a, b) for a, b in zip(after, before[target])])
            role = "experts" if isinstance(module, FakeQuantExperts) else roles.get(target, "linear")
            ctx.report.layers.append(LayerRecord(block.qualified(target), spec.scheme.label, spec.output_error, role, position))

    def _observe(self, block: Block, ctx: Context, layers: dict, quantizers: list[FakeQuantize],
                 hessian_targets: list[str]) -> tuple[dict[str, list], dict]:
        """Keep the layers' float inputs of the first batches, then observe static quantizers (and
        accumulate the GPTQ Hessians of `hessian_targets`) on every batch once."""
        samples: dict[str, list] = {target: [] for target in layers}
        static = [q for q in quantizers if not q.scheme.dynamic]
        chosen = {target: layers[target] for target in hessian_targets}
        # GPTQ fitted to static quantized inputs needs their scales first: its Hessians then take a run of their own
        after_freezing = (self.weight_algorithm == "gptq" and self.gptq.quantized_inputs
                          and any(isinstance(q, FakeQuantize) and not q.scheme.dynamic
                                  for q in map(block.input_quantizer, chosen)))
        hessians: dict = {}
        with _quantizer_modes(quantizers, "off"):
            with temporary_hooks() as hooks:
                for target, module in layers.items():
                    hooks.before(module, lambda m, args, t=target: samples[t].append(tuple(a.detach() for a in args)))
                ctx.run(block, ctx.leading(self.error_batches))
            if static or self.weight_algorithm == "gptq":
                with _quantizer_modes(static, "observe"), self._hessians(block, {} if after_freezing else chosen) as hessians:
                    self._run_all(block, ctx, layers)
        reduce_observers([q.observer for q in quantizers if q.observer is not None], ctx.world)
        self._freeze(block, ctx, quantizers, layers)
        if after_freezing:
            with _quantizer_modes(quantizers, "off"), self._hessians(block, chosen) as hessians:
                self._run_all(block, ctx, layers)
        reduce_hessians({t: h for t, h in hessians.items() if not isinstance(h, RoutedCalls)}, ctx.world)
        return samples, hessians

    @contextlib.contextmanager
    def _hessians(self, block: Block, layers: dict) -> Iterator[dict]:
        """GPTQ statistics while open: one accumulator per tensor the Linears read (shared by the Linears reading
        the same graph node, such as q/k/v: their inputs are equal, since the quantizers in front of them are off
        while this runs; the one accumulator is then under each of their names: whatever combines accumulators
        must take each once); per experts module one per (weight, expert)."""
        hessians: dict = {}
        if self.weight_algorithm != "gptq":
            yield hessians
            return
        linears = [target for target, module in layers.items() if not isinstance(module, FakeQuantExperts)]
        with temporary_hooks() as hooks:
            for target, module in layers.items():
                if isinstance(module, FakeQuantExperts):
                    routed = hessians[target] = RoutedCalls(module)
                    hooks.before(module, routed.record, with_kwargs=True)
            for shared in find_shared_inputs(block.graph_module, linears):
                for quantizer, group in self._by_input_quantization(block, shared):
                    accumulator = HessianAccumulator() if quantizer is None else QuantizedInputAccumulator(quantizer.quantize)
                    hessians.update(dict.fromkeys(group, accumulator))
                    hooks.before(layers[group[0]], lambda m, args, a=accumulator: a.add(args[0]))
            yield hessians

    def _by_input_quantization(self, block: Block, readers: list[str]) -> list[tuple[FakeQuantize | None, list[str]]]:
        """Linears reading one input, grouped with the quantizer whose quantized inputs `quantized_inputs` fits them to
        (its scales fixed: dynamic, or static and frozen), or None (the float inputs). Quantizers of one scheme, and
        for static inputs equal scales, quantize alike and share a group."""
        groups: dict[tuple | None, tuple[FakeQuantize | None, list[str]]] = {}
        for target in readers:
            quantizer = block.input_quantizer(target) if self.gptq.quantized_inputs else None
            if not isinstance(quantizer, FakeQuantize) or quantizer.observer is not None:
                quantizer = None
            key = (None if quantizer is None else (quantizer.scheme,) if quantizer.scheme.dynamic else
                   (quantizer.scheme, tuple(quantizer.scale.flatten().tolist()), tuple(quantizer.offset.flatten().tolist())))
            groups.setdefault(key, (quantizer, []))[1].append(target)
        return list(groups.values())

    def _quantize_in_order(self, block: Block, ctx: Context, layers: dict, quantizers: list[FakeQuantize],
                           hessians: dict, levels: list[list[str]]) -> None:
        """Sequential GPTQ: the first level's layers from the Hessians `_observe` took, then each later level's from
        a run of the block as far as that level, with the levels before it quantized."""
        quantized: list[str] = []
        for depth, level in enumerate(levels):
            chosen = {target: layers[target] for target in level}
            if depth:
                hessians = self._hessians_after(block, ctx, chosen, quantizers, {t: layers[t] for t in quantized})
            self._quantize_weights(block, ctx, chosen, hessians, {})
            quantized += level

    @torch.no_grad()
    def _hessians_after(self, block: Block, ctx: Context, chosen: dict, quantizers: list[FakeQuantize],
                        quantized: dict) -> dict:
        """The Hessians of `chosen`'s inputs on every batch, with the `quantized` layers' input quantizers (and
        their keys' and values' cache quantizers) quantizing and every other quantizer off."""
        running = [q for target, module in quantized.items()
                   for q in (block.input_quantizer(target), *module.modules()) if isinstance(q, FakeQuantize)]
        running += [q for q in quantizers if isinstance(q, KVCacheQuantize) and q.projection in quantized]
        prefix = ObservedPrefix.of(block.graph_module, dict.fromkeys(chosen, "output"))
        with _quantizer_modes(quantizers, "off"), _quantizer_modes(running, "quantize"), \
                self._hessians(block, chosen) as hessians:
            for args, kwargs in ctx.inputs:  # in order: a store may hold some on disk
                if prefix is None:
                    block.traced(*args, **kwargs)
                else:
                    prefix.run(block.traced.flatten_inputs(args, kwargs), lambda target, value: None)
        reduce_hessians({t: h for t, h in hessians.items() if not isinstance(h, RoutedCalls)}, ctx.world)
        return hessians

    def _run_all(self, block: Block, ctx: Context, layers: dict) -> None:
        """All calibration batches through the block, so static observers see the whole set."""
        experts = [m for m in layers.values() if isinstance(m, FakeQuantExperts)]
        for module in experts:
            module.route_all = self.route_all_experts
        try:
            ctx.run(block, keep=0)  # what the hooks record is the result
        finally:
            for module in experts:
                module.route_all = False

    @staticmethod
    def _freeze(block: Block, ctx: Context, quantizers: list[FakeQuantize], layers: dict) -> None:
        for experts in (m for m in layers.values() if isinstance(m, FakeQuantExperts)):
            for group in (experts.gate_up_input, experts.down_input):
                if group is not None and _borrow_unobserved(group):
                    ctx.report.note(f"calibrate: some experts of {block.name} saw no calibration tokens and use the "
                                    "range of all experts; set route_all_experts: true to calibrate each")
        for q in quantizers:
            if q.observer is not None and not q.observer.observed:
                raise PassError(f"calibrate: a quantizer in block {block.name} saw no data; the calibration inputs never reach it")
            q.freeze()

    def _learn_rounding(self, block: Block, ctx: Context, layers: dict, quantizers: list[FakeQuantize]) -> dict:
        """AutoRound: the rounding of every weight of the layers, by (target, weight name, expert or None), learned
        together to bring the block's output to the float block's on its calibration inputs, with the activation
        quantizers (frozen by now) quantizing. Every process learns the same, from the gradients of all."""
        options, roundings = self.autoround, {}
        for target, module in layers.items():
            scheme = ctx.program.quant_specs[block.qualified(target)].scheme.weight
            for name, expert, _, _ in _weights(module, None):
                try:
                    roundings[target, name, expert] = LearnedRounding(getattr(module, name), expert, scheme, options.min_max_tuning)
                except ValueError as error:
                    raise _layer_error(block, target, error) from None
        if not roundings:  # a block whose only quantizers are its KV cache's
            return roundings
        with _quantizer_modes(quantizers, "off"):
            targets = ctx.run(block)
        learn_rounding(block, ctx.inputs, targets, list(roundings.values()), quantizers, iterations=options.iterations,
                       lr=options.rate, batches_per_step=options.batches_per_step, seed=options.seed, world=ctx.world)
        return roundings

    @torch.no_grad()
    def _quantize_weights(self, block: Block, ctx: Context, layers: dict, hessians: dict, learned: dict) -> None:
        """Quantize every weight of the layers in place (each expert of fused experts on its own) with its `learned`
        rounding, GPTQ or to nearest, and record their scales and offsets. In several processes each quantizes its
        share of the weights (the i-th on process i % N) and all take the others' results."""
        world, done, keys = ctx.world, {}, []
        for group in _job_groups(block, ctx, layers, hessians):
            keys += [job[:3] for job in group]  # not the jobs: a chunk's Hessians go with its group
            mine = [job for index, job in enumerate(group) if index % world.size == world.rank]
            # A Hessian shared by several Linears (q, k, v) is factored once on each process that quantizes one of
            # them, and its factor dropped after the last.
            readers, factors = Counter(id(job[-1]) for job in mine), {}
            for target, name, expert, weight, scheme, hessian in mine:
                try:
                    rounding = learned.get((target, name, expert))
                    done[target, name, expert] = (rounding.quantize() if rounding is not None
                                                  else self._quantize_weight(weight, scheme, hessian, factors))
                except ValueError as error:
                    raise _layer_error(block, target, error) from None
                readers[id(hessian)] -= 1
                if not readers[id(hessian)]:
                    factors.pop(id(hessian), None)
        if world.size > 1:
            done = {key: result for process in world.gather(done) for key, result in process.items()}
        for target, module in layers.items():
            spec = ctx.program.quant_specs[block.qualified(target)]
            scheme = spec.scheme.weight
            results = {(name, expert): done[target, name, expert] for t, name, expert in keys if t == target}
            for (name, expert), (codes, _, _) in results.items():
                weight = getattr(module, name) if expert is None else getattr(module, name)[expert]
                weight.copy_(dequantize_weight(codes, *results[name, expert][1:], scheme).to(weight.dtype))
            for name in dict.fromkeys(name for name, _ in results):
                qparams = [results[name, expert][1:] for (n, expert) in results if n == name]
                spec.weight_qparams[name] = (qparams[0] if not isinstance(module, FakeQuantExperts) else
                                             (torch.stack([q[0] for q in qparams]), torch.stack([q[1] for q in qparams])))
            routed = hessians.get(target)
            if isinstance(routed, RoutedCalls) and routed.unrouted:
                ctx.report.note(f"calibrate: {block.qualified(target)}: {routed.unrouted} experts got no routed "
                                "calibration tokens; their weights were rounded to nearest instead of GPTQ")

    def _quantize_weight(self, weight: torch.Tensor, scheme: TensorScheme, hessian: HessianAccumulator | None,
                         factors: dict[int, tuple[HessianFactor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Round to nearest, or GPTQ when a Hessian was collected for this weight; its factor (and input correction,
        with `quantized_inputs`) is taken from `factors` (by the accumulator's id), or computed and left there for
        the other Linears reading it."""
        if hessian is None or hessian.count == 0:
            return quantize_weight(weight, scheme)
        options = self.gptq
        if id(hessian) not in factors:
            correction = (hessian.input_correction(options.damp, release=True)
                          if isinstance(hessian, QuantizedInputAccumulator) else None)
            # the float64 sum is released: only the factor is read from here on
            factors[id(hessian)] = (factor_hessian(hessian.hessian(release=True), damp=options.damp,
                                                   act_order=options.act_order), correction)
        factor, correction = factors[id(hessian)]
        if correction is not None:
            weight = weight.float() @ correction
        return gptq_quantize(weight, factor, scheme, block_size=options.block_size)

    @staticmethod
    @torch.no_grad()
    def _layer_outputs(module: nn.Module, samples: list, block: Block, target: str, quantize_inputs: bool) -> list[torch.Tensor]:
        """The layer's outputs on its recorded inputs, with or without its input quantization."""
        quantizers = [m for m in module.modules() if isinstance(m, FakeQuantize)]
        node_quantizer = block.input_quantizer(target)
        with _quantizer_modes(quantizers, "quantize" if quantize_inputs else "off"):
            outputs = []
            for args in samples:
                if node_quantizer is not None and quantize_inputs:
                    args = (node_quantizer(args[0]), *args[1:])
                outputs.append(module(*args))
            return outputs


def _layer_error(block: Block, target: str, error: ValueError) -> PassError:
    """A weight of the layer `target` cannot be quantized as its scheme says (a group size that does not divide)."""
    return PassError(f"calibrate: {block.qualified(target)}: {error}; choose a group_size that divides it, or leave "
                     "this layer out with an exclude glob")


# The expert Hessians held at once, in bytes: an expert's are (H² + I²) float64, 38 MB at Qwen3-30B-A3B's widths and
# 228 MB at GLM-4.7's, so a whole layer's would be 4.9 GB and 36 GB.
EXPERT_HESSIAN_BYTES = 1 << 30


class RoutedCalls:
    """A fused experts module's calls in the calibration run (its tokens and their routing), from which its experts'
    GPTQ Hessians are accumulated afterwards a few experts at a time (`EXPERT_HESSIAN_BYTES`), each expert's from its
    routed tokens call by call as the run would have: the same float64 sums, a fraction of the memory."""

    def __init__(self, module: FakeQuantExperts) -> None:
        self.module = module
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.routed: set[int] = set()  # the experts some process routed tokens to, over the chunks accumulated so far

    def record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        self.calls.append((bound["hidden_states"].detach(), bound["top_k_index"].detach()))

    def chunks(self, processes: int) -> list[range]:
        """Runs of experts whose Hessians fit the budget together (at least one expert per process)."""
        hidden, inner = self.module.down_proj.shape[-2:]
        size = max(processes, EXPERT_HESSIAN_BYTES // ((hidden * hidden + inner * inner) * 8))
        return [range(first, min(first + size, self.module.num_experts)) for first in range(0, self.module.num_experts, size)]

    @torch.no_grad()
    def hessians(self, experts: range, world) -> dict[tuple[str, int], HessianAccumulator]:
        """The Hessians of `experts`' weights by (weight name, expert), summed over the processes."""
        found: dict[tuple[str, int], HessianAccumulator] = {}
        module = self.module
        module.capture = lambda expert, name, x: found.setdefault((name, expert), HessianAccumulator()).add(x)
        try:
            with _quantizer_modes([m for m in module.modules() if isinstance(m, FakeQuantize)], "off"):
                for hidden_states, top_k_index in self.calls:  # the tokens in the order the run gave them
                    for expert, tokens, _ in routed_tokens(top_k_index, module.num_experts):
                        if expert in experts:
                            module.expert_forward(expert, hidden_states[tokens])
        finally:
            module.capture = None
        reduce_hessians({"experts": found}, world)
        self.routed.update(expert for _, expert in found)
        return found

    @property
    def unrouted(self) -> int:
        return self.module.num_experts - len(self.routed)


def _job_groups(block: Block, ctx: Context, layers: dict, hessians: dict) -> Iterator[list[tuple]]:
    """The weights to quantize, each (target, weight name, expert or None, weight, scheme, Hessian or None), in
    groups that every process walks alike: the layers whose statistics exist, then per fused experts module
    (GPTQ) each chunk of experts, its Hessians accumulated as the group is reached and dropped with it."""
    def scheme(target: str) -> TensorScheme:
        return ctx.program.quant_specs[block.qualified(target)].scheme.weight

    routed = {target: calls for target, calls in hessians.items() if isinstance(calls, RoutedCalls)}
    yield [(target, name, expert, weight, scheme(target), hessian)
           for target, module in layers.items() if target not in routed
           for name, expert, weight, hessian in _weights(module, hessians.get(target))]
    for target, calls in routed.items():
        for experts in calls.chunks(ctx.world.size):
            found = calls.hessians(experts, ctx.world)
            yield [(target, name, expert, getattr(calls.module, name)[expert], scheme(target), found.get((name, expert)))
                   for expert in experts for name in EXPERT_WEIGHTS]


def _weights(module: nn.Module, hessian: HessianAccumulator | None) -> list[tuple[str, int | None, torch.Tensor, HessianAccumulator | None]]:
    """A layer's weights to quantize, each (name, expert or None, weight, its GPTQ statistics or None): a Linear's
    `weight` with `hessian`; each expert's slice of fused experts' weights, without (theirs: `RoutedCalls`)."""
    if not isinstance(module, FakeQuantExperts):
        return [("weight", None, module.weight, hessian)]
    return [(name, expert, getattr(module, name)[expert], None) for name in EXPERT_WEIGHTS for expert in range(module.num_experts)]


@contextlib.contextmanager
def _quantizer_modes(quantizers: list[FakeQuantize], mode: str) -> Iterator[None]:
    """The quantizers in `mode` while open; each gets its own mode back on exit."""
    saved = [q.mode for q in quantizers]
    for q in quantizers:
        q.mode = mode
    try:
        yield
    finally:
        for q, previous in zip(quantizers, saved, strict=True):
            q.mode = previous


def _borrow_unobserved(group: nn.ModuleList) -> bool:
    """Give quantizers that saw no data the union range of their observed siblings; True if any did."""
    observed = [q.observer for q in group if q.observer is not None and q.observer.observed]
    missing = [q for q in group if q.observer is not None and not q.observer.observed]
    if not missing or not observed:
        return False
    low = torch.stack([o.min_val for o in observed]).min()
    high = torch.stack([o.max_val for o in observed]).max()
    for q in missing:
        q.observer.update(torch.stack([low, high]))
    return True
