"""Fidelity: how close a quantized model's outputs stay to the float model's, block by block and at the end.

For models without a perplexity (vision-language models, diffusion transformers), and for language
models on their logits with `slimc eval --fidelity`. Both models run on the same held-out batches;
each block's output is hooked by its name in both, and every floating-point tensor it returns (both
streams of a joint-attention block) is compared as one vector. With q the quantized model's values
and f the float model's, flattened:

- cosine similarity  q·f / (‖q‖ ‖f‖)                                  1 when identical
- relative error     ‖q − f‖ / ‖f‖                                    0 when identical
- PSNR               10·log10(range² / mean((q − f)²)) dB, range = max(f) − min(f)    inf when identical

Each is measured per batch, then summarised over the batches by its mean and its worst value (lowest
cosine and PSNR, highest relative error). Sums are taken in float64 over chunks, so a large output
(logits over a whole vocabulary) costs no float64 copy.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from slimc.errors import DataError
from slimc.ir.hooks import temporary_hooks
from slimc.progress import tracked

CHUNK = 1 << 22  # elements per float64 partial sum


@dataclass(frozen=True)
class Sums:
    """Sufficient statistics of a pair (q, f): Σf², Σq², Σqf, Σ(q−f)², min f, max f, and the element count."""

    ff: float = 0.0
    qq: float = 0.0
    qf: float = 0.0
    dd: float = 0.0
    low: float = math.inf
    high: float = -math.inf
    n: int = 0

    def __add__(self, other: Sums) -> Sums:
        return Sums(self.ff + other.ff, self.qq + other.qq, self.qf + other.qf, self.dd + other.dd,
                    min(self.low, other.low), max(self.high, other.high), self.n + other.n)


@dataclass(frozen=True)
class Metrics:
    cosine: float
    relative_error: float
    psnr: float


def tensor_sums(q: torch.Tensor, f: torch.Tensor) -> Sums:
    """The Sums of two tensors of one shape (any dtype), accumulated in float64 chunk by chunk."""
    if q.shape != f.shape:
        raise DataError(f"cannot compare a quantized tensor of shape {tuple(q.shape)} with a float one of shape {tuple(f.shape)}")
    total = Sums()
    q, f = q.detach().reshape(-1), f.detach().reshape(-1)
    for start in range(0, f.numel(), CHUNK):
        qc, fc = q[start:start + CHUNK].double(), f[start:start + CHUNK].double()
        d = qc - fc
        total = total + Sums(float(fc @ fc), float(qc @ qc), float(qc @ fc), float(d @ d),
                             float(fc.min()), float(fc.max()), fc.numel())
    return total


def metrics_of(s: Sums) -> Metrics:
    """Cosine, relative error and PSNR from Sums (conventions for zero norms: identical is 1 / 0 / inf)."""
    if s.ff == 0.0 or s.qq == 0.0:
        cosine = 1.0 if s.ff == s.qq else 0.0
    else:
        cosine = s.qf / math.sqrt(s.ff * s.qq)
    if s.dd == 0.0:
        return Metrics(cosine, 0.0, math.inf)
    relative = math.sqrt(s.dd / s.ff) if s.ff > 0.0 else math.inf
    span = s.high - s.low
    psnr = 10.0 * math.log10(span * span / (s.dd / s.n)) if span > 0.0 else -math.inf
    return Metrics(cosine, relative, psnr)


def cosine_similarity(q: torch.Tensor, f: torch.Tensor) -> float:
    return metrics_of(tensor_sums(q, f)).cosine


def relative_error(q: torch.Tensor, f: torch.Tensor) -> float:
    """‖q − f‖ / ‖f‖, as `metrics_of(tensor_sums(q, f)).relative_error` gives it, from the same float64 chunk sums
    of f² and (q − f)² only: searches measure it on every trial, and the other sums double its cost."""
    if q.shape != f.shape:
        raise DataError(f"cannot compare a quantized tensor of shape {tuple(q.shape)} with a float one of shape {tuple(f.shape)}")
    ff = dd = 0.0
    q, f = q.detach().reshape(-1), f.detach().reshape(-1)
    for start in range(0, f.numel(), CHUNK):
        fc = f[start:start + CHUNK].double()
        d = q[start:start + CHUNK].double() - fc
        ff += float(fc @ fc)
        dd += float(d @ d)
    if dd == 0.0:
        return 0.0
    return math.sqrt(dd / ff) if ff > 0.0 else math.inf


def psnr(q: torch.Tensor, f: torch.Tensor) -> float:
    return metrics_of(tensor_sums(q, f)).psnr


def float_leaves(value: Any, path: str = "") -> dict[str, torch.Tensor]:
    """The floating-point tensors of a (nested) model or block output, by path: `logits`, `0`, `1.sample`.

    Mappings (transformers / diffusers output classes are ones) give their keys, sequences their indices."""
    if isinstance(value, torch.Tensor):
        return {path: value} if value.is_floating_point() else {}
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return {}
    found: dict[str, torch.Tensor] = {}
    for key, item in items:
        found.update(float_leaves(item, f"{path}.{key}" if path else str(key)))
    return found


def pair_sums(quantized: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], what: str) -> Sums:
    """The Sums of matching leaves, added: the comparison of every leaf as one vector."""
    if list(quantized) != list(reference):
        raise DataError(f"{what}: the quantized model returns {list(quantized)} where the float model returns {list(reference)}")
    total = Sums()
    for key, f in reference.items():
        total = total + tensor_sums(quantized[key], f)
    return total


@dataclass
class Summary:
    """One compared tensor (a block's output, or one model output) over every batch."""

    mean: Metrics
    worst: Metrics
    batches: int


def summarize(per_batch: Sequence[Metrics]) -> Summary:
    if not per_batch:
        raise DataError("nothing to summarise: no batch was compared")
    mean = Metrics(*(sum(getattr(m, k) for m in per_batch) / len(per_batch) for k in ("cosine", "relative_error", "psnr")))
    worst = Metrics(min(m.cosine for m in per_batch), max(m.relative_error for m in per_batch), min(m.psnr for m in per_batch))
    return Summary(mean, worst, len(per_batch))


@dataclass
class FidelityReport:
    """Per block (in the order the model runs them) and per model output: a Summary."""

    blocks: dict[str, Summary] = field(default_factory=dict)
    outputs: dict[str, Summary] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        def rows(summaries: dict[str, Summary]) -> list[dict]:
            return [{"name": name, "batches": s.batches, "mean": asdict(s.mean), "worst": asdict(s.worst)}
                    for name, s in summaries.items()]

        return {"blocks": rows(self.blocks), "outputs": rows(self.outputs), "notes": list(self.notes)}


@contextlib.contextmanager
def recording_outputs(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, list[dict[str, torch.Tensor]]]]:
    """While open, every output of the named submodules, as float leaves, one entry per call."""
    seen: dict[str, list[dict[str, torch.Tensor]]] = {name: [] for name in names}
    with temporary_hooks() as hooks:
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise DataError(f"{type(model).__name__} has no block {name}; compare a quantized model with its own float model") from None
            hooks.after(module, lambda m, a, out, n=name: seen[n].append(float_leaves(out)))
        yield seen


def _calls_sums(quantized: list[dict], reference: list[dict], what: str) -> Sums:
    if len(quantized) != len(reference):
        raise DataError(f"{what} ran {len(quantized)} times in the quantized model and {len(reference)} in the float one")
    total = Sums()
    for q, f in zip(quantized, reference, strict=True):
        total = total + pair_sums(q, f, what)
    return total


@torch.no_grad()
def compare_models(float_model: nn.Module, quantized_model: nn.Module, batches: Sequence[dict],
                   call: Callable[[nn.Module, dict], Any], blocks: Sequence[str], *, progress: bool = False) -> FidelityReport:
    """Run both models on every batch (`call(model, batch)`) and compare each named block's output and
    each floating-point model output; a block the batch never reaches is left out of that batch."""
    per_block: dict[str, list[Metrics]] = {name: [] for name in blocks}
    per_output: dict[str, list[Metrics]] = {}
    for batch in tracked(batches, "fidelity", "batch", shown=progress):
        with recording_outputs(float_model, blocks) as float_blocks:
            reference = float_leaves(call(float_model, batch))
        with recording_outputs(quantized_model, blocks) as quantized_blocks:
            quantized = float_leaves(call(quantized_model, batch))
        for name in blocks:
            if float_blocks[name] or quantized_blocks[name]:
                per_block[name].append(metrics_of(_calls_sums(quantized_blocks[name], float_blocks[name], f"block {name}")))
        if list(quantized) != list(reference):
            raise DataError(f"the quantized model returns {list(quantized)} where the float model returns {list(reference)}")
        for key, f in reference.items():
            per_output.setdefault(key or "output", []).append(metrics_of(tensor_sums(quantized[key], f)))
        del float_blocks, quantized_blocks, reference, quantized
    report = FidelityReport(blocks={n: summarize(m) for n, m in per_block.items() if m},
                            outputs={n: summarize(m) for n, m in per_output.items()})
    never = [n for n, m in per_block.items() if not m]
    if never:
        report.notes.append(f"{len(never)} blocks ran on no batch (e.g. {never[0]}); give data that reaches them")
    return report


def json_safe(value: Any) -> Any:
    """`value` with infinite and NaN floats as the strings "inf", "-inf", "nan", so that it is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def _number(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def render(results: dict) -> str:
    """The fidelity results of `slimc eval` as a table: per block, then per model output."""
    width = max([40, *(len(e["name"]) + 7 for e in [*results["blocks"], *results["outputs"]])])
    columns = (("cosine", 6), ("rel. error", 6), ("PSNR (dB)", 2))

    def row(label: str, entry: dict) -> str:
        cells = [_number(entry[which][key], digits) for key, (_, digits) in zip(("cosine", "relative_error", "psnr"), columns)
                 for which in ("mean", "worst")]
        return f"{label:{width}s}" + "".join(f"{cell:>10s}" + ("  " if i % 2 else "") for i, cell in enumerate(cells)).rstrip()

    lines = [f"fidelity on {results['dataset']} ({results['batches']} batches): "
             f"quantized {results['quantized_dir']} against the float model",
             " " * width + "".join(f"{title:>20s}  " for title, _ in columns).rstrip(),
             " " * width + "".join(f"{'mean':>10s}{'worst':>10s}  " for _ in columns).rstrip()]
    lines += [row(entry["name"], entry) for entry in results["blocks"]]
    lines += [row(f"output {entry['name']}", entry) for entry in results["outputs"]]
    lines += [f"note: {note}" for note in results["notes"]]
    return "\n".join(lines)
