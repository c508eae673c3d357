"""The onnx backend on shapes the default tiny models do not reach, in float32, bfloat16 and float16.

The model is a tiny Qwen3 of ODD_SIZES (GQA 3:1, head_dim 32 where hidden / heads is 40, Hadamard orders 240 and
352 that are not powers of two) with tied embeddings, compiled with shipped configs through
`export: [{format: onnx}]`, so `verify` ran once. The tests then run the file with onnxruntime on other inputs.

Reference: the program run through its rewritten graphs in float32 (`exported_dtype`), which is what the graph
computes for every model dtype. Tolerance, per output: float32 kernels that sum in other orders can move an
activation code by one step where a value sits at a rounding boundary, which later layers carry (an int4 code
moves logits by percents); so each input must be within what verify accepts for it (twice the program's own
change under float32 noise), and most positions must match exactly (EXACT): a code step changes its own
position and the later ones of its sequence, a wrong graph every position.
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import numpy_helper
from programs import logits, relative
from tiny_models import ODD_SIZES, VOCAB_SIZE, tiny_causal_lm
from tiny_tokenizer import tiny_tokenizer

from slimc.backends.onnx import EXACT_SESSION_CONFIG, MODEL_FILE, OnnxBackend, noise_sensitivity
from slimc.backends.onnx_dtype import exported_dtype
from slimc.commands.cli import resolve_config_path
from slimc.commands.compile import compile_model
from slimc.config import load_config
from slimc.errors import ExportError
from slimc.ir import Program

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = ["calibration.samples=4", "calibration.seq_len=32", "calibration.batch_size=2", "export=[{format: onnx}]"]
EXACT = 1e-5
W8A8, W4A4 = "llm/w8a8_dynamic.yaml", "llm/w4a4_quarot_gptq.yaml"  # W4A4: rotated (R1, R2, online Hadamard 352)
EXTRA = {W8A8: ["pipeline.0.search_grid=[0.5]"]}  # one smoothing strength: the search does not change the graph
ROWS = [(torch.float32, W8A8), (torch.float32, W4A4), (torch.bfloat16, W8A8), (torch.bfloat16, W4A4),
        (torch.float16, W8A8)]


@dataclasses.dataclass
class Compiled:
    program: Program
    out: Path  # the onnx output directory


def session(path: Path) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    for key, value in EXACT_SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Compile each (dtype, config) once for the module: compiled(dtype, config) -> Compiled."""
    cache: dict[tuple[torch.dtype, str], Compiled] = {}

    def get(dtype: torch.dtype, config_name: str) -> Compiled:
        if (dtype, config_name) not in cache:
            root = tmp_path_factory.mktemp(f"odd-{str(dtype).removeprefix('torch.')}-{Path(config_name).stem}")
            tiny_causal_lm("qwen3", sizes=ODD_SIZES, tie_word_embeddings=True, dtype=dtype).save_pretrained(root / "model")
            tiny_tokenizer().save_pretrained(root / "model")
            config = load_config(resolve_config_path(config_name), SMALL + EXTRA.get(config_name, []))
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*below the recommended", UserWarning)
                result = compile_model(config, model_path=str(root / "model"), out_dir=root / "out")
            cache[(dtype, config_name)] = Compiled(result.program, root / "out" / "onnx")
        return cache[(dtype, config_name)]

    return get


def fresh_ids(seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB_SIZE, (3, 21), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("dtype", "config_name"), ROWS)
def test_odd_shapes_export_and_onnxruntime_reproduces_the_program_on_other_inputs(compiled, dtype, config_name):
    row = compiled(dtype, config_name)
    run, backend = session(row.out / MODEL_FILE), OnnxBackend()
    errors, accepted, positions = [], [], []
    with exported_dtype(row.program):
        for seed in range(3):
            ids = fresh_ids(seed)
            expected = logits(row.program, ids)
            actual = torch.from_numpy(run.run(["logits"], {"input_ids": ids.numpy()})[0])
            errors.append(relative(actual, expected))
            positions.append((actual - expected).norm(dim=-1) / expected.norm(dim=-1))
            sensitivity = noise_sensitivity(row.program, lambda ids=ids: logits(row.program, ids), expected.numpy())
            accepted.append(backend.accepted(sensitivity))
    assert all(error <= bound for error, bound in zip(errors, accepted)), (errors, accepted)
    assert torch.cat(positions).flatten().median() < EXACT, errors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_is_a_float32_graph_and_the_program_keeps_its_dtype(compiled, dtype):
    row = compiled(dtype, W8A8)
    graph = onnx.load(row.out / MODEL_FILE).graph
    floats = {t.data_type for t in graph.initializer} - {onnx.TensorProto.INT8, onnx.TensorProto.INT4,
                                                          onnx.TensorProto.INT32, onnx.TensorProto.INT64,
                                                          onnx.TensorProto.UINT8}
    assert floats == {onnx.TensorProto.FLOAT}
    assert [o.type.tensor_type.elem_type for o in graph.output] == [onnx.TensorProto.FLOAT]
    assert row.program.dtype == dtype
    ids = fresh_ids(7)
    before = logits(row.program, ids)  # runs the blocks' graphs, which accept the model's dtype again
    (row.out.parent / "again").mkdir()
    OnnxBackend().export(row.program, row.out.parent / "again")
    assert before.dtype == dtype and torch.equal(logits(row.program, ids), before)


def test_tied_embeddings_are_stored_once(compiled):
    row = compiled(torch.float32, W8A8)
    names = [t.name for t in onnx.load(row.out / MODEL_FILE).graph.initializer]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names


def scaled_norms(row: Compiled, factor: float, out: Path) -> Path:
    """A copy of the row's export whose layer norm weights are multiplied by `factor`."""
    shutil.copytree(row.out, out)
    graph = onnx.load(out / MODEL_FILE)
    for tensor in (t for t in graph.graph.initializer if t.name.endswith("layernorm.weight")):
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(factor), tensor.name))
    onnx.save(graph, out / MODEL_FILE)
    return out


def test_verify_accepts_float_noise_that_moves_activation_codes(compiled, tmp_path):
    """Norm weights moved by 1e-6 move int4 activation codes of the bfloat16 W4A4 graph, so its logits differ by
    more than the fixed floor; each output's derived tolerance accepts it."""
    row = compiled(torch.bfloat16, W4A4)
    out = scaled_norms(row, 1 + 1e-6, tmp_path / "noise")
    run = session(out / MODEL_FILE)
    with exported_dtype(row.program):
        moved = [relative(torch.from_numpy(run.run(["logits"], {"input_ids": ids.numpy()})[0]), logits(row.program, ids))
                 for ids in map(fresh_ids, range(3))]
    assert max(moved) > OnnxBackend().tolerance, moved
    OnnxBackend().verify(row.program, out)


def test_verify_refuses_norm_weights_one_percent_off(compiled, tmp_path):
    row = compiled(torch.float32, W4A4)
    out = scaled_norms(row, 1.01, tmp_path / "wrong")
    with pytest.raises(ExportError, match="onnxruntime's logits differs from the program's"):
        OnnxBackend().verify(row.program, out)
