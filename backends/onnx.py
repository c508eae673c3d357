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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from pydantic import Field

from slimc.backends.base import Backend, register_backend
from slimc.backends.onnx_dtype import EXPORT_DTYPE, exported_dtype
from slimc.backends.onnx_inputs import GraphSpec, graph_spec
from slimc.errors import ExportError, SlimcError
from slimc.ir import Program
from slimc.ir.hooks import temporary_hooks
from slimc.numerics.modules import QuantizedExperts, QuantizedLinear
from slimc.schemes import KVCacheScheme

if TYPE_CHECKING:
    from onnxscript import ir

# onnx_ops and onnx_graph (onnxscript, torch.onnx) take seconds to import: they are imported by the methods
# that use them, so that registering the format costs nothing to compiles that do not export it.

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
DESCRIPTION_FILE = "onnx_model.json"
EXTERNAL_DATA_BYTES = 2**30  # automatic external data from here: well below protobuf's 2 GiB limit on one file
# ONNX Runtime fuses a weight-only layer's DequantizeLinear and MatMul into MatMulNBits, which by default (accuracy
# level 4) rounds the activations to int8 as well; level 1 keeps them float32, as the program computes.
EXACT_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}
# How much float noise each output of the program itself amplifies, measured on its own sample: the largest change
# of that output over PERTURBATION_SAMPLES runs with every element of every lowered layer's input moved by
# PERTURBATION_ULPS float32 epsilons, up or down at random. That is the noise a runtime that sums in another order
# puts in front of each quantizer; where an element sits at a rounding boundary, a code moves by one step, which
# later layers carry (one int4 activation code moved the logits of a tiny W4A4 model by 8.5%, and ONNX Runtime's
# output matched the program's under a one-epsilon perturbation to 4e-7). A uniform scaling of the first block's
# input would not do: RMS norms and per-token symmetric quantizers are blind to it. verify accepts
# SENSITIVITY_FACTOR times that change, at least `tolerance`.
PERTURBATION_ULPS = 8
PERTURBATION_SAMPLES = 2
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
    - `tolerance`: the least relative (L2) difference between onnxruntime's output and the program's that
      `verify` accepts (float32 rounding, no code moved); above it, up to twice the change of that output of the
      program under a float32-noise perturbation of its quantized layers' inputs. Both compute the same codes
      and scales, but float32 kernels sum in other orders, and a one-ulp difference in front of a quantizer can
      move a code by one step, which later layers carry.
    """

    extra = "onnx"
    opset: int = Field(21, ge=21)
    integer_matmul: bool = True
    logits: Literal["all", "last"] = "all"
    sample_batch: int = Field(2, ge=2)
    sample_seq_len: int = Field(16, ge=2)
    external_data: bool | None = None
    tolerance: float = Field(1e-4, gt=0)
    # No shape rules of its own: ONNX int4 tensors pad an odd element count to a whole byte, and blocked
    # DequantizeLinear takes any group size that divides the input (a scheme rule).
    shape_rules = ()

    def kv_cache_refusal(self, scheme: KVCacheScheme) -> str | None:
        return "the exported graph computes attention over the whole sequence, with no KV cache to quantize"

    def check(self, program: Program) -> None:
        super().check(program)
        self._spec(program)  # raises for programs with no graph here (DiTs other than FLUX and Wan, multimodal)

    def write(self, program: Program, out_dir: Path) -> list[Path]:
        from onnxscript import ir

        from slimc.backends.onnx_graph import initializer_bytes, io_description

        out_dir = Path(out_dir)
        before = set(out_dir.iterdir())
        with program.reading(*program.blocks), exported_dtype(program):  # one graph: the whole model is read; saved inside: the graph's initializers read the widened tensors lazily
            model = self._export(program, self._spec(program))
            external = self.external_data if self.external_data is not None else initializer_bytes(model) > EXTERNAL_DATA_BYTES
            ir.save(model, out_dir / MODEL_FILE, external_data=DATA_FILE if external else None)
        description = {
            "format": "onnx", "runtime": "onnxruntime", "opset": self.opset, "model": MODEL_FILE,
            "external_data": DATA_FILE if external else None, **io_description(model),
            "layers": {name: layer_description(m, self.integer_matmul) for name, m in _lowered(program).items()},
        }
        (out_dir / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2) + "\n")
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
        from onnxscript import ir

        from slimc.backends.onnx_graph import check_integer_weights

        path = Path(out_dir) / MODEL_FILE
        if not path.is_file():
            raise ExportError(f"onnx: {path} was not written")
        session = inference_session(path)
        with program.reading(*program.blocks):
            check_integer_weights(ir.load(path), program, self.integer_matmul)
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

    def accepted(self, sensitivity: float) -> float:
        """The relative difference verify accepts for an output whose `noise_sensitivity` is `sensitivity`."""
        return max(self.tolerance, SENSITIVITY_FACTOR * sensitivity)

    def _compare(self, program: Program, session, spec: GraphSpec) -> None:
        with torch.no_grad(), program.executing_graphs():
            expected = spec.run().float().numpy()
            sensitivity = noise_sensitivity(program, spec.run, expected)
        try:
            actual = session.run([spec.output], {name: t.numpy() for name, t in spec.inputs.items()})[0]
        except Exception as error:
            raise ExportError(f"onnx: onnxruntime failed on inputs {_shapes(spec)}: {_cause(error)}") from error
        if actual.shape != expected.shape:
            raise ExportError(f"onnx: onnxruntime's {spec.output} has shape {actual.shape}, the program's {expected.shape} "
                              f"(inputs {_shapes(spec)})")
        difference = _relative(actual, expected)
        if not difference <= self.accepted(sensitivity):
            raise ExportError(f"onnx: onnxruntime's {spec.output} differs from the program's by {difference:.3g} relative "
                              f"(max abs {np.abs(actual - expected).max():.3g}) on inputs {_shapes(spec)}; tolerance "
                              f"{self.tolerance:g}, or {SENSITIVITY_FACTOR}x the {sensitivity:.3g} that the program's "
                              f"{spec.output} itself moves by when its quantized layers' inputs move by "
                              f"{PERTURBATION_ULPS} float32 epsilons")


def inference_session(path: Path):
    """An onnxruntime CPU session of the graph at `path` that computes as the program does (EXACT_SESSION_CONFIG)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    for key, value in EXACT_SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise ExportError(f"onnx: onnxruntime cannot load {path.name}: {_cause(error)}") from error


def noise_sensitivity(program: Program, run: Callable[[], torch.Tensor], expected: np.ndarray) -> float:
    """The largest relative change of `run()`'s output from `expected` (its unperturbed value) over
    PERTURBATION_SAMPLES runs with perturbed lowered-layer inputs. Call it where `run` computes the program's output
    (inside `executing_graphs`, and `exported_dtype` for the exported arithmetic)."""
    changes = []
    for seed in range(PERTURBATION_SAMPLES):
        with torch.no_grad(), _perturbed_layer_inputs(program, seed):
            changes.append(_relative(run().float().numpy(), expected))
    return max(changes)


def _relative(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / max(float(np.linalg.norm(expected)), 1e-30))


@contextlib.contextmanager
def _perturbed_layer_inputs(program: Program, seed: int) -> Iterator[None]:
    """Move each element of every lowered layer's float input by PERTURBATION_ULPS epsilons of its dtype, up or down
    at random (seeded), meanwhile (inside `executing_graphs`)."""
    generator = torch.Generator().manual_seed(seed)

    def hook(module, args, kwargs):
        x, *rest = args
        signs = torch.randint(0, 2, x.shape, generator=generator).to(x.device) * 2 - 1
        return (x * (1 + PERTURBATION_ULPS * torch.finfo(x.dtype).eps * signs), *rest), kwargs

    with temporary_hooks() as hooks:
        for module in _lowered(program).values():
            hooks.before(module, hook, with_kwargs=True)
        yield


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
    """Names in the exported module (as torch.onnx names initializers) -> the program's names of the same tensors.
    Every alias: torch.onnx may name a tied tensor (embedding and head) by any of its paths."""
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return {name: program_names[id(tensor)] for name, tensor in named if id(tensor) in program_names}


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
