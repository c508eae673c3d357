"""What a run measured: time per step, peak memory, per-layer quantization error, output size; what it was made
from (`provenance`: versions, resolved config, model and data hashes, device); the evaluation when one ran; the
accuracy tuning's rounds when the config has a `tune:` section."""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


def peak_memory_bytes() -> dict[str, int]:
    """Peak resident memory of this process, and of the accelerator when one is in use."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peaks = {"host": rss if sys.platform == "darwin" else rss * 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks["cuda"] = torch.cuda.max_memory_allocated()
    return peaks


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def plot_layer_errors(points: Sequence[tuple[str, int, float]], path: Path, ylabel: str) -> None:
    """A PNG of layers' errors against their block's depth, one line per label: `points` are (label, block, error)."""
    # On a thread of its own: the first drawing imports matplotlib's backend and PIL's plugins, and the import errors
    # they catch leave reference cycles through every calling frame; from the compile's frame they would keep its
    # Program (and the spilled blocks' directory) alive until the next garbage collection.
    errors: list[BaseException] = []

    def draw() -> None:
        try:
            _draw_layer_errors(points, path, ylabel)
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=draw, name="slimc-plot")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def _draw_layer_errors(points: Sequence[tuple[str, int, float]], path: Path, ylabel: str) -> None:
    # A Figure of its own, not pyplot: drawing a file leaves the caller's backend and open figures alone.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(8, 4.5), dpi=100)
    axes = figure.add_subplot()
    for label in sorted({point[0] for point in points}):
        line = sorted((block, error) for kind, block, error in points if kind == label)
        axes.plot([p[0] for p in line], [p[1] for p in line], marker="o", markersize=3, label=label)
    axes.set_xlabel("block")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(ylabel)
    if points and min(point[2] for point in points) > 0:
        axes.set_yscale("log")
    axes.legend(fontsize="small", ncol=2)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png")


@dataclass
class LayerRecord:
    name: str
    scheme: str
    relative_error: float
    role: str = "linear"  # from the block's graph when it was measured (slimc.patterns.linear_roles), or "experts"
    block: int = 0  # the block's position in the program


@dataclass
class RunReport:
    seconds: dict[str, float] = field(default_factory=dict)
    # The process's CPU seconds (all its threads) per step: on a machine shared with other jobs the wall seconds
    # grow with the load, these much less.
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    layers: list[LayerRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    outputs: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, dict] = field(default_factory=dict)
    peak_memory: dict[str, int] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)  # slimc.commands.provenance
    evaluation: dict | None = None  # `compile --eval`'s results, as `slimc eval --json` prints them
    tune: dict | None = None  # a compile with a `tune:` section: its rounds and fallbacks (slimc.commands.tune)
    location: Path | None = field(default=None, repr=False)  # where the report was published, if it was

    @contextlib.contextmanager
    def timed(self, step: str) -> Iterator[None]:
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - start
            self.cpu_seconds[step] = self.cpu_seconds.get(step, 0.0) + time.process_time() - cpu_start

    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)

    started: float = field(default_factory=time.perf_counter, repr=False)
    cpu_started: float = field(default_factory=time.process_time, repr=False)

    def finish(self) -> None:
        """Record the total time (wall and CPU) so far and the peak memory."""
        self.seconds["total"] = time.perf_counter() - self.started
        self.cpu_seconds["total"] = time.process_time() - self.cpu_started
        self.peak_memory = peak_memory_bytes()

    def to_json(self) -> str:
        fields = asdict(self)
        fields.pop("started")
        fields.pop("cpu_started")
        fields.pop("location")
        return json.dumps(fields, indent=2)

    def render(self, worst: int = 10) -> str:
        """A plain-text summary for the terminal."""
        lines = ["", "slimc run summary", "-----------------"]
        total = self.seconds.get("total")
        if total is not None:
            lines.append(f"time: {total:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items() if k != "total") + ")")
        cpu_total = self.cpu_seconds.get("total")
        if cpu_total is not None:
            lines.append(f"CPU time: {cpu_total:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in self.cpu_seconds.items() if k != "total") + ")")
        for device, size in self.peak_memory.items():
            lines.append(f"peak memory ({device}): {size / 2**20:.0f} MiB")
        for fmt, size in self.outputs.items():
            lines.append(f"output {fmt}: {size / 2**20:.1f} MiB")
        for key, value in self.metrics.items():
            lines.append(f"{key}: {value:.4g}")
        if self.layers:
            errors = [layer.relative_error for layer in self.layers]
            lines.append(
                f"quantized layers: {len(self.layers)}; relative output error mean {sum(errors) / len(errors):.4f}, "
                f"max {max(errors):.4f}"
            )
            lines.append(f"worst {min(worst, len(self.layers))} layers:")
            for layer in sorted(self.layers, key=lambda r: -r.relative_error)[:worst]:
                lines.append(f"  {layer.relative_error:8.4f}  {layer.scheme:14s} {layer.name}")
        lines.extend(f"note: {note}" for note in self.notes)
        if self.location is not None:
            lines.append(f"report: {self.location} (versions, resolved config, model and calibration hashes, per-layer errors)")
        return "\n".join(lines)
