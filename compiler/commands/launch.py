"""`slimc compile --nproc N`: the same command in N processes on this machine, started by torchrun
(torch.distributed.run), which stops them all once one fails. See docs/distributed.md."""

from __future__ import annotations

import os
import subprocess
import sys

from slimc.errors import SlimcError


def without_nproc(argv: list[str]) -> list[str]:
    """The command line less its --nproc option (the processes torchrun starts are each one of the N)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def launch(nproc: int, argv: list[str]) -> int:
    """Run `slimc ARGV` in `nproc` processes under torchrun; 0 when every one succeeded. Each process gets an equal
    share of this machine's cores for its torch threads unless OMP_NUM_THREADS says otherwise."""
    if os.environ.get("WORLD_SIZE") is not None:
        raise SlimcError("--nproc starts torchrun, and this process is already one that torchrun started; "
                         "leave out --nproc, or run `slimc compile --nproc N` without torchrun")
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = {"OMP_NUM_THREADS": str(threads), **os.environ}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "slimc", *without_nproc(argv)]
    return subprocess.run(command, env=env, check=False).returncode
