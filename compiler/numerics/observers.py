"""Activation observers: collect statistics during calibration, then give a static scale and offset.

- minmax: running min and max;
- percentile: clip to the given percentile of the observed values (outlier-robust);
- mse: choose the clipping range that minimises the quantization error of the observed values.
percentile and mse keep a bounded random subsample of values, so memory stays fixed: drawn with a generator seeded
by the calibration batch's index and kept in batch order, so that processes sharing the batches (slimc.distributed)
and `reduce_observers` give the subsample of one process.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextvars import ContextVar

import torch

from slimc.distributed import World
from slimc.numerics.quant import fake_quantize, qparams_from_range
from slimc.schemes import TensorScheme

SAMPLE_LIMIT = 1 << 20
SAMPLES_PER_CALL = max(SAMPLE_LIMIT // 64, 1)
_BATCH: ContextVar[int] = ContextVar("calibration_batch", default=0)


@contextlib.contextmanager
def observed_batch(index: int) -> Iterator[None]:
    """Observers updated meanwhile see calibration batch `index`."""
    token = _BATCH.set(index)
    try:
        yield
    finally:
        _BATCH.reset(token)


class Observer:
    """Running statistics of one activation tensor at per-tensor granularity."""

    range_shape: tuple[int, ...] = ()  # the shape of min_val / max_val

    def __init__(self, scheme: TensorScheme, seed: int = 0) -> None:
        self.scheme = scheme
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None
        self.samples: list[tuple[int, torch.Tensor]] = []  # (batch index, values), in the order observed
        self._kept = 0
        self._seed = seed
        self._batch: int | None = None
        self._generator = torch.Generator()

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        lo, hi = x.min(), x.max()
        self.min_val = lo if self.min_val is None else torch.minimum(self.min_val, lo)
        self.max_val = hi if self.max_val is None else torch.maximum(self.max_val, hi)
        if self.scheme.observer != "minmax" and self._kept < SAMPLE_LIMIT:
            batch = _BATCH.get()
            if batch != self._batch:
                self._batch = batch
                self._generator.manual_seed(self._seed * (1 << 32) + batch)
            flat = x.reshape(-1)
            take = min(flat.numel(), SAMPLES_PER_CALL)
            index = torch.randint(flat.numel(), (take,), generator=self._generator)
            self.samples.append((batch, flat[index]))
            self._kept += take

    @property
    def observed(self) -> bool:
        return self.min_val is not None

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Static scale and offset, each of shape (1,)."""
        if self.min_val is None:
            raise RuntimeError("observer saw no data: the layer was never reached by calibration inputs")
        if self.scheme.observer == "minmax":
            lo, hi = self.min_val, self.max_val
        else:
            values = torch.cat([values for _, values in sorted(self.samples, key=lambda kept: kept[0])])[:SAMPLE_LIMIT]
            lo, hi = self._percentile_range(values) if self.scheme.observer == "percentile" else self._mse_range(values)
        scale, offset = qparams_from_range(lo.reshape(1), hi.reshape(1), self.scheme)
        return scale, offset

    def _percentile_range(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.scheme.percentile / 100.0
        return torch.quantile(values, 1.0 - q), torch.quantile(values, q)

    def _mse_range(self, values: torch.Tensor, grid: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
        best = (float("inf"), self.min_val, self.max_val)
        for i in range(grid):
            factor = 1.0 - 0.9 * i / grid
            lo, hi = self.min_val * factor, self.max_val * factor
            scale, offset = qparams_from_range(lo, hi, self.scheme)
            err = float(((fake_quantize(values, scale, offset, self.scheme) - values) ** 2).mean())
            if err < best[0]:
                best = (err, lo, hi)
        return best[1], best[2]


class ChannelObserver:
    """Running min and max per channel of attention keys or values (batch, kv_heads, tokens, head_dim): a range per
    (head, head_dim) pair, over every batch and token (minmax only)."""

    def __init__(self, scheme: TensorScheme, heads: int, head_dim: int) -> None:
        self.scheme = scheme
        self.range_shape = (heads, head_dim)
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:2] + x.shape[3:]) != self.range_shape:
            raise ValueError(f"expected keys or values of shape (batch, {self.range_shape[0]}, tokens, "
                             f"{self.range_shape[1]}), got {tuple(x.shape)}")
        lo, hi = torch.aminmax(x.detach().float().transpose(1, 2).flatten(0, 1), dim=0)
        self.min_val = lo if self.min_val is None else torch.minimum(self.min_val, lo)
        self.max_val = hi if self.max_val is None else torch.maximum(self.max_val, hi)

    @property
    def observed(self) -> bool:
        return self.min_val is not None

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Static scale and offset, each (heads, head_dim)."""
        if self.min_val is None:
            raise RuntimeError("observer saw no data: the attention was never reached by calibration inputs")
        return qparams_from_range(self.min_val, self.max_val, self.scheme)


def reduce_observers(observers: list[Observer | ChannelObserver], world: World) -> None:
    """Give each observer the statistics of every process's batches: the range over all of them, and the samples
    in batch order (each process keeps its first SAMPLE_LIMIT, which hold its share of the first SAMPLE_LIMIT of
    all). Every process passes the same observers in the same order."""
    if world.size == 1 or not observers:
        return

    def flat(values: list[torch.Tensor | None], fill: float) -> torch.Tensor:
        """Every observer's range (a per-channel one too) in one vector, one collective for all."""
        return torch.cat([(torch.full(o.range_shape, fill) if v is None else v.cpu()).reshape(-1)
                          for o, v in zip(observers, values, strict=True)])

    sizes = [math.prod(o.range_shape) for o in observers]
    low = world.min(flat([o.min_val for o in observers], float("inf"))).split(sizes)
    high = world.max(flat([o.max_val for o in observers], float("-inf"))).split(sizes)
    sampling = [o for o in observers if o.scheme.observer != "minmax"]
    if sampling:
        gathered = world.gather([o.samples for o in sampling])
        for position, observer in enumerate(sampling):
            observer.samples = [sample for process in gathered for sample in process[position]]
    device = next((o.min_val.device for o in observers if o.min_val is not None), torch.device("cpu"))
    for observer, lo, hi in zip(observers, low, high, strict=True):
        if torch.isfinite(lo).all():  # some process observed it
            shape = observer.range_shape
            observer.min_val, observer.max_val = lo.reshape(shape).to(device), hi.reshape(shape).to(device)
