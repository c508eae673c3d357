"""The `mindie` backend: the Ascend "ascendV1" layout that MindIE and vLLM-Ascend load (docs/formats/mindie.md).

    quant_model_weights.safetensors (or -0000i-of-0000N shards + .index.json)
    quant_model_description.json      every tensor -> quant type, plus version, model_quant_type, ...
    config.json, tokenizer files ...  copied by the HF frontend

Each lowered Linear (and each expert of lowered fused experts) is written under its checkpoint
name with the tensors its Ascend type needs; everything else is written as FLOAT. `verify` reads
the files back with the independent reader (`mindie_reader`) and recomputes every quantized
Linear from them.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import torch
from safetensors import safe_open

from slimc.backends.base import Backend, register_backend
from slimc.backends.checkpoint import (
    CheckpointLinear,
    Scope,
    ShardSize,
    ShardWriter,
    WrittenFiles,
    checkpoint_linears,
    checkpoint_prefixes,
    export_scopes,
    float_tensors,
    kv_cache_quantizers,
    natural_key,
    online_rotations,
    qk_rotations,
    same_bits,
    shard_bytes,
    source_tensors,
)
from slimc.backends.mindie_reader import (
    DESCRIPTION_FILE,
    GLOBAL_KEYS,
    INDEX_FILE,
    KV_CACHE_KEYS,
    KV_CACHE_PROJECTIONS,
    KV_CACHE_SUFFIXES,
    KV_CACHE_TYPE,
    MUL_SCALE_SUFFIX,
    QK_ROTATION_SUFFIXES,
    QUANT_TYPE_PRIORITY,
    ROTATION_SUFFIXES,
    UNTYPED_SUFFIXES,
    VERSION,
    WEIGHTS_FILE,
    WRAPPED_LINEAR,
    AscendExperts,
    AscendLinear,
    load_ascend_model,
    model_quant_type,
    read_description,
    tensor_files,
    tensor_types,
    unpacked_shape,
)
from slimc.errors import ExportError, SlimcError
from slimc.ir import Program
from slimc.numerics.modules import ChannelScale, FakeQuantize, QuantizedLinear
from slimc.numerics.quant import pack_int4
from slimc.schemes import KVCacheScheme, QuantScheme, ShapeRule

__all__ = ["AscendExperts", "AscendLinear", "MindieBackend", "load_ascend_model"]

SUPPORTED = ("W8A8", "W8A8_DYNAMIC", "W8A16", "W4A16", "W4A4_DYNAMIC", "W4A8_DYNAMIC")
SCALE_BIAS_SPLITS = 16  # W4A8 row-parallel scale_bias: one column per 1/16 of the input (tensor parallel up to 16)

@register_backend("mindie")
class MindieBackend(Backend):
    """Ascend ascendV1 output.

    Options:
    - `max_shard_size`: split the weights into files of at most this size (bytes, or "5GB", "500MiB"; default
      5GB); None writes one file. Either way a streamed program is written one block at a time.
    - `row_parallel`: globs over checkpoint Linear names (without ".weight") that tensor parallelism
      splits along their input (W4A8_DYNAMIC only: their `scale_bias` gets one column per 1/16 of the input).
    """

    max_shard_size: ShardSize = "5GB"
    row_parallel: list[str] = ["*.o_proj", "*.down_proj"]
    # The shapes `_part_tensors`' layouts hold: `compile` checks them on the plan, `_check_scheme` on what is written.
    shape_rules = (
        ShapeRule(lambda s: s.label == "W4A16" and s.weight.granularity == "per_group", lambda out, in_, s: out % 2 == 0,
                  "per-group W4A16 needs an even output size: it packs two int4 output rows per byte",
                  "give these layers an int8 weight scheme (W8A16)"),
        ShapeRule(lambda s: s.label == "W4A16" and s.weight.granularity != "per_group", lambda out, in_, s: in_ % 2 == 0,
                  "per-channel W4A16 needs an even input size: it packs two int4 input columns per byte",
                  "give these layers an int8 weight scheme (W8A16)"),
        ShapeRule(lambda s: s.label == "W4A8_DYNAMIC", lambda out, in_, s: out % 2 == 0,
                  "W4A8_DYNAMIC needs an even output size: it packs two int4 output rows per byte",
                  "give these layers int8 weights (W8A8_DYNAMIC)"),
        ShapeRule(lambda s: s.label == "W4A8_DYNAMIC", lambda out, in_, s: in_ % SCALE_BIAS_SPLITS == 0,
                  f"W4A8_DYNAMIC needs an input size divisible by {SCALE_BIAS_SPLITS}: a row-parallel layer's scale_bias "
                  f"has one column per 1/{SCALE_BIAS_SPLITS} of the input (tensor parallelism up to {SCALE_BIAS_SPLITS})",
                  "give these layers int8 weights (W8A8_DYNAMIC)"),
    )

    def kv_cache_refusal(self, scheme: KVCacheScheme) -> str | None:
        """int8 per channel is C8, written as msModelSlim does (`_kv_cache_tensors`)."""
        if scheme.dtype != "int8":
            return (f"Ascend runtimes quantize the KV cache to int8 per channel (C8), not {scheme.dtype}; use "
                    "kv_cache: {dtype: int8, granularity: per_channel}")
        return None

    def qk_rotation_refusal(self) -> str | None:
        """Written beside the C8 scales as `<attn>.qk_rotation_m` / `_n` (`_rotation_tensors`)."""
        return None

    def write(self, program: Program, out_dir: Path) -> list[Path]:
        out_dir = Path(out_dir)
        before = set(out_dir.iterdir())
        writer = ShardWriter(out_dir, WEIGHTS_FILE, shard_bytes(self.max_shard_size), "mindie")
        types: dict[str, str] = {}
        schemes: dict[str, QuantScheme] = {}
        rotated: list[str] = []
        for scope in export_scopes(program):
            parts = checkpoint_linears(program, "mindie", scope)
            tensors, scope_types = self._tensors(program, parts, scope)
            rotations = _rotation_tensors(program, parts, scope)
            copied = source_tensors(program, "mindie") if scope.block is None else {}
            writer.add({**tensors, **rotations, **copied})
            types.update(scope_types)
            types.update(dict.fromkeys(copied, "FLOAT"))
            schemes.update({part.prefix: part.scheme for part in parts})
            rotated.extend(rotations)
        description = {n: types[n] for n in sorted(types, key=natural_key)}
        description.update({
            "version": VERSION,
            "model_quant_type": model_quant_type(types.values()),
            "metadata": _metadata(program, rotated),
            "group_size": _group_size(schemes),
            "optional": {},
        })
        if KV_CACHE_TYPE in types.values():
            description.update(dict.fromkeys(KV_CACHE_KEYS, KV_CACHE_TYPE))
        written = writer.finish()
        (out_dir / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2) + "\n")
        written.append(out_dir / DESCRIPTION_FILE)
        for path in written:
            path.chmod(0o644)
        return sorted(set(out_dir.iterdir()) - before)

    def verify(self, program: Program, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        try:
            description = read_description(out_dir)
            files = tensor_files(out_dir)
        except SlimcError as e:
            raise ExportError(f"mindie: {e}") from e
        types = tensor_types(description)
        rotation_names = {n for n in files if n.endswith(UNTYPED_SUFFIXES)}
        _check_same_names("description", set(types), "safetensors", set(files) - rotation_names)
        _check_globals(description, types)
        stored = _StoredTensors(out_dir, files)
        expected_names, rotated, total = set(), [], 0
        for scope in export_scopes(program):  # one block's tensors at a time
            parts = checkpoint_linears(program, "mindie", scope)
            expected, expected_types = self._tensors(program, parts, scope)
            copied = source_tensors(program, "mindie") if scope.block is None else {}
            expected_types.update(dict.fromkeys(copied, "FLOAT"))
            rotations = _rotation_tensors(program, parts, scope)
            _check_same_names("the program's tensors", set(expected) | set(copied), "the written tensors", set(types),
                              missing_only=True)
            _check_same_names("the program's online rotations", set(rotations), "the written rotation tensors",
                              rotation_names, missing_only=True)
            expected_names.update(expected, copied)
            rotated.extend(rotations)
            for name, tensor in {**expected, **rotations}.items():
                actual = stored[name]
                total += actual.numel() * actual.element_size()
                if expected_types.get(name) != types.get(name) or not torch.equal(tensor.cpu(), actual):
                    raise ExportError(f"mindie: {name} ({types.get(name, 'online rotation')}, {actual.dtype} "
                                      f"{tuple(actual.shape)}) differs from the program's tensor")
            for name, source in copied.items():  # one at a time: a talker can be gigabytes
                actual = stored[name]
                total += actual.numel() * actual.element_size()
                if types[name] != "FLOAT" or not same_bits(source.load(), actual):
                    raise ExportError(f"mindie: {name} ({types[name]}, {actual.dtype} {tuple(actual.shape)}) differs from "
                                      f"{source.path.name} of the source checkpoint, which it should copy unchanged")
            for part in parts:
                wrapped = f"{part.prefix}{MUL_SCALE_SUFFIX}" in types
                _check_recomputed(part, stored.linear(part.prefix + WRAPPED_LINEAR if wrapped else part.prefix),
                                  description["group_size"])
        _check_same_names("the program's tensors", expected_names, "the written tensors", set(types))
        _check_same_names("the program's online rotations", set(rotated), "the written rotation tensors", rotation_names)
        if description["metadata"] != _metadata(program, rotated):
            raise ExportError(f"mindie: the description's metadata {description['metadata']} does not list the online rotations")
        _check_index(out_dir, total)
        is_bf16 = runs_in_bfloat16(program)
        for prefix, quant_type in _quantized_prefixes(types).items():
            _check_linear(prefix, quant_type, stored.linear(prefix), types, is_bf16, description["group_size"])
        _check_multiplies(types, stored, description["group_size"])

    def _tensors(self, program: Program, parts: list[CheckpointLinear], scope: Scope) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Every tensor of the scope to write (checkpoint name -> tensor) and its description type."""
        tensors, types = {}, {}
        is_bf16 = runs_in_bfloat16(program)
        for part in parts:
            _check_scheme(part)
            row_parallel = any(fnmatch.fnmatchcase(part.prefix, glob) for glob in self.row_parallel)
            for name, (tensor, quant_type) in _part_tensors(part, is_bf16, row_parallel).items():
                tensors[name], types[name] = tensor, quant_type
        for name, tensor in float_tensors(program, scope).items():
            if name in tensors:
                raise ExportError(f"mindie: {name} is both a float tensor and a quantized Linear's tensor")
            tensors[name], types[name] = tensor, "FLOAT"
        _nest_multiplied(tensors, types, _multiplied_prefixes(program, parts, set(tensors), scope))
        for name, tensor in _kv_cache_tensors(program, parts, scope).items():
            tensors[name], types[name] = tensor, KV_CACHE_TYPE
        order = sorted(tensors, key=natural_key)
        return {n: tensors[n] for n in order}, {n: types[n] for n in order}


def _kv_cache_tensors(program: Program, parts: list[CheckpointLinear], scope: Scope) -> dict[str, torch.Tensor]:
    """`<attn>.k_proj.kv_cache_scale` / `.kv_cache_offset` float32 (kv_heads · head_dim,) of each KV cache quantizer
    in `scope`, under the checkpoint name of the projection computing its keys or values (beside that Linear's own
    tensors, also when those are nested under `.linear`), as msModelSlim writes C8."""
    tensors = {}
    for block, quantizer in kv_cache_quantizers(program, scope):
        runtime = block.qualified(quantizer.projection)
        prefixes = checkpoint_prefixes(program, parts, runtime)
        expected = next(name for name, which in KV_CACHE_PROJECTIONS.items() if which == quantizer.which)
        if len(prefixes) != 1 or prefixes[0].rpartition(".")[2] != expected:
            raise ExportError(f"mindie: the int8 KV cache (C8) scales are named after the attention's {expected}, but "
                              f"{runtime} is written as {', '.join(prefixes)}; Ascend runtimes find C8 scales by "
                              "those names only")
        tensors[prefixes[0] + KV_CACHE_SUFFIXES[0]] = quantizer.scale.float().reshape(-1).contiguous()
        tensors[prefixes[0] + KV_CACHE_SUFFIXES[1]] = quantizer.offset.float().reshape(-1).contiguous()
    return tensors


def _group_size(schemes: dict[str, QuantScheme]) -> int:
    """The description's one group size (0 without per-group layers), given each checkpoint Linear's scheme."""
    group_sizes = {s.weight.group_size for s in schemes.values() if s.weight.granularity == "per_group"}
    if len(group_sizes) > 1:
        raise ExportError(f"mindie: the description has one group_size but the schemes use {sorted(group_sizes)}")
    per_channel_w4a16 = sorted((p for p, s in schemes.items() if s.label == "W4A16" and s.weight.granularity != "per_group"),
                               key=natural_key)
    if group_sizes and per_channel_w4a16:
        raise ExportError(f"mindie: {per_channel_w4a16[0]}: per-channel W4A16 packs along its input, but with a group_size "
                          "in the description runtimes unpack W4A16 along the output; use one W4A16 granularity")
    return group_sizes.pop() if group_sizes else 0


def runs_in_bfloat16(program: Program) -> bool:
    """Whether the runtime runs the model in bfloat16: the dtype of the source's config.json, else the program's.

    It decides how deq_scale is stored; calibrating a bfloat16 checkpoint in float32 still gives a bfloat16 runtime.
    """
    config = getattr(program.source, "config", None)
    dtype = getattr(config, "dtype", None) or getattr(getattr(config, "text_config", None), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    return (dtype if isinstance(dtype, torch.dtype) else program.dtype) == torch.bfloat16


# --- what to write ------------------------------------------------------------------------------------


def _rotation_tensors(program: Program, parts: list[CheckpointLinear], scope: Scope) -> dict[str, torch.Tensor]:
    """`P.kronecker_rotation_m` (m, m) and `P.kronecker_rotation_n` (n, n) float32 per rotated Linear P:
    the runtime reads P's input x (.., m·n) as X (m, n) and computes R_mᵀ · X · R_n (msModelSlim's layout).
    In the same layout `<attn>.qk_rotation_m` / `_n` per attention whose queries and keys are rotated after RoPE
    (rotate's online_qk), `<attn>` the checkpoint name its k_proj is written under, less `.k_proj`: the runtime
    rotates each head's vector of both before the keys enter the C8 cache."""
    tensors = {}
    for prefix, transform in online_rotations(program, parts, "mindie", scope).items():
        r_m, r_n = transform.kronecker_factors()
        tensors[prefix + ROTATION_SUFFIXES[0]] = r_m.float().contiguous()
        tensors[prefix + ROTATION_SUFFIXES[1]] = r_n.float().contiguous()
    for block, transform in qk_rotations(program, scope):
        runtime = block.qualified(transform.key_projection)
        prefixes = checkpoint_prefixes(program, parts, runtime)
        if len(prefixes) != 1:
            raise ExportError(f"mindie: the online query and key rotation is written under the attention's name, "
                              f"found from its k_proj, but {runtime} is written as {', '.join(prefixes) or 'nothing'}")
        attention = prefixes[0].rpartition(".")[0]
        r_m, r_n = transform.kronecker_factors()
        tensors[attention + QK_ROTATION_SUFFIXES[0]] = r_m.float().contiguous()
        tensors[attention + QK_ROTATION_SUFFIXES[1]] = r_n.float().contiguous()
    return tensors


def _metadata(program: Program, rotations: list[str]) -> dict:
    """The description's metadata: `quarot` lists the Linears with an online rotation (given its rotation tensors'
    names), max_tp_size 1 as the rotation mixes the whole input, so a tensor-parallel runtime must gather it first;
    and under `qk_rotation` the attentions whose queries and keys are rotated (per head: no gather needed)."""
    metadata = dict(program.ascend_metadata)
    layers = sorted({n.rpartition(".")[0] for n in rotations if n.endswith(ROTATION_SUFFIXES)}, key=natural_key)
    attentions = sorted({n.rpartition(".")[0] for n in rotations if n.endswith(QK_ROTATION_SUFFIXES)}, key=natural_key)
    quarot = {}
    if layers:
        quarot = {"max_tp_size": 1, "kronecker_rotation": {"layers": layers}}
    if attentions:
        quarot["qk_rotation"] = {"layers": attentions}
    if quarot:
        metadata["quarot"] = quarot
    return metadata


def _explicit_multiplies(program: Program, scope: Scope) -> dict[str, torch.Tensor]:
    """Runtime Linear name -> `mul_scale` of the explicit smoothing multiply (a ChannelScale node) on its input, in
    `scope`; Linears reading one multiply each get it. Quantizers and online rotations between are followed."""
    found: dict[str, torch.Tensor] = {}
    for block in program.blocks:
        if block.traced is None or scope.block is not block:
            continue
        gm = block.graph_module
        for node in gm.graph.nodes:
            if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), ChannelScale):
                continue
            readers = list(node.users)
            while readers:
                user = readers.pop()
                layer = gm.get_submodule(user.target) if user.op == "call_module" else None
                if isinstance(layer, FakeQuantize) or hasattr(layer, "kronecker_factors"):
                    readers.extend(user.users)
                elif isinstance(layer, torch.nn.Linear | QuantizedLinear):
                    found[block.qualified(user.target)] = gm.get_submodule(node.target).mul_scale
                else:
                    raise ExportError(f"mindie: {block.qualified(node.target)} multiplies the input of {user.name}, not of a "
                                      "Linear; Ascend checkpoints record explicit multiplies before Linears only")
    return found


def _multiplied_prefixes(program: Program, parts: list[CheckpointLinear], names: set[str],
                         scope: Scope) -> dict[str, torch.Tensor]:
    """Checkpoint Linear name -> `mul_scale`, for every Linear (quantized or float) behind an explicit multiply."""
    prefixes: dict[str, torch.Tensor] = {}
    rotated = set(online_rotations(program, parts, "mindie", scope))
    for runtime, mul_scale in _explicit_multiplies(program, scope).items():
        own = checkpoint_prefixes(program, parts, runtime)
        if not all(f"{prefix}.weight" in names for prefix in own):
            raise ExportError(f"mindie: {runtime} has an explicit smoothing multiply but no checkpoint tensors under its name")
        if rotated & set(own):
            raise ExportError(f"mindie: {runtime} has both an online rotation and an explicit smoothing multiply; "
                              "Ascend runtimes define no order for the two")
        prefixes.update(dict.fromkeys(own, mul_scale))
    return prefixes


def _nest_multiplied(tensors: dict[str, torch.Tensor], types: dict[str, str], multiplied: dict[str, torch.Tensor]) -> None:
    """msModelSlim's layout of a Linear P behind an explicit multiply: `P.div.mul_scale` (FLOAT) and P's own
    tensors under `P.linear.*`."""
    for prefix, mul_scale in multiplied.items():
        for name in [n for n in tensors if n.rpartition(".")[0] == prefix]:
            nested = f"{prefix}{WRAPPED_LINEAR}.{name.rpartition('.')[2]}"
            tensors[nested], types[nested] = tensors.pop(name), types.pop(name)
        tensors[prefix + MUL_SCALE_SUFFIX], types[prefix + MUL_SCALE_SUFFIX] = mul_scale.detach().float(), "FLOAT"


def _check_scheme(part: CheckpointLinear) -> None:
    scheme, label, where = part.scheme, part.scheme.label, f"mindie: {part.prefix}"
    if label not in SUPPORTED:
        raise ExportError(f"{where}: scheme {label} has no Ascend layout; the mindie backend writes {', '.join(SUPPORTED)}")
    act, weight = scheme.act, scheme.weight
    if act is not None and act.dynamic and (act.granularity != "per_token" or not act.symmetric):
        raise ExportError(f"{where}: Ascend dynamic activations are per_token and symmetric, not {act.granularity} "
                          f"{'symmetric' if act.symmetric else 'asymmetric'}")
    if label in ("W8A8", "W8A8_DYNAMIC", "W4A8_DYNAMIC") and not weight.symmetric:
        raise ExportError(f"{where}: {label} weights must be symmetric (the runtime ignores weight offsets)")
    if label in ("W8A8", "W4A8_DYNAMIC") and weight.granularity == "per_group":
        raise ExportError(f"{where}: {label} needs per-channel weights, not per_group")
    if label == "W4A16" and (part.codes.shape[0 if weight.granularity == "per_group" else 1] % 2):
        raise ExportError(f"{where}: W4A16 packs two int4 values per byte along the "
                          f"{'output' if weight.granularity == 'per_group' else 'input'} size, which must be even: {tuple(part.codes.shape)}")
    if label == "W4A8_DYNAMIC" and (part.codes.shape[0] % 2 or part.codes.shape[1] % SCALE_BIAS_SPLITS):
        raise ExportError(f"{where}: W4A8_DYNAMIC needs an even output size and an input size divisible by "
                          f"{SCALE_BIAS_SPLITS}, got {tuple(part.codes.shape)}")


def _part_tensors(part: CheckpointLinear, is_bf16: bool, row_parallel: bool) -> dict[str, tuple[torch.Tensor, str]]:
    """The tensors of one checkpoint Linear in the ascendV1 layout (docs/formats/mindie.md), with their description types."""
    p, label = part.prefix, part.scheme.label
    codes = part.codes.to(torch.int8)
    out: dict[str, tuple[torch.Tensor, str]] = {}
    if label == "W8A8":
        input_scale, input_offset = (q.float().reshape(1) for q in part.input_qparams)
        deq_scale = (input_scale * part.scale.float().reshape(-1)).float()
        bias = part.bias.float() if part.bias is not None else torch.zeros(codes.shape[0])
        quant_bias = torch.round(bias / deq_scale - codes.float().sum(dim=1) * input_offset).to(torch.int32)
        out[f"{p}.weight"] = (codes, label)
        out[f"{p}.input_scale"] = (input_scale, label)
        out[f"{p}.input_offset"] = (input_offset, label)
        out[f"{p}.deq_scale"] = (deq_scale if is_bf16 else deq_scale.view(torch.int32).to(torch.int64), label)
        out[f"{p}.quant_bias"] = (quant_bias, label)
    else:
        scale, offset = part.scale.float(), part.offset.float()
        if label == "W4A8_DYNAMIC" or (label == "W4A16" and part.scheme.weight.granularity == "per_group"):
            out[f"{p}.weight"] = (pack_int4(codes.T.contiguous()).T.contiguous(), label)  # two output rows per byte
        elif label == "W4A16":
            out[f"{p}.weight"] = (pack_int4(codes), label)  # per channel: two input columns per byte
        else:
            out[f"{p}.weight"] = (codes, label)
        out[f"{p}.weight_scale"] = (scale, label)
        out[f"{p}.weight_offset"] = (offset, label)
        if label == "W4A8_DYNAMIC":
            deq = codes.float() * scale
            if row_parallel:
                scale_bias = 8 * deq.reshape(codes.shape[0], SCALE_BIAS_SPLITS, -1).sum(dim=-1)
            else:
                scale_bias = 8 * deq.sum(dim=1, keepdim=True)
            out[f"{p}.scale_bias"] = (scale_bias, label)
    if part.bias is not None:
        out[f"{p}.bias"] = (part.bias.float(), "FLOAT")
    return out


# --- read-back checks ---------------------------------------------------------------------------------


def _check_same_names(what_a: str, a: set[str], what_b: str, b: set[str], missing_only: bool = False) -> None:
    if a - b:
        raise ExportError(f"mindie: {len(a - b)} tensors of {what_a} are missing from {what_b}, e.g. {sorted(a - b)[:5]}")
    if b - a and not missing_only:
        raise ExportError(f"mindie: {len(b - a)} tensors of {what_b} are not in {what_a}, e.g. {sorted(b - a)[:5]}")


class _StoredTensors:
    """The written tensors, read one at a time (memory stays bounded by the tensors being compared: WrittenFiles)."""

    def __init__(self, out_dir: Path, files: dict[str, Path]) -> None:
        self.files, self.written = files, WrittenFiles()
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise ExportError(f"mindie: {path.name} is listed in {INDEX_FILE} but does not exist in {out_dir}")
            with safe_open(path, "pt") as f:
                names = f.keys()
            for name in names:
                if files.get(name) != path:
                    raise ExportError(f"mindie: {name} is in {path.name} but the index puts it in {files.get(name)}")
        self.prefixes: dict[str, list[str]] = {}
        for name in files:
            prefix, _, suffix = name.rpartition(".")
            self.prefixes.setdefault(prefix, []).append(suffix)

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self.written.get(self.files[name], name)
        except Exception as e:  # safetensors raises its own error types for a name the index lists wrongly
            raise ExportError(f"mindie: cannot read {name} from {self.files[name].name}: {e}") from e

    def linear(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors `prefix.<suffix>` of one Linear, by suffix (its online rotation's factors aside)."""
        return {suffix: self[f"{prefix}.{suffix}"] for suffix in self.prefixes.get(prefix, [])
                if not f".{suffix}".endswith(ROTATION_SUFFIXES + KV_CACHE_SUFFIXES)}


def _check_index(out_dir: Path, total: int) -> None:
    if not (out_dir / INDEX_FILE).is_file():
        return
    stated = json.loads((out_dir / INDEX_FILE).read_text())["metadata"]["total_size"]
    if stated != total:
        raise ExportError(f"mindie: {INDEX_FILE} says total_size {stated} but the shards hold {total} bytes")


def _check_globals(description: dict, types: dict[str, str]) -> None:
    missing = [k for k in GLOBAL_KEYS if k not in description]
    if missing:
        raise ExportError(f"mindie: {DESCRIPTION_FILE} lacks {missing}")
    has_c8 = KV_CACHE_TYPE in types.values()
    if any((description.get(k) == KV_CACHE_TYPE) != has_c8 for k in KV_CACHE_KEYS):
        raise ExportError(f"mindie: {DESCRIPTION_FILE}: {' and '.join(KV_CACHE_KEYS)} must be {KV_CACHE_TYPE!r} exactly "
                          f"when {KV_CACHE_TYPE} tensors are written")
    unknown = sorted({t for t in types.values() if t not in QUANT_TYPE_PRIORITY and t not in ("W4A8_DYNAMIC", KV_CACHE_TYPE)})
    if unknown:
        raise ExportError(f"mindie: {DESCRIPTION_FILE} has unknown quant types {unknown}")
    if description["version"] != VERSION or description["model_quant_type"] != model_quant_type(types.values()):
        raise ExportError(f"mindie: version {description['version']!r} / model_quant_type {description['model_quant_type']!r} "
                          f"should be {VERSION!r} / {model_quant_type(types.values())!r}")
    objects = all(isinstance(description[k], dict) for k in ("metadata", "optional"))
    if not isinstance(description["group_size"], int) or not objects:
        raise ExportError(f"mindie: {DESCRIPTION_FILE}: group_size must be an int, metadata and optional objects")


def _quantized_prefixes(types: dict[str, str]) -> dict[str, str]:
    return {n.removesuffix(".weight"): t for n, t in types.items() if n.endswith(".weight") and t in SUPPORTED}


_SUFFIXES = {
    "W8A8": {"weight", "input_scale", "input_offset", "deq_scale", "quant_bias"},
    "W4A8_DYNAMIC": {"weight", "weight_scale", "weight_offset", "scale_bias"},
}


def _check_linear(prefix: str, quant_type: str, own: dict[str, torch.Tensor], types: dict[str, str], is_bf16: bool,
                  group_size: int) -> None:
    """The table of docs/formats/mindie.md for one quantized Linear: its tensor set, dtypes and shapes."""
    required = _SUFFIXES.get(quant_type, {"weight", "weight_scale", "weight_offset"})
    if set(own) - {"bias"} != required:
        raise ExportError(f"mindie: {prefix} ({quant_type}) has tensors {sorted(own)}; expected {sorted(required)} (+ bias)")
    weight, f32 = own["weight"], torch.float32
    out, in_ = unpacked_shape(quant_type, weight, group_size)
    per_row = (f32, lambda s: len(s) == 2 and s[0] == out and in_ % s[1] == 0, f"({out}, 1) or ({out}, in / group)")
    rules = {
        "weight": (torch.int8, lambda s: len(s) == 2, "(out, in)"),
        "bias": (f32, lambda s: s == (out,), f"({out},)"),
        "weight_scale": per_row,
        "weight_offset": (f32, lambda s: s == tuple(own["weight_scale"].shape), "the shape of weight_scale"),
        "scale_bias": (f32, lambda s: s in ((out, 1), (out, SCALE_BIAS_SPLITS)), f"({out}, 1) or ({out}, {SCALE_BIAS_SPLITS})"),
        "input_scale": (f32, lambda s: s == (1,), "(1,)"),
        "input_offset": (f32, lambda s: s == (1,), "(1,)"),
        "quant_bias": (torch.int32, lambda s: s == (out,), f"({out},)"),
        "deq_scale": (f32 if is_bf16 else torch.int64, lambda s: s == (out,), f"({out},)"),
    }
    for suffix, t in own.items():
        dtype, shape_ok, shape = rules[suffix]
        if t.dtype != dtype or not shape_ok(tuple(t.shape)):
            raise ExportError(f"mindie: {prefix}.{suffix} is {t.dtype} {tuple(t.shape)}; expected {dtype} {shape}")
    if "bias" in own and types[f"{prefix}.bias"] != "FLOAT":
        raise ExportError(f"mindie: {prefix}.bias should be described as FLOAT")
    if quant_type == "W4A4_DYNAMIC" and (weight.min() < -8 or weight.max() > 7):
        raise ExportError(f"mindie: {prefix}.weight holds values outside int4 [-8, 7]")


def _check_multiplies(types: dict[str, str], stored: _StoredTensors, group_size: int) -> None:
    """Each `P.div.mul_scale` is a FLOAT float32 vector as long as P's input, beside `P.linear.weight` (and no `P.weight`)."""
    for name in (n for n in types if n.endswith(MUL_SCALE_SUFFIX)):
        prefix = name.removesuffix(MUL_SCALE_SUFFIX)
        weight_name = f"{prefix}{WRAPPED_LINEAR}.weight"
        if weight_name not in types or f"{prefix}.weight" in types:
            raise ExportError(f"mindie: {name} needs the Linear's tensors under {prefix}{WRAPPED_LINEAR}.*, not {prefix}.*")
        weight, quant_type = stored[weight_name], types[weight_name]
        in_features = unpacked_shape(quant_type, weight, group_size)[1] if quant_type in SUPPORTED else weight.shape[-1]
        mul_scale = stored[name]
        if types[name] != "FLOAT" or mul_scale.dtype != torch.float32 or tuple(mul_scale.shape) != (in_features,):
            raise ExportError(f"mindie: {name} is {types[name]} {mul_scale.dtype} {tuple(mul_scale.shape)}; "
                              f"expected FLOAT torch.float32 ({in_features},)")


def _check_recomputed(part: CheckpointLinear, own: dict[str, torch.Tensor], group_size: int) -> None:
    """The Linear recomputed from the files alone matches the lowered one on a random input."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, part.codes.shape[1], generator=generator)
    reference = part.reference()
    with torch.no_grad():
        if part.input_qparams is not None:
            x = x * float(part.input_qparams[0]) * 40
        expected, actual = reference(x), AscendLinear(part.scheme.label, own, group_size)(x)
    tolerance = 1e-4 * expected.abs().max() + 1e-6
    if part.input_qparams is not None:  # quant_bias rounds bias / deq_scale to an integer
        tolerance = tolerance + 0.5 * (part.input_qparams[0].float() * part.scale.float().reshape(-1))
    error = (actual - expected).abs()
    if torch.any(error > tolerance):
        raise ExportError(f"mindie: {part.prefix} recomputed from the files differs from the lowered Linear by {error.max():.3g}")
