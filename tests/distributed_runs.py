"""Compiles run by the processes torchrun starts, for tests/test_distributed.py: `python -m torch.distributed.run
--nproc-per-node N tests/distributed_runs.py JOBS.json` compiles each job (config, model, out, --set overrides) in
turn, every process with THREADS torch threads (the reference compile in one process uses as many)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from slimc.commands.cli import resolve_config_path
from slimc.commands.compile import compile_model
from slimc.config import load_config

THREADS = 1


def compile_job(job: dict) -> None:
    config = load_config(resolve_config_path(job["config"]), job["settings"])
    compile_model(config, model_path=job["model"], out_dir=Path(job["out"]))


if __name__ == "__main__":
    torch.set_num_threads(THREADS)
    for job in json.loads(Path(sys.argv[1]).read_text()):
        compile_job(job)
