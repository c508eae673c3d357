"""`slimc trace`: what the compiler sees in a model — blocks, leaves, and the patterns found in each."""

from __future__ import annotations

import warnings
from collections import Counter

import torch

from slimc.config import config_from_data
from slimc.frontends import frontend_for
from slimc.ir import Block, Program
from slimc.ir.source import default_model_path, resolve_model_source
from slimc.patterns import (
    ModulationGroup,
    find_experts,
    find_kv_inputs,
    find_modulation_groups,
    find_multiply_groups,
    find_norm_linear_groups,
    find_ov_pairs,
    find_residual_stream,
    find_up_down_pairs,
    node_kind,
)
from slimc.pipeline import Pipeline
from slimc.report import RunReport


def traced_program(model_path: str | None, *, seq_len: int | None = None) -> Program:
    """Load a model in float32 and trace every block on one small sample of the frontend's own data
    (its `trace_calibration` settings: a short text window, one small image, two diffusion steps)."""
    source = resolve_model_source(model_path or default_model_path())
    frontend = frontend_for(source)
    program = frontend.build(source, frontend.load(source, dtype=torch.float32))
    settings = {"dataset": frontend.calibration_dataset, "samples": 1, "batch_size": 1, **frontend.trace_calibration}
    if seq_len is not None:
        settings["seq_len"] = seq_len
    config = config_from_data({"calibration": settings})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = frontend.calibration_batches(config.calibration, source, program)
    Pipeline([]).run(program, config, batches, RunReport())
    return program


def describe_block(block: Block) -> list[str]:
    gm = block.graph_module
    kinds = Counter(node_kind(gm, n) for n in gm.graph.nodes if n.op in ("call_module", "call_function"))
    lines = [
        f"  leaves: {kinds['linear']} Linear, {kinds['norm']} norm, {kinds['attention']} attention kernel, "
        f"{kinds['experts']} experts; {len(gm.graph.nodes)} graph nodes"
    ]
    for group in find_norm_linear_groups(gm):
        readers = ", ".join(f"{c.target}" + ("" if c.kind == "linear" else f" ({c.kind})") for c in group.consumers)
        lines.append(f"  norm → linears   {group.norm} → {readers}")
    for pair in find_ov_pairs(gm):
        lines.append(f"  v → o            {pair.v} → {pair.o} (head_dim {pair.head_dim})")
    if block.role == "text":  # the blocks that fake_quant's kv_cache quantizes
        for kv in find_kv_inputs(gm):
            lines.append(f"  k, v → attention {kv.k}, {kv.v} → {kv.kernel.target} ({kv.heads} kv heads × {kv.head_dim}): "
                         "the KV cache")
    for pair in find_up_down_pairs(gm):
        lines.append(f"  up → down        {pair.up} → {pair.down} (gate {pair.gate})")
    for experts in find_experts(gm):
        module = gm.get_submodule(experts)
        lines.append(f"  experts          {experts}: {module.gate_up_proj.shape[0]} experts, fused 3-D weights")
    for group in (g for g in find_modulation_groups(gm) if g.foldable):
        lines.append(f"  modulation       {group.norm}·(1 + scale) + shift → {', '.join(c.target for c in group.readers)}: "
                     f"smoothing folds into {_chunk_rows(gm, group)}")
    for group in find_multiply_groups(gm):
        lines.append(f"  explicit multiply {group.source} → {', '.join(c.target for c in group.readers)}: "
                     f"x·(1/s) before them ({group.reason})")
    stream = find_residual_stream(gm)
    if stream.problem:
        hint = "; smoothing goes through the modulation and explicit multiplies, rotation only per Linear (rotate_inputs)"
        lines.append(f"  residual stream  not rotatable: {stream.problem}{hint if 'AdaLN' in stream.problem else ''}")
    else:
        readers = [n.norm for n in stream.norms] + [c.target for c in stream.direct_readers]
        lines.append(f"  residual stream  read by {', '.join(readers)}; written by {', '.join(w.target for w in stream.writers)}")
    return lines


def _chunk_rows(gm, group: ModulationGroup) -> str:
    """`norm1.linear rows [32:64) (scale, chunk 1 of 6) and [0:32) (shift, chunk 0)`."""
    out = gm.get_submodule(group.linear).out_features
    scale, shift = group.rows(group.scale_chunk, out), group.rows(group.shift_chunk, out)
    return (f"{group.linear} rows [{scale.start}:{scale.stop}) (scale, chunk {group.scale_chunk} of {group.chunks}) "
            f"and [{shift.start}:{shift.stop}) (shift, chunk {group.shift_chunk})")


def _describe_stage(blocks: list[Block]) -> list[str]:
    """Each block's description; a run of blocks with the same description is shown once."""
    lines: list[str] = []
    previous: list[str] | None = None
    repeated: list[str] = []
    for block in blocks:
        description = describe_block(block)
        if description == previous:
            repeated.append(block.name)
            continue
        if repeated:
            lines.append(f"  (same structure: {repeated[0]} … {repeated[-1]}, {len(repeated)} blocks)")
            repeated = []
        lines.append(f"block {block.name} [{block.role}]")
        lines.extend(description)
        previous = description
    if repeated:
        lines.append(f"  (same structure: {repeated[0]} … {repeated[-1]}, {len(repeated)} blocks)")
    return lines


def trace_report(model_path: str | None, *, seq_len: int | None = None) -> str:
    program = traced_program(model_path, seq_len=seq_len)
    stages = ", ".join(f"{stage.name} ({len(stage.blocks)})" for stage in program.stages)
    lines = [
        f"model: {program.source.architecture} ({program.family} frontend), {len(program.blocks)} blocks "
        f"in stages {stages}; tied embeddings: {program.tied_embeddings}",
    ]
    if program.embeddings:
        lines.append(f"residual stream outside the blocks: written by {', '.join(program.embeddings)}, "
                     f"read by {program.head_norm or '?'} → {program.head or '?'}")
    for stage in program.stages:
        lines.append(f"stage {stage.name}")
        lines.extend(_describe_stage(stage.blocks))
    return "\n".join(lines)
