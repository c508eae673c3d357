"""Activation observers: collect statistics during calibration, then give a static scale and offset.

- minmax: running min and max;
- percentile: clip to the given percentile of the observed values (outlier-robust);
- mse: choose the clipping range that minimises the quantization error of the observed values.
percentile and mse keep a bounded random subsample of values, so memory stays fixed.
"""

from __future__ import annotations

import torch

from slimc.numerics.quant import fake_quantize, qparams_from_range
from slimc.schemes import TensorScheme

SAMPLE_LIMIT = 1 << 20


class Observer:
    """Running statistics of one activation tensor at per-tensor granularity."""

    def __init__(self, scheme: TensorScheme, seed: int = 0) -> None:
        self.scheme = scheme
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None
        self.samples: list[torch.Tensor] = []
        self._kept = 0
        self._generator = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        lo, hi = x.min(), x.max()
        self.min_val = lo if self.min_val is None else torch.minimum(self.min_val, lo)
        self.max_val = hi if self.max_val is None else torch.maximum(self.max_val, hi)
        if self.scheme.observer != "minmax" and self._kept < SAMPLE_LIMIT:
            flat = x.reshape(-1)
            take = min(flat.numel(), SAMPLE_LIMIT - self._kept, max(SAMPLE_LIMIT // 64, 1))
            index = torch.randint(flat.numel(), (take,), generator=self._generator)
            self.samples.append(flat[index])
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
            values = torch.cat(self.samples)
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
