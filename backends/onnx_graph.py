"""The exported ONNX graph after torch.onnx: integer weight initializers, graph cleanup, and their read-back checks."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir.passes.common as common_passes
import onnxscript.optimizer
from onnxscript import ir

from slimc.backends.onnx_ops import integer_matmul, weight_names
from slimc.errors import ExportError
from slimc.ir import Program
from slimc.numerics.modules import QuantizedExperts, QuantizedLinear

_CODE_TYPES = {"int8": ir.DataType.INT8, "int4": ir.DataType.INT4}


def name_initializers(model: ir.Model, names: dict[str, str], codes: dict[str, str]) -> set[ir.Value]:
    """Rename the initializers from the exported module's paths to the program's tensor names, and fold into each
    lowered weight the transpose (and int4 cast) that the translation applies to it, so the file holds the codes
    as the runtime reads them.

    `names`: exported name -> program name; `codes`: program name of each lowered weight -> its code dtype
    ("int8", "int4"). Returns the lowered weights' initializers, which later constant folding must leave alone
    (folding a DequantizeLinear input would store float weights).
    """
    initializers = model.graph.initializers
    stored = set()
    for exported, name in names.items():
        value = initializers.get(exported)
        if value is None or value.const_value is None:
            if name in codes:
                raise ExportError(f"onnx: the exported graph has no initializer for {name} (expected {exported})")
            continue  # a tensor the graph never reads
        if name in codes:
            while (folded := _fold_consumer(model.graph, value, _CODE_TYPES[codes[name]])) is not None:
                value = folded
            stored.add(value)
        del initializers[value.name]
        value.name = name
        model.graph.register_initializer(value)
    return stored


def _fold_consumer(graph: ir.Graph, value: ir.Value, code_type: ir.DataType) -> ir.Value | None:
    """Replace the Transpose or Cast-to-`code_type` that is the initializer's only reader by a new initializer."""
    readers = value.consumers()
    if len(readers) != 1 or value.is_graph_output():
        return None
    node = readers[0]
    array = value.const_value.numpy()
    if node.op_type == "Transpose":
        array, dtype = np.ascontiguousarray(array.transpose(node.attributes["perm"].as_ints())), value.dtype
    elif node.op_type == "Cast" and code_type == ir.DataType.INT4 and node.attributes["to"].as_int() == code_type:
        array, dtype = array.astype(ml_dtypes.int4), ir.DataType.INT4
    else:
        return None
    folded = ir.Value(name=f"{value.name}.folded", shape=ir.Shape(array.shape), type=ir.TensorType(dtype),
                      const_value=ir.Tensor(array, dtype=dtype))
    graph.register_initializer(folded)
    node.outputs[0].replace_all_uses_with(folded)
    graph.remove(node, safe=True)
    del graph.initializers[value.name]
    return folded


def optimize(model: ir.Model, keep: set[ir.Value]) -> None:
    """Fold constants (shape arithmetic, casts and reshapes of scales), never a node that reads one of `keep`, then
    remove dead nodes and common subexpressions (the per-token quantization of q, k and v reads one input).

    onnxscript's `optimize_ir` also runs its pattern rewriter, which took 20 s on a tiny DiT graph for
    clean-ups that ONNX Runtime's own graph optimizer makes when it loads the model.
    """
    def should_fold(node: ir.Node) -> bool | None:
        return False if any(value in keep for value in node.inputs) else None

    onnxscript.optimizer.fold_constants(model, should_fold=should_fold)
    for node in model.graph.all_nodes():  # torch.onnx's per-node stack traces and fx nodes: ~2 KB a node of local paths
        for key in [k for k in node.metadata_props if k.startswith("pkg.torch.")]:
            del node.metadata_props[key]
    ir.passes.Sequential(
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.RemoveUnusedOpsetsPass(),
    )(model)


def check_integer_weights(model: ir.Model, program: Program, integer: bool) -> None:
    """Every lowered weight is an integer initializer holding its codes, and is read by the ops its scheme
    says: MatMulInteger (integer path) or DequantizeLinear."""
    initializers = model.graph.initializers
    for name, module in program.model.named_modules():
        if not isinstance(module, (QuantizedLinear, QuantizedExperts)):
            continue
        for which in weight_names(module):
            codes = getattr(module, which)
            stored = initializers.get(f"{name}.{which}")
            expected_type = _CODE_TYPES[module.scheme.weight.dtype] if isinstance(module, QuantizedLinear) else ir.DataType.INT8
            if stored is None or stored.const_value is None:
                raise ExportError(f"onnx: {name}.{which} is not an initializer of the graph; its weights are not stored as integers")
            if stored.dtype != expected_type:
                raise ExportError(f"onnx: {name}.{which} is stored as {stored.dtype}, expected {expected_type} codes")
            array = np.asarray(stored.const_value.numpy()).astype(np.int8)
            reference = codes.cpu().numpy()
            if isinstance(module, QuantizedLinear):  # stored (in, out), as the matmul reads it
                reference = reference.T
            if array.shape != reference.shape or not np.array_equal(array, reference):
                raise ExportError(f"onnx: {name}.{which} holds other codes than the program's")
            readers = _readers(stored)
            wanted = "MatMulInteger" if integer_matmul(module.scheme, integer) else "DequantizeLinear"
            if wanted not in readers:
                raise ExportError(f"onnx: {name}.{which} ({module.scheme.label}) is read by {sorted(readers)}, not {wanted}")


def _readers(value: ir.Value) -> set[str]:
    """Op types reading the value, through the Cast / Add (the uint8 shift) / Gather / Transpose that may sit in
    front of the matmul."""
    found, frontier = set(), [value]
    while frontier:
        for node in frontier.pop().consumers():
            found.add(node.op_type)
            if node.op_type in ("Cast", "Add", "Gather", "Transpose", "Squeeze"):
                frontier.extend(node.outputs)
    return found


def io_description(model: ir.Model) -> dict[str, list[dict]]:
    """Inputs and outputs of the graph: name, element type, shape (named axes are dynamic)."""
    def describe(value: ir.Value) -> dict:
        dims = [d if isinstance(d, int) else str(d) for d in value.shape] if value.shape is not None else None
        return {"name": value.name, "dtype": value.dtype.name.lower(), "shape": dims}

    return {"inputs": [describe(v) for v in model.graph.inputs], "outputs": [describe(v) for v in model.graph.outputs]}


def initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)

