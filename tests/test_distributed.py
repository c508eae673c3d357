"""Multi-process compiles (slimc.distributed): 2 processes on gloo, sharing the calibration batches, write the files
of a compile in one process byte for byte (with as many torch threads each); a failure in one process stops them
all with its message; what a multi-process compile cannot do is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from cli_runs import assert_user_error, slimc
from distributed_runs import THREADS
from test_resume import compile_args
from test_streaming import same_files, save_llm

from slimc.commands.cli import resolve_config_path
from slimc.commands.compile import compile_model
from slimc.config import load_config
from slimc.distributed import World
from slimc.errors import ConfigError, DataError
from slimc.numerics.gptq import HessianAccumulator

TESTS = Path(__file__).parent
# 3 batches of 2 samples: process 0 runs batches 0 and 2, process 1 batch 1.
CALIBRATION = ["calibration.samples=6", "calibration.seq_len=32", "calibration.batch_size=2"]
# name: (model, config, overrides): static ranges (minmax), per channel of an int8 KV cache too, and on MoE experts
# static percentile ranges (sampled) with sequential GPTQ (Hessians summed per expert, from the tokens each process
# routed to it, and per level of the block, with the levels before it quantized)
CASES = {
    "llama-w8a8-static-c8": ("llama", "llm/w8a8_static.yaml", [*CALIBRATION, "pipeline.1.kv_cache={dtype: int8}"]),
    "qwen3_moe-w8a8-static-percentile-gptq": ("qwen3_moe", "llm/w8a8_static.yaml",
                                              [*CALIBRATION, "pipeline.2.weight_algorithm=gptq",
                                               "pipeline.2.gptq.sequential=true",
                                               "schemes.w8a8_static.act.observer=percentile"]),
    # each process's batches on disk (memory.activations_gb below one batch): what tests/test_activations.py
    # shows gives the files of a compile without it; GPTQ fitted to quantized inputs (the dynamic down projections'
    # cross sums reduced beside their Hessians)
    "llama-w8a8-static-spilled-gptq": ("llama", "llm/w8a8_static.yaml",
                                       [*CALIBRATION, "memory.activations_gb=1e-6", "pipeline.2.weight_algorithm=gptq",
                                        "pipeline.2.gptq.quantized_inputs=true"]),
}
FAILING = "failing"


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(THREADS),
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {family: save_llm(family, root / family) for family in ("llama", "qwen3_moe")}


def failing_config(directory: Path) -> Path:
    """W8A8 dynamic with a pass that fails in process 1 at the first block, when process 0 is at the same block."""
    data = yaml.safe_load(resolve_config_path("llm/w8a8_dynamic.yaml").read_text())
    data["pipeline"].insert(1, {"pass": "failing_pass:FailInProcess", "rank": 1})
    path = directory / "failing.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def two_processes(models, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The CASES compiled by 2 processes under torchrun, then the failing compile (the last: it ends the run)."""
    root = tmp_path_factory.mktemp("two")
    jobs = [[str(a) for a in compile_args(config, models[model], root / name, settings)]
            for name, (model, config, settings) in CASES.items()]
    jobs.append([str(a) for a in compile_args(failing_config(root), models["llama"], root / FAILING, CALIBRATION)])
    (root / "jobs.json").write_text(json.dumps(jobs))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(TESTS / "distributed_runs.py"), str(root / "jobs.json")],
                         capture_output=True, text=True, timeout=300, env=environment())
    return root, run


def one_process(config: str, model: Path, out: Path, settings: list[str]) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        compile_model(load_config(resolve_config_path(config), settings), model_path=str(model), out_dir=out)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("case", CASES)
def test_two_processes_write_the_files_of_one(case, two_processes, models, tmp_path):
    root, run = two_processes
    model, config, settings = CASES[case]
    assert (root / case).is_dir(), run.stderr[-3000:]
    reference = one_process(config, models[model], tmp_path / "one", settings)
    assert same_files(root / case, reference) == []


def test_a_failure_in_one_process_stops_the_others_with_its_message(two_processes):
    root, run = two_processes
    assert run.returncode != 0
    assert "slimc: error: process 1: failing_pass: stopped on purpose in process 1" in run.stderr
    assert "slimc: error: process 0: another of the 2 processes of the compile stopped" in run.stderr
    assert not (root / FAILING).exists()


def test_slimc_compile_nproc_starts_torchrun_and_writes_the_files_of_one_process(models, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", str(THREADS))
    monkeypatch.setenv("PYTHONPATH", environment()["PYTHONPATH"])
    two = tmp_path / "two"
    result = slimc(*compile_args("llm/w8a8_dynamic.yaml", models["llama"], two, CALIBRATION), "--nproc", "2")
    assert result.returncode == 0, result.stderr
    reference = one_process("llm/w8a8_dynamic.yaml", models["llama"], tmp_path / "one", CALIBRATION)
    assert same_files(two, reference) == []


def test_resume_in_several_processes_is_refused(models, tmp_path):
    config = load_config(resolve_config_path("llm/w8a8_dynamic.yaml"), CALIBRATION)
    with pytest.raises(ConfigError, match="--resume continues a compile run in one process, and this one runs in 2"):
        compile_model(config, model_path=str(models["llama"]), out_dir=tmp_path / "out", resume=True, world=World(0, 2))


def test_more_processes_than_calibration_batches_are_refused(models, tmp_path):
    config = load_config(resolve_config_path("llm/w8a8_dynamic.yaml"), CALIBRATION)
    with pytest.raises(DataError, match="4 processes share 3 calibration batches"):
        compile_model(config, model_path=str(models["llama"]), out_dir=tmp_path / "out", world=World(0, 4))


def test_gptq_hessians_summed_by_two_processes_round_to_the_hessian_of_one_within_one_float32_ulp():
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 64, 48, generator=generator) * 10 ** torch.rand(48, generator=generator) for _ in range(5)]
    one = HessianAccumulator()
    for batch in batches:
        one.add(batch)
    parts = [HessianAccumulator(), HessianAccumulator()]
    for index, batch in enumerate(batches):
        parts[index % 2].add(batch)
    two = HessianAccumulator()
    two.sum, two.count = parts[0].sum + parts[1].sum, parts[0].count + parts[1].count
    expected, summed = one.hessian(), two.hessian()
    assert summed.dtype == torch.float32
    ulp = torch.nextafter(expected.abs(), torch.tensor(float("inf"))) - expected.abs()
    assert ((summed - expected).abs() <= ulp).all()


def test_slimc_compile_resume_with_nproc_is_refused_before_starting_processes(models, tmp_path):
    result = slimc(*compile_args("llm/w8a8_dynamic.yaml", models["llama"], tmp_path / "out", CALIBRATION),
                   "--nproc", "2", "--resume")
    assert_user_error(result, "--resume continues a compile run in one process", "--nproc 2")
