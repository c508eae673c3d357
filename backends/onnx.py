"""The `onnx` backend: an ONNX graph of the quantized model that ONNX Runtime runs (docs/formats/onnx.md).

    model.onnx              the graph (decoder LLMs: a prefill, input_ids -> logits; diffusion transformers:
                            the denoiser forward -> sample), opset 21, float32 activations
    model.onnx.data         its initializers, when stored as external data (`external_data`)
    onnx_model.json         inputs and outputs (named axes are dynamic), and how each quantized layer is expressed
    config.json, tokenizer  the model's other files, as the HF frontend writes them

The graph is traced with torch.onnx (dynamo) while the model runs through the blocks' rewritten graphs
(`Program.executing_graphs`), so online rotations and explicit smoothing multiplies are in it; every
lowered layer is one custom op whose translation (`onnx_ops`) stores its codes as an integer initializer
and computes what QuantizedLinear computes. `verify` runs the file with onnxruntime and compares its
output with the program's.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from pydantic import Field

from slimc.backends import Backend, register_backend
from slimc.backends.onnx_inputs import GraphSpec, graph_spec
from slimc.errors import ExportError, SlimcError
from slimc.frontends.hf import write_model_files
from slimc.ir import Program
from slimc.modules import QuantizedExperts, QuantizedLinear

if TYPE_CHECKING:
    from onnxscript import ir

# onnx_ops and onnx_graph (onnxscript, torch.onnx) take seconds to import: they are imported by the methods
# that use them, so that registering the format costs nothing to compiles that do not export it.

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
DESCRIPTION_FILE = "onnx_model.json"
EXTERNAL_DATA_BYTES = 2**30  # automatic external data from here: well below protobuf's 2 GiB limit on one file
EXPORT_DTYPE = torch.float32  # what ONNX Runtime's CPU kernels compute in
# ONNX Runtime fuses a weight-only layer's DequantizeLinear and MatMul into MatMulNBits, which by default (accuracy
# level 4) rounds the activations to int8 as well; level 1 keeps them float32, as the program computes.
EXACT_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}
# How much float noise the program's output itself amplifies: its change when the first block's inputs are
# scaled by 1 + PERTURBATION (8 float32 ulps). Dynamic per-token quantization of a model with massive
# activations (SmolLM2's attention sink) turns such noise into percent-level output changes, which no two
# float32 implementations avoid; verify accepts SENSITIVITY_FACTOR times that.
PERTURBATION = 1e-6
SENSITIVITY_FACTOR = 2


@register_backend("onnx")
class OnnxBackend(Backend):
    """An ONNX graph with integer weights, for ONNX Runtime.

    Options:
    - `opset`: ONNX opset of the graph; 21 or later (int4 and blocked DequantizeLinear are opset 21).
    - `integer_matmul`: layers with dynamic symmetric activations and per-channel symmetric weights run as
      MatMulInteger (uint8 activations x int8 weights -> int32), the fast int8 path on CPUs; false writes
      them as an explicit quantize-dequantize of the activation before a DequantizeLinear-MatMul.
    - `logits`: what an LLM graph returns: "all" positions' logits, as the model's forward does, or the "last"
      position's only, what generation reads after a prefill (the head then runs on one position, not all).
    - `sample_batch`, `sample_seq_len`: the LLM prompt the graph is traced and verified with (any batch and
      length run afterwards); the batch must be at least 2 so that the exporter keeps it dynamic.
    - `external_data`: store the initializers in model.onnx.data; None does so from 1 GiB of weights.
    - `tolerance`: the relative (L2) difference between onnxruntime's output and the program's that
      `verify` accepts, or twice the program's own change under a float32-noise perturbation if larger.
      Both compute the same codes and scales, but float32 kernels sum in other orders, and a one-ulp
      difference in front of a quantizer can move a code by one step, which later layers carry.
    """

    opset: int = Field(21, ge=21)
    integer_matmul: bool = True
    logits: Literal["all", "last"] = "all"
    sample_batch: int = Field(2, ge=2)
    sample_seq_len: int = Field(16, ge=2)
    external_data: bool | None = None
    tolerance: float = Field(5e-3, gt=0)

    def write(self, program: Program, out_dir: Path) -> list[Path]:
        from onnxscript import ir

        from slimc.backends.onnx_graph import initializer_bytes, io_description

        out_dir = Path(out_dir)
        before = set(out_dir.iterdir())
        with exported_dtype(program):
            model = self._export(program, self._spec(program))
        external = self.external_data if self.external_data is not None else initializer_bytes(model) > EXTERNAL_DATA_BYTES
        ir.save(model, out_dir / MODEL_FILE, external_data=DATA_FILE if external else None)
        description = {
            "format": "onnx", "runtime": "onnxruntime", "opset": self.opset, "model": MODEL_FILE,
            "external_data": DATA_FILE if external else None, **io_description(model),
            "layers": {name: layer_description(m, self.integer_matmul) for name, m in _lowered(program).items()},
        }
        (out_dir / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2) + "\n")
        write_model_files(program.source, out_dir, program.metadata.get("config_updates"))
        for path in set(out_dir.iterdir()) - before:
            path.chmod(0o644)
        return sorted(set(out_dir.iterdir()) - before)

    def _export(self, program: Program, spec: GraphSpec) -> ir.Model:
        """Trace `spec` through the program's graphs into an ONNX model with integer weight initializers."""
        from slimc.backends.onnx_graph import name_initializers, optimize
        from slimc.backends.onnx_ops import exporting_custom_ops, translation_table, weight_names

        tensor_names = _tensor_names(program.model)  # before the graphs are swapped in: the program's own names
        with exporting_custom_ops(program.model, self.integer_matmul) as lowered, program.executing_graphs(), spec.tracing:
            codes = {f"{name}.{which}": _code_dtype(module) for name, module in lowered.items() for which in weight_names(module)}
            names = _exported_names(spec.module, tensor_names)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the exporter's deprecation and tracing notes are not the user's to act on
                    exported = torch.onnx.export(
                        spec.module, (), kwargs={**spec.inputs, **spec.constants}, dynamic_shapes=spec.dynamic_shapes,
                        output_names=[spec.output], opset_version=self.opset, dynamo=True,
                        custom_translation_table=translation_table(), optimize=False, verbose=False,
                    )
            except Exception as error:
                raise ExportError(f"onnx: torch.onnx could not trace the {program.family} model: {_cause(error)}") from error
        model = exported.model
        optimize(model, name_initializers(model, names, codes))
        return model

    def verify(self, program: Program, out_dir: Path) -> None:
        import onnxruntime
        from onnxscript import ir

        from slimc.backends.onnx_graph import check_integer_weights

        path = Path(out_dir) / MODEL_FILE
        if not path.is_file():
            raise ExportError(f"onnx: {path} was not written")
        check_integer_weights(ir.load(path), program, self.integer_matmul)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        for key, value in EXACT_SESSION_CONFIG.items():
            options.add_session_config_entry(key, value)
        try:
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:
            raise ExportError(f"onnx: onnxruntime cannot load {path.name}: {_cause(error)}") from error
        with exported_dtype(program):
            for spec in self._verification_specs(program):
                self._compare(program, session, spec)

    def _spec(self, program: Program, batch: int | None = None, seq_len: int | None = None, seed: int = 0) -> GraphSpec:
        return graph_spec(program, batch=batch or self.sample_batch, seq_len=seq_len or self.sample_seq_len,
                          dtype=EXPORT_DTYPE, last_logits=self.logits == "last", seed=seed)

    def _verification_specs(self, program: Program) -> list[GraphSpec]:
        """The traced sample and, for LLMs, another batch and length (the axes must really be dynamic)."""
        specs = [self._spec(program)]
        if program.family == "llm":
            specs.append(self._spec(program, self.sample_batch + 1, self.sample_seq_len + 5, seed=1))
        return specs

    def _compare(self, program: Program, session, spec: GraphSpec) -> None:
        with torch.no_grad(), program.executing_graphs():
            expected = spec.run().float().numpy()
            with _perturbed_first_block(program):
                perturbed = spec.run().float().numpy()
        try:
            actual = session.run([spec.output], {name: t.numpy() for name, t in spec.inputs.items()})[0]
        except Exception as error:
            raise ExportError(f"onnx: onnxruntime failed on inputs {_shapes(spec)}: {_cause(error)}") from error
        if actual.shape != expected.shape:
            raise ExportError(f"onnx: onnxruntime's {spec.output} has shape {actual.shape}, the program's {expected.shape} "
                              f"(inputs {_shapes(spec)})")
        difference, sensitivity = _relative(actual, expected), _relative(perturbed, expected)
        if not difference <= max(self.tolerance, SENSITIVITY_FACTOR * sensitivity):
            raise ExportError(f"onnx: onnxruntime's {spec.output} differs from the program's by {difference:.3g} relative "
                              f"(max abs {np.abs(actual - expected).max():.3g}) on inputs {_shapes(spec)}; tolerance "
                              f"{self.tolerance:g}, or {SENSITIVITY_FACTOR}x the {sensitivity:.3g} that the program itself "
                              f"moves by when the first block's inputs change by {PERTURBATION:g}")


def _relative(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / max(float(np.linalg.norm(expected)), 1e-30))


@contextlib.contextmanager
def _perturbed_first_block(program: Program) -> Iterator[None]:
    """Scale the float inputs of the first block by 1 + PERTURBATION meanwhile (inside `executing_graphs`)."""
    def scale(value):
        return value * (1 + PERTURBATION) if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    def hook(module, args, kwargs):
        return tuple(scale(a) for a in args), {k: scale(v) for k, v in kwargs.items()}

    first = program.blocks[0]
    handle = first.container[first.index].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _lowered(program: Program) -> dict[str, QuantizedLinear | QuantizedExperts]:
    return {n: m for n, m in program.model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedExperts))}


def _tensor_names(module: torch.nn.Module) -> dict[int, str]:
    """Parameters and buffers by identity -> the first name the module gives them."""
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    names: dict[int, str] = {}
    for name, tensor in named:
        names.setdefault(id(tensor), name)
    return names


def _exported_names(module: torch.nn.Module, program_names: dict[int, str]) -> dict[str, str]:
    """Names in the exported module (as torch.onnx names initializers) -> the program's names of the same tensors."""
    return {name: program_names[id(tensor)] for name, tensor in [*module.named_parameters(), *module.named_buffers()]
            if id(tensor) in program_names}


def _code_dtype(module: QuantizedLinear | QuantizedExperts) -> str:
    """How the codes are stored: int4 codes of a Linear as INT4; fused experts' codes stay int8, since each
    expert's slice is taken in the graph."""
    return module.scheme.weight.dtype if isinstance(module, QuantizedLinear) else "int8"


def layer_description(module: QuantizedLinear | QuantizedExperts, integer: bool) -> dict[str, str]:
    """How a lowered layer is written: its scheme, weight and activation quantization, and its ops."""
    from slimc.backends.onnx_ops import integer_matmul

    scheme = module.scheme
    weight, act = scheme.weight, scheme.act
    group = f" (group {weight.group_size})" if weight.granularity == "per_group" else ""
    if act is None:
        activation = "float"
    else:
        kind = "dynamic" if act.dynamic else "static"
        activation = f"{act.dtype} {kind} {act.granularity} {'symmetric' if act.symmetric else 'asymmetric'}"
    if integer_matmul(scheme, integer):
        ops = "per-token quantization subgraph -> MatMulInteger (uint8 x int8) -> Cast -> Mul scales"
    elif act is not None and not act.dynamic:
        ops = "QuantizeLinear -> DequantizeLinear -> MatMul(DequantizeLinear(weight))"
    elif act is not None:
        ops = "quantize-dequantize subgraph -> MatMul(DequantizeLinear(weight))"
    else:
        ops = "MatMul(DequantizeLinear(weight))"
    if isinstance(module, QuantizedExperts):
        ops = f"every expert on every token, weighted by its routing weight; each projection: {ops}"
    return {"scheme": scheme.label, "weight": f"{weight.dtype} {weight.granularity}{group}", "activation": activation, "ops": ops}


@contextlib.contextmanager
def exported_dtype(program: Program) -> Iterator[None]:
    """Run the program's float tensors in EXPORT_DTYPE meanwhile (a bfloat16 or float16 model exports as float32),
    then put the very same tensors back, so sharing between blocks and their graphs is kept."""
    if program.dtype == EXPORT_DTYPE:
        yield
        return
    modules = [program.model, *(block.traced for block in program.blocks if block.traced is not None)]
    params, buffers, cast = {}, [], {}
    for tree in modules:
        for module in tree.modules():
            for p in module._parameters.values():
                if p is not None and p.dtype == program.dtype and id(p) not in params:
                    params[id(p)] = (p, p.data)
            for name, b in module._buffers.items():
                if b is not None and b.dtype == program.dtype:
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


def _cause(error: BaseException) -> str:
    """The innermost slimc error in the chain (a block traced for other inputs), else the error's first line."""
    seen = error
    while seen is not None:
        if isinstance(seen, SlimcError):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    text = str(error)
    if "## Exception summary" in text:  # torch.onnx wraps the tracing error in a page of advice
        text = text.split("## Exception summary", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _shapes(spec: GraphSpec) -> str:
    return ", ".join(f"{name} {tuple(t.shape)}" for name, t in spec.inputs.items())
