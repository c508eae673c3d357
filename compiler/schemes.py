"""Quantization schemes as data: what a tensor is quantized to, not how scales are found."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

IntDtype = Literal["int8", "int4"]
Granularity = Literal["per_tensor", "per_channel", "per_group", "per_token"]
ObserverName = Literal["minmax", "percentile", "mse"]

QRANGES: dict[str, tuple[int, int]] = {"int8": (-128, 127), "int4": (-8, 7)}


class TensorScheme(BaseModel):
    """How one tensor (a weight or a Linear's input activation) is quantized."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: IntDtype = "int8"
    granularity: Granularity = "per_channel"
    group_size: int | None = None
    symmetric: bool = True
    dynamic: bool = False
    observer: ObserverName = "minmax"
    percentile: float = 99.99

    @model_validator(mode="after")
    def _consistent(self) -> TensorScheme:
        if self.granularity == "per_group" and not (self.group_size and self.group_size > 0):
            raise ValueError("granularity per_group needs a positive group_size (e.g. group_size: 64)")
        if self.granularity != "per_group" and self.group_size is not None:
            raise ValueError(f"group_size is only used with granularity per_group, not {self.granularity}")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        return self

    @property
    def qmin(self) -> int:
        return QRANGES[self.dtype][0]

    @property
    def qmax(self) -> int:
        return QRANGES[self.dtype][1]

    @property
    def bits(self) -> int:
        return 8 if self.dtype == "int8" else 4


class QuantScheme(BaseModel):
    """A Linear's scheme: its weight and, unless weight-only, its input activation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: TensorScheme
    act: TensorScheme | None = None

    @model_validator(mode="after")
    def _consistent(self) -> QuantScheme:
        if self.weight.dynamic:
            raise ValueError("weight: dynamic is for activations only; weights are quantized once, offline")
        if self.weight.granularity == "per_token":
            raise ValueError("weight: per_token is an activation granularity; use per_channel or per_group")
        if self.act is not None:
            if self.act.granularity == "per_channel":
                raise ValueError("act: per_channel activations cannot be folded into a matmul; use per_tensor or per_token")
            if self.act.granularity == "per_group":
                raise ValueError("act: per_group activations are not supported; use per_tensor or per_token")
            if self.act.granularity == "per_token" and not self.act.dynamic:
                raise ValueError("act: per_token scales depend on each token, so they need dynamic: true")
        return self

    @property
    def label(self) -> str:
        """W8A8, W8A8_DYNAMIC, W8A16, W4A4_DYNAMIC ... in the naming Ascend runtimes use."""
        w = f"W{self.weight.bits}"
        if self.act is None:
            return f"{w}A16"
        return f"{w}A{self.act.bits}" + ("_DYNAMIC" if self.act.dynamic else "")


@dataclass(frozen=True)
class ShapeRule:
    """A condition on the weight shapes a scheme, or an export format, can hold: data, checked on the plan.

    `concerns(scheme)` picks the schemes it constrains; `holds(out_features, in_features, scheme)` tests one
    weight (a Linear's, or one expert's projection); `requirement` (formatted with `scheme`) says what is
    needed and why; `fix` is what to change, besides leaving the layer float.
    """

    concerns: Callable[[QuantScheme], bool]
    holds: Callable[[int, int, QuantScheme], bool]
    requirement: str
    fix: str

    def broken_by(self, out_features: int, in_features: int, scheme: QuantScheme) -> bool:
        return self.concerns(scheme) and not self.holds(out_features, in_features, scheme)


# What every format needs of a scheme's layers; each format adds its own (`Backend.shape_rules`).
SHAPE_RULES: tuple[ShapeRule, ...] = (
    ShapeRule(
        concerns=lambda scheme: scheme.weight.granularity == "per_group",
        holds=lambda out_features, in_features, scheme: in_features % scheme.weight.group_size == 0,
        requirement="group_size {scheme.weight.group_size} must divide the input size: per_group weights have one "
                    "scale per group of input columns",
        fix="choose a group_size that divides the input size",
    ),
)


class KVCacheScheme(BaseModel):
    """How the keys and values a decoder's attention caches are quantized, static, calibrated on the keys (after
    RoPE) and values entering the attention kernel:

    - int8, one scale (and offset, unless symmetric) per channel (kv_heads × head_dim): Ascend's C8;
    - fp8_e4m3, one symmetric scale per tensor (amax / 448): vLLM's FP8 KV cache (compressed-tensors'
      kv_cache_scheme with k_scale / v_scale)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: str = "int8"
    granularity: str = "per_channel"
    symmetric: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> KVCacheScheme:
        allowed = {"int8": "per_channel", "fp8_e4m3": "per_tensor"}
        if self.dtype not in allowed:
            raise ValueError(f"kv_cache.dtype: int8 (Ascend C8) or fp8_e4m3 (vLLM), not {self.dtype!r}")
        if self.granularity != allowed[self.dtype]:
            raise ValueError(f"kv_cache.granularity: a {self.dtype} KV cache is {allowed[self.dtype]} (int8: one scale "
                             f"per kv_heads × head_dim channel, Ascend C8; fp8_e4m3: one per tensor, vLLM), not "
                             f"{self.granularity!r}")
        if self.dtype == "fp8_e4m3" and not self.symmetric:
            raise ValueError("kv_cache.symmetric: an fp8_e4m3 KV cache is symmetric (vLLM reads k_scale / v_scale only)")
        return self

    @property
    def tensor(self) -> TensorScheme:
        """How the ranges are observed: min/max per channel over the calibration data (an fp8 cache takes its one
        range from them when calibrate freezes it)."""
        return TensorScheme(dtype="int8", granularity="per_channel", symmetric=self.symmetric, dynamic=False,
                            observer="minmax")
