"""smooth: SmoothQuant, moving activation outliers into the weights of the layers that read them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, PrivateAttr, field_validator
from torch import fx

from slimc.ir import Block, Program
from slimc.ir.calls import block_output, row_count, spread_rows, take_rows, tokens_per_row
from slimc.ir.capture import BlockInput
from slimc.ir.hooks import temporary_hooks
from slimc.ir.partial import ObservedPrefix, PartialRuns
from slimc.numerics.calib import channel_absmax, simulated_quantization
from slimc.numerics.fidelity import relative_error
from slimc.numerics.folding import precise
from slimc.numerics.modules import ChannelScale
from slimc.numerics.quant import smoothing_scales
from slimc.pass_base import Context, Pass, register_pass
from slimc.patterns import (
    Consumer,
    ModulationGroup,
    UpDownPair,
    find_modulation_groups,
    find_multiply_groups,
    find_norm_linear_groups,
    find_ov_pairs,
    find_up_down_pairs,
    sublayer_output,
)
from slimc.patterns.fold import (
    consumer_weight,
    input_channel_absmax,
    norm_has_affine_weight,
    scale_input_channels,
    scale_modulation,
    scale_norm,
    scale_output_channels,
    tensor_parts,
    update_in_parts,
)

Subgraph = Literal["norm-linear", "v-o", "up-down", "modulation", "multiply"]


@dataclass
class Migration:
    """One place a per-channel scale can move: activations are divided by it, readers' weights multiplied."""

    kind: Subgraph
    observe: tuple[str, str]  # (leaf, "input" | "output") where the activation is measured
    readers: list[Consumer]
    weight_absmax: Callable[[], torch.Tensor]
    apply: Callable[[torch.Tensor], None]  # takes activation-channel scales
    tensors: Callable[[], list[torch.Tensor]]  # what `apply` changes, to undo a search trial
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    discard: Callable[[], None] = lambda: None  # undo what `apply` did besides `tensors` (inserted nodes)
    # the same migration with only some of its readers, where the producer allows it (a norm)
    restricted: Callable[[list[Consumer]], Migration] | None = None


@register_pass("smooth")
class Smooth(Pass):
    """Per input channel j, scale s_j = max|X_j|^alpha / max|W_j|^(1-alpha); X is divided by s (folded into
    the norm, the v projection or the up projection that produce it) and the readers' weights multiplied.

    DiT blocks have no norm right before their Linears: an AdaLN-modulated input
    `norm(x)·(1 + scale) + shift` takes 1/s in the modulation Linear's scale and shift rows
    ("modulation"); where nothing can take it (a block input such as Wan's encoder_hidden_states, Wan's
    `scale_shift_table + temb` modulation), an explicit multiply by 1/s is put before each reader that
    a later step quantizes ("multiply"). The patterns decide; LLM blocks have neither.

    With `search: true`, alpha is chosen per group from `search_grid` to minimise the output error
    when the group's Linears are quantized with the schemes the pipeline will give them; a
    group where every alpha is worse than no migration is left as it is. The search runs on the first
    `search_batches` calibration batches, and of them on at most `search_tokens` tokens (whole rows,
    evenly spread over each batch, at least one row of each; null: every token); the channel maxima that
    the scales come from are measured on all calibration tokens. With `search_scope: sublayer` a group's error is
    measured at the output of the sublayer it feeds (`patterns.sublayer_output`: o_proj for the attention's
    groups, down_proj for the MLP's, as AWQ measures), and a trial runs only that sublayer; where no Linear closes
    the sublayer (fused MoE experts), and with `block`, at the block's output. `search_method: descent` walks the
    sorted grid from its middle alpha towards lower errors and stops where both neighbours are worse (3 to 5 trials
    of 7 where the error is unimodal in alpha); `grid` tries every alpha.
    """

    preserves_function = True

    alpha: float = Field(0.5, ge=0.0, le=1.0)
    search: bool = False
    search_grid: list[float] = [round(0.1 * i, 1) for i in range(11)]
    search_batches: int = Field(1, ge=1)
    search_tokens: int | None = Field(2048, ge=1)
    search_scope: Literal["sublayer", "block"] = "sublayer"
    search_method: Literal["descent", "grid"] = "descent"
    subgraphs: list[Subgraph] = ["norm-linear", "v-o", "up-down", "modulation", "multiply"]
    _chosen: dict[str, float | None] = PrivateAttr(default_factory=dict)
    _multiplied: int = PrivateAttr(0)

    @field_validator("search_grid")
    @classmethod
    def _grid_in_range(cls, grid: list[float]) -> list[float]:
        if not grid or any(not 0.0 <= a <= 1.0 for a in grid):
            raise ValueError("search_grid needs alphas in [0, 1], e.g. [0.3, 0.5, 0.7]")
        return grid

    def run_block(self, block: Block, ctx: Context) -> None:
        migrations = self.migrations(block, ctx)
        if not migrations:
            return
        targets = dict(m.observe for m in migrations)
        searched = len(ctx.leading(self.search_batches)) if self.search else 0
        # the other batches run only as far as the last observed value (before SmolLM2's down_proj: a fifth of a run),
        # unless the pipeline takes the block's outputs as the next block's inputs (calibration.propagate: float)
        prefix = ObservedPrefix.of(block.graph_module, targets)
        outputs: list[torch.Tensor] = []
        float_outputs = ctx.float_outputs

        @torch.no_grad()
        def run(block: Block, batches: Sequence[BlockInput], record: Callable[[str, torch.Tensor], None]) -> None:
            for index, (args, kwargs) in enumerate(batches):  # one at a time: a store may hold some on disk
                offered = float_outputs is not None and float_outputs.wants(index)
                if index < searched or offered or prefix is None:
                    whole = block.traced(*args, **kwargs)
                    if offered:
                        float_outputs.offer(index, whole)
                    if index < searched:  # the float outputs the search measures against
                        outputs.append(block_output(whole))
                else:
                    prefix.run(block.traced.flatten_inputs(args, kwargs), record)

        stats = channel_absmax(block, ctx.inputs, targets, run)
        stats = {target: ctx.world.max(stats[target]) for target in sorted(stats)}
        search = self._search_calls(block, ctx, outputs) if self.search else None
        for migration in migrations:
            act_absmax = migration.reduce(stats[migration.observe[0]])
            alpha = self._best_alpha(block, ctx, migration, act_absmax, *search) if search else self.alpha
            if alpha is not None:
                migration.apply(smoothing_scales(act_absmax, migration.weight_absmax(), alpha))
                self._multiplied += len(migration.readers) if migration.kind == "multiply" else 0

    def _search_calls(self, block: Block, ctx: Context, outputs: list[torch.Tensor]) -> tuple[list[BlockInput], list[torch.Tensor]]:
        """The calls the search runs, and the float block's outputs on them: the `spread_rows` of each of the first
        `search_batches` batches (whose outputs on all their rows are `outputs`); the whole batch where that is all
        its rows or they cannot be run apart."""
        batches = ctx.leading(self.search_batches)
        searched = min(self.search_batches, ctx.batch_count or len(ctx.inputs))  # over all processes
        share = None if self.search_tokens is None else self.search_tokens // searched
        calls, reference = [], []
        for batch, output in zip(batches, outputs, strict=True):
            rows = row_count(batch)
            chosen = spread_rows(rows, tokens_per_row(batch), share)
            if len(chosen) < rows:
                subset = take_rows(batch, chosen)
                subset_output = ctx.run(block, [subset])[0] if block.traced.matches(*subset) else None
                if subset_output is not None and _same_rows(subset_output, output, chosen, rows):
                    calls.append(subset)
                    reference.append(subset_output)
                    continue
                ctx.report.note(f"smooth: the calibration rows of {block.name} cannot be run apart; its search ran on "
                                "whole batches (search_tokens could not apply)")
            calls.append(batch)
            reference.append(output)
        return calls, reference

    def _best_alpha(self, block: Block, ctx: Context, migration: Migration, act_absmax: torch.Tensor,
                    calls: list[BlockInput], reference: list[torch.Tensor]) -> float | None:
        """The grid alpha with the lowest quantized error (of the sublayer or the block), or None where no migration
        is better."""
        planned = {}
        for reader in migration.readers:
            found = ctx.plan.scheme(block.qualified(reader.target)) if reader.kind == "linear" else None
            if found is not None:
                planned[reader.target] = found.scheme
        if not planned:
            return self.alpha
        # Readers a trial keeps float (fused experts beside a quantized shared expert) have their inputs multiplied
        # back by the scales instead of their weights by them: no copy of those weights to undo a trial with, nor a
        # rewrite of them per trial (a GLM-4.7 layer's experts are 5 GB in bf16).
        kept = [r for r in migration.readers if r.kind != "weight" and r.target not in planned] if migration.restricted else []
        trial = migration.restricted([r for r in migration.readers if r not in kept]) if kept else migration
        saved = [t.detach().clone() for t in trial.tensors()]
        weight_absmax = migration.weight_absmax()  # each trial is undone, so the readers' weights are these again
        # a trial changes only the migration's tensors (an explicit multiply also inserts nodes: those run whole), so
        # the trials after the first recompute only the nodes downstream of them, with the same results
        partial = None if migration.kind == "multiply" else PartialRuns.reading(block.graph_module, trial.tensors())
        flat_calls = [block.traced.flatten_inputs(args, kwargs) for args, kwargs in calls]
        scope = sublayer_output(block.graph_module, partial.reached) if partial and self.search_scope == "sublayer" else None
        if scope is not None:  # the trials measure the sublayer's output, against the float one
            partial = partial.ending_at(scope)
            with torch.no_grad():
                reference = partial.run(flat_calls)

        def quantized_error() -> float:
            with simulated_quantization(block, planned), torch.no_grad():
                outputs = [block_output(o) for o in partial.run(flat_calls)] if partial else ctx.run(block, calls)
            return ctx.world.worst([relative_error(o, r) for o, r in zip(outputs, reference)])

        def trial_error(alpha: float) -> float:
            scales = smoothing_scales(act_absmax, weight_absmax, alpha)
            trial.apply(scales)
            with _inputs_scaled(block, kept, scales):
                error = quantized_error()
            with torch.no_grad():
                for tensor, original in zip(trial.tensors(), saved):
                    tensor.copy_(original)
            return error

        unmigrated = quantized_error()
        alpha, error = grid_minimum(self.search_grid, trial_error, descend=self.search_method == "descent")
        best_alpha = alpha if error < unmigrated else None
        if best_alpha is None:
            migration.discard()
        self._chosen[block.qualified(migration.observe[0])] = best_alpha
        return best_alpha

    def finish(self, program: Program, ctx: Context) -> None:
        if self._multiplied:
            ctx.report.note(f"smooth: {self._multiplied} Linears read inputs that no layer can take the scale into; "
                            "an explicit multiply by 1/s sits before each (`slimc trace` lists them)")
        if self._chosen:
            values = sorted(a for a in self._chosen.values() if a is not None)
            kept = len(self._chosen) - len(values)
            summary = f"median alpha {values[len(values) // 2]}, range {values[0]}-{values[-1]}" if values else "none migrated"
            ctx.report.note(
                f"smooth: searched {len(self._chosen)} groups: {kept} better left unsmoothed; {summary} "
                "(each group's choice is in the report's details)"
            )
            ctx.report.details["smooth_alpha"] = dict(self._chosen)

    def migrations(self, block: Block, ctx: Context | None = None) -> list[Migration]:
        """The block's migrations of the enabled subgraphs. An explicit multiply goes only before the
        readers `ctx`'s plan quantizes (before all of them when the plan quantizes no layer)."""
        gm = block.graph_module
        found: list[Migration] = []
        if "norm-linear" in self.subgraphs:
            found += [_norm_migration(block, g.norm, g.consumers) for g in find_norm_linear_groups(gm) if norm_has_affine_weight(block.leaf(g.norm))]
        if "v-o" in self.subgraphs:
            found += [_ov_migration(block, p.v, p.o, p.head_dim) for p in find_ov_pairs(gm)]
        if "up-down" in self.subgraphs:
            found += [_up_down_migration(block, p) for p in find_up_down_pairs(gm)]
        if "modulation" in self.subgraphs:
            found += [_modulation_migration(block, g) for g in find_modulation_groups(gm) if g.foldable]
        if "multiply" in self.subgraphs:
            for group in find_multiply_groups(gm):
                readers = _quantized(block, ctx, group.readers)
                if readers:
                    found.append(_multiply_migration(block, readers))
        return found


def _same_rows(subset_output: torch.Tensor, output: torch.Tensor, chosen: list[int], rows: int) -> bool:
    """Whether a call on the `chosen` rows computed what the whole call (of `rows` rows) computed on them, within
    one epsilon of the dtype (differently shaped matmuls may round differently); a tensor cut wrongly along the
    rows moves positions or masks, and the outputs by far more."""
    if output.shape[0] != rows:
        return False
    whole = output.index_select(0, torch.tensor(chosen, device=output.device))
    return whole.shape == subset_output.shape and relative_error(subset_output, whole) <= torch.finfo(output.dtype).eps


def grid_minimum(grid: Sequence[float], error: Callable[[float], float], descend: bool) -> tuple[float, float]:
    """The alpha of `grid` with the lowest `error`, and that error: of every alpha, or (`descend`) a local minimum
    reached from the sorted grid's middle alpha by stepping to the better neighbour, each alpha measured once."""
    if not descend:
        errors = {alpha: error(alpha) for alpha in grid}
        best = min(errors, key=errors.__getitem__)  # the first of equal errors, in the grid's order
        return best, errors[best]
    ordered, errors = sorted(set(grid)), {}

    def measured(index: int) -> float:
        if ordered[index] not in errors:
            errors[ordered[index]] = error(ordered[index])
        return errors[ordered[index]]

    index = len(ordered) // 2
    while True:
        better = min((i for i in (index, index - 1, index + 1) if 0 <= i < len(ordered)), key=measured)
        if better == index:
            return ordered[index], errors[ordered[index]]
        index = better


def _quantized(block: Block, ctx: Context | None, readers: list[Consumer]) -> list[Consumer]:
    """The readers the plan quantizes; all of them when it quantizes no layer."""
    if ctx is None or not ctx.plan.schemes:
        return readers
    return [r for r in readers if ctx.plan.scheme(block.qualified(r.target)) is not None]


def _norm_migration(block: Block, norm_target: str, readers: list[Consumer]) -> Migration:
    norm = block.leaf(norm_target)

    def apply(scales: torch.Tensor) -> None:
        scale_norm(norm, 1.0 / scales)
        scale_input_channels(block, readers, scales)

    def tensors() -> list[torch.Tensor]:
        bias = getattr(norm, "bias", None)
        return [norm.weight, *([bias] if isinstance(bias, torch.Tensor) else []), *(consumer_weight(block, r) for r in readers)]

    return Migration("norm-linear", (norm_target, "output"), readers, lambda: input_channel_absmax(block, readers), apply, tensors,
                     restricted=lambda subset: _norm_migration(block, norm_target, subset))


@contextlib.contextmanager
def _inputs_scaled(block: Block, readers: list[Consumer], scales: torch.Tensor) -> Iterator[None]:
    """The readers' first inputs (positional, or the first keyword) multiplied by `scales` (per channel) while open."""
    multiply = ChannelScale(scales)

    def scale(x: torch.Tensor) -> torch.Tensor:
        return multiply.to(x.device)(x)

    def scaled(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (scale(args[0]), *args[1:]), kwargs
        first = next(iter(kwargs))
        return args, {**kwargs, first: scale(kwargs[first])}

    with temporary_hooks() as hooks:
        for reader in readers:
            hooks.before(block.leaf(reader.target), scaled, with_kwargs=True)
        yield


def _ov_migration(block: Block, v_target: str, o_target: str, head_dim: int) -> Migration:
    """v's output rows are per kv head; o's input columns per query head (grouped-query attention
    repeats each kv head for `repeat` query heads), so scales are shared across a kv head's group."""
    v, o = block.leaf(v_target), block.leaf(o_target)
    kv_heads = v.weight.shape[0] // head_dim
    repeat = o.weight.shape[1] // v.weight.shape[0]
    readers = [Consumer("linear", o_target)]

    def reduce(per_o_channel: torch.Tensor) -> torch.Tensor:
        return per_o_channel.reshape(kv_heads, repeat, head_dim).amax(1).reshape(-1)

    def expand(per_v_channel: torch.Tensor) -> torch.Tensor:
        return per_v_channel.reshape(kv_heads, 1, head_dim).expand(kv_heads, repeat, head_dim).reshape(-1)

    def apply(scales: torch.Tensor) -> None:
        scale_output_channels(v, 1.0 / scales)
        scale_input_channels(block, readers, expand(scales))

    def tensors() -> list[torch.Tensor]:
        return [v.weight, *([v.bias] if v.bias is not None else []), o.weight]

    return Migration("v-o", (o_target, "input"), readers, lambda: reduce(input_channel_absmax(block, readers)), apply, tensors, reduce)


def _up_down_migration(block: Block, pair: UpDownPair) -> Migration:
    """up -> down; across rotate's online rotation R before down (which reads x·R with the weight W·R) the scales are
    of x's channels, before R, so down's weight is taken back to W, its columns scaled, and rotated again."""
    up, down = block.leaf(pair.up), block.leaf(pair.down)
    readers = [Consumer("linear", pair.down)]
    rotation = None if pair.rotation is None else block.graph_module.get_submodule(pair.rotation).rotation()

    def weight_absmax() -> torch.Tensor:
        if rotation is None:
            return input_channel_absmax(block, readers)
        maxima = [rotation.apply_transposed(precise(part)).abs().amax(0) for part in tensor_parts(down.weight.detach())]
        return torch.stack(maxima).amax(0).float()

    def apply(scales: torch.Tensor) -> None:
        scale_output_channels(up, 1.0 / scales)
        if rotation is None:
            scale_input_channels(block, readers, scales)
            return
        factor = precise(scales)
        with torch.no_grad():
            update_in_parts(down.weight, lambda part: rotation.apply(rotation.apply_transposed(precise(part)) * factor.to(part.device)).to(part.dtype))

    def tensors() -> list[torch.Tensor]:
        return [up.weight, *([up.bias] if up.bias is not None else []), down.weight]

    return Migration("up-down", (pair.down if rotation is None else pair.rotation, "input"), readers, weight_absmax, apply, tensors)


def _modulation_migration(block: Block, group: ModulationGroup) -> Migration:
    """1/s goes into the modulation Linear's scale and shift rows (see `scale_modulation`)."""
    linear, readers = block.leaf(group.linear), group.readers
    scale_rows = group.rows(group.scale_chunk, linear.out_features)
    shift_rows = group.rows(group.shift_chunk, linear.out_features)

    def apply(scales: torch.Tensor) -> None:
        scale_modulation(linear, scale_rows, shift_rows, 1.0 / scales)
        scale_input_channels(block, readers, scales)

    def tensors() -> list[torch.Tensor]:
        return [linear.weight, linear.bias, *(consumer_weight(block, r) for r in readers)]

    return Migration("modulation", (readers[0].target, "input"), readers, lambda: input_channel_absmax(block, readers), apply, tensors)


def _multiply_migration(block: Block, readers: list[Consumer]) -> Migration:
    """A `ChannelScale` node multiplies the readers' input by 1/s; Linears reading the same node share
    one (inserted on the first `apply`, before the first of them)."""
    gm = block.graph_module
    targets = {r.target for r in readers}
    calls: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in targets:
            calls.setdefault(node.args[0], []).append(node)
    modules: dict[fx.Node, ChannelScale] = {}
    for source, group in calls.items():
        existing = gm.get_submodule(source.target) if source.op == "call_module" else None
        weight = block.leaf(group[0].target).weight
        # smoothed before: the existing multiply takes the new scale too
        modules[source] = existing if isinstance(existing, ChannelScale) else ChannelScale(torch.ones(weight.shape[-1], device=weight.device))
    fresh = [source for source, module in modules.items() if source.op != "call_module" or gm.get_submodule(source.target) is not module]
    inserted: dict[fx.Node, str] = {}

    def apply(scales: torch.Tensor) -> None:
        for source in (s for s in fresh if s not in inserted):
            group = calls[source]
            inserted[source] = target = block.scale_target(group[0].target)
            gm.add_submodule(target, modules[source])
            with gm.graph.inserting_before(group[0]):
                scaled = gm.graph.call_module(target, (source,))
            for call in group:
                call.replace_input_with(source, scaled)
        gm.recompile()
        with torch.no_grad():
            for module in modules.values():
                module.mul_scale.mul_(1.0 / scales.to(module.mul_scale.device, torch.float32))
        scale_input_channels(block, readers, scales)

    def tensors() -> list[torch.Tensor]:
        return [*(consumer_weight(block, r) for r in readers), *(m.mul_scale for m in modules.values())]

    def discard() -> None:
        for target in inserted.values():
            block.remove_input_node(target)
        inserted.clear()

    return Migration("multiply", (readers[0].target, "input"), readers, lambda: input_channel_absmax(block, readers), apply, tensors,
                     discard=discard)
