"""What the backends that write Hugging Face-style safetensors checkpoints share.

- the checkpoint Linears of a lowered Program: every QuantizedLinear, and every expert's projection of
  QuantizedExperts, under the name transformers' save-time conversion gives it (`checkpoint_linears`);
- the float tensors outside lowered modules, and tensors a frontend copies unchanged from the source
  checkpoint (an Omni talker beside its quantized thinker);
- the online rotations in front of Linears, which a format records or refuses;
- sharded safetensors writing.

Nothing here knows a quantized format's tensor layout.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
from pydantic import AfterValidator
from safetensors import safe_open
from safetensors.torch import save_file

from slimc.backends.mindie_reader import checkpoint_row_layout
from slimc.errors import ExportError
from slimc.ir import Program
from slimc.numerics.modules import EXPERT_WEIGHTS, FakeQuantize, QuantizedExperts, QuantizedLinear
from slimc.schemes import QuantScheme

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass
class CheckpointLinear:
    """One checkpoint Linear: output rows of a lowered Linear or of one expert's fused weight."""

    prefix: str  # checkpoint name without ".weight"
    scheme: QuantScheme
    codes: torch.Tensor  # int8 (out, in)
    scale: torch.Tensor  # float32 (out, 1) or (out, in / g)
    offset: torch.Tensor
    bias: torch.Tensor | None  # float32 (out,)
    input_qparams: tuple[torch.Tensor, torch.Tensor] | None  # static: float32 (1,), (1,)
    dtype: torch.dtype
    runtime: str  # the runtime weight it comes from, e.g. "model.layers.0.mlp.experts.down_proj"

    def reference(self) -> QuantizedLinear:
        return QuantizedLinear(self.scheme, self.codes, self.scale, self.offset, self.bias, self.input_qparams, self.dtype)

def checkpoint_linears(program: Program, fmt: str) -> list[CheckpointLinear]:
    """The checkpoint Linears of every lowered module, named by transformers' save-time conversion."""
    model = program.model
    lowered = {n: m for n, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedExperts))}
    weights = {}
    for name, module in lowered.items():
        for which in ("weight",) if isinstance(module, QuantizedLinear) else EXPERT_WEIGHTS:
            weights[f"{name}.{which}"] = getattr(module, which).shape
    try:
        layout = checkpoint_row_layout(model, weights) if weights else {}
    except ValueError as e:
        raise ExportError(f"{fmt}: cannot name the quantized tensors in the checkpoint layout: {e}") from e
    parts = []
    for ck_name, where in layout.items():
        if not ck_name.endswith(".weight"):
            raise ExportError(f"{fmt}: the checkpoint name {ck_name} of {where.runtime} does not end in .weight")
        module_name, _, which = where.runtime.rpartition(".")
        module = lowered[module_name]
        if isinstance(module, QuantizedLinear):
            codes, scale, offset, bias = module.weight, module.weight_scale, module.weight_offset, module.bias
            static = None if module.input_scale is None else (module.input_scale, module.input_offset)
        else:
            e, stem = where.expert, which.removesuffix("_proj")
            codes = getattr(module, which)[e]
            scale, offset = getattr(module, f"{which}_scale")[e], getattr(module, f"{which}_offset")[e]
            bias = getattr(module, f"{which}_bias", None)
            bias = None if bias is None else bias[e]
            static = None
            if module.scheme.act is not None and not module.scheme.act.dynamic:
                static = tuple(getattr(module, f"{stem}_input_{q}")[e:e + 1] for q in ("scale", "offset"))
        scale, offset = scale.expand(codes.shape[0], -1), offset.expand(codes.shape[0], -1)  # per_tensor -> per row
        rows = where.rows
        parts.append(CheckpointLinear(
            ck_name.removesuffix(".weight"), module.scheme, _take(codes, rows), _take(scale, rows), _take(offset, rows),
            None if bias is None else _take(bias, rows), static, module.dtype, where.runtime,
        ))
    return parts

def online_rotations(program: Program, parts: list[CheckpointLinear], fmt: str) -> dict[str, torch.nn.Module]:
    """Checkpoint Linear name -> the online rotation applied to its input at run time.

    Rotations are graph nodes in front of a Linear, or the `down_transform` of fused experts (one
    per expert's down projection). Only their Kronecker factors matter here.
    """
    found: dict[str, torch.nn.Module] = {}
    for block in program.blocks:
        if block.traced is None:
            continue
        gm = block.graph_module
        for node in gm.graph.nodes:
            if node.op != "call_module" or not hasattr(gm.get_submodule(node.target), "kronecker_factors"):
                continue
            for user in node.users:
                while user.op == "call_module" and isinstance(gm.get_submodule(user.target), FakeQuantize):
                    user = next(iter(user.users))
                found.update(dict.fromkeys(checkpoint_prefixes(program, parts, block.qualified(user.target)),
                                           gm.get_submodule(node.target)))
        for name, module in block.module.named_modules():
            transform = getattr(module, "down_transform", None)
            if transform is None:
                continue
            runtime = f"{block.qualified(name)}.down_proj"
            prefixes = [part.prefix for part in parts if part.runtime == runtime]
            if not prefixes:
                raise ExportError(f"{fmt}: {runtime} has an online rotation but is not quantized; "
                                  "online rotations are recorded for quantized experts only")
            found.update(dict.fromkeys(prefixes, transform))
    return found


def checkpoint_prefixes(program: Program, parts: list[CheckpointLinear], linear: str) -> list[str]:
    """The checkpoint names (without .weight) of a runtime Linear: its parts if quantized, else its own conversion."""
    runtime = f"{linear}.weight"
    prefixes = [part.prefix for part in parts if part.runtime == runtime]
    if not prefixes:
        shape = program.model.get_submodule(linear).weight.shape
        prefixes = [name.removesuffix(".weight") for name in checkpoint_row_layout(program.model, {runtime: shape})]
    return prefixes

def _take(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows of `t`: a view when they are consecutive."""
    if len(rows) and torch.equal(rows, torch.arange(int(rows[0]), int(rows[0]) + len(rows))):
        return t[int(rows[0]):int(rows[0]) + len(rows)]
    return t.index_select(0, rows)

def float_tensors(program: Program) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers outside lowered modules, under their checkpoint names and in their dtypes.

    Tied weights are written under each of their names.
    """
    from transformers.core_model_loading import revert_weight_conversion

    model = program.model
    lowered = {n for n, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedExperts))}

    def inside_lowered(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]) in lowered for i in range(1, len(parts)))

    state = {n: t.detach() for n, t in model.state_dict(keep_vars=True).items() if not inside_lowered(n)}
    return {n: t[0] if isinstance(t, list) else t for n, t in revert_weight_conversion(model, state).items()}


# --- outputs that keep a whole checkpoint ------------------------------------------------------------------
# A frontend that quantizes one part of a larger checkpoint (an Omni thinker beside its talker) sets
# `Program.source_tensors`, {name: safetensors file} of the checkpoint's other tensors, which are
# copied unchanged as FLOAT, so the output loads in place of the checkpoint. The part's own tensors already
# carry their checkpoint names: transformers' save conversion restores the prefix (`thinker.`) that
# `from_pretrained` removed when it loaded the part from the whole checkpoint.

_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                      "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class SourceTensor:
    """A tensor of the source checkpoint, read from its file only when written or checked."""

    name: str
    path: Path
    nbytes: int

    def load(self) -> torch.Tensor:
        with safe_open(self.path, "pt") as f:
            return f.get_tensor(self.name)


def source_tensors(program: Program, written: dict[str, torch.Tensor], fmt: str) -> dict[str, SourceTensor]:
    """The checkpoint tensors the program copies (`Program.source_tensors`), each file's header read once."""
    declared = program.source_tensors
    clashes = sorted(set(declared) & set(written))
    if clashes:
        raise ExportError(f"{fmt}: {clashes[0]} is both a tensor of the program and one copied from the source checkpoint")
    by_file: dict[Path, list[str]] = {}
    for name, path in declared.items():
        by_file.setdefault(Path(path), []).append(name)
    found = {}
    for path, names in by_file.items():
        if not path.is_file():
            raise ExportError(f"{fmt}: {path} of the source checkpoint is gone; the tensors it holds must be copied from it")
        with safe_open(path, "pt") as f:
            for name in names:
                tensor = f.get_slice(name)
                found[name] = SourceTensor(name, path, math.prod(tensor.get_shape()) * _SAFETENSORS_BYTES[tensor.get_dtype()])
    return found


def _nbytes(tensor: torch.Tensor | SourceTensor) -> int:
    return tensor.nbytes if isinstance(tensor, SourceTensor) else tensor.numel() * tensor.element_size()


def _loaded(tensor: torch.Tensor | SourceTensor) -> torch.Tensor:
    return tensor.load() if isinstance(tensor, SourceTensor) else tensor


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def natural_key(name: str) -> list:
    return [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in name.split(".")]


def save_sharded(tensors: dict[str, torch.Tensor | SourceTensor], out_dir: Path, weights_file: str,
                 max_bytes: int | None) -> list[Path]:
    """`weights_file`, or shards `<stem>-0000i-of-0000N.safetensors` of at most `max_bytes` each plus
    `<weights_file>.index.json` ({"metadata": {"total_size"}, "weight_map"}), as transformers writes them."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = _nbytes(tensor)
        if max_bytes is not None and shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) == 1:
        save_file(_storable({n: _loaded(tensors[n]) for n in shards[0]}), out_dir / weights_file, metadata={"format": "pt"})
        return [out_dir / weights_file]
    stem = weights_file.removesuffix(".safetensors")
    written, weight_map = [], {}
    for i, names in enumerate(shards, start=1):
        file = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(_storable({n: _loaded(tensors[n]) for n in names}), out_dir / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        written.append(out_dir / file)
    total = sum(_nbytes(t) for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    index_file = out_dir / f"{weights_file}.index.json"
    index_file.write_text(json.dumps(index, indent=2) + "\n")
    return [*written, index_file]


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; a tensor overlapping one already in the file (tied weights) is copied."""
    seen: dict[int, list[tuple[int, int]]] = {}
    out = {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        spans = seen.setdefault(t.untyped_storage().data_ptr(), [])
        if any(start < e and s < end for s, e in spans):
            t = t.clone()
        else:
            spans.append((start, end))
        out[name] = t
    return out


def parse_size(value: str | int) -> int:
    """Bytes of a size given as an int or a string like "5GB", "500MB", "4GiB"."""
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"max_shard_size must be positive, got {value}")
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
    if not match or match.group(2).upper() not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"max_shard_size {value!r} is not a size; use bytes or e.g. \"5GB\", \"500MB\", \"4GiB\"")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def _checked_size(value: str | int | None) -> str | int | None:
    if value is not None:
        parse_size(value)
    return value


# A backend option: the most bytes one safetensors file holds ("5GB", "500MiB" or an int), None for one file.
ShardSize = Annotated[str | int | None, AfterValidator(_checked_size)]


def shard_bytes(size: str | int | None) -> int | None:
    return None if size is None else parse_size(size)
