"""`slimc compile` with a `tune:` section: layers fall back in the order analyze ranks them until the target is met,
or the size budget stops it with exit 1; the report says which layers fell back, why, and what it cost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_runs import assert_user_error, slimc
from test_streaming import same_files
from tiny_models import tiny_causal_lm
from tiny_tokenizer import tiny_tokenizer

import slimc.commands.evaluate as evaluate_module
from slimc.commands.analyze import LayerSensitivity
from slimc.commands.compile import compile_model
from slimc.commands.evaluate import evaluate
from slimc.commands.tune import next_moves, tune_compile, with_fallbacks
from slimc.config import load_config, with_evaluation
from slimc.frontends.mix import text_windows
from slimc.ir.source import resolve_model_source

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EVALUATION = {"dataset": "builtin:text-eval", "samples": 4, "seq_len": 32}


def config_text(tune: str, rules: str = '[{scheme: w4a4, include: ["*"], exclude: ["lm_head"]}]') -> str:
    """W4A4 dynamic (Ascend W4A4_DYNAMIC) on every Linear but the head (or as `rules` say), with the `tune:` section."""
    return f"""
version: 2
model: {{family: auto, dtype: float32}}
calibration: {{dataset: "builtin:text", samples: 4, seq_len: 32, batch_size: 2}}
evaluation: {{dataset: "{EVALUATION['dataset']}", samples: {EVALUATION['samples']}, seq_len: {EVALUATION['seq_len']}, batch_size: 2}}
schemes:
  w4a4:
    weight: {{dtype: int4, granularity: per_channel, symmetric: true}}
    act: {{dtype: int4, granularity: per_token, symmetric: true, dynamic: true}}
  w8:
    weight: {{dtype: int8, granularity: per_channel, symmetric: true}}
pipeline:
  - pass: fake_quant
    rules: {rules}
  - pass: calibrate
  - pass: lower
export: [{{format: mindie}}]
tune: {tune}
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny Llama trained to predict the evaluation windows: its perplexity on them is near 1, so the noise
    quantization adds raises it (a random model's perplexity moves either way)."""
    path = tmp_path_factory.mktemp("tune") / "model"
    tokenizer = tiny_tokenizer()
    ids, _ = text_windows(tokenizer, EVALUATION["dataset"], samples=EVALUATION["samples"],
                          seq_len=EVALUATION["seq_len"], recommended=None)
    lm = tiny_causal_lm("llama").train()
    optimizer = torch.optim.Adam(lm.parameters(), lr=1e-2)
    for _ in range(40):
        loss = lm(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    lm.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write(directory: Path, text: str) -> Path:
    path = directory / "config.yaml"
    path.write_text(text)
    return path


def quant_types(out: Path) -> dict[str, str]:
    """Each Linear's quant type in the written Ascend description (its own reader's key)."""
    description = json.loads((out / "mindie" / "quant_model_description.json").read_text())
    return {key.removesuffix(".weight"): value for key, value in description.items()
            if key.endswith("proj.weight")}


def analysis_ranking(model: Path, config: Path, out: Path) -> list[str]:
    result = slimc("analyze", config, "--model", model, "--out", out)
    assert result.returncode == 0, result.stderr
    return [layer["name"] for layer in json.loads((out / "analysis.json").read_text())["layers"]]


def test_a_target_that_needs_fallback_moves_the_ranked_layers_and_meets_it(model, tmp_path):
    config = write(tmp_path, config_text("{dataset: builtin:text-eval, max_ppl_increase: 0.001, fallback: [float], step: 2, max_rounds: 4, "
                                         "max_size_increase: 1.0}"))
    out = tmp_path / "out"
    result = slimc("compile", config, "--model", model, "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr
    tune = json.loads((out / "slimc_report.json").read_text())["tune"]
    rounds = tune["rounds"]
    assert tune["met"] and tune["chosen_round"] == rounds[-1]["round"] > 0
    assert all(entry["ppl_increase"] > 0.001 for entry in rounds[:-1])  # it went on only while above the target
    assert rounds[-1]["ppl_increase"] <= 0.001
    fallen = [item["layer"] for item in tune["fallen_back"]]
    assert len(fallen) == 2 * tune["chosen_round"]
    assert fallen == analysis_ranking(model, config, tmp_path / "analysis")[:len(fallen)]  # analyze's order
    assert all(item["to"] == "float" and f"rank {item['rank']} of 14" in item["reason"] for item in tune["fallen_back"])
    written = quant_types(out)
    assert {name for name, kind in written.items() if kind == "FLOAT"} == set(fallen)
    assert {kind for name, kind in written.items() if name not in fallen} == {"W4A4_DYNAMIC"}
    assert tune["size_cost_bytes"] == rounds[-1]["size_bytes"] - rounds[0]["size_bytes"] > 0
    assert tune["outcome"].startswith("target met")
    assert f"tune: {tune['outcome']}" in result.stdout


def test_an_unreachable_target_stops_at_the_size_budget_with_exit_1_and_keeps_the_best_round(model, tmp_path):
    config = write(tmp_path, config_text("{dataset: builtin:text-eval, max_ppl_increase: 0.000001, fallback: [float], step: 2, max_rounds: 8, "
                                         "max_size_increase: 0.1}"))
    out = tmp_path / "out"
    result = slimc("compile", config, "--model", model, "--out", out)
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads((out / "slimc_report.json").read_text())
    tune = report["tune"]
    rounds = tune["rounds"]
    assert not tune["met"] and not rounds[-1]["within_size_budget"] and len(rounds) < 8
    assert "max_size_increase" in tune["stopped"]
    within = [entry for entry in rounds if entry["within_size_budget"]]
    best = min(within, key=lambda entry: entry["ppl_increase"])
    assert tune["chosen_round"] == best["round"]
    assert report["evaluation"]["quantized"]["mindie"]["relative_change"] == pytest.approx(best["ppl_increase"])
    assert sum(kind == "FLOAT" for kind in quant_types(out).values()) == best["fallen_back"]
    assert tune["outcome"].startswith("target NOT met")
    assert "the target was not met" in result.stdout


def test_a_round_reuses_the_blocks_before_its_first_changed_one_and_writes_what_a_fresh_compile_writes(model, tmp_path):
    # block 0 in int8 weights only (little error, ranked last), block 1 in W4A4: the fallbacks are all in block 1
    rules = '[{scheme: w8, include: ["*layers.0.*"]}, {scheme: w4a4, include: ["*layers.1.*"]}]'
    config = write(tmp_path, config_text("{dataset: builtin:text-eval, max_ppl_increase: 0.000001, fallback: [float], step: 2, max_rounds: 2, "
                                         "max_size_increase: 1.0}", rules))
    out = tmp_path / "out"
    result = slimc("compile", config, "--model", model, "--out", out)
    report = json.loads((out / "slimc_report.json").read_text())
    rounds, fallen = report["tune"]["rounds"], [item["layer"] for item in report["tune"]["fallen_back"]]
    assert [entry["reused_blocks"] for entry in rounds] == [0, 1], result.stdout
    assert all(name.startswith("model.layers.1.") for name in fallen) and len(fallen) == 2
    assert report["tune"]["chosen_round"] == 1  # the two most sensitive layers of block 1 in float help
    fresh = tmp_path / "fresh"
    compile_model(with_fallbacks(load_config(config), dict.fromkeys(fallen, "float")), model_path=str(model),
                  out_dir=fresh)
    assert same_files(out, fresh) == []


def test_fallbacks_go_breadth_first_in_ranked_order_skipping_a_layers_own_scheme():
    ranking = [LayerSensitivity(name, "linear", 0, scheme, error, 3.0, 0.0, rank=rank)
               for rank, (name, scheme, error) in enumerate([("a", "w4", 0.3), ("b", "w8", 0.2), ("c", "w4", 0.1)], 1)]
    fallback = ["w8", "float"]
    taken: dict[str, str] = {}
    order = []
    while moves := next_moves(ranking, taken, fallback, step=2):
        order.append(moves)
        taken.update(moves)
    # every layer takes its first fallback before any takes its second; b is w8 already, so float is its first
    assert order == [{"a": "w8", "b": "float"}, {"c": "w8", "a": "float"}, {"c": "float"}]


def test_an_unknown_fallback_scheme_is_refused_with_its_line_and_the_choices(model, tmp_path):
    config = write(tmp_path, config_text("{dataset: builtin:text-eval, max_ppl_increase: 0.01, fallback: [float, w9]}"))
    result = slimc("compile", config, "--model", model, "--out", tmp_path / "out")
    assert_user_error(result, "config.yaml:18", "tune.fallback.1", "unknown scheme 'w9'", "known: w4a4, w8, float")
    assert not (tmp_path / "out").exists()


def test_a_tune_section_without_a_target_names_the_missing_key(model, tmp_path):
    config = write(tmp_path, config_text("{fallback: [float]}"))
    result = slimc("compile", config, "--model", model, "--out", tmp_path / "out")
    assert_user_error(result, "tune.max_ppl_increase", "required key is missing")


def test_rounds_are_measured_on_the_validation_text_unless_the_config_names_other_held_out_data(tmp_path):
    config = load_config(write(tmp_path, config_text("{max_ppl_increase: 0.01, fallback: [float]}")))
    assert config.tune.dataset == "builtin:validation"


def test_tuning_on_the_calibration_text_is_refused(model, tmp_path):
    config = write(tmp_path, config_text("{dataset: builtin:text, max_ppl_increase: 0.01, fallback: [float]}"))
    result = slimc("compile", config, "--model", model, "--out", tmp_path / "out")
    assert_user_error(result, "evaluation dataset builtin:text is the calibration dataset")
    assert not (tmp_path / "out").exists()


def test_the_float_model_is_measured_once_and_every_round_is_compared_with_the_same_figure(model, tmp_path, monkeypatch):
    measured = []
    float_nlls = evaluate_module._float_nlls
    monkeypatch.setattr(evaluate_module, "_float_nlls", lambda *args: measured.append(args) or float_nlls(*args))
    config = load_config(write(tmp_path, config_text("{dataset: builtin:text-eval, max_ppl_increase: 0.000001, "
                                                     "fallback: [float], step: 2, max_rounds: 2, max_size_increase: 1.0}")))
    tuned = tune_compile(config, model_path=str(model), out_dir=tmp_path / "out")
    assert len(tuned.rounds) == 2 and len(measured) == 1
    assert tuned.rounds[0].evaluation["float_ppl"] == tuned.rounds[1].evaluation["float_ppl"]
    fresh = evaluate(resolve_model_source(str(model)), None, with_evaluation(config, dataset="builtin:text-eval"))
    assert tuned.rounds[1].evaluation["float_ppl"] == fresh["float_ppl"]
