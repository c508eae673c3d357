"""Reading the Ascend "ascendV1" layout (quant_model_description.json + safetensors) without slimc's modules.

`load_ascend_model` rebuilds the model (transformers or diffusers) from an output directory alone: float tensors are
loaded by name, and every Linear the description marks as quantized becomes an `AscendLinear` that
computes the Ascend runtime arithmetic from the written tensors (docs/formats/mindie.md). This is what
`slimc eval --quantized OUT` measures, so nothing here may use `QuantizedLinear` or `slimc.numerics.quant`.

The file-format facts the writer (`slimc.backends.mindie`) shares live here too: file names, the
quant-type priority, and how runtime (transformers) weights map to checkpoint names.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from slimc.errors import ModelLoadError
from slimc.numerics.int_mm import integer_matmul_available

DESCRIPTION_FILE = "quant_model_description.json"
WEIGHTS_FILE = "quant_model_weights.safetensors"
INDEX_FILE = WEIGHTS_FILE + ".index.json"
VERSION = "1.0.0"
GLOBAL_KEYS = ("version", "model_quant_type", "metadata", "group_size", "optional")
# msModelSlim's order, weakest first; W4A8_DYNAMIC is deliberately absent (never the model type). W4A16
# (written by msModelSlim's older per-group path, not ranked by the newer saver) ranks above W8A16.
QUANT_TYPE_PRIORITY = (
    "FLOAT", "W16A16S", "W8A16", "W4A16", "W8A8_DYNAMIC", "W8A8_MIX", "W8A8", "WFP8AFP8_DYNAMIC",
    "W8A8_MXFP8", "W4A8_MXFP", "W4A4_DYNAMIC", "W4A4_MXFP4", "W4A4_MXFP4_DUALSCALE",
)
# Quantized Linear types this module can compute: type -> (activation qmin, qmax) or None (weight-only).
LINEAR_TYPES: dict[str, tuple[int, int] | None] = {
    "W8A8": (-128, 127), "W8A8_DYNAMIC": (-128, 127), "W4A8_DYNAMIC": (-128, 127),
    "W4A4_DYNAMIC": (-8, 7), "W8A16": None, "W4A16": None,
}
# Online rotations: `P.kronecker_rotation_m` / `_n` beside a Linear P, listed in metadata.quarot, not typed.
ROTATION_SUFFIXES = (".kronecker_rotation_m", ".kronecker_rotation_n")
# The online Hadamard on an attention's queries and keys after RoPE (with C8): `<attn>.qk_rotation_m` / `_n` beside
# its k_proj and v_proj, listed in metadata.quarot.qk_rotation, not typed; each head's vector X (m, n) -> R_mᵀ X R_n.
QK_ROTATION_SUFFIXES = (".qk_rotation_m", ".qk_rotation_n")
UNTYPED_SUFFIXES = ROTATION_SUFFIXES + QK_ROTATION_SUFFIXES
# Explicit smoothing multiplies (msModelSlim's non-fusion smoothing): `P.div.mul_scale` (FLOAT, (in,)) multiplies
# the input of Linear P, whose own tensors are then written under `P.linear.*`.
MUL_SCALE_SUFFIX = ".div.mul_scale"
WRAPPED_LINEAR = ".linear"
# int8 KV cache (C8): `<attn>.k_proj.kv_cache_scale` / `.kv_cache_offset` float32 (kv_heads · head_dim,), the same
# beside v_proj, typed "C8"; the description then says "kv_cache_type" and "kv_quant_type": "C8".
KV_CACHE_TYPE = "C8"
KV_CACHE_KEYS = ("kv_cache_type", "kv_quant_type")
KV_CACHE_SUFFIXES = (".kv_cache_scale", ".kv_cache_offset")
KV_CACHE_PROJECTIONS = {"k_proj": "key", "v_proj": "value"}
C8_ATTENTION = "slimc_ascend_c8"
_TINY = torch.finfo(torch.float32).tiny
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _everything(name: str) -> bool:
    return True


def model_quant_type(types: Iterable[str]) -> str:
    """The strongest type present by QUANT_TYPE_PRIORITY (FLOAT when none ranks)."""
    ranked = [QUANT_TYPE_PRIORITY.index(t) for t in set(types) if t in QUANT_TYPE_PRIORITY]
    return QUANT_TYPE_PRIORITY[max(ranked, default=0)]


def read_description(out_dir: Path) -> dict:
    path = Path(out_dir) / DESCRIPTION_FILE
    if not path.is_file():
        raise ModelLoadError(f"{out_dir}: no {DESCRIPTION_FILE}; is this an Ascend (mindie) output directory?")
    return json.loads(path.read_text())


def tensor_types(description: dict) -> dict[str, str]:
    """The description without its global keys: tensor name -> quant type."""
    return {k: v for k, v in description.items() if k not in GLOBAL_KEYS + KV_CACHE_KEYS and isinstance(v, str)}


def tensor_files(out_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (from the index when sharded)."""
    out_dir = Path(out_dir)
    if (out_dir / INDEX_FILE).is_file():
        weight_map = json.loads((out_dir / INDEX_FILE).read_text())["weight_map"]
        return {name: out_dir / file for name, file in weight_map.items()}
    if not (out_dir / WEIGHTS_FILE).is_file():
        raise ModelLoadError(f"{out_dir}: neither {WEIGHTS_FILE} nor {INDEX_FILE} exists")
    with safe_open(out_dir / WEIGHTS_FILE, "pt") as f:
        return {name: out_dir / WEIGHTS_FILE for name in f.keys()}


def read_tensors(out_dir: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The written tensors whose names start with `prefix` (all by default)."""
    by_file: dict[Path, list[str]] = {}
    for name, path in tensor_files(out_dir).items():
        if name.startswith(prefix):
            by_file.setdefault(path, []).append(name)
    tensors = {}
    for path, names in by_file.items():
        with safe_open(path, "pt") as f:
            tensors.update({name: f.get_tensor(name) for name in names})
    return tensors


def deq_scale_float(deq_scale: torch.Tensor) -> torch.Tensor:
    """deq_scale as float32: int64 tensors hold the float32 bit pattern in their low 32 bits."""
    if deq_scale.dtype == torch.int64:
        return deq_scale.to(torch.int32).view(torch.float32)
    return deq_scale.float()


def packed_along_rows(quant_type: str, group_size: int) -> bool:
    """W4A8_DYNAMIC and per-group W4A16 (the description's group_size > 0) pack two output rows per byte;
    per-channel W4A16 two input columns."""
    return quant_type == "W4A8_DYNAMIC" or (quant_type == "W4A16" and group_size > 0)


def unpacked_shape(quant_type: str, weight: torch.Tensor, group_size: int) -> tuple[int, int]:
    """(out, in) of a Linear from its stored weight."""
    rows, cols = weight.shape
    if packed_along_rows(quant_type, group_size):
        return rows * 2, cols
    return (rows, cols * 2) if quant_type == "W4A16" else (rows, cols)


def unpack_int4_columns(packed: torch.Tensor) -> torch.Tensor:
    """Per-channel W4A16 weights (out, in/2), two input columns per byte (even column low) -> (out, in) int8."""
    return unpack_int4_rows(packed.T.contiguous()).T.contiguous()


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """W4A8_DYNAMIC weights (out/2, in), two output rows per byte (even row in the low nibble) -> (out, in) int8."""
    u = packed.view(torch.uint8).to(torch.int16)
    low, high = u & 0xF, u >> 4
    low, high = torch.where(low > 7, low - 16, low), torch.where(high > 7, high - 16, high)
    return torch.stack([low, high], dim=1).reshape(-1, packed.shape[1]).to(torch.int8)


# --- runtime <-> checkpoint names -------------------------------------------------------------------


@dataclass(frozen=True)
class RowSlice:
    """Where one checkpoint weight's output rows live in a runtime weight."""

    runtime: str  # runtime tensor name, e.g. "model.layers.0.mlp.experts.gate_up_proj"
    expert: int | None  # index along the experts dim of a fused 3-D weight, else None
    rows: torch.Tensor  # rows (of that expert) the checkpoint tensor holds, in its order


def checkpoint_row_layout(model: nn.Module, weights: dict[str, torch.Size]) -> dict[str, RowSlice]:
    """Checkpoint names of runtime weights (out, in) or fused experts (E, rows, in), by row.

    Runs transformers' own save-time conversion (`revert_weight_conversion`) on tensors of row
    indices, so whatever the model's conversion mapping does (split fused experts, rename) is
    followed without naming any model here. Fused experts that no mapping splits get the
    per-expert names Ascend runtimes load: `{experts}.{e}.gate_proj|up_proj|down_proj.weight`.
    """
    from transformers.core_model_loading import revert_weight_conversion

    names = list(weights)
    bases, index, base = [], {}, 0
    for name in names:
        rows = weights[name][:-1].numel()
        index[name] = torch.arange(base, base + rows).reshape(*weights[name][:-1], 1)
        bases.append(base)
        base += rows
    layout: dict[str, RowSlice] = {}
    for ck_name, idx in revert_weight_conversion(_IndexedWeights(model, index), index).items():
        idx = idx[0] if isinstance(idx, list) else idx
        flat = idx.reshape(-1)
        source = bisect.bisect_right(bases, int(flat[0])) - 1
        runtime, shape = names[source], weights[names[source]]
        local = flat - bases[source]
        if idx.ndim == 3 and ck_name == runtime:
            layout.update(_default_expert_names(runtime, shape))
            continue
        if idx.ndim != 2 or idx.shape[1] != 1 or local.min() < 0 or local.max() >= shape[:-1].numel():
            raise ValueError(f"the checkpoint conversion of {runtime} is not a split by rows "
                             f"(gives {ck_name} {tuple(idx.shape)})")
        if len(shape) == 3:
            experts = torch.unique(local // shape[1])
            if len(experts) != 1:
                raise ValueError(f"checkpoint tensor {ck_name} mixes experts of {runtime}")
            layout[ck_name] = RowSlice(runtime, int(experts[0]), local % shape[1])
        else:
            layout[ck_name] = RowSlice(runtime, None, local)
    return layout


class _IndexedWeights:
    """The model as transformers' save conversion sees it, except that the weights being named answer with
    the shape of the index tensors standing in for them. A conversion that compares a tensor with the
    model's parameter (Qwen3-VL-MoE transposes experts only when they disagree) then sees the runtime
    layout it would see at save time, and lowered modules (buffers, not parameters) are named too."""

    def __init__(self, model: nn.Module, index: dict[str, torch.Tensor]) -> None:
        self._model, self._index = model, index

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def get_parameter(self, target: str) -> torch.Tensor:
        if target in self._index:
            return torch.empty(self._index[target].shape, device="meta")
        return self._model.get_parameter(target)


def _default_expert_names(runtime: str, shape: torch.Size) -> dict[str, RowSlice]:
    prefix, _, which = runtime.rpartition(".")
    num_experts, rows = shape[0], shape[1]
    if which == "gate_up_proj":
        half = rows // 2
        parts = {"gate_proj": torch.arange(half), "up_proj": torch.arange(half, rows)}
    elif which == "down_proj":
        parts = {"down_proj": torch.arange(rows)}
    else:
        raise ValueError(f"no per-expert checkpoint names known for fused weight {runtime}")
    return {f"{prefix}.{e}.{part}.weight": RowSlice(runtime, e, r) for e in range(num_experts) for part, r in parts.items()}


def fused_experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules holding fused MoE expert weights: 3-D `gate_up_proj` and `down_proj`."""
    return {
        name: m for name, m in model.named_modules()
        if all(isinstance(getattr(m, w, None), torch.Tensor) and getattr(m, w).ndim == 3 for w in ("gate_up_proj", "down_proj"))
    }


# --- the runtime arithmetic ------------------------------------------------------------------------


def _expand_groups(param: torch.Tensor, in_features: int) -> torch.Tensor:
    """(out, 1) or (out, in / g) -> (out, in)."""
    return param.repeat_interleave(in_features // param.shape[1], dim=1)


class AscendLinear(nn.Module):
    """One quantized Linear as the Ascend runtime computes it, from the written tensors only.

    static W8A8: ``x_q = clamp(round(x / input_scale + input_offset), -128, 127)``,
    ``y = (x_q · W_qᵀ + quant_bias) · deq_scale`` (integer products summed exactly: in int32 as the runtime sums
    them where that cannot overflow, on a CPU whose int8 matmul is exact (`integer_matmul_available`), otherwise in
    float64; the same values);
    *_DYNAMIC: per token ``s = amax|x| / qmax``, ``x_q = clamp(round(x / s))``,
    ``y = (x_q · W_qᵀ) · s · weight_scale + bias`` with the products summed in int32 as the runtime's integer
    matmul sums them (where the int8 matmul is exact, for a scale per row, zero weight offsets and sums int32
    holds), otherwise
    ``y = (x_q · s)((W_q − weight_offset) · weight_scale)ᵀ + bias`` in float32; W8A16: dequantized weight.
    """

    def __init__(self, quant_type: str, tensors: dict[str, torch.Tensor], group_size: int = 0) -> None:
        super().__init__()
        if quant_type not in LINEAR_TYPES:
            raise ModelLoadError(f"quant type {quant_type} is not supported by the reader; supported: {', '.join(LINEAR_TYPES)}")
        self.quant_type = quant_type
        weight = tensors["weight"]
        if quant_type in ("W4A8_DYNAMIC", "W4A16"):
            rows = packed_along_rows(quant_type, group_size)
            weight = unpack_int4_rows(weight) if rows else unpack_int4_columns(weight)
        self.register_buffer("weight", weight.to(torch.int8))
        self.out_features, self.in_features = self.weight.shape
        bias = tensors.get("bias")
        self.register_buffer("bias", None if bias is None else bias.float())
        if quant_type == "W8A8":
            self.register_buffer("input_scale", tensors["input_scale"].float().reshape(()))
            self.register_buffer("input_offset", tensors["input_offset"].float().reshape(()))
            self.register_buffer("deq_scale", deq_scale_float(tensors["deq_scale"]).double())
            self.register_buffer("quant_bias", tensors["quant_bias"].double())
        else:
            scale, offset = tensors["weight_scale"].float(), tensors["weight_offset"].float()
            act, weight_bound = LINEAR_TYPES[quant_type], 8 if quant_type.startswith("W4") else 128
            if (act is not None and scale.shape[-1] == 1 and not offset.any()
                    and max(-act[0], act[1]) * weight_bound * self.in_features <= torch.iinfo(torch.int32).max):
                self.register_buffer("weight_scale", scale.reshape(1, -1))  # one per row: it factors out of the sums
            else:
                w = (self.weight.float() - _expand_groups(offset, self.in_features)) * _expand_groups(scale, self.in_features)
                self.register_buffer("dequantized_weight", w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        if self.quant_type == "W8A8":
            x_q = torch.clamp(torch.round(x32 / self.input_scale + self.input_offset), -128, 127)
            if integer_matmul_available(x.device) and 128 * 128 * self.in_features <= torch.iinfo(torch.int32).max:
                products = torch._int_mm(x_q.to(torch.int8).reshape(-1, self.in_features), self.weight.t())
                products = products.reshape(*x.shape[:-1], self.out_features).double()
            else:
                products = x_q.double() @ self.weight.double().T
            return ((products + self.quant_bias) * self.deq_scale).to(x.dtype)
        act = LINEAR_TYPES[self.quant_type]
        if act is None:
            return F.linear(x32, self.dequantized_weight, self.bias).to(x.dtype)
        qmin, qmax = act
        s = torch.clamp(x32.abs().amax(dim=-1, keepdim=True) / qmax, min=_TINY)
        x_q = torch.clamp(torch.round(x32 / s), qmin, qmax)
        if not hasattr(self, "weight_scale"):
            return F.linear(x_q * s, self.dequantized_weight, self.bias).to(x.dtype)
        if not integer_matmul_available(x.device):
            return F.linear(x_q * s, self.weight.float() * self.weight_scale.T, self.bias).to(x.dtype)
        products = torch._int_mm(x_q.to(torch.int8).reshape(-1, self.in_features), self.weight.t())
        y = products.float().mul_(s.reshape(-1, 1)).mul_(self.weight_scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.quant_type}"


class KroneckerRotatedInput(nn.Module):
    """A layer whose input is first rotated online: x (..., m·n) read as X (m, n) becomes R_mᵀ · X · R_n."""

    def __init__(self, layer: nn.Module, r_m: torch.Tensor, r_n: torch.Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("r_m", r_m.float())
        self.register_buffer("r_n", r_n.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, n = self.r_m.shape[0], self.r_n.shape[0]
        grid = x.float().reshape(-1, m, n)
        rotated = self.r_m.T @ (grid @ self.r_n)
        return self.layer(rotated.reshape(x.shape).to(x.dtype))


class ScaledInput(nn.Module):
    """A layer behind an explicit smoothing multiply: its input is first multiplied by `mul_scale` per channel (float32)."""

    def __init__(self, layer: nn.Module, mul_scale: torch.Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("mul_scale", mul_scale.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer((x.float() * self.mul_scale).to(x.dtype))


def take_explicit_multiplies(types: dict[str, str], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Linear prefix P -> its `P.div.mul_scale`, taken out of `types` and `tensors`; the Linear's `P.linear.*`
    tensors get their plain names `P.*` back, so they load as any Linear's."""
    multiplies = {n.removesuffix(MUL_SCALE_SUFFIX): tensors.pop(n) for n in [n for n in tensors if n.endswith(MUL_SCALE_SUFFIX)]}
    for prefix in multiplies:
        types.pop(prefix + MUL_SCALE_SUFFIX, None)
        wrapped = prefix + WRAPPED_LINEAR
        own = [n for n in tensors if n.rpartition(".")[0] == wrapped]
        if wrapped + ".weight" not in own:
            raise ModelLoadError(f"{prefix}{MUL_SCALE_SUFFIX} multiplies the input of {prefix}, but there is no {wrapped}.weight")
        for name in own:
            plain = f"{prefix}.{name.rpartition('.')[2]}"
            tensors[plain], types[plain] = tensors.pop(name), types.pop(name)
    return multiplies


def apply_explicit_multiplies(model: nn.Module, multiplies: dict[str, torch.Tensor]) -> None:
    """Put each Linear (quantized or float) of `multiplies` behind its multiply."""
    for prefix, mul_scale in multiplies.items():
        try:
            layer = model.get_submodule(prefix)
        except AttributeError:
            raise ModelLoadError(f"{prefix}{MUL_SCALE_SUFFIX} names no layer of {type(model).__name__}") from None
        model.set_submodule(prefix, ScaledInput(layer, mul_scale))


class AscendKVCache(nn.Module):
    """The int8 KV cache of one attention module: the keys (after RoPE) and values its kernel reads are what the
    runtime stores and reads back, ``q = clamp(round(x / scale + offset), -128, 127)``, ``(q - offset) · scale``,
    per channel (kv_heads · head_dim). Buffers (not saved) ``key_scale``, ``key_offset``, ``value_scale``,
    ``value_offset`` float32; `implementation` is the attention kernel the module used before. With `qk_rotation`
    (R_m, R_n) the queries and keys are first rotated per head, each head's vector X (m, n) -> R_mᵀ X R_n."""

    def __init__(self, tensors: dict[str, torch.Tensor], implementation: str | None, eager: Callable | None,
                 qk_rotation: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor.float().reshape(-1), persistent=False)
        self.implementation, self.eager = implementation, eager
        self.register_buffer("r_m", None if qk_rotation is None else qk_rotation[0].float(), persistent=False)
        self.register_buffer("r_n", None if qk_rotation is None else qk_rotation[1].float(), persistent=False)

    def _rotated(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, heads, tokens, head_dim), each head's vector read as X (m, n), as R_mᵀ X R_n."""
        if self.r_m is None:
            return x
        m, n = self.r_m.shape[0], self.r_n.shape[0]
        if x.shape[-1] != m * n:
            raise ModelLoadError(f"qk_rotation factors of orders {m} and {n} cannot rotate heads of {x.shape[-1]}")
        grid = x.float().reshape(*x.shape[:-1], m, n)
        return (self.r_m.T @ grid @ self.r_n).reshape(x.shape).to(x.dtype)

    @staticmethod
    def _stored(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """x (batch, kv_heads, tokens, head_dim) as the cache holds it."""
        shape = (x.shape[1], 1, x.shape[3])
        scale, offset = scale.reshape(shape), offset.reshape(shape)
        codes = (x.float() / scale).add_(offset).round_().clamp_(-128, 127)
        return codes.sub_(offset).mul_(scale).to(x.dtype)

    def forward(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        kernel = ALL_ATTENTION_FUNCTIONS.get_interface(self.implementation, self.eager)
        query, key = self._rotated(query), self._rotated(key)
        key = self._stored(key, self.key_scale, self.key_offset)
        value = self._stored(value, self.value_scale, self.value_offset)
        return kernel(module, query, key, value, *args, **kwargs)


def _c8_attention(module: nn.Module, *args, **kwargs):
    return module.ascend_kv_cache(module, *args, **kwargs)


def install_kv_cache(model: nn.Module, tensors: dict[str, torch.Tensor], types: dict[str, str],
                     within: Callable[[str], bool] = _everything,
                     qk_rotations: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
    """Give each attention module whose k_proj and v_proj have C8 scales an AscendKVCache, and route its attention
    through it (its own copy of the config names the C8 kernel, which calls the module's previous one).
    `qk_rotations`: checkpoint attention name -> the (R_m, R_n) of its online query and key rotation."""
    qk_rotations = qk_rotations or {}
    if not tensors and not qk_rotations:
        return
    import sys

    from transformers.modeling_utils import AttentionInterface

    wrong = sorted(n for n, t in types.items() if t != KV_CACHE_TYPE)
    if wrong:
        raise ModelLoadError(f"{wrong[0]} is typed {types[wrong[0]]}; KV cache scales are typed {KV_CACHE_TYPE}")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and within(name)}
    try:
        layout = checkpoint_row_layout(model, {f"{n}.weight": m.weight.shape for n, m in linears.items()})
    except ValueError as e:
        raise ModelLoadError(f"cannot map {type(model).__name__}'s weights to checkpoint names: {e}") from e
    by_attention: dict[str, dict[str, torch.Tensor]] = {}
    checkpoint_names: dict[str, str] = {}  # runtime attention -> its checkpoint name
    for name, tensor in tensors.items():
        projection, _, suffix = name.rpartition(".")
        where = layout.get(f"{projection}.weight")
        which = KV_CACHE_PROJECTIONS.get(projection.rpartition(".")[2])
        if where is None or which is None:
            raise ModelLoadError(f"{name}: KV cache scales belong to a k_proj or v_proj Linear of the model")
        attention = where.runtime.removesuffix(".weight").rpartition(".")[0]
        by_attention.setdefault(attention, {})[f"{which}_{suffix.removeprefix('kv_cache_')}"] = tensor
        checkpoint_names[attention] = projection.rpartition(".")[0]
    alone = sorted(set(qk_rotations) - set(checkpoint_names.values()))
    if alone:
        raise ModelLoadError(f"{alone[0]}{QK_ROTATION_SUFFIXES[0]}: an online query and key rotation is written only "
                             "with the attention's C8 scales (kv_cache_scale and kv_cache_offset beside its k_proj)")
    AttentionInterface.register(C8_ATTENTION, _c8_attention)
    for attention, own in by_attention.items():
        if len(own) != 4:
            raise ModelLoadError(f"{attention}: C8 needs kv_cache_scale and kv_cache_offset beside both k_proj and "
                                 f"v_proj, found {sorted(own)}")
        module = model.get_submodule(attention)
        config = copy.copy(module.config)
        previous = getattr(module, "ascend_kv_cache", None)  # installed before: keep the kernel it routes to
        implementation = config._attn_implementation if previous is None else previous.implementation
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        rotation = qk_rotations.get(checkpoint_names[attention])
        module.add_module("ascend_kv_cache", AscendKVCache(own, implementation, eager, rotation))
        config._attn_implementation_internal = C8_ATTENTION
        module.config = config


class AscendRows(nn.Module):
    """A runtime weight's output rows computed by several checkpoint Linears (e.g. one expert's gate and up)."""

    def __init__(self, out_features: int, parts: list[tuple[AscendLinear, torch.Tensor]]) -> None:
        super().__init__()
        self.out_features = out_features
        self.parts = nn.ModuleList(part for part, _ in parts)
        for i, (_, rows) in enumerate(parts):
            self.register_buffer(f"rows_{i}", rows.long())
        covered = torch.cat([rows for _, rows in parts]) if parts else torch.empty(0, dtype=torch.long)
        if sorted(covered.tolist()) != list(range(out_features)):
            raise ModelLoadError(f"the checkpoint Linears of a weight with {out_features} rows cover rows "
                                 f"{sorted(covered.tolist())[:8]}...; every row must be covered once")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.new_empty(*x.shape[:-1], self.out_features)
        for i, part in enumerate(self.parts):
            y[..., getattr(self, f"rows_{i}")] = part(x)
        return y


class AscendExperts(nn.Module):
    """Fused MoE experts rebuilt from per-expert checkpoint Linears; the `(hidden, top_k_index, top_k_weights)` interface."""

    def __init__(self, gate_up: list[AscendRows], down: list[AscendRows], act_fn: nn.Module) -> None:
        super().__init__()
        self.gate_up, self.down, self.act_fn = nn.ModuleList(gate_up), nn.ModuleList(down), act_fn
        self.num_experts = len(gate_up)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for expert in torch.unique(top_k_index).tolist():
            if not 0 <= expert < self.num_experts:
                continue
            token_idx, slot = torch.where(top_k_index == expert)
            gate, up = self.gate_up[expert](hidden_states[token_idx]).chunk(2, dim=-1)
            y = self.down[expert](self.act_fn(gate) * up) * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


# --- loading -----------------------------------------------------------------------------------------




def load_ascend_model(out_dir: Path, *, dtype: torch.dtype | None = None) -> nn.Module:
    """A model computing what Ascend runtimes compute from the files in `out_dir`, in eval mode.

    The class is the one config.json names: a transformers model (decoder LLMs, multimodal models, whose
    checkpoint names come from transformers' own save conversion) or a diffusers model (`_class_name`;
    no conversion, the checkpoint names are its state_dict names). `dtype` is the dtype of the float
    parts; by default the dtype most float tensors were written in.
    """
    # slimc.ir.source is the one place that picks the model class, for loading and reading alike.
    from slimc.ir.source import model_from_config

    output = AscendOutput(out_dir, dtype)
    model = model_from_config(output.source, dtype=output.dtype)
    output.install(model, output.read())
    return model.eval()


class AscendOutput:
    """An Ascend output directory as `load_ascend_model` reads it: its description, tensor names and float dtype;
    `install` rebuilds the part of a model whose tensors it is given."""

    def __init__(self, out_dir: Path, dtype: torch.dtype | None = None) -> None:
        from slimc.ir.source import component_source, config_source

        self.out_dir = Path(out_dir)
        self.source, self.prefix = component_source(config_source(self.out_dir))  # a whole Omni checkpoint: its thinker
        description = _component_description(read_description(self.out_dir), self.prefix)
        self.types = tensor_types(description)
        self.group_size = int(description.get("group_size", 0))
        quarot = description.get("metadata", {}).get("quarot", {})
        self.rotated = quarot.get("kronecker_rotation", {}).get("layers", [])
        self.qk_rotated = quarot.get("qk_rotation", {}).get("layers", [])
        self.files = {name.removeprefix(self.prefix): path for name, path in tensor_files(self.out_dir).items()
                      if name.startswith(self.prefix)}
        typed = {name for name in self.files if not name.endswith(UNTYPED_SUFFIXES)}
        if set(self.types) != typed:
            raise ModelLoadError(f"{out_dir}: description and safetensors disagree on {sorted(set(self.types) ^ typed)[:5]}")
        self.dtype = dtype or self._float_dtype()

    def _float_dtype(self) -> torch.dtype:
        """The dtype most FLOAT tensors were written in (read from the headers only)."""
        sizes: Counter = Counter()
        for path in set(self.files.values()):
            with safe_open(path, "pt") as f:
                for name in f.keys():
                    local = name.removeprefix(self.prefix)
                    if name.startswith(self.prefix) and self.types.get(local) == "FLOAT" and not local.endswith(MUL_SCALE_SUFFIX):
                        sliced = f.get_slice(name)
                        dtype = _SAFETENSORS_DTYPES.get(sliced.get_dtype())
                        if dtype is not None and dtype.is_floating_point:
                            sizes[dtype] += int(torch.Size(sliced.get_shape()).numel())
        return sizes.most_common(1)[0][0] if sizes else torch.float32

    def read(self, wanted: Callable[[str], bool] = _everything) -> dict[str, torch.Tensor]:
        """The written tensors whose names (without the component prefix) `wanted` accepts."""
        by_file: dict[Path, list[str]] = {}
        for name, path in self.files.items():
            if wanted(name):
                by_file.setdefault(path, []).append(name)
        tensors = {}
        for path, names in by_file.items():
            with safe_open(path, "pt") as f:
                tensors.update({name: f.get_tensor(self.prefix + name) for name in names})
        return tensors

    def install(self, model: nn.Module, tensors: dict[str, torch.Tensor], within: Callable[[str], bool] = _everything) -> None:
        """Rebuild what `tensors` hold into `model`: the Linears they quantize become Ascend modules, the float
        tensors are loaded. `within` says which model names they cover: every parameter it accepts must be filled."""
        types = {name: t for name, t in self.types.items() if name in tensors}
        tensors = dict(tensors)
        rotations = {n: tensors.pop(n) for n in [n for n in tensors if n.endswith(ROTATION_SUFFIXES)]}
        kv_cache = {n: tensors.pop(n) for n in [n for n in tensors if n.endswith(KV_CACHE_SUFFIXES)]}
        qk = {n: tensors.pop(n) for n in [n for n in tensors if n.endswith(QK_ROTATION_SUFFIXES)]}
        qk_rotated = [attention for attention in self.qk_rotated if within(attention)]
        if sorted(qk_rotated) != sorted({n.rpartition(".")[0] for n in qk}):
            raise ModelLoadError(f"{self.out_dir}: metadata.quarot.qk_rotation lists {len(qk_rotated)} attention modules, "
                                 f"but the files hold query and key rotation tensors for {len(qk) // 2}")
        qk_factors = {a: (qk[a + QK_ROTATION_SUFFIXES[0]], qk[a + QK_ROTATION_SUFFIXES[1]]) for a in qk_rotated}
        install_kv_cache(model, kv_cache, {n: types[n] for n in kv_cache}, within, qk_factors)
        rotated = [layer for layer in self.rotated if within(layer)]
        if sorted(rotated) != sorted({n.rpartition(".")[0] for n in rotations}):
            raise ModelLoadError(f"{self.out_dir}: metadata.quarot lists online rotations of {len(rotated)} layers, "
                                 f"but the files hold rotation tensors for {len(rotations) // 2}")
        multiplies = take_explicit_multiplies(types, tensors)
        quantized = {name.removesuffix(".weight"): t for name, t in types.items() if name.endswith(".weight") and t != "FLOAT"}
        factors = {p: (rotations[p + ROTATION_SUFFIXES[0]], rotations[p + ROTATION_SUFFIXES[1]]) for p in rotated}
        used = _install_quantized(model, quantized, tensors, factors, self.group_size, within)
        _load_float(model, {n: t for n, t in tensors.items() if n not in used}, within)
        for prefix in set(factors) - set(quantized):
            model.set_submodule(prefix, KroneckerRotatedInput(model.get_submodule(prefix), *factors[prefix]))
        apply_explicit_multiplies(model, multiplies)


class AscendBlocks:
    """An Ascend output read a block at a time, for evaluating models larger than memory: `model` is built with
    its parameters on the meta device (its buffers, such as rotary tables, computed as usual); `read_outside`
    reads everything outside the blocks, and `reading(block)` rebuilds one block from its files (the tensors
    named under the block's own name) in the model while inside, leaving the meta block there after."""

    def __init__(self, out_dir: Path, dtype: torch.dtype | None = None) -> None:
        from accelerate import init_empty_weights

        from slimc.ir.source import model_from_config

        self.output = AscendOutput(out_dir, dtype)
        with init_empty_weights():
            self.model = model_from_config(self.output.source, dtype=self.output.dtype).eval()

    def read_outside(self, blocks: Iterable[str]) -> None:
        """Read every tensor outside the blocks (qualified names)."""
        blocks = list(blocks)

        def outside(name: str) -> bool:
            return not any(_under(name, block) for block in blocks)

        _allocate(self.model, outside)
        self.output.install(self.model, self.output.read(outside), outside)

    @contextlib.contextmanager
    def reading(self, block: str) -> Iterator[nn.Module]:
        skeleton = self.model.get_submodule(block)
        module = copy.deepcopy(skeleton)  # on the meta device: costs nothing until allocated
        _allocate(module)
        self.model.set_submodule(block, module)
        try:
            tensors = self.output.read(lambda name: _under(name, block))
            if not tensors:
                raise ModelLoadError(f"{self.output.out_dir}: no tensor is named under {block}")
            self.output.install(self.model, tensors, lambda name: _under(name, block))
            yield self.model.get_submodule(block)
        finally:
            self.model.set_submodule(block, skeleton)


def _under(name: str, module: str) -> bool:
    return name.startswith(module + ".")


def _allocate(model: nn.Module, within: Callable[[str], bool] = _everything) -> None:
    """Give the parameters on the meta device that `within` accepts storage on the CPU, uninitialised; a
    parameter tied to another (a head sharing the embedding's weight) stays tied."""
    made: dict[int, nn.Parameter] = {}
    for prefix, module in model.named_modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is None or not parameter.is_meta or not within(f"{prefix}.{name}" if prefix else name):
                continue
            if id(parameter) not in made:
                made[id(parameter)] = nn.Parameter(torch.empty_like(parameter, device="cpu"), requires_grad=False)
            module._parameters[name] = made[id(parameter)]


def _component_description(description: dict, prefix: str) -> dict:
    """The description of the part of a whole checkpoint whose names start with `prefix` (an Omni output's
    `thinker.` tensors), names without it; the other tensors, copied from the checkpoint, must be FLOAT."""
    if not prefix:
        return description
    quantized = sorted(n for n, t in tensor_types(description).items() if not n.startswith(prefix) and t != "FLOAT")
    if quantized:
        raise ModelLoadError(f"{quantized[0]} is quantized but lies outside {prefix!r}, the part of the checkpoint "
                             "slimc quantizes; only that part's tensors may be quantized")
    part = {key: value for key, value in description.items() if key in GLOBAL_KEYS + KV_CACHE_KEYS}
    part.update({n.removeprefix(prefix): t for n, t in tensor_types(description).items() if n.startswith(prefix)})
    rotation = part.get("metadata", {}).get("quarot", {}).get("kronecker_rotation")
    if rotation:
        layers = [layer.removeprefix(prefix) for layer in rotation.get("layers", [])]
        part["metadata"] = {**part["metadata"], "quarot": {**part["metadata"]["quarot"],
                                                           "kronecker_rotation": {**rotation, "layers": layers}}}
    return part


def _install_quantized(model: nn.Module, quantized: dict[str, str], tensors: dict[str, torch.Tensor],
                       rotations: dict[str, tuple[torch.Tensor, torch.Tensor]], group_size: int,
                       within: Callable[[str], bool] = _everything) -> set[str]:
    """Replace runtime Linears / fused experts (of the modules `within` accepts) whose checkpoint weights are
    quantized (behind their online rotation, if any); return the tensor names used."""
    experts = {name: m for name, m in fused_experts_modules(model).items() if within(name)}
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and within(name)}
    weights = {f"{n}.weight": m.weight.shape for n, m in linears.items()}
    weights.update({f"{n}.{w}": getattr(m, w).shape for n, m in experts.items() for w in ("gate_up_proj", "down_proj")})
    try:
        layout = checkpoint_row_layout(model, weights)
    except ValueError as e:
        raise ModelLoadError(f"cannot map {type(model).__name__}'s weights to checkpoint names: {e}") from e
    by_prefix: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        prefix, _, suffix = name.rpartition(".")
        by_prefix.setdefault(prefix, {})[suffix] = tensor
    parts: dict[tuple[str, int | None], list[tuple[AscendLinear, torch.Tensor]]] = {}
    float_parts: set[tuple[str, int | None]] = set()
    used: set[str] = set()
    for ck_name, where in layout.items():
        prefix = ck_name.removesuffix(".weight")
        key = (where.runtime, where.expert)
        if prefix not in quantized:
            float_parts.add(key)
            continue
        own = by_prefix[prefix]
        used.update(f"{prefix}.{suffix}" for suffix in own)
        layer = AscendLinear(quantized[prefix], own, group_size)
        if prefix in rotations:
            layer = KroneckerRotatedInput(layer, *rotations[prefix])
        parts.setdefault(key, []).append((layer, where.rows))
    mixed = float_parts & set(parts)
    if mixed:
        raise ModelLoadError(f"{sorted(mixed)[0][0]}: some of its checkpoint Linears are quantized and some are FLOAT")
    unknown = set(quantized) - {ck.removesuffix(".weight") for ck in layout}
    if unknown:
        raise ModelLoadError(f"quantized tensors match no Linear of {type(model).__name__}: {sorted(unknown)[:5]}")
    runtime_done = {runtime for runtime, _ in parts}
    for runtime in runtime_done:
        module_name = runtime.rpartition(".")[0]
        if module_name in experts:
            continue
        out_features = linears[module_name].out_features
        rows = parts[(runtime, None)]
        whole = len(rows) == 1 and torch.equal(rows[0][1], torch.arange(out_features))
        module = rows[0][0] if whole else AscendRows(out_features, rows)
        model.set_submodule(module_name, module)
    for module_name, module in experts.items():
        keys = [(f"{module_name}.{w}", e) for w in ("gate_up_proj", "down_proj") for e in range(module.gate_up_proj.shape[0])]
        if not any(key in parts for key in keys):
            continue
        if not all(key in parts for key in keys):
            raise ModelLoadError(f"{module_name}: only some experts are quantized")
        gate_up, down = (
            [AscendRows(getattr(module, w).shape[1], parts[(f"{module_name}.{w}", e)]) for e in range(module.gate_up_proj.shape[0])]
            for w in ("gate_up_proj", "down_proj")
        )
        model.set_submodule(module_name, AscendExperts(gate_up, down, module.act_fn))
    return used


@torch.no_grad()
def _load_float(model: nn.Module, tensors: dict[str, torch.Tensor], within: Callable[[str], bool] = _everything) -> None:
    """Load checkpoint-named float tensors into the model's parameters and persistent buffers (those `within`
    accepts).

    The inverse of transformers' save conversion. Every parameter must be in the files; a persistent
    buffer that is not keeps the value the model class gives it.
    """
    from transformers.core_model_loading import revert_weight_conversion

    params = {name: tensor for name, tensor in model.state_dict(keep_vars=True).items() if within(name)}
    required = {name for name, _ in model.named_parameters(remove_duplicate=False) if within(name)}
    filled = Counter()  # parameter name -> elements loaded
    consumed: set[str] = set()
    same_name = set(revert_weight_conversion(model, {n: p.detach() for n, p in params.items()})) & set(params)
    for name in same_name & set(tensors):
        params[name].copy_(tensors[name].reshape(params[name].shape).to(params[name].dtype))
        filled[name] += params[name].numel()
        consumed.add(name)
    converted = [n for n in params if n not in same_name]
    if converted:
        # Follow the save conversion on element indices: each checkpoint tensor says which elements it holds.
        bases, index, base = [], {}, 0
        for n in converted:
            index[n] = torch.arange(base, base + params[n].numel()).reshape(params[n].shape)
            bases.append(base)
            base += params[n].numel()
        for ck_name, idx in revert_weight_conversion(model, index).items():
            if ck_name not in tensors:
                continue
            idx = (idx[0] if isinstance(idx, list) else idx).reshape(-1)
            source = bisect.bisect_right(bases, int(idx[0])) - 1
            target = params[converted[source]]
            target.view(-1)[idx - bases[source]] = tensors[ck_name].reshape(-1).to(target.dtype)
            filled[converted[source]] += idx.numel()
            consumed.add(ck_name)
    missing = sorted(n for n in required if filled[n] < params[n].numel())
    if missing:
        raise ModelLoadError(f"the Ascend files have no tensor for {len(missing)} parameters, e.g. {missing[:5]}")
    unexpected = sorted(set(tensors) - consumed)
    if unexpected:
        raise ModelLoadError(f"{len(unexpected)} float tensors in the Ascend files match no parameter, e.g. {unexpected[:5]}")
