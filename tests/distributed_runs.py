"""The command line in each process torchrun starts, for tests/test_distributed.py: `python -m torch.distributed.run
--nproc-per-node N tests/distributed_runs.py JOBS.json` runs `slimc ARGS` for each job (a list of arguments) in
turn with THREADS torch threads (the reference compiles in one process use as many), and exits with the first
failure's status."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from slimc.commands.cli import main

THREADS = 1


if __name__ == "__main__":
    torch.set_num_threads(THREADS)
    for args in json.loads(Path(sys.argv[1]).read_text()):
        if status := main(args):
            sys.exit(status)
