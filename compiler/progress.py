"""What slimc tells the user while it works: the progress of each phase, and where log records go.

A phase (the blocks of a compile, the batches of a capture, the formats of an export) is a `Progress`. On a
terminal it draws a tqdm bar naming what runs now, with the time left; in every case it logs a line per step
on the `slimc.progress` logger. `logging_to` sets up one command: those lines reach a stderr that is not a
terminal now and then as plain lines (a log holds no carriage-return frames), and a `--log-file` holds all of
them, every other log record, the warnings and what the command printed, each line with its time.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

PROGRESS = logging.getLogger("slimc.progress")
MESSAGES = logging.getLogger("slimc.cli")  # what the command line says itself: errors, notes, the version warning
LINE_INTERVAL = 30.0  # seconds between progress lines on a stderr that is not a terminal (first and last always)
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LIBRARY_BARS_VARIABLE = "HF_HUB_DISABLE_PROGRESS_BARS"  # read by huggingface_hub, whose setting transformers follows


@dataclass
class Verbosity:
    """The command line's -q, -v and --debug."""

    quiet: bool = False
    verbose: bool = False
    debug: bool = False


VERBOSITY = Verbosity()


def shows_bars() -> bool:
    """Bars on a terminal, or in a notebook (whose stderr is no terminal but shows tqdm's widgets); else lines."""
    return not VERBOSITY.quiet and (sys.stderr.isatty() or "ipykernel" in sys.modules)


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `1h02m`."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


class Progress:
    """`done` of `total` items of one phase, and what runs within the current item.

    It closes itself after its last item, so a phase spread over a loop needs no `with`."""

    def __init__(self, what: str, total: int, unit: str, *, leave: bool = True) -> None:
        self.what, self.total, self.unit = what, total, unit
        self.done = 0
        self.started = time.monotonic()
        self.reported = False
        self.bar = tqdm(total=total, desc=what, unit=unit, leave=leave, dynamic_ncols=True) if total and shows_bars() else None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def doing(self, activity: str) -> None:
        """Name what runs now within the current item (the pass inside a block)."""
        if self.bar is not None:
            self.bar.set_postfix_str(activity)
        self._report(f"{self.what} {min(self.done + 1, self.total)}/{self.total}: {activity}{self._timing()}")

    def advance(self, count: int = 1) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        if self.done >= self.total:
            self._report(f"{self.what}: {self._count(self.done)} done in {duration(time.monotonic() - self.started)}",
                         last=True)
            self.close()
        else:
            self._report(f"{self.what}: {self.done}/{self._count(self.total)}{self._timing()}")

    def skip(self, count: int) -> None:
        """Leave `count` items out of the total: they will not run (a stage no calibration batch reaches)."""
        self.total -= count
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()
        if self.done >= self.total:
            self.close()

    def counted(self, call: Callable[[], T]) -> Callable[[], T]:
        """`call`, advancing this progress when it returns."""
        def run() -> T:
            try:
                return call()
            finally:  # a capture stops the forward with an exception once it has what it needs
                self.advance()
        return run

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _count(self, count: int) -> str:
        if count == 1:
            return f"{count} {self.unit}"
        return f"{count} {self.unit}{'es' if self.unit.endswith(('s', 'ch', 'sh', 'x')) else 's'}"

    def _timing(self) -> str:
        elapsed = time.monotonic() - self.started
        if not 0 < self.done < self.total:
            return f" ({duration(elapsed)})"
        return f" ({duration(elapsed)}, about {duration(elapsed / self.done * (self.total - self.done))} left)"

    def _report(self, line: str, *, last: bool = False) -> None:
        PROGRESS.info(line, extra={"milestone": last or not self.reported})
        self.reported = True


def tracked(items: Sequence[T], what: str, unit: str, *, shown: bool = True) -> Iterator[T]:
    """`items`, one by one, with their progress if `shown`."""
    if not shown:
        yield from items
        return
    with Progress(what, len(items), unit) as progress:
        for item in items:
            yield item
            progress.advance()


class _ConsoleFilter(logging.Filter):
    """Which records reach stderr: the command line's own messages and warnings always; progress lines unless
    quiet or a bar shows them, one per LINE_INTERVAL (every one when verbose); other records by level."""

    def __init__(self) -> None:
        super().__init__()
        self.last_line = -math.inf

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == PROGRESS.name:
            return self._progress_line(record)
        if record.name in (MESSAGES.name, "py.warnings"):
            return True
        threshold = logging.DEBUG if VERBOSITY.debug else logging.INFO if VERBOSITY.verbose else logging.WARNING
        return record.levelno >= threshold

    def _progress_line(self, record: logging.LogRecord) -> bool:
        if VERBOSITY.quiet or shows_bars():
            return False
        now = time.monotonic()
        if VERBOSITY.verbose or getattr(record, "milestone", False) or now - self.last_line >= LINE_INTERVAL:
            self.last_line = now
            return True
        return False


class _ConsoleFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if record.name == "py.warnings":  # already `slimc: warning: ...` (the command line sets warnings.formatwarning)
            return record.getMessage().rstrip()
        if record.name in (PROGRESS.name, MESSAGES.name):  # a traceback the message mentions goes to the log file only
            return f"slimc: {record.getMessage()}"
        return super().format(record)


class _FileFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(FILE_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).rstrip()  # a warning's text ends in a newline


class _ConsoleHandler(logging.Handler):
    """Writes to the stderr of the moment (tests swap it), through tqdm so that a line does not tear a bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


class _LoggedStdout:
    """stdout as it was, each complete line also written to the log file."""

    def __init__(self, stream: IO[str], handler: logging.Handler) -> None:
        self.stream, self.handler = stream, handler
        self.pending = ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self.handler.handle(logging.makeLogRecord({"name": "slimc.stdout", "levelno": logging.INFO,
                                                       "levelname": "INFO", "msg": line}))
        return len(text)

    def __getattr__(self, name: str) -> object:  # flush, fileno, isatty, encoding: the stream's own
        return getattr(self.stream, name)


@contextlib.contextmanager
def _library_bars_off() -> Iterator[None]:
    """Turn off transformers' and huggingface_hub's own bars (loading weights, downloads): through the environment
    for an import to come, through transformers for one done."""
    previous = os.environ.get(LIBRARY_BARS_VARIABLE)
    os.environ[LIBRARY_BARS_VARIABLE] = "1"
    hf_logging = sys.modules.get("transformers.utils.logging")
    enabled = hf_logging is not None and hf_logging.is_progress_bar_enabled()
    if enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if previous is None:
            del os.environ[LIBRARY_BARS_VARIABLE]
        else:
            os.environ[LIBRARY_BARS_VARIABLE] = previous
        if enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def logging_to(verbosity: Verbosity, log_file: Path | None = None) -> Iterator[None]:
    """For one command: progress, warnings and log records to stderr as `verbosity` says, and everything,
    what goes to stdout included, to `log_file` (appended) with timestamps."""
    root = logging.getLogger()
    previous = (Verbosity(**vars(VERBOSITY)), root.level, sys.stdout)
    vars(VERBOSITY).update(vars(verbosity))
    console = _ConsoleHandler()
    console.addFilter(_ConsoleFilter())
    console.setFormatter(_ConsoleFormatter())
    handlers: list[logging.Handler] = [console]
    if log_file is not None:
        file = logging.FileHandler(log_file, encoding="utf-8")
        file.setFormatter(_FileFormatter())
        handlers.append(file)
        sys.stdout = _LoggedStdout(sys.stdout, file)  # type: ignore[assignment]
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbosity.debug else logging.INFO)
    logging.captureWarnings(True)
    try:
        with contextlib.nullcontext() if shows_bars() else _library_bars_off():
            yield
    finally:
        logging.captureWarnings(False)
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        saved, root_level, sys.stdout = previous
        vars(VERBOSITY).update(vars(saved))
        root.setLevel(root_level)
