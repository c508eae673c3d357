"""A bench script stopped by SIGTERM (`kill`, `timeout`) stops the compile it started, instead of leaving it running
beside the next measurement."""
from __future__ import annotations

import signal
import sys


def stop_children_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so the script unwinds: `subprocess.run` kills its child on the way out, and
    a script that waits on a `Popen` itself kills it in its own `except BaseException`."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
