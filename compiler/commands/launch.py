"""`slimc compile --nproc N`: the same command in N processes on this machine, started by torchrun
(torch.distributed.run), which stops them all once one fails. See docs/distributed.md."""

from __future__ import annotations

import os

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
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:  # in this process, so that a failed one ends in its own message rather than torchrun's traceback
        run(get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "slimc", *without_nproc(argv)]))
    except ChildFailedError:
        return 1
    return 0
