"""The onnx backend writes a graph that onnxruntime runs and that computes the fake-quant model's output.

Each compiled row is a tiny model compiled with a shipped config (calibration shrunk by --set overrides)
through `export: [{format: onnx}]`, so `verify` already ran once; the tests then read the files with the
format's own reader (onnx / onnxruntime) and compare with the program run through its rewritten graphs.

Tolerance (relative L2 error of onnxruntime's logits against the program's): both compute the same codes and
scales and their float32 kernels differ in summation order only, so an input reproduces to float rounding
(~2e-7, below EXACT) unless a one-ulp difference in front of a quantizer moved a code by one step (or, with
static zero points, QuantizeLinear's `round(x / s) + z` differs from slimc's `round(x / s + z)` at a tie); such
a step moves the tiny models' logits by up to ~3e-3 (ONE_STEP). Of three inputs, at least one must match
exactly and none may differ by more than a step.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import save_tiny_model
from onnx import numpy_helper
from programs import logits, relative
from tiny_diffusion import save_tiny_pipeline, tiny_transformer
from tiny_models import VOCAB_SIZE
from torch import nn

from slimc.backends.onnx import DESCRIPTION_FILE, EXACT_SESSION_CONFIG, MODEL_FILE, OnnxBackend
from slimc.backends.onnx_ops import exporting_custom_ops, translation_table
from slimc.commands.cli import resolve_config_path
from slimc.commands.compile import compile_model
from slimc.config import load_config
from slimc.errors import ExportError
from slimc.frontends.diffusion import DiffusionTransformer
from slimc.ir import Program
from slimc.ir.source import ModelSource
from slimc.numerics.modules import QuantizedExperts, QuantizedLinear
from slimc.schemes import QuantScheme

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = ["calibration.samples=4", "calibration.seq_len=32", "calibration.batch_size=2", "export=[{format: onnx}]"]
DIT_SMALL = ["calibration.samples=2", "calibration.diffusion.steps=2", "calibration.diffusion.max_sequence_length=16",
             "pipeline.0.search_grid=[0.5]", "calibration.diffusion.height=16", "calibration.diffusion.width=16",
             "export=[{format: onnx}]"]
EXACT, ONE_STEP = 1e-5, 5e-3
# (family, shipped config): every family, static and dynamic activations, MoE experts, int4 weights per channel
# (with online rotations) and per group
ROWS = [
    ("llama", "llm/w8a8_dynamic.yaml"), ("llama", "llm/w8a8_static.yaml"), ("qwen2", "llm/w8a8_static.yaml"),
    ("qwen3", "llm/w8a8_dynamic.yaml"), ("qwen3_moe", "llm/w8a8_dynamic.yaml"), ("llama", "llm/w4a8_quarot_gptq.yaml"),
    ("qwen3", "llm/w4a16_gptq.yaml"),
]
# Groups of 16 where the shipped config uses 64: several groups per row of the 64-wide tiny model.
EXTRA = {"llm/w4a16_gptq.yaml": ["schemes.w4a16.weight.group_size=16"]}


@dataclasses.dataclass
class Compiled:
    program: Program
    out: Path  # the onnx output directory

    def graph(self) -> onnx.ModelProto:
        return onnx.load(self.out / MODEL_FILE)

    def session(self) -> onnxruntime.InferenceSession:
        return session(self.out / MODEL_FILE)


def session(path: Path) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    for key, value in EXACT_SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Compile each row once for the module: compiled(family, config) -> Compiled."""
    cache: dict[tuple[str, str], Compiled] = {}

    def get(family: str, config_name: str) -> Compiled:
        if (family, config_name) not in cache:
            root = tmp_path_factory.mktemp(f"{family}-{Path(config_name).stem}")
            model_dir = save_tiny_model(root / "model", family)
            config = load_config(resolve_config_path(config_name), SMALL + EXTRA.get(config_name, []))
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*below the recommended", UserWarning)
                result = compile_model(config, model_path=str(model_dir), out_dir=root / "out")
            cache[(family, config_name)] = Compiled(result.program, root / "out" / "onnx")
        return cache[(family, config_name)]

    return get


def fresh_ids(batch: int = 3, length: int = 21, seed: int = 5) -> torch.Tensor:
    return torch.randint(3, VOCAB_SIZE, (batch, length), generator=torch.Generator().manual_seed(seed))


def lowered(program) -> dict[str, QuantizedLinear | QuantizedExperts]:
    return {n: m for n, m in program.model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedExperts))}


def initializers(graph: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.graph.initializer}


@pytest.mark.parametrize(("family", "config_name"), ROWS)
def test_onnxruntime_reproduces_the_fake_quant_logits(compiled, family, config_name):
    row = compiled(family, config_name)
    run = row.session()
    errors = []
    for seed in range(3):
        ids = fresh_ids(seed=seed)
        actual = torch.from_numpy(run.run(["logits"], {"input_ids": ids.numpy()})[0])
        errors.append(relative(actual, logits(row.program, ids)))
    assert min(errors) < EXACT and max(errors) < ONE_STEP, errors


@pytest.mark.parametrize(("family", "config_name"), ROWS)
def test_every_quantized_weight_is_an_integer_initializer_holding_its_codes(compiled, family, config_name):
    row = compiled(family, config_name)
    stored = initializers(row.graph())
    with row.program.reading(*row.program.blocks):  # a streamed compile spilled them
        for name, module in lowered(row.program).items():
            if isinstance(module, QuantizedExperts):  # fused experts keep their (E, out, in) int8 layout
                for which in ("gate_up_proj", "down_proj"):
                    tensor = stored[f"{name}.{which}"]
                    assert tensor.data_type == onnx.TensorProto.INT8
                    assert np.array_equal(numpy_helper.to_array(tensor), getattr(module, which).numpy())
                continue
            tensor = stored[f"{name}.weight"]
            expected_type = onnx.TensorProto.INT4 if module.scheme.weight.dtype == "int4" else onnx.TensorProto.INT8
            assert tensor.data_type == expected_type
            assert np.array_equal(numpy_helper.to_array(tensor).astype(np.int8), module.weight.numpy().T)  # (in, out)
    assert not [t.name for t in stored.values() if t.name.endswith(("proj.weight", "_proj")) and t.data_type == onnx.TensorProto.FLOAT]


def test_static_activations_are_quantize_dequantize_pairs_with_the_stored_scale_and_zero_point(compiled):
    row = compiled("llama", "llm/w8a8_static.yaml")
    graph = row.graph()
    stored = initializers(graph)
    ops = Counter(node.op_type for node in graph.graph.node)
    static = {n: m for n, m in lowered(row.program).items() if m.scheme.act is not None and not m.scheme.act.dynamic}
    dynamic = set(lowered(row.program)) - set(static)
    assert static and dynamic  # the shipped config keeps down_proj dynamic
    assert ops["QuantizeLinear"] == len(static)
    assert ops["MatMulInteger"] == len(dynamic)
    scales = {(float(numpy_helper.to_array(stored[n.input[1]])), int(numpy_helper.to_array(stored[n.input[2]])))
              for n in graph.graph.node if n.op_type == "QuantizeLinear"}
    with row.program.reading(*row.program.blocks):  # a streamed compile spilled them
        assert scales == {(float(m.input_scale), int(m.input_offset) + 128) for m in static.values()}  # uint8 codes
    for node in (n for n in graph.graph.node if n.op_type == "QuantizeLinear"):
        readers = [n.op_type for n in graph.graph.node if node.output[0] in n.input]
        assert readers == ["DequantizeLinear"]


def test_dynamic_activations_are_quantized_per_token_into_matmulinteger(compiled):
    row = compiled("qwen3", "llm/w8a8_dynamic.yaml")
    graph = row.graph()
    ops = Counter(node.op_type for node in graph.graph.node)
    assert ops["MatMulInteger"] == len(lowered(row.program))
    assert ops["QuantizeLinear"] == 0 and ops["DequantizeLinear"] == 0
    stored = initializers(graph)
    producers = {output: node for node in graph.graph.node for output in node.output}
    for node in (n for n in graph.graph.node if n.op_type == "MatMulInteger"):
        activation, weight, activation_zero_point, weight_zero_point = node.input
        for operand, zero_point in ((activation, activation_zero_point), (weight, weight_zero_point)):
            # both int8 operands shifted to uint8: uint8 x int8 saturates on x86 CPUs without VNNI
            assert producers[operand].op_type == "Cast"
            assert onnx.helper.get_node_attr_value(producers[operand], "to") == onnx.TensorProto.UINT8
            assert numpy_helper.to_array(stored[zero_point]) == 128
        shift = producers[producers[weight].input[0]]
        assert shift.op_type == "Add" and stored[producers[shift.input[0]].input[0]].data_type == onnx.TensorProto.INT8


def test_the_integer_matmul_is_exact_for_codes_at_the_ends_of_the_int8_range(tmp_path):
    """Activations and weights of +-127 make every pair of products overflow a 16-bit sum: the case a uint8 x int8
    kernel gets wrong on AVX2-only CPUs. onnxruntime must reproduce the layer to float rounding."""
    scheme = QuantScheme.model_validate({"weight": {"dtype": "int8"},
                                         "act": {"dtype": "int8", "granularity": "per_token", "dynamic": True}})
    generator = torch.Generator().manual_seed(0)
    codes = torch.where(torch.rand(32, 64, generator=generator) < 0.5, -127, 127)
    layer = nn.Sequential(QuantizedLinear(scheme, codes, torch.full((32, 1), 1e-3), torch.zeros(32, 1), None, None,
                                          torch.float32)).eval()
    x = torch.where(torch.rand(2, 5, 64, generator=generator) < 0.5, -1.0, 1.0)
    with exporting_custom_ops(layer, integer=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(layer, (x,), tmp_path / "layer.onnx", input_names=["x"], dynamo=True, opset_version=21,
                          custom_translation_table=translation_table(), optimize=False, verbose=False)
    actual = session(tmp_path / "layer.onnx").run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        assert relative(torch.from_numpy(actual), layer(x)) < EXACT


def test_without_integer_matmul_dynamic_activations_are_fake_quantized_before_dequantized_weights(compiled, tmp_path):
    row = compiled("llama", "llm/w8a8_dynamic.yaml")
    backend = OnnxBackend(integer_matmul=False)
    backend.export(row.program, tmp_path)
    backend.verify(row.program, tmp_path)
    ops = Counter(node.op_type for node in onnx.load(tmp_path / MODEL_FILE).graph.node)
    assert ops["MatMulInteger"] == 0 and ops["DequantizeLinear"] == len(lowered(row.program))
    ids = fresh_ids()
    actual = torch.from_numpy(session(tmp_path / MODEL_FILE).run(["logits"], {"input_ids": ids.numpy()})[0])
    assert relative(actual, logits(row.program, ids)) < ONE_STEP


def test_the_prefill_graph_takes_any_batch_and_sequence_length(compiled):
    row = compiled("llama", "llm/w8a8_dynamic.yaml")
    (input_ids,) = row.graph().graph.input
    assert [d.dim_param for d in input_ids.type.tensor_type.shape.dim] == ["batch", "sequence"]
    run = row.session()
    for shape in [(1, 7), (4, 33)]:
        ids = fresh_ids(*shape)
        actual = torch.from_numpy(run.run(["logits"], {"input_ids": ids.numpy()})[0])
        assert actual.shape == (*shape, VOCAB_SIZE)
        assert relative(actual, logits(row.program, ids)) < ONE_STEP


def test_a_last_logits_graph_returns_the_last_positions_logits_only(compiled, tmp_path):
    row = compiled("qwen2", "llm/w8a8_static.yaml")
    backend = OnnxBackend(logits="last")
    backend.export(row.program, tmp_path)
    backend.verify(row.program, tmp_path)
    ids = fresh_ids()
    actual = torch.from_numpy(session(tmp_path / MODEL_FILE).run(["logits"], {"input_ids": ids.numpy()})[0])
    assert actual.shape == (3, 1, VOCAB_SIZE)
    assert relative(actual, logits(row.program, ids)[:, -1:]) < ONE_STEP


def test_the_output_holds_the_model_files_and_describes_its_inputs_outputs_and_layers(compiled):
    row = compiled("llama", "llm/w8a8_static.yaml")
    files = {p.name for p in row.out.iterdir()}
    assert {MODEL_FILE, DESCRIPTION_FILE, "config.json", "tokenizer.json"} <= files
    description = json.loads((row.out / DESCRIPTION_FILE).read_text())
    assert description["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}]
    assert description["outputs"] == [{"name": "logits", "dtype": "float", "shape": ["batch", "sequence", VOCAB_SIZE]}]
    layers = description["layers"]
    assert set(layers) == set(lowered(row.program))
    assert layers["model.layers.0.self_attn.q_proj"]["ops"].startswith("QuantizeLinear")
    assert layers["model.layers.0.mlp.down_proj"]["ops"].startswith("per-token quantization subgraph -> MatMulInteger")


def test_external_data_keeps_the_weights_beside_the_graph(compiled, tmp_path):
    row = compiled("llama", "llm/w8a8_dynamic.yaml")
    backend = OnnxBackend(external_data=True)
    backend.export(row.program, tmp_path)
    graph = onnx.load(tmp_path / MODEL_FILE, load_external_data=False)
    weights = [t for t in graph.graph.initializer if t.name.endswith("proj.weight")]
    assert weights and all(t.data_location == onnx.TensorProto.EXTERNAL for t in weights)
    assert {entry.value for t in weights for entry in t.external_data if entry.key == "location"} == {"model.onnx.data"}
    backend.verify(row.program, tmp_path)


def test_verify_reports_the_measured_difference_when_the_file_computes_something_else(compiled, tmp_path):
    row = compiled("llama", "llm/w8a8_dynamic.yaml")
    shutil.copytree(row.out, tmp_path / "out")
    graph = row.graph()
    norm = initializers(graph)["model.norm.weight"]
    norm.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(norm) * 1.5, norm.name))
    onnx.save(graph, tmp_path / "out" / MODEL_FILE)
    with pytest.raises(ExportError, match=r"onnxruntime's logits differs from the program's by [0-9.e-]+ relative"):
        OnnxBackend().verify(row.program, tmp_path / "out")


def test_verify_refuses_weights_that_are_not_the_programs_codes(compiled, tmp_path):
    row = compiled("llama", "llm/w8a8_dynamic.yaml")
    shutil.copytree(row.out, tmp_path / "out")
    graph = row.graph()
    weight = initializers(graph)["model.layers.1.mlp.up_proj.weight"]
    weight.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(weight), weight.name))
    onnx.save(graph, tmp_path / "out" / MODEL_FILE)
    with pytest.raises(ExportError, match="model.layers.1.mlp.up_proj.weight holds other codes than the program's"):
        OnnxBackend().verify(row.program, tmp_path / "out")


def test_a_tiny_flux_transformer_exports_and_onnxruntime_matches_it(tmp_path):
    pipeline_dir = save_tiny_pipeline("flux", tmp_path / "flux", weight_std=0.3)
    config = load_config(resolve_config_path("flux/w8a8.yaml"), DIT_SMALL)
    program = compile_model(config, model_path=str(pipeline_dir), out_dir=tmp_path / "out").program
    out = tmp_path / "out" / "onnx"
    graph = onnx.load(out / MODEL_FILE)
    assert Counter(n.op_type for n in graph.graph.node)["MatMulInteger"] == len(lowered(program))
    # Other inputs than the traced sample: a 6x6 latent grid, 11 text tokens, batch 3.
    generator = torch.Generator().manual_seed(3)
    rows, cols = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    inputs = {
        "hidden_states": torch.randn(3, 36, 16, generator=generator),
        "encoder_hidden_states": torch.randn(3, 11, 32, generator=generator),
        "pooled_projections": torch.randn(3, 32, generator=generator),
        "timestep": torch.full((3,), 0.002), "img_ids": torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float(),
        "txt_ids": torch.zeros(11, 3), "guidance": torch.full((3,), 0.002),
    }
    actual = session(out / MODEL_FILE).run(["sample"], {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad(), program.executing_graphs():
        expected = program.model(**inputs, joint_attention_kwargs={}, return_dict=False)[0]
    assert relative(torch.from_numpy(actual), expected) < ONE_STEP


def test_programs_without_an_onnx_graph_raise_an_export_error_naming_the_alternative(compiled, tmp_path):
    hunyuan = tiny_transformer("hunyuan_video")
    source = ModelSource(path=tmp_path, gguf_file=None, config=dict(hunyuan.config), library="diffusers",
                         architecture=type(hunyuan).__name__)
    with pytest.raises(ExportError, match="not HunyuanVideoTransformer3DModel; export it with mindie"):
        OnnxBackend().export(DiffusionTransformer().build(source, hunyuan), tmp_path)
    vision_language = dataclasses.replace(compiled("llama", "llm/w8a8_dynamic.yaml").program, family="multimodal")
    with pytest.raises(ExportError, match="not a 'multimodal' program .*; export it with mindie or vllm"):
        OnnxBackend().export(vision_language, tmp_path)


def test_the_onnxruntime_example_in_the_docs_runs_on_an_export(compiled, monkeypatch):
    text = (Path(__file__).resolve().parent.parent / "docs" / "formats" / "onnx.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    row = compiled("llama", "llm/w8a8_dynamic.yaml")
    monkeypatch.chdir(row.out.parent.parent)  # the example reads out/onnx/
    namespace: dict = {}
    exec(compile(code, "onnx.md", "exec"), namespace)
    assert namespace["logits"].shape[-1] == VOCAB_SIZE
