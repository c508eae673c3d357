"""What the backends that write Hugging Face-style safetensors checkpoints share.

- the checkpoint Linears of a lowered Program: every QuantizedLinear, and every expert's projection of
  QuantizedExperts, under the name transformers' save-time conversion gives it (`checkpoint_linears`);
- the float tensors outside lowered modules, and tensors a frontend copies unchanged from the source
  checkpoint (an Omni talker beside its quantized thinker);
- the online rotations in front of Linears, which a format records or refuses;
- the export scopes: what lies outside the blocks, then each block with its weights read (`export_scopes`), so a
  streamed program is written and verified one block at a time;
- sharded safetensors writing, scope by scope (`ShardWriter`), and reading back for verify with only a bounded
  part of the files mapped (`WrittenFiles`).

Nothing here knows a quantized format's tensor layout.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import AfterValidator
from safetensors import safe_open
from safetensors.torch import save_file

from slimc.backends.mindie_reader import checkpoint_row_layout
from slimc.errors import ExportError
from slimc.ir import Block, Program
from slimc.ir.source import storable_tensors
from slimc.numerics.modules import (
    EXPERT_WEIGHTS,
    FakeQuantize,
    KVCacheQuantize,
    QKHadamard,
    QuantizedExperts,
    QuantizedLinear,
)
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

@dataclass(frozen=True)
class Scope:
    """One step of an export: the tensors outside every block (`block` None), or one block's."""

    program: Program
    block: Block | None

    def holds(self, name: str) -> bool:
        """Whether the qualified module or tensor name is in this scope."""
        return self.program.block_of(name) is self.block


def export_scopes(program: Program) -> Iterator[Scope]:
    """What lies outside the blocks, then each block with its weights read (a streamed program's blocks are on
    the meta device between scopes): a format written scope by scope holds one block at a time."""
    yield Scope(program, None)
    for block in program.blocks:
        with program.reading(block):
            yield Scope(program, block)


def checkpoint_linears(program: Program, fmt: str, scope: Scope | None = None) -> list[CheckpointLinear]:
    """The checkpoint Linears of every lowered module (in `scope`), named by transformers' save-time conversion."""
    model = program.model
    lowered = {n: m for n, m in model.named_modules()
               if isinstance(m, (QuantizedLinear, QuantizedExperts)) and (scope is None or scope.holds(n))}
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

def online_rotations(program: Program, parts: list[CheckpointLinear], fmt: str,
                     scope: Scope | None = None) -> dict[str, torch.nn.Module]:
    """Checkpoint Linear name -> the online rotation applied to its input at run time (in `scope`).

    Rotations are graph nodes in front of a Linear, or the `down_transform` of fused experts (one
    per expert's down projection). Only their Kronecker factors matter here.
    """
    found: dict[str, torch.nn.Module] = {}
    for block in program.blocks:
        if block.traced is None or (scope is not None and scope.block is not block):
            continue
        gm = block.graph_module
        for node in gm.graph.nodes:
            module = gm.get_submodule(node.target) if node.op == "call_module" else None
            if not hasattr(module, "kronecker_factors") or isinstance(module, QKHadamard):  # that one feeds attention
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


def qk_rotations(program: Program, scope: Scope | None = None) -> list[tuple[Block, QKHadamard]]:
    """The online Hadamards on attention queries and keys (rotate's online_qk) of the blocks' graphs (in `scope`),
    with their blocks, in graph order."""
    return [(block, module) for block in program.blocks if block.traced is not None
            and (scope is None or scope.block is block)
            for module in block.graph_module.modules() if isinstance(module, QKHadamard)]


def kv_cache_quantizers(program: Program, scope: Scope | None = None) -> list[tuple[Block, KVCacheQuantize]]:
    """The KV cache quantizers of the blocks' graphs (in `scope`), with their blocks, in graph order."""
    return [(block, module) for block in program.blocks if block.traced is not None
            and (scope is None or scope.block is block)
            for module in block.graph_module.modules() if isinstance(module, KVCacheQuantize)]


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

def float_tensors(program: Program, scope: Scope | None = None) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers outside lowered modules (in `scope`), under their checkpoint names and in
    their dtypes.

    Tied weights are written under each of their names.
    """
    from transformers.core_model_loading import revert_weight_conversion

    model = program.model
    lowered = {n for n, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedExperts))}

    def inside_lowered(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]) in lowered for i in range(1, len(parts)))

    state = {n: t.detach() for n, t in model.state_dict(keep_vars=True).items()
             if not inside_lowered(n) and (scope is None or scope.holds(n))}
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

    def load(self) -> torch.Tensor:
        with safe_open(self.path, "pt") as f:
            return f.get_tensor(self.name)


def source_tensors(program: Program, fmt: str) -> dict[str, SourceTensor]:
    """The checkpoint tensors the program copies (`Program.source_tensors`), each file's header read once."""
    by_file: dict[Path, list[str]] = {}
    for name, path in program.source_tensors.items():
        by_file.setdefault(Path(path), []).append(name)
    found = {}
    for path, names in by_file.items():
        if not path.is_file():
            raise ExportError(f"{fmt}: {path} of the source checkpoint is gone; the tensors it holds must be copied from it")
        with safe_open(path, "pt") as f:
            missing = sorted(set(names) - set(f.keys()))
        if missing:
            raise ExportError(f"{fmt}: {missing[0]} is not in {path} of the source checkpoint, which should hold it")
        found.update({name: SourceTensor(name, path) for name in names})
    return found


class WrittenFiles:
    """Tensors read back from written safetensors files, the files opened as needed and closed again once
    `mapped_bytes` have been read through them. An open file keeps every page read through it mapped, so a verify
    that checks the blocks one by one through files it kept open grew by the whole output; opening the file for
    each tensor instead costs a header parse per read (tens of milliseconds for an MoE shard's)."""

    def __init__(self, mapped_bytes: int = 256 * 2**20) -> None:
        self.mapped_bytes = mapped_bytes
        self.handles: dict[Path, Any] = {}
        self.read = 0

    def get(self, path: Path, name: str) -> torch.Tensor:
        if self.read >= self.mapped_bytes:  # the tensors still referenced keep their own pages
            self.handles.clear()
            self.read = 0
        if path not in self.handles:
            self.handles[path] = safe_open(path, "pt")
        tensor = self.handles[path].get_tensor(name)
        self.read += tensor.numel() * tensor.element_size()
        return tensor


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def natural_key(name: str) -> list:
    return [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in name.split(".")]


class ShardWriter:
    """Writes a checkpoint's tensors given scope by scope, as `weights_file` or as shards
    `<stem>-0000i-of-0000N.safetensors` of at most `max_bytes` each plus `<weights_file>.index.json`
    ({"metadata": {"total_size"}, "weight_map"}), as transformers writes them.

    Each scope's tensors go to a file of their own in a private folder as they come (`add`), so no more than one
    scope is held in memory; `finish` then lays every tensor out in name order and packs the shards, copying
    each tensor's bytes from where it lies (a scope's file, or the source checkpoint for copied tensors). The
    safetensors library writes only whole files from tensors in memory, hence the copy of raw bytes: its layout
    (a little-endian u64 header length, a JSON header of dtypes, shapes and data offsets, then the data) is
    fixed by the format, and `verify` reads every file back with the library."""

    def __init__(self, out_dir: Path, weights_file: str, max_bytes: int | None, fmt: str) -> None:
        self.out_dir, self.weights_file, self.max_bytes, self.fmt = out_dir, weights_file, max_bytes, fmt
        self.scopes_dir = out_dir / ".scopes"
        self.scopes_dir.mkdir()
        self.located: dict[str, tuple[Path, str]] = {}  # tensor name -> (safetensors file, name in it)
        self.scope_files = 0

    def add(self, tensors: dict[str, torch.Tensor | SourceTensor]) -> None:
        """One scope's tensors: written to a file of its own now (copied tensors stay where they are)."""
        clashes = sorted(set(tensors) & set(self.located), key=natural_key)
        if clashes:
            raise ExportError(f"{self.fmt}: {clashes[0]} is written twice (by two scopes of the program, or as the "
                              "program's tensor and one copied from the source checkpoint)")
        own = {n: t for n, t in tensors.items() if not isinstance(t, SourceTensor)}
        if own:
            path = self.scopes_dir / f"{self.scope_files}.safetensors"
            self.scope_files += 1
            save_file(storable_tensors(own), path)
            self.located.update({name: (path, name) for name in own})
        self.located.update({n: (t.path, t.name) for n, t in tensors.items() if isinstance(t, SourceTensor)})

    def finish(self) -> list[Path]:
        """Write the files (the shards in name order); return them."""
        headers = {path: _header(path) for path in {path for path, _ in self.located.values()}}
        entries = {name: headers[path][stored] for name, (path, stored) in self.located.items()}
        shards: list[list[str]] = [[]]
        size = 0
        for name in sorted(self.located, key=natural_key):
            nbytes = _span(entries[name])
            if self.max_bytes is not None and shards[-1] and size + nbytes > self.max_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        if len(shards) == 1:
            files = [self.weights_file]
        else:
            stem = self.weights_file.removesuffix(".safetensors")
            files = [f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        written, weight_map = [], {}
        for file, names in zip(files, shards):
            self._write_shard(self.out_dir / file, names, entries)
            weight_map.update(dict.fromkeys(names, file))
            written.append(self.out_dir / file)
        shutil.rmtree(self.scopes_dir)
        if len(shards) > 1:
            total = sum(_span(entry) for entry in entries.values())
            index_file = self.out_dir / f"{self.weights_file}.index.json"
            index_file.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
            written.append(index_file)
        return written

    def _write_shard(self, path: Path, names: list[str], entries: dict[str, dict]) -> None:
        # widest elements first, as the library orders them, so every tensor starts aligned to its element size
        ordered = sorted(names, key=lambda n: (-_SAFETENSORS_BYTES.get(entries[n]["dtype"], 1), natural_key(n)))
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in ordered:
            nbytes = _span(entries[name])
            header[name] = {"dtype": entries[name]["dtype"], "shape": entries[name]["shape"],
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        with path.open("wb") as out:
            out.write(len(encoded).to_bytes(8, "little"))
            out.write(encoded)
            for name in ordered:
                source, _ = self.located[name]
                _copy_bytes(source, entries[name]["data_start"], _span(entries[name]), out)


def _header(path: Path) -> dict[str, dict]:
    """A safetensors file's tensor entries, each with `data_start`: where its bytes begin in the file."""
    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    for entry in header.values():
        entry["data_start"] = 8 + length + entry["data_offsets"][0]
    return header


def _span(entry: dict) -> int:
    return entry["data_offsets"][1] - entry["data_offsets"][0]


def _copy_bytes(path: Path, start: int, length: int, out) -> None:
    with path.open("rb") as f:
        f.seek(start)
        while length:
            chunk = f.read(min(length, 64 * 2**20))
            if not chunk:
                raise ExportError(f"{path} ended before a tensor it declares")
            out.write(chunk)
            length -= len(chunk)


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
