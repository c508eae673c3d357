"""Resumable compiles: a streamed compile killed with SIGKILL (as `kill -9` does) at a block, or after the last one,
continues with `slimc compile --resume` and writes the files an uninterrupted compile writes; what cannot be
resumed is refused with what differs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_runs import assert_user_error, slimc
from interrupting_pass import END
from test_streaming import CASES, same_files

from slimc.commands.cli import resolve_config_path
from slimc.commands.export import REPORT_FILE
from slimc.journal import MANIFEST, journal_directory

TESTS = Path(__file__).parent

# case: (model and settings from test_streaming.CASES, where the compile is killed, the blocks committed by then)
KILLS = {
    "llama-w8a8-static-mid-way": ("llama-w8a8", "llm/w8a8_static.yaml", "model.layers.1", ["model.layers.0"]),
    "llama-w8a8-float-propagation-mid-way": ("llama-w8a8-float-propagation", "llm/w8a8_dynamic.yaml", "model.layers.1",
                                             ["model.layers.0"]),
    "glm4_moe-c8-mid-way": ("glm4_moe", "glm4_moe/w8a8_c8.yaml", "model.layers.1", ["model.layers.0"]),
    "llama-at-the-first-block": ("llama-w8a8", "llm/w8a8_static.yaml", "model.layers.0", []),
    "llama-w4a4-rotated-before-export": ("llama-w4a4-rotated", "llm/w4a4_quarot_gptq.yaml", END,
                                         ["model.layers.0", "model.layers.1"]),
    "qwen3_vl_moe-in-the-text-stage": ("qwen3_vl_moe", "qwen3_vl_moe/w8a8.yaml", "model.language_model.layers.1",
                                       ["model.visual.blocks.0", "model.visual.blocks.1",
                                        "model.visual.deepstack_merger_list.0", "model.visual.deepstack_merger_list.1",
                                        "model.visual.merger", "model.language_model.layers.0"]),
}


def interrupting_config(directory: Path, config: str, at: str) -> Path:
    """The shipped `config` with a pass after its first one that kills the process at block `at` (once)."""
    data = yaml.safe_load(resolve_config_path(config).read_text())
    data["pipeline"].insert(1, {"pass": "interrupting_pass:KillOnce", "at": at, "marker": str(directory / "killed-once")})
    path = directory / "interrupting.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def compile_args(config: Path, model: Path, out: Path, settings: list[str], *extra: str) -> list:
    return ["compile", config, "--model", model, "--out", out, *(a for s in settings for a in ("--set", s)), *extra]


def killed_compile(*args: str | Path) -> subprocess.CompletedProcess:
    """`slimc ARGS` in a process of its own, which the interrupting pass kills."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "slimc.commands.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def committed(out: Path) -> list[str]:
    return json.loads((journal_directory(out) / MANIFEST).read_text())["blocks"]


@pytest.mark.parametrize("case", KILLS)
def test_a_killed_compile_resumes_to_the_files_of_an_uninterrupted_one(case, tmp_path):
    model_case, config, at, blocks = KILLS[case]
    save, _, settings = CASES[model_case]
    model = save(tmp_path / "model")
    interrupting = interrupting_config(tmp_path, config, at)
    out = tmp_path / "resumed"

    killed = killed_compile(*compile_args(interrupting, model, out, settings))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists() and committed(out) == blocks

    resumed = slimc(*compile_args(interrupting, model, out, settings, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert not journal_directory(out).exists()
    notes = json.loads((out / REPORT_FILE).read_text())["notes"]
    resumed_notes = [note for note in notes if note.startswith("resumed")]
    assert resumed_notes == ([f"resumed after {len(blocks)} committed blocks (the last {blocks[-1]})"] if blocks else [])

    whole = tmp_path / "whole"  # the same config, which no longer kills (its marker exists)
    assert slimc(*compile_args(interrupting, model, whole, settings)).returncode == 0
    assert same_files(out, whole) == []


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """A tiny Llama whose W8A8 static compile to `out` was killed after its first block."""
    root = tmp_path_factory.mktemp("interrupted")
    save, _, settings = CASES["llama-w8a8"]
    save(root / "model")
    config = interrupting_config(root, "llm/w8a8_static.yaml", "model.layers.1")
    killed = killed_compile(*compile_args(config, root / "model", root / "out", settings))
    assert killed.returncode == -signal.SIGKILL and committed(root / "out") == ["model.layers.0"], killed.stderr
    return root


@pytest.fixture
def copy_of(interrupted, tmp_path) -> Path:
    """A copy of the interrupted compile, this test's to change."""
    return Path(shutil.copytree(interrupted, tmp_path / "copy", symlinks=True))


def resume_args(root: Path, *extra: str) -> list:
    return compile_args(root / "interrupting.yaml", root / "model", root / "out", CASES["llama-w8a8"][2], *extra)


def test_resume_refuses_a_changed_config_and_keeps_the_interrupted_compile(copy_of):
    refused = slimc(*resume_args(copy_of, "--resume", "--set", "pipeline.0.search_grid=[0.5]"))
    assert_user_error(refused, "--resume refused", "config.pipeline.0.search_grid", "[0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]",
                      "in the interrupted compile", "[0.5] now")
    assert committed(copy_of / "out") == ["model.layers.0"]
    assert slimc(*resume_args(copy_of, "--resume")).returncode == 0


def test_resume_refuses_another_slimc_version(copy_of):
    manifest_path = journal_directory(copy_of / "out") / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["identity"]["slimc"] = "0.0.1"
    manifest_path.write_text(json.dumps(manifest))
    assert_user_error(slimc(*resume_args(copy_of, "--resume")), "--resume refused", "slimc: '0.0.1' in the interrupted compile")


def test_a_new_compile_keeps_an_interrupted_one_unless_told_to_discard_it(copy_of):
    assert_user_error(slimc(*resume_args(copy_of)), "holds an interrupted compile", "1 blocks done", "--resume", "--overwrite")
    assert committed(copy_of / "out") == ["model.layers.0"]
    started_again = slimc(*resume_args(copy_of, "--overwrite"))
    assert started_again.returncode == 0, started_again.stderr
    assert not any("resumed" in note for note in json.loads((copy_of / "out" / REPORT_FILE).read_text())["notes"])
    assert not journal_directory(copy_of / "out").exists()


def test_resume_needs_an_interrupted_compile(tmp_path):
    save, _, settings = CASES["llama-w8a8"]
    model = save(tmp_path / "model")
    assert_user_error(slimc(*compile_args(resolve_config_path("llm/w8a8_dynamic.yaml"), model, tmp_path / "out", settings,
                                          "--resume")),
                      "no interrupted compile", "run the compile without --resume")


def test_resume_of_a_compile_that_loads_the_model_whole_is_refused(copy_of):
    assert_user_error(slimc(*resume_args(copy_of, "--resume", "--set", "memory.stream_blocks=false")),
                      "--resume continues a compile that streams its blocks", "memory.stream_blocks is false")
