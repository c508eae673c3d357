"""Building and compiling Programs in memory, for tests of passes and patterns; lowered Programs built without the
passes, for tests of backends and readers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from module_calls import module_calls
from tiny_models import tiny_causal_lm
from torch import nn

from slimc.backends.mindie import MindieBackend
from slimc.config import config_from_data
from slimc.frontends.llm import DecoderLLM
from slimc.ir import Program
from slimc.ir.source import ModelSource
from slimc.numerics.modules import QuantizedExperts, QuantizedLinear, float_matmuls
from slimc.numerics.quant import act_range, qparams_from_range, quantize_weight
from slimc.pipeline import Context, Pipeline
from slimc.report import RunReport
from slimc.schemes import QuantScheme, TensorScheme

W8A8_DYNAMIC = {
    "weight": {"dtype": "int8", "granularity": "per_channel"},
    "act": {"dtype": "int8", "granularity": "per_token", "dynamic": True},
}
W8A8_STATIC = {
    "weight": {"dtype": "int8", "granularity": "per_channel"},
    "act": {"dtype": "int8", "granularity": "per_tensor", "symmetric": False},
}
# Token ids on which the export tests compare a written checkpoint's logits with its program's.
CHECK_IDS = torch.randint(4, 512, (2, 20), generator=torch.Generator().manual_seed(3))


def llm_program(model) -> Program:
    """The Program of a tiny LLM as the LLM frontend cuts it: its decoder layers are the blocks."""
    source = ModelSource(path=Path("."), gguf_file=None, config=model.config, architecture=type(model).__name__)
    return DecoderLLM().build(source, model)


def calibration_ids(vocab_size: int, *, batches: int = 2, batch_size: int = 2, seq_len: int = 24, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab_size, (batch_size, seq_len), generator=generator) for _ in range(batches)]


def run_pipeline(model, pipeline: list[dict], schemes: dict | None = None, batches: list[torch.Tensor] | None = None, **config):
    """Trace and run `pipeline` on the model's blocks; returns (program, report)."""
    program = llm_program(model)
    cfg = config_from_data({"schemes": schemes or {}, "pipeline": pipeline, **config})
    batches = batches if batches is not None else calibration_ids(model.config.vocab_size)
    report = RunReport()
    Pipeline.from_config(cfg).run(program, cfg, [{"input_ids": ids} for ids in batches], report)
    return program, report


def context_of(program: Program) -> Context:
    """A pass context with an empty config, for running one pass by hand."""
    return Context(program, config_from_data({}), [], RunReport())


@torch.no_grad()
def logits(program: Program, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits, computed through the blocks' (rewritten) graphs."""
    with program.executing_graphs():
        return program.model(input_ids=ids, use_cache=False).logits


@contextlib.contextmanager
def simulating_in_float(program: Program) -> Iterator[None]:
    """Within: the program's lowered layers multiply dequantized values in float32 (`float_matmuls`), as
    compressed-tensors' simulation of a scheme in transformers does, instead of summing integer products (which
    differ by float32 rounding, and a code a layer later can round the other way on it)."""
    with contextlib.ExitStack() as stack:
        for block in program.blocks:
            stack.enter_context(float_matmuls(block.module if block.traced is None else block.graph_module))
        yield


def simulated_logits(program: Program, ids: torch.Tensor) -> torch.Tensor:
    """`logits` with float matmuls (`simulating_in_float`)."""
    with simulating_in_float(program):
        return logits(program, ids)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two outputs, computed in float32 (bfloat16 arithmetic is off in the third digit)."""
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


def rounding_bound(program: Program, inputs: dict, floor: float) -> float:
    """How far another computation of the program's logits may fairly be: the larger of `floor` and twice the
    logits' relative change on `inputs` when every embedding moves by one epsilon of the model's dtype (random signs), the
    pipeline's equivalence-check rule applied to the whole model. Static activation quantizers in bfloat16
    amplify rounding differences into different integer codes; float32 programs stay near `floor`."""
    table = program.model.get_input_embeddings().weight
    signs = torch.randint(0, 2, table.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    original = table.detach().clone()
    with torch.no_grad(), program.executing_graphs():
        expected = program.model(**inputs, use_cache=False).logits
        table.copy_(original.float() * (1 + torch.finfo(table.dtype).eps * signs))
        moved = program.model(**inputs, use_cache=False).logits
        table.copy_(original)
    return max(floor, 2 * relative(moved, expected))


# --- lowered Programs without the passes ------------------------------------------------------------------


def token_ids(seed: int = 0) -> torch.Tensor:
    """(2, 12) token ids of the tiny models' vocabulary."""
    return torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(seed))


def _static_qparams(x: torch.Tensor, scheme: TensorScheme) -> tuple[torch.Tensor, torch.Tensor]:
    return qparams_from_range(*act_range(x, scheme), scheme)


def _first_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """The first positional input of every Linear and fused-experts module at its first call, on token_ids(seed=99)."""
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) or hasattr(m, "gate_up_proj")]
    seen: dict[str, torch.Tensor] = {}
    for name, args, _, _ in module_calls(modules, lambda: model(token_ids(seed=99))):
        seen.setdefault(name, args[0].detach())
    return seen


@torch.no_grad()
def lower(model: nn.Module, scheme_for) -> nn.Module:
    """Replace Linears (and fused experts) for which scheme_for(name) gives a scheme by their lowered modules."""
    inputs = _first_inputs(model)
    for name, module in list(model.named_modules()):
        scheme = scheme_for(name)
        if scheme is None:
            continue
        static = scheme.act is not None and not scheme.act.dynamic
        if isinstance(module, nn.Linear):
            codes, scale, offset = quantize_weight(module.weight, scheme.weight)
            qparams = _static_qparams(inputs[name], scheme.act) if static else None
            new = QuantizedLinear(scheme, codes, scale, offset, module.bias, qparams, module.weight.dtype)
        elif hasattr(module, "gate_up_proj"):
            new = lower_experts(module, scheme, inputs[name] if static else None)
        else:
            continue
        model.set_submodule(name, new)
    return model


def lower_experts(experts: nn.Module, scheme: QuantScheme, hidden: torch.Tensor | None) -> QuantizedExperts:
    """Fused experts lowered by round-to-nearest; static input scales from `hidden`, their input, when given."""
    tensors = {}
    for which in ("gate_up_proj", "down_proj"):
        weight = getattr(experts, which)
        quantized = [quantize_weight(weight[e], scheme.weight) for e in range(weight.shape[0])]
        for i, suffix in enumerate(("", "_scale", "_offset")):
            tensors[which + suffix] = torch.stack([q[i] for q in quantized])
    if hidden is not None:
        gate_up_q, down_q = [], []
        for e in range(experts.gate_up_proj.shape[0]):
            gate, up = (hidden.float() @ experts.gate_up_proj[e].float().T).chunk(2, dim=-1)
            gate_up_q.append(_static_qparams(hidden, scheme.act))
            down_q.append(_static_qparams(experts.act_fn(gate) * up, scheme.act))
        for stem, qs in (("gate_up", gate_up_q), ("down", down_q)):
            tensors[f"{stem}_input_scale"] = torch.cat([q[0].reshape(1) for q in qs])
            tensors[f"{stem}_input_offset"] = torch.cat([q[1].reshape(1) for q in qs])
    return QuantizedExperts(scheme, experts.act_fn, experts.gate_up_proj.dtype, tensors)


def program_of(model: nn.Module, tmp_path: Path, **fields) -> Program:
    """A Program of an already lowered `model` as a backend takes it: no stages; its config.json saved under
    tmp_path/source, where the exports read it."""
    source_dir = tmp_path / "source"
    source_dir.mkdir(exist_ok=True)
    model.config.save_pretrained(source_dir)
    source = ModelSource(path=source_dir, gguf_file=None, config=model.config, architecture=model.config.architectures[0])
    return Program(model=model, family="llm", source=source, stages=[], **fields)


def compiled_to_mindie(model: nn.Module, pipeline: list[dict], schemes: dict, directory: Path) -> tuple[Program, Path]:
    """`model` compiled by `pipeline` and exported by the mindie backend to directory/mindie (its config.json saved in
    `directory`, where the export reads it): (program, out)."""
    program, _ = run_pipeline(model, pipeline, schemes)
    program.source = ModelSource(path=directory, gguf_file=None, config=model.config, architecture=type(model).__name__)
    model.config.save_pretrained(directory)
    out = directory / "mindie"
    out.mkdir()
    MindieBackend().export(program, out)
    return program, out


def everything_but_head(scheme: QuantScheme):
    return lambda name: scheme if name.startswith("model.layers.") else None


def quantized_model(family: str, scheme_for, **kwargs) -> nn.Module:
    """A tiny `family` model with the layers `scheme_for` names lowered (without the passes)."""
    model = tiny_causal_lm(family, **kwargs)
    model.config.architectures = [type(model).__name__]
    return lower(model, scheme_for)
