"""What the command line tells the user besides its results: global flags anywhere, progress, the log file,
and the pass and config listings (`slimc passes`, `slimc configs`, with `--json`).

Progress and flags are the command line's own behaviour, so they run in real processes whose stderr is a pipe,
as in a CI log."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from cli_runs import slimc, slimc_process

from slimc.config.steps import PASSES, load_builtin_passes
from slimc.configs import shipped_configs

CONFIG = """\
version: 2
model: {dtype: float32}
calibration: {samples: 4, seq_len: 32, batch_size: 2}
schemes:
  w8a8_dynamic:
    weight: {dtype: int8, granularity: per_channel, symmetric: true}
    act: {dtype: int8, granularity: per_token, symmetric: true, dynamic: true}
pipeline:
  - pass: smooth
  - pass: fake_quant
    rules: [{scheme: w8a8_dynamic, include: ["*"], exclude: ["lm_head"]}]
  - pass: calibrate
  - pass: lower
export:
  - format: mindie
"""
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


@pytest.fixture(scope="module")
def logged_compile(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> tuple:
    """A compile in a process whose stderr is a pipe, with the flags after the subcommand: (process, log text)."""
    work = tmp_path_factory.mktemp("logged")
    (work / "config.yaml").write_text(CONFIG)
    log = work / "run.log"
    result = slimc_process("compile", work / "config.yaml", "--model", tiny_llama_dir, "--out", work / "out",
                           "--log-file", log)
    assert result.returncode == 0, result.stderr
    return result, log.read_text()


def test_progress_on_a_stderr_that_is_no_terminal_is_plain_lines_naming_the_pass(logged_compile):
    result, _ = logged_compile
    assert "\r" not in result.stderr
    assert re.search(r"^slimc: blocks 1/2: model\.layers\.0: smooth", result.stderr, re.MULTILINE), result.stderr
    assert "slimc: blocks: 2 blocks done in" in result.stderr


def test_the_log_file_has_every_step_with_its_time_the_warnings_and_what_was_printed(logged_compile):
    result, log = logged_compile
    lines = log.splitlines()
    assert lines and all(TIMESTAMP.match(line) for line in lines), log
    assert "\r" not in log
    for pass_name in ("smooth", "fake_quant", "calibrate", "lower"):
        assert f"blocks 2/2: model.layers.1: {pass_name}" in log
    assert "about" in log and "left" in log  # the time left of the whole compile
    for phase in ("capture text: 2 batches done", "export 1/1: writing mindie", "export 1/1: verifying mindie"):
        assert phase in log
    assert "slimc: warning: 4 samples" in log  # the small calibration set
    assert "slimc run summary" in log and "slimc run summary" in result.stdout


def test_quiet_after_the_subcommand_prints_no_progress(tmp_path, tiny_llama_dir):
    (tmp_path / "config.yaml").write_text(CONFIG)
    result = slimc_process("compile", tmp_path / "config.yaml", "--model", tiny_llama_dir, "--out", tmp_path / "out", "-q")
    assert result.returncode == 0, result.stderr
    assert "blocks" not in result.stderr and "capture" not in result.stderr and "\r" not in result.stderr
    assert "slimc: warning: 4 samples" in result.stderr  # warnings still show
    assert "wrote" in result.stdout


def test_debug_after_the_subcommand_shows_the_traceback(tmp_path):
    (tmp_path / "config.yaml").write_text(CONFIG)
    result = slimc_process("compile", tmp_path / "config.yaml", "--model", tmp_path / "nowhere", "--out", tmp_path / "out",
                           "--debug")
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ModelLoadError" in result.stderr


def test_a_user_error_goes_to_the_log_file_too(tmp_path):
    log = tmp_path / "run.log"
    result = slimc("--log-file", log, "compile", tmp_path / "missing.yaml", "--out", tmp_path / "out")
    assert result.returncode == 2
    assert "slimc: error: config" in result.stderr
    assert re.search(r"ERROR slimc\.cli: error: config .*missing\.yaml", log.read_text())


def test_quiet_and_verbose_together_are_refused():
    with pytest.raises(SystemExit) as exit_info:
        slimc("passes", "-q", "--verbose")
    assert exit_info.value.code == 2


# --- slimc passes / slimc configs -------------------------------------------------------------------------


def test_passes_json_lists_every_registered_pass_with_parameter_types_allowed_values_and_defaults():
    result = slimc_process("passes", "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    load_builtin_passes()
    assert set(listing) == set(PASSES)
    alpha = listing["smooth"]["parameters"]["alpha"]
    assert alpha["type"] == "float" and alpha["default"] == 0.5 and alpha["constraints"] == {"ge": 0.0, "le": 1.0}
    algorithm = listing["calibrate"]["parameters"]["weight_algorithm"]
    assert algorithm["allowed"] == ["rtn", "gptq", "autoround"] and algorithm["default"] == "rtn"
    assert listing["calibrate"]["parameters"]["gptq"]["fields"]["block_size"]["default"] == 128
    rules = listing["fake_quant"]["parameters"]["rules"]
    assert rules["type"] == "list[Rule]" and rules["required"]
    assert {"scheme", "include", "exclude"} <= set(rules["fields"])
    assert listing["calibrate"]["requires"] == ["fake_quant"]
    assert listing["norm_fusion"]["function_preserving"]


def test_passes_shows_the_whole_first_paragraph_and_the_allowed_values():
    result = slimc("passes")
    assert result.returncode == 0, result.stderr
    calibrate = " ".join(result.stdout[result.stdout.index("calibrate:"):result.stdout.index("fake_quant:")].split())
    assert "is measured on the first `error_batches` batches and reported." in calibrate  # the paragraph's end
    assert "weight_algorithm: 'rtn' | 'gptq' | 'autoround' (default 'rtn')" in calibrate
    assert "damp: float (default 0.01), > 0.0, <= 1.0" in calibrate
    fake_quant = result.stdout[result.stdout.index("fake_quant:"):result.stdout.index("lower:")]
    assert "rules: list[Rule] (required)" in fake_quant and "include: list[str] (default ['*'])" in fake_quant


def test_configs_json_describes_every_shipped_config():
    result = slimc("configs", "--json")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert set(listing) == set(shipped_configs())
    quarot = listing["llm/w4a4_quarot_gptq.yaml"]
    assert quarot["description"].endswith("Ascend runtimes apply the online rotation listed in the description's metadata.")
    assert quarot["passes"] == ["norm_fusion", "rotate", "smooth", "fake_quant", "calibrate", "lower"]
    assert quarot["export"] == ["mindie"] and Path(quarot["path"]).is_file()
