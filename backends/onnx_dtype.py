"""A bfloat16 or float16 program run in float32 while the onnx backend exports and verifies it.

ONNX Runtime's CPU kernels compute float32 (it has no bfloat16 MatMul), so the graph is the program's
arithmetic in float32: the same integer codes and scales, its float weights (embeddings, norms, head, excluded
layers) widened exactly. Widening the tensors is not enough: each block's graph was traced in the checkpoint's
dtype, and its TracedBlock refuses inputs of another dtype, while the tracer folded `x.dtype` reads into
constants of the graph (`.to(torch.bfloat16)`). Meanwhile the blocks expect float32 inputs and their graphs
read float32 where they read the program's dtype; everything is put back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import fx, nn

from slimc.ir import Program
from slimc.ir.traced_block import TracedBlock

EXPORT_DTYPE = torch.float32  # what ONNX Runtime's CPU kernels compute in


@contextlib.contextmanager
def exported_dtype(program: Program) -> Iterator[None]:
    """Run the program in EXPORT_DTYPE meanwhile (inside or around `Program.executing_graphs`)."""
    dtype = program.dtype  # read once: it is the parameters' dtype, which is EXPORT_DTYPE meanwhile
    if dtype == EXPORT_DTYPE:
        yield
        return
    traced = [block.traced for block in program.blocks if block.traced is not None]
    with _widened_tensors(dtype, [program.model, *traced]), contextlib.ExitStack() as stack:
        for block in traced:
            stack.enter_context(_retyped_block(block, dtype))
        yield


@contextlib.contextmanager
def _widened_tensors(dtype: torch.dtype, trees: list[nn.Module]) -> Iterator[None]:
    """Parameters and buffers of `dtype` as EXPORT_DTYPE, then the very same tensors back, so that sharing between
    the model, its blocks and their graphs is kept."""
    params, buffers, cast = {}, [], {}
    for tree in trees:
        for module in tree.modules():
            for p in module._parameters.values():
                if p is not None and p.dtype == dtype and id(p) not in params:
                    params[id(p)] = (p, p.data)
            for name, b in module._buffers.items():
                if b is not None and b.dtype == dtype:
                    buffers.append((module, name, b))
    try:
        for p, data in params.values():
            p.data = data.to(EXPORT_DTYPE)
        for module, name, b in buffers:
            module._buffers[name] = cast.setdefault(id(b), b.to(EXPORT_DTYPE))
        yield
    finally:
        for p, data in params.values():
            p.data = data
        for module, name, b in buffers:
            module._buffers[name] = b


@contextlib.contextmanager
def _retyped_block(block: TracedBlock, dtype: torch.dtype) -> Iterator[None]:
    """The block accepts EXPORT_DTYPE tensors where it was traced with `dtype`, and its graphs compute in it."""
    expected = block._expected
    block._expected = [(EXPORT_DTYPE, *leaf[1:]) if is_tensor and leaf[0] == dtype else leaf
                       for is_tensor, leaf in zip(block._is_tensor, expected)]
    graphs = [block.graph_module, block.__dict__["_guard_module"]]
    try:
        with contextlib.ExitStack() as stack:
            for graph_module in graphs:
                stack.enter_context(_retyped_graph(graph_module, dtype))
            yield
    finally:
        block._expected = expected


@contextlib.contextmanager
def _retyped_graph(graph_module: fx.GraphModule, dtype: torch.dtype) -> Iterator[None]:
    """`dtype` constants in the graph's node arguments read EXPORT_DTYPE, and so do its plain tensor attributes
    (constants the tracer kept; parameters and buffers are widened with the model's)."""
    def retype(value):
        return EXPORT_DTYPE if isinstance(value, torch.dtype) and value == dtype else value

    saved = [(node, node.args, node.kwargs) for node in graph_module.graph.nodes]
    attributes = []
    for node in graph_module.graph.nodes:
        node.args, node.kwargs = fx.node.map_aggregate(node.args, retype), fx.node.map_aggregate(node.kwargs, retype)
        if node.op == "get_attr":
            owner_path, _, name = node.target.rpartition(".")
            owner = graph_module.get_submodule(owner_path)
            value = owner.__dict__.get(name)
            if isinstance(value, torch.Tensor) and value.dtype == dtype:
                attributes.append((owner, name, value))
                owner.__dict__[name] = value.to(EXPORT_DTYPE)
    graph_module.recompile()
    try:
        yield
    finally:
        for node, args, kwargs in saved:
            node.args, node.kwargs = args, kwargs
        for owner, name, value in attributes:
            owner.__dict__[name] = value
        graph_module.recompile()
