"""A bench script killed with SIGTERM takes the compile it started with it (bench/children.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"

# A stand-in for a bench script: its child writes its pid, then runs until killed.
SCRIPT = """
import subprocess, sys
sys.path.insert(0, sys.argv[1])
from children import stop_children_on_sigterm
if sys.argv[3] == "handled":
    stop_children_on_sigterm()
child = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)"
subprocess.run([sys.executable, "-c", child, sys.argv[2]])
"""


def is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def child_after_sigterm(tmp_path: Path, mode: str) -> tuple[int, int]:
    """SIGTERM the stand-in once its child runs; its exit status and its child's pid."""
    pid_file = tmp_path / f"{mode}.pid"
    script = subprocess.Popen([sys.executable, "-c", SCRIPT, str(BENCH_DIR), str(pid_file), mode])
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline, "the stand-in's child never started"
        time.sleep(0.05)
    script.send_signal(signal.SIGTERM)
    return script.wait(timeout=60), int(pid_file.read_text())


def test_sigterm_stops_the_child(tmp_path: Path) -> None:
    status, child = child_after_sigterm(tmp_path, "handled")
    assert status == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while is_running(child):
        assert time.monotonic() < deadline, "the bench script's child outlived it"
        time.sleep(0.05)


def test_without_the_handler_the_child_survives(tmp_path: Path) -> None:
    """What the handler is for: Python's default SIGTERM ends the script and orphans its child."""
    status, child = child_after_sigterm(tmp_path, "default")
    try:
        assert status == -signal.SIGTERM
        time.sleep(0.5)
        assert is_running(child)
    finally:
        if is_running(child):
            os.kill(child, signal.SIGKILL)

