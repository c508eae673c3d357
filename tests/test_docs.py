"""The documentation's examples run as written."""

import re
import sys
from pathlib import Path

import torch
from programs import W8A8_DYNAMIC, run_pipeline
from tiny_models import tiny_causal_lm

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_the_custom_pass_in_the_docs_runs_by_its_dotted_path(tmp_path, monkeypatch):
    text = (DOCS / "passes.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "mypasses.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mypasses", None)
    model = tiny_causal_lm("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 50.0
    pipeline = [
        {"pass": "mypasses:ClipWeightOutliers", "sigmas": 5.0},
        {"pass": "fake_quant", "rules": [{"scheme": "w8a8_dynamic"}]},
        {"pass": "calibrate"},
        {"pass": "lower"},
    ]
    program, report = run_pipeline(model, pipeline, {"w8a8_dynamic": W8A8_DYNAMIC})
    assert "clipped model.layers.0.mlp.up_proj" in report.notes
    assert program.blocks[0].module.mlp.up_proj.dequantized_weight()[0, 0] < 40.0  # clipped from 50


def test_the_python_api_example_runs_on_a_model_from_the_hub_cache(tmp_path, monkeypatch, tiny_llama_dir, capsys):
    """docs/api.md's example as written, its Hub model a tiny Llama in an offline cache."""
    from hub_cache import cache_model, use_hub_cache

    code = re.search(r"```python\n(.*?)```", (DOCS / "api.md").read_text(), re.S).group(1)
    model_id = re.search(r'model = "([^"]+)"', code).group(1)
    cache_model(use_hub_cache(monkeypatch, tmp_path / "hub"), model_id, tiny_llama_dir)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/api.md", "exec"), {})
    printed = capsys.readouterr().out
    assert {"mindie", "vllm", "onnx", "slimc_report.json"} <= {p.name for p in (tmp_path / "smollm2-w8a8").iterdir()}
    assert [line.split(":")[0] for line in printed.splitlines() if "perplexity" in line] == ["mindie", "vllm", "onnx"]
