"""`load_ascend_model` rebuilds every family from its Ascend files: decoder LLMs, multimodal models (checkpoint
names from transformers' save conversion) and diffusers transformers (their state_dict names), computing
what the compiled program computed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from programs import W8A8_DYNAMIC, calibration_ids, context_of, logits, lower_experts, relative, run_pipeline
from safetensors import safe_open
from tiny_diffusion import tiny_transformer, tiny_transformer_inputs
from tiny_dit_frontend import TinyDiT
from tiny_models import tiny_causal_lm
from tiny_multimodal import tiny_multimodal_inputs, tiny_multimodal_model
from torch import nn

from slimc.backends.mindie import MindieBackend
from slimc.backends.mindie_reader import (
    AscendExperts,
    AscendLinear,
    load_ascend_model,
    read_description,
    tensor_types,
)
from slimc.config import config_from_data
from slimc.ir import Program
from slimc.ir.source import ModelSource, resolve_model_source
from slimc.numerics.modules import QuantizedLinear
from slimc.numerics.quant import quantize_weight
from slimc.passes.lower import Lower
from slimc.pipeline import Pipeline
from slimc.report import RunReport
from slimc.schemes import QuantScheme

FAKE_QUANT = [{"pass": "fake_quant", "rules": [{"scheme": "w8"}]}, {"pass": "calibrate"}]
SCHEME = QuantScheme.model_validate(W8A8_DYNAMIC)


def export(program: Program, out: Path) -> Path:
    out.mkdir(parents=True)
    MindieBackend().export(program, out)
    MindieBackend().verify(program, out)
    return out


def lower_blocks(program: Program) -> None:
    for block in program.blocks:
        Lower().run_block(block, context_of(program))


def checkpoint_names(directory: Path) -> set[str]:
    names = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            names.update(f.keys())
    return names


def test_reader_reproduces_the_fake_quantized_llm_compiled_by_the_pipeline(tmp_path):
    model = tiny_causal_lm("llama")
    ids = calibration_ids(model.config.vocab_size, batches=1, seed=5)[0]
    program, _ = run_pipeline(model, [{"pass": "smooth"}, *FAKE_QUANT], {"w8": W8A8_DYNAMIC})
    fake = logits(program, ids)
    lower_blocks(program)
    program.source = ModelSource(path=tmp_path, gguf_file=None, config=model.config, architecture="LlamaForCausalLM")
    model.config.save_pretrained(tmp_path)
    with torch.no_grad():
        read = load_ascend_model(export(program, tmp_path / "mindie"))(input_ids=ids).logits
    assert relative(read, fake) < 1e-5


@pytest.fixture(scope="module", params=["flux", "hunyuan_video", "wan"])
def compiled_dit(request, tmp_path_factory) -> tuple[str, Path, Program, dict, torch.Tensor]:
    """A tiny diffusers transformer saved, compiled W8A8_DYNAMIC by the pipeline (smooth, fake_quant,
    calibrate), its fake-quant output recorded, then lowered and exported."""
    kind = request.param
    directory = tmp_path_factory.mktemp(kind)
    tiny_transformer(kind).save_pretrained(directory / "model")
    source = resolve_model_source(directory / "model")
    frontend = TinyDiT()
    program = frontend.build(source, frontend.load(source, dtype=torch.float32))
    config = config_from_data({"schemes": {"w8": W8A8_DYNAMIC}, "pipeline": [{"pass": "smooth"}, *FAKE_QUANT]})
    Pipeline.from_config(config).run(program, config, [tiny_transformer_inputs(program.model, kind, seed=s) for s in range(2)], RunReport())
    held_out = tiny_transformer_inputs(program.model, kind, seed=7)
    with torch.no_grad(), program.executing_graphs():
        fake = program.model(**held_out)[0]
    lower_blocks(program)
    return kind, export(program, directory / "mindie"), program, held_out, fake


def test_reader_reproduces_the_fake_quantized_diffusers_transformer_compiled_by_the_pipeline(compiled_dit):
    kind, out, _, held_out, fake = compiled_dit
    model = load_ascend_model(out)
    assert type(model).__name__ == {"flux": "FluxTransformer2DModel", "hunyuan_video": "HunyuanVideoTransformer3DModel",
                                    "wan": "WanTransformer3DModel"}[kind]
    assert any(isinstance(m, AscendLinear) for m in model.modules())
    with torch.no_grad():
        assert relative(model(**held_out)[0], fake) < 1e-5


def test_diffusers_outputs_are_named_by_the_models_state_dict(compiled_dit):
    """Every tensor keeps its state_dict name; a Linear behind an explicit smoothing multiply (Wan) is
    written as msModelSlim does: `P.div.mul_scale` beside its own tensors under `P.linear.*`."""
    _, out, program, _, _ = compiled_dit
    multiplied = {n.removesuffix(".div.mul_scale") for n in checkpoint_names(out) if n.endswith(".div.mul_scale")}
    written = {_unnested(n, multiplied) for n in checkpoint_names(out) if not n.endswith(".div.mul_scale")}
    saved = checkpoint_names(program.source.path)
    quantized = {_unnested(n, multiplied) for n, kind in tensor_types(read_description(out)).items() if kind != "FLOAT"}
    assert quantized and {n for n in quantized if n.endswith(".weight")} <= saved
    assert {n for n in written if n not in quantized and not n.endswith((".weight_scale", ".weight_offset"))} <= saved
    assert (len(multiplied) > 0) == (program.source.architecture == "WanTransformer3DModel")


def _unnested(name: str, multiplied: set[str]) -> str:
    prefix = next((p for p in multiplied if name.startswith(f"{p}.linear.")), None)
    return name if prefix is None else f"{prefix}.{name.removeprefix(f'{prefix}.linear.')}"


def lower_every_linear(model: nn.Module, keep: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Every Linear (and fused experts) outside `keep` lowered to W8A8_DYNAMIC by round-to-nearest."""
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if name in keep:
                continue
            if isinstance(module, nn.Linear):
                codes, scale, offset = quantize_weight(module.weight, SCHEME.weight)
                model.set_submodule(name, QuantizedLinear(SCHEME, codes, scale, offset, module.bias, None, module.weight.dtype))
            elif getattr(module, "gate_up_proj", None) is not None and module.gate_up_proj.ndim == 3:
                model.set_submodule(name, lower_experts(module, SCHEME, None))
    return model


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl_moe"])
def test_reader_rebuilds_a_multimodal_model_under_its_transformers_checkpoint_names(kind, tmp_path):
    model = tiny_multimodal_model(kind)
    model.save_pretrained(tmp_path / "model")
    inputs = tiny_multimodal_inputs(model, kind)
    source = ModelSource(path=tmp_path / "model", gguf_file=None, config=model.config, architecture=type(model).__name__)
    lower_every_linear(model)
    out = export(Program(model=model, family="test", source=source, stages=[]), tmp_path / "mindie")
    read = load_ascend_model(out)
    assert any(name.startswith("model.visual.") and isinstance(m, AscendLinear) for name, m in read.named_modules())
    if kind == "qwen3_vl_moe":
        assert any(isinstance(m, AscendExperts) for m in read.modules())
    with torch.no_grad():
        assert relative(read(**inputs).logits, model(**inputs).logits) < 1e-5
    saved = checkpoint_names(tmp_path / "model")
    floats = {n for n, t in tensor_types(read_description(out)).items() if t == "FLOAT"}
    assert floats <= saved  # the float tensors keep the names transformers saves the model under


def test_a_diffusers_model_built_in_bfloat16_keeps_the_modules_its_class_keeps_in_float32(tmp_path):
    """As diffusers' own from_pretrained(torch_dtype=bfloat16) does: Wan's norms, time embedder and
    modulation tables stay float32, the rest becomes bfloat16, and no cast warning is printed."""
    from slimc.ir.source import model_from_config

    tiny_transformer("wan").save_pretrained(tmp_path / "model")
    source = resolve_model_source(tmp_path / "model")
    reference = type(tiny_transformer("wan")).from_pretrained(tmp_path / "model", torch_dtype=torch.bfloat16)
    built = model_from_config(source, dtype=torch.bfloat16)
    assert {n: p.dtype for n, p in built.named_parameters()} == {n: p.dtype for n, p in reference.named_parameters()}


def test_a_diffusers_model_built_in_bfloat16_computes_its_unsaved_buffers_as_from_pretrained_does(tmp_path):
    """Buffers no file holds keep the value the class computes: Wan's float32 rotary tables, rounded through
    bfloat16 on the way, moved a bfloat16 Wan read from its Ascend files 1-7% away from the compiled program."""
    from slimc.ir.source import model_from_config

    tiny_transformer("wan").save_pretrained(tmp_path / "model")
    reference = type(tiny_transformer("wan")).from_pretrained(tmp_path / "model", torch_dtype=torch.bfloat16)
    built = dict(model_from_config(resolve_model_source(tmp_path / "model"), dtype=torch.bfloat16).named_buffers())
    expected = dict(reference.named_buffers())
    assert expected and set(built) == set(expected)
    assert all(built[n].dtype == t.dtype and torch.equal(built[n], t) for n, t in expected.items())
