"""Running the `slimc` command line in tests, and what a user error looks like on it."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import warnings
from pathlib import Path

from slimc.commands.cli import main

EXIT_USER_ERROR = 2


def slimc(*args: str | Path) -> subprocess.CompletedProcess:
    """`slimc ARGS` through `main` in this process: its exit code and what it printed."""
    stdout, stderr = io.StringIO(), io.StringIO()
    format_warning = warnings.formatwarning  # main sets how warnings print
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), warnings.catch_warnings():
            code = main([str(a) for a in args])
    finally:
        warnings.formatwarning = format_warning
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


def slimc_process(*args: str | Path) -> subprocess.CompletedProcess:
    """`python -m slimc.commands.cli ARGS` in a fresh process (HF_HUB_OFFLINE=1 is inherited from the fixture), its
    stdout and stderr pipes (not terminals)."""
    return subprocess.run([sys.executable, "-m", "slimc.commands.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def assert_user_error(result: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 2, exactly one `slimc: error:` message on stderr containing every word, and no traceback."""
    assert result.returncode == EXIT_USER_ERROR, f"exit {result.returncode}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    assert [line.startswith("slimc: error:") for line in result.stderr.splitlines()].count(True) == 1, result.stderr
    message = result.stderr[result.stderr.index("slimc: error:"):]
    for word in words:
        assert word in message, f"{word!r} not in:\n{message}"
