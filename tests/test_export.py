"""One compile writes every format its `export:` list names, each complete in its own subdirectory of --out."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime
import pytest
import torch
from conftest import save_tiny_model
from programs import logits, relative
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from slimc.backends.checkpoint import WrittenFiles
from slimc.backends.mindie_reader import load_ascend_model
from slimc.backends.vllm import VllmBackend
from slimc.commands.cli import resolve_config_path
from slimc.commands.compile import LAYER_PLOT_FILE, REPORT_FILE, compile_model
from slimc.commands.export import MARKER_FILE
from slimc.config import load_config
from slimc.errors import ExportError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL_CALIBRATION = ["calibration.samples=4", "calibration.seq_len=32", "calibration.batch_size=2"]
EVERY_FORMAT = "export=[{format: mindie}, {format: vllm}, {format: onnx}]"


def test_every_listed_format_is_written_to_its_own_directory_and_reads_back(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model", "qwen3")
    config = load_config(resolve_config_path("llm/w8a8_static.yaml"), [*SMALL_CALIBRATION, EVERY_FORMAT])
    with pytest.warns(UserWarning, match="below the recommended"):
        compiled = compile_model(config, model_path=str(model_dir), out_dir=tmp_path / "out")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(["mindie", "vllm", "onnx", REPORT_FILE, MARKER_FILE, LAYER_PLOT_FILE])
    assert set(json.loads((out / REPORT_FILE).read_text())["outputs"]) == {"mindie", "vllm", "onnx"}
    ids = torch.randint(4, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    expected = logits(compiled.program, ids)
    with torch.no_grad():
        ascend = load_ascend_model(out / "mindie")(input_ids=ids, use_cache=False).logits
        vllm = AutoModelForCausalLM.from_pretrained(out / "vllm").eval()(input_ids=ids, use_cache=False).logits
    onnx_logits = onnxruntime.InferenceSession(str(out / "onnx" / "model.onnx")).run(None, {"input_ids": ids.numpy()})[0]
    assert relative(ascend, expected) < 1e-2
    assert relative(torch.from_numpy(onnx_logits), expected) < 5e-3
    assert torch.nn.functional.cosine_similarity(vllm.flatten(), expected.flatten(), dim=0) > 0.999


def test_a_format_that_fails_leaves_no_output_and_names_itself(tmp_path, caplog):
    # vllm cannot express an online rotation inside fused MoE experts: it refuses after mindie has been written.
    model_dir = save_tiny_model(tmp_path / "model", "qwen3_moe")
    config = load_config(resolve_config_path("llm/w4a8_quarot_gptq.yaml"), [*SMALL_CALIBRATION, EVERY_FORMAT])
    with (pytest.warns(UserWarning, match="below the recommended"),
          pytest.raises(ExportError, match="^vllm: .*online rotation inside fused MoE experts")):
        compile_model(config, model_path=str(model_dir), out_dir=tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.resume", "model"]
    assert "--resume" in caplog.text
    # Only the formats changed, so the committed blocks are reused: the pipeline does not run again.
    without_vllm = load_config(resolve_config_path("llm/w4a8_quarot_gptq.yaml"),
                               [*SMALL_CALIBRATION, "export=[{format: mindie}, {format: onnx}]"])
    with pytest.warns(UserWarning, match="below the recommended"):
        compiled = compile_model(without_vllm, model_path=str(model_dir), out_dir=tmp_path / "out", resume=True)
    assert not (tmp_path / ".out.resume").exists()
    assert sorted(json.loads((tmp_path / "out" / REPORT_FILE).read_text())["outputs"]) == ["mindie", "onnx"]
    ids = torch.randint(4, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ascend = load_ascend_model(tmp_path / "out" / "mindie")(input_ids=ids, use_cache=False).logits
    assert relative(ascend, logits(compiled.program, ids)) < 1e-2


def test_a_format_is_renamed_into_place_only_after_it_verified(tmp_path, monkeypatch):
    """While a format is written and checked it lives under a hidden name; a failed check leaves nothing."""
    seen = []

    def failing_verify(self, program, out_dir):
        seen.append((out_dir.name, (out_dir / "config.json").is_file(), sorted(p.name for p in out_dir.parent.iterdir())))
        raise ExportError("vllm: simulated mismatch")

    monkeypatch.setattr(VllmBackend, "verify", failing_verify)
    model_dir = save_tiny_model(tmp_path / "model", "llama")
    config = load_config(resolve_config_path("llm/w8a8_dynamic.yaml"), [*SMALL_CALIBRATION, EVERY_FORMAT])
    with pytest.warns(UserWarning, match="below the recommended"), pytest.raises(ExportError, match="simulated mismatch"):
        compile_model(config, model_path=str(model_dir), out_dir=tmp_path / "out")
    assert seen == [(".vllm.partial", True, [".vllm.partial", "mindie"])]  # onnx, listed after vllm, never started
    assert not (tmp_path / "out").exists()


def mapped_resident_bytes(path) -> int:
    """Resident bytes of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if len(fields) >= 5 and "-" in fields[0] and ":" in fields[3]:  # a mapping's header line
            inside = fields[-1] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_reading_written_tensors_back_keeps_only_a_bounded_part_of_the_files_mapped(tmp_path):
    """verify reads every written tensor back, block after block; through files kept open the pages read stayed
    mapped, and the process grew by the whole output."""
    tensor_bytes, limit = 2**20, 4 * 2**20
    written = {f"t{i}": torch.full((tensor_bytes // 4,), float(i)) for i in range(32)}
    path = tmp_path / "model.safetensors"
    save_file(written, path)
    files = WrittenFiles(mapped_bytes=limit)
    resident = []
    for name, tensor in written.items():
        assert torch.equal(files.get(path, name), tensor)
        resident.append(mapped_resident_bytes(path))
    assert max(resident) <= limit + 2 * tensor_bytes < len(written) * tensor_bytes  # the kernel maps a little around a read
    assert resident[len(written) // 8] > 0  # the reads did go through mappings
