"""A pass that kills its own process (SIGKILL, as `kill -9` does) the first time it reaches a given block, or the
end of the pipeline: an interrupted compile for the resume tests, at a moment the test chooses. It leaves a marker
file so the resumed compile, with the same config, runs through."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from slimc.passes import Pass

END = "end"


class KillOnce(Pass):
    """Kill the process at block `at` (before the passes after this one run on it), or at `end` (after the last
    block, before the outputs are written), unless `marker` exists."""

    at: str
    marker: str

    def run_block(self, block, ctx) -> None:
        if block.name == self.at:
            self._kill()

    def finish(self, program, ctx) -> None:
        if self.at == END:
            self._kill()

    def _kill(self) -> None:
        marker = Path(self.marker)
        if not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
