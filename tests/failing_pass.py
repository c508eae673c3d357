"""A pass that fails in one process of a multi-process compile (tests/test_distributed.py): the others must stop
too rather than wait for it."""

from __future__ import annotations

from slimc.errors import PassError
from slimc.passes import Pass


class FailInProcess(Pass):
    """Raise a PassError at the first block, in the process of rank `rank` only."""

    rank: int

    def run_block(self, block, ctx) -> None:
        if ctx.world.rank == self.rank:
            raise PassError(f"failing_pass: stopped on purpose in process {self.rank}")
