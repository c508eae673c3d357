"""The `vllm` backend: a compressed-tensors checkpoint (docs/formats/vllm.md), the layout llm-compressor writes and
vLLM and transformers load.

    model.safetensors (or model-0000i-of-0000N.safetensors + model.safetensors.index.json)
    config.json                       the model's, with `quantization_config` (written by compressed-tensors)
    tokenizer, processor files ...    copied by the HF frontend

Each checkpoint Linear (every expert's projection of fused MoE experts included, under the per-expert names
vLLM's MoE loader reads) is compressed by the compressed-tensors library itself from its dequantized weight
and slimc's scales: `int-quantized` (int8 `weight`, `weight_scale`) for int8 weights with quantized
activations, `pack-quantized` (`weight_packed` int32, `weight_scale`, `weight_shape`) for int4 weights and
weight-only schemes; static activations add `input_scale` (and `input_zero_point` when asymmetric). Online
Hadamard rotations become compressed-tensors input transforms (`vllm_transforms`).
`verify` parses the config with compressed-tensors and decompresses every Linear with its compressors.
"""

from __future__ import annotations

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
    same_bits,
    shard_bytes,
    source_tensors,
)
from slimc.backends.vllm_transforms import (
    check_transforms,
    expressible_rotations,
    runtime_linear,
    target_patterns,
    transform_config,
    transform_tensors,
)
from slimc.errors import ExportError
from slimc.ir import Program
from slimc.numerics.modules import EXPERT_WEIGHTS, ChannelScale, QuantizedExperts
from slimc.numerics.quant import dequantize, expand_to_weight
from slimc.schemes import KVCacheScheme, QuantScheme, TensorScheme

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = WEIGHTS_FILE + ".index.json"
CONFIG_FILE = "config.json"
_STRATEGIES = {"per_channel": "channel", "per_group": "group", "per_tensor": "tensor", "per_token": "token"}


def quantization_args(scheme: TensorScheme):
    """compressed-tensors' QuantizationArgs of one slimc tensor scheme."""
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=scheme.bits, type="int", symmetric=scheme.symmetric,
                            strategy=_STRATEGIES[scheme.granularity], group_size=scheme.group_size,
                            dynamic=scheme.dynamic)


def compression_format(scheme: QuantScheme) -> str:
    """int8 weights with quantized activations are stored as int8 (vLLM's W8A8 kernels read `weight`); int4
    weights and weight-only schemes are packed into int32 (vLLM's WNA16 kernels read `weight_packed`)."""
    return "int-quantized" if scheme.act is not None and scheme.weight.bits == 8 else "pack-quantized"


def compressed_scheme(scheme: QuantScheme, targets: list[str]):
    from compressed_tensors.quantization import QuantizationScheme

    return QuantizationScheme(targets=targets, weights=quantization_args(scheme.weight),
                              input_activations=None if scheme.act is None else quantization_args(scheme.act),
                              format=compression_format(scheme))


@register_backend("vllm")
class VllmBackend(Backend):
    """compressed-tensors checkpoint for vLLM.

    Options:
    - `max_shard_size`: split the weights into files of at most this size (bytes, or "5GB", "500MiB"; default
      5GB); None writes one file. Either way a streamed program is written one block at a time.
    """

    extra = "vllm"
    max_shard_size: ShardSize = "5GB"
    # No shape rules of its own: compressed-tensors packs int4 codes into int32 words and pads the last one.
    shape_rules = ()

    def kv_cache_refusal(self, scheme: KVCacheScheme) -> str | None:
        """fp8_e4m3 per tensor is compressed-tensors' kv_cache_scheme, with k_scale / v_scale (`_kv_cache_tensors`)."""
        if scheme.dtype != "fp8_e4m3":
            return ("vLLM reads a quantized KV cache from compressed-tensors' kv_cache_scheme as float8 (e4m3) with "
                    "per-tensor k_scale / v_scale, not int8 per channel; use kv_cache: {dtype: fp8_e4m3, granularity: "
                    "per_tensor}, or export the int8 cache (C8) in the mindie format")
        return None

    def qk_rotation_refusal(self) -> str | None:
        """compressed-tensors can name such a transform (locations q_attn and k_cache), but vLLM does not apply it."""
        return ("compressed-tensors can describe it (transform locations q_attn and k_cache), but vLLM applies "
                "compressed-tensors transforms only to the inputs and outputs of Linear layers, so its cache would hold "
                "unrotated keys under scales fitted to rotated ones; export it with format mindie, or compile for vllm "
                "without rotate's online_qk")

    def write(self, program: Program, out_dir: Path) -> list[Path]:
        from compressed_tensors.compressors import ModelCompressor

        out_dir = Path(out_dir)
        before = set(out_dir.iterdir())
        parts = _exportable_linears(program)  # every block's, on the meta device where streamed: names and schemes
        rotations = expressible_rotations(program, parts)
        writer = ShardWriter(out_dir, WEIGHTS_FILE, shard_bytes(self.max_shard_size), "vllm")
        copied = source_tensors(program, "vllm")
        for scope in export_scopes(program):
            tensors = transform_tensors(program, rotations) if scope.block is None else {}
            for part in _scope_linears(program, scope):
                tensors.update(_compressed_tensors(part))
            for name, tensor in float_tensors(program, scope).items():
                if name in tensors:
                    raise ExportError(f"vllm: {name} is both a float tensor and a quantized Linear's tensor")
                tensors[name] = tensor
            tensors.update(_kv_cache_tensors(program, parts, scope))
            writer.add({**tensors, **(copied if scope.block is None else {})})
        writer.finish()
        ModelCompressor(quantization_config=quantization_config(program, parts, set(copied)),
                        transform_config=transform_config(program, parts, rotations)).update_config(str(out_dir))
        for path in out_dir.iterdir():
            path.chmod(0o644)
        return sorted(set(out_dir.iterdir()) - before)

    def verify(self, program: Program, out_dir: Path) -> None:
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.quantization import QuantizationConfig

        out_dir = Path(out_dir)
        stored = _StoredTensors(out_dir)
        try:
            raw = json.loads((out_dir / CONFIG_FILE).read_text())["quantization_config"]
            config = QuantizationConfig.model_validate(raw)
        except (OSError, KeyError, ValueError) as e:
            raise ExportError(f"vllm: {out_dir / CONFIG_FILE} has no valid compressed-tensors quantization_config: {e}") from e
        if raw.get("quant_method") != "compressed-tensors" or config.quantization_status != "compressed":
            raise ExportError(f"vllm: quantization_config must say quant_method compressed-tensors and status compressed, "
                              f"got {raw.get('quant_method')!r} / {config.quantization_status!r}")
        expected = check_transforms(program, _exportable_linears(program), raw.get("transform_config"), stored)
        floats: set[str] = set()
        for scope in export_scopes(program):  # one block's tensors at a time
            for part in _scope_linears(program, scope):
                group = _group_of(config, part.prefix)
                wanted = compressed_scheme(part.scheme, group.targets)
                if group.weights != wanted.weights or group.input_activations != wanted.input_activations:
                    raise ExportError(f"vllm: {part.prefix} falls in a config group whose scheme is not its {part.scheme.label}")
                compressor = BaseCompressor.get_value_from_registry(group.format or config.format)
                names = _stored_names(part, group, compressor)
                expected.update(f"{part.prefix}.{n}" for n in names)
                own = {n: stored[f"{part.prefix}.{n}"] for n in names}
                weight = compressor.decompress({k: v for k, v in own.items() if k.startswith("weight")}, group)["weight"]
                if not torch.equal(weight.float(), _dequantized(part)):
                    error = (weight.float() - _dequantized(part)).abs().max()
                    raise ExportError(f"vllm: {part.prefix} decompressed by compressed-tensors differs from the lowered "
                                      f"weight by {error:.3g}")
                for name, tensor in _activation_tensors(part).items():
                    if not torch.equal(own[name], tensor):
                        raise ExportError(f"vllm: {part.prefix}.{name} differs from the lowered Linear's")
            for name, tensor in float_tensors(program, scope).items():
                if not same_bits(tensor.detach().cpu().contiguous(), stored[name]):
                    raise ExportError(f"vllm: {name} differs from the program's float tensor")
                floats.add(name)
            for name, tensor in _kv_cache_tensors(program, _scope_linears(program, scope), scope).items():
                if not torch.equal(stored[name], tensor):
                    raise ExportError(f"vllm: {name} differs from the program's KV cache scale")
                expected.add(name)
        if config.kv_cache_scheme != kv_cache_scheme(program):
            raise ExportError(f"vllm: quantization_config.kv_cache_scheme is {config.kv_cache_scheme}, the program's "
                              f"KV cache {kv_cache_scheme(program)}")
        copied = source_tensors(program, "vllm")
        for name, source in copied.items():
            if not same_bits(source.load(), stored[name]):
                raise ExportError(f"vllm: {name} differs from {source.path.name} of the source checkpoint, which it should copy")
        extra = set(stored.files) - expected - floats - set(copied)
        missing = (expected | floats | set(copied)) - set(stored.files)
        if extra or missing:
            raise ExportError(f"vllm: the written tensors do not match the program: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(extra)[:5]}")


# --- what to write ------------------------------------------------------------------------------------


def _exportable_linears(program: Program) -> list[CheckpointLinear]:
    """The checkpoint Linears (of blocks on the meta device too: their names and schemes), once the program is
    known to hold no multiply that compressed-tensors cannot carry (online rotations are checked by
    `expressible_rotations`)."""
    if program.source.library == "diffusers":
        raise ExportError("vllm: compressed-tensors checkpoints are for language models that vLLM serves; "
                          "export a diffusion transformer with format mindie or onnx")
    parts = checkpoint_linears(program, "vllm")
    for block in program.blocks:
        if block.traced is not None and any(isinstance(m, ChannelScale) for m in block.graph_module.modules()):
            raise ExportError(f"vllm: {block.name} has an explicit smoothing multiply, which compressed-tensors cannot "
                              "express; export it with format mindie, or smooth only where the scale folds")
    if not parts:
        raise ExportError("vllm: the program has no quantized Linear; a compressed-tensors checkpoint needs at least one")
    return parts


def _scope_linears(program: Program, scope: Scope) -> list[CheckpointLinear]:
    """The checkpoint Linears of one scope, with their codes and scales read."""
    parts = checkpoint_linears(program, "vllm", scope)
    for part in parts:
        if part.scheme.weight.granularity == "per_tensor" and not torch.all(part.scale == part.scale[:1]):
            raise ExportError(f"vllm: {part.prefix} has per-tensor weights with more than one scale")
    return parts


def _dequantized(part: CheckpointLinear) -> torch.Tensor:
    """float32 (out, in): what the codes and scales stand for."""
    weight = part.scheme.weight
    return dequantize(part.codes, expand_to_weight(part.scale, part.codes.shape, weight),
                      expand_to_weight(part.offset, part.codes.shape, weight))


def _weight_qparams(part: CheckpointLinear) -> dict[str, torch.Tensor]:
    """`weight_scale` float32 ((1,) per tensor, (out, 1) per channel, (out, in / g) per group) and, if asymmetric,
    `weight_zero_point` int8 of the same shape."""
    per_tensor = part.scheme.weight.granularity == "per_tensor"
    scale, offset = (part.scale[:1].reshape(1), part.offset[:1].reshape(1)) if per_tensor else (part.scale, part.offset)
    qparams = {"weight_scale": scale.float().contiguous()}
    if not part.scheme.weight.symmetric:
        qparams["weight_zero_point"] = offset.to(torch.int8).contiguous()
    return qparams


def _activation_tensors(part: CheckpointLinear) -> dict[str, torch.Tensor]:
    """Static activations: `input_scale` float32 (1,) and, if asymmetric, `input_zero_point` int8 (1,)."""
    if part.input_qparams is None:
        return {}
    scale, offset = part.input_qparams
    tensors = {"input_scale": scale.float().reshape(1).contiguous()}
    if not part.scheme.act.symmetric:
        tensors["input_zero_point"] = offset.to(torch.int8).reshape(1).contiguous()
    return tensors


def _compressed_tensors(part: CheckpointLinear) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one Linear, compressed by compressed-tensors from the dequantized weight."""
    from compressed_tensors.compressors import BaseCompressor

    scheme = compressed_scheme(part.scheme, ["Linear"])
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    compressed = compressor.compress({"weight": _dequantized(part), **_weight_qparams(part)}, scheme)
    codes = compressed.get("weight")
    if codes is not None and not torch.equal(codes.to(torch.int8), part.codes):
        raise ExportError(f"vllm: compressed-tensors re-quantized {part.prefix} to other codes than slimc's")
    tensors = {f"{part.prefix}.{name}": tensor.contiguous() for name, tensor in compressed.items()}
    tensors.update({f"{part.prefix}.{name}": tensor for name, tensor in _activation_tensors(part).items()})
    if part.bias is not None:
        tensors[f"{part.prefix}.bias"] = part.bias.to(part.dtype).contiguous()
    return tensors


def quantization_config(program: Program, parts: list[CheckpointLinear], copied: set[str]):
    """One config group per scheme. A single scheme targets every `Linear`; several target their Linears by
    `re:` patterns (layer and expert numbers generalised where that stays unambiguous). `ignore` names every
    float Linear (under its runtime and checkpoint names, which differ for some multimodal models), float fused
    experts, and the 2-D weights copied unchanged from the source checkpoint."""
    from compressed_tensors.quantization import QuantizationConfig

    by_scheme: dict[QuantScheme, dict[str, None]] = {}  # names kept in order, each once (MoE: tens of thousands)
    for part in parts:
        by_scheme.setdefault(part.scheme, {}).update(dict.fromkeys((part.prefix, runtime_linear(part))))
    if len(by_scheme) == 1:
        targets = {next(iter(by_scheme)): ["Linear"]}
    else:
        targets = target_patterns(by_scheme)
    groups = {f"group_{i}": compressed_scheme(scheme, targets[scheme]) for i, scheme in enumerate(by_scheme)}
    formats = {compression_format(scheme) for scheme in by_scheme}
    return QuantizationConfig(config_groups=groups, format=formats.pop() if len(formats) == 1 else "mixed-precision",
                              quantization_status="compressed", ignore=_ignored(program, parts, copied),
                              kv_cache_scheme=kv_cache_scheme(program))


def kv_cache_scheme(program: Program):
    """compressed-tensors' kv_cache_scheme of a program with an FP8 KV cache: float 8-bit, per tensor, symmetric,
    static (vLLM's FP8 KV cache); None without one."""
    from compressed_tensors.quantization import QuantizationArgs

    if not kv_cache_quantizers(program):
        return None
    return QuantizationArgs(num_bits=8, type="float", strategy="tensor", symmetric=True, dynamic=False)


def _kv_cache_tensors(program: Program, parts: list[CheckpointLinear], scope: Scope) -> dict[str, torch.Tensor]:
    """`<attn>.k_scale` and `<attn>.v_scale` float32 (1,) of each KV cache quantizer in `scope`, under the checkpoint
    name of the attention module (its k/v projection's, less the last part), as compressed-tensors names them."""
    tensors = {}
    for block, quantizer in kv_cache_quantizers(program, scope):
        prefixes = checkpoint_prefixes(program, parts, block.qualified(quantizer.projection))
        if len(prefixes) != 1:
            raise ExportError(f"vllm: {block.qualified(quantizer.projection)} is written as {', '.join(prefixes)}; the "
                              "KV cache scales belong to one attention module")
        attention = prefixes[0].rpartition(".")[0]
        tensors[f"{attention}.{'k' if quantizer.which == 'key' else 'v'}_scale"] = quantizer.scale.float().reshape(1)
    return tensors


def _ignored(program: Program, parts: list[CheckpointLinear], copied: set[str]) -> list[str]:
    quantized = {part.runtime.removesuffix(".weight") for part in parts} | {part.prefix for part in parts}
    ignored: dict[str, None] = {}  # in order, each name once
    for name, module in program.model.named_modules():
        if isinstance(module, torch.nn.Linear) and name not in quantized:
            ignored.update(dict.fromkeys((name, *checkpoint_prefixes(program, parts, name))))
        elif _is_float_experts(module):
            ignored[name] = None
    copied_layers = {name.removesuffix(".weight") for name in copied if name.endswith(".weight")}
    return [*ignored, *sorted(copied_layers - ignored.keys(), key=natural_key)]


def _is_float_experts(module: torch.nn.Module) -> bool:
    return not isinstance(module, QuantizedExperts) and all(
        isinstance(getattr(module, w, None), torch.Tensor) and getattr(module, w).ndim == 3 for w in EXPERT_WEIGHTS)


# --- read-back ----------------------------------------------------------------------------------------


def _group_of(config, prefix: str):
    """The one config group whose targets take the checkpoint Linear `prefix` (every one of them is a Linear)."""
    from compressed_tensors.utils import match_name

    if any(match_name(prefix, ignored) for ignored in config.ignore or []):
        raise ExportError(f"vllm: the quantized Linear {prefix} is in quantization_config.ignore")
    groups = [g for g in config.config_groups.values()
              if any(t == "Linear" or match_name(prefix, t) for t in g.targets)]
    if len(groups) != 1:
        raise ExportError(f"vllm: {prefix} is taken by {len(groups)} quantization_config groups; it needs exactly one")
    return groups[0]


def _stored_names(part: CheckpointLinear, group, compressor) -> list[str]:
    names = [*compressor.compression_param_names(group), *_activation_tensors(part)]
    return names + (["bias"] if part.bias is not None else [])


class _StoredTensors:
    """The written tensors by name, read one at a time from their (possibly sharded) files."""

    def __init__(self, out_dir: Path) -> None:
        index = out_dir / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: out_dir / file for name, file in weight_map.items()}
        elif (out_dir / WEIGHTS_FILE).is_file():
            with safe_open(out_dir / WEIGHTS_FILE, "pt") as f:
                self.files = dict.fromkeys(f.keys(), out_dir / WEIGHTS_FILE)
        else:
            raise ExportError(f"vllm: {out_dir} has neither {WEIGHTS_FILE} nor {INDEX_FILE}")
        self.written = WrittenFiles()  # memory bounded by the tensors being compared
        for path in sorted(set(self.files.values())):
            if not path.is_file():
                raise ExportError(f"vllm: {path.name} is listed in {INDEX_FILE} but does not exist in {out_dir}")

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise ExportError(f"vllm: {name} is missing from the written checkpoint")
        return self.written.get(self.files[name], name)

