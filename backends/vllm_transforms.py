"""Online rotations in compressed-tensors checkpoints, and the module-name targets of both configs.

compressed-tensors writes a rotation of a Linear's input as a transform scheme applied at location `input`
(`quantization_config.transform_config`): x -> x · S / √h on each block of h channels, S an h×h ±1 matrix
stored in the checkpoint as `<linear>.<group>_input.weight`. Both readers share one S per group and size:

- vLLM (`CompressedTensorsLinearTransformMethod`, Linear layers only) loads S once for all the layers, divides
  it by √h and multiplies by it; for type `hadamard` it runs its Walsh–Hadamard kernel instead, which computes
  Sylvester's matrix;
- compressed-tensors' `apply_transform_config` hooks a transform module in front of each target: type
  `hadamard` generates Sylvester's matrix, type `random-hadamard` draws a random one for the stored S to replace.

slimc's online Hadamard of width n (`OnlineHadamard`) is I_b ⊗ H_p ⊗ H_k / √(p·k), H_k Sylvester's. With p = 1
it is compressed-tensors' `hadamard` (with `head_dim` k when b > 1). With a Paley base (p > 1) no library
construction equals it (compressed-tensors' Hadamard matrices of order 12, 20, ... differ), so it is written as
`random-hadamard` with S = H_p ⊗ H_k stored: every reader multiplies by the stored matrix.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from slimc.backends.checkpoint import CheckpointLinear, checkpoint_prefixes, natural_key, online_rotations
from slimc.errors import ExportError
from slimc.ir import Program
from slimc.numerics.hadamard import OnlineHadamard
from slimc.numerics.modules import EXPERT_WEIGHTS, FakeQuantize
from slimc.patterns import node_kind

if TYPE_CHECKING:
    from compressed_tensors.transform import TransformConfig

LOCATION = "input"


@dataclass(frozen=True)
class Transform:
    """The compressed-tensors form of one online Hadamard: its config group and the h×h block it stores."""

    type: str  # "hadamard" (readers may generate S) or "random-hadamard" (readers use the stored S)
    head_dim: int | None  # h when the rotation is block-diagonal, None when one block spans the width
    size: int  # h

    @property
    def group(self) -> str:
        name = "hadamard" if self.type == "hadamard" else "stored_hadamard"
        return name if self.head_dim is None else f"{name}_blocks_{self.head_dim}"


def transform_of(rotation: OnlineHadamard) -> Transform:
    size = rotation.base_order * rotation.power
    return Transform("hadamard" if rotation.base_order == 1 else "random-hadamard",
                     size if rotation.blocks > 1 else None, size)


def stored_block(rotation: OnlineHadamard, dtype: torch.dtype) -> torch.Tensor:
    """S (h, h) ±1 in `dtype`: H_p ⊗ H_k, the rotation's block before its 1/√h."""
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

    sylvester = deterministic_hadamard_matrix(rotation.power, dtype)  # ±1 products are exact in any float dtype
    return sylvester if rotation.base is None else torch.kron(rotation.base.to("cpu", dtype), sylvester)


def runtime_linear(part: CheckpointLinear) -> str:
    """The runtime module a checkpoint Linear comes from (fused experts: the expert's checkpoint name)."""
    return part.prefix if part.runtime.endswith(EXPERT_WEIGHTS) else part.runtime.removesuffix(".weight")


def _generalised(name: str) -> str:
    return "re:^" + r"\.".join(r"\d+" if piece.isdigit() else re.escape(piece) for piece in name.split(".")) + "$"


def target_patterns(by_owner: dict[Hashable, dict[str, None]]) -> dict[Hashable, list[str]]:
    """Per owner (a scheme, a transform), patterns over module names that no other owner's module matches: layer
    and expert numbers generalised where that stays unambiguous, the exact name where it does not."""
    owners: dict[str, set[Hashable]] = {}
    for owner, names in by_owner.items():
        for name in names:
            owners.setdefault(_generalised(name), set()).add(owner)
    targets: dict[Hashable, list[str]] = {}
    for owner, names in by_owner.items():
        chosen: dict[str, None] = {}  # in order, each pattern once
        for name in names:
            pattern = _generalised(name)
            chosen[pattern if len(owners[pattern]) == 1 else f"re:^{re.escape(name)}$"] = None
        targets[owner] = list(chosen)
    return targets


# --- what to write ------------------------------------------------------------------------------------


def expressible_rotations(program: Program, parts: list[CheckpointLinear]) -> dict[str, OnlineHadamard]:
    """Checkpoint Linear -> its online rotation, once every rotation is known to be one that vLLM applies."""
    rotations = online_rotations(program, parts, "vllm")
    experts = sorted((p.prefix for p in parts if p.prefix in rotations and p.runtime.endswith(EXPERT_WEIGHTS)),
                     key=natural_key)
    if experts:
        raise ExportError(f"vllm: {experts[0]} (and {len(experts) - 1} more) has an online rotation inside fused MoE "
                          "experts, which compressed-tensors transforms cannot express (vLLM applies them to Linear "
                          "layers only, and transformers' fused experts have no per-expert Linear to hook); export it "
                          "with format mindie, or compile without the rotate pass's online rotations (online_down: false)")
    _check_fused_inputs(program)
    names = _linear_names(program, parts)
    for prefix in rotations:
        if getattr(program.model.get_submodule(names[prefix]), "bias", None) is not None:
            raise ExportError(f"vllm: {prefix} has an online rotation and a bias; vLLM applies compressed-tensors input "
                              "transforms only to Linears without a bias. Export it with format mindie, or leave this "
                              "layer out of the rotation")
    return rotations


def _check_fused_inputs(program: Program) -> None:
    """Linears that read one tensor (q/k/v, gate/up) must all be rotated or none: vLLM fuses them into one layer,
    which takes one input transform for all its parts (one rotation node serves them all, so rotated ones agree)."""
    for block in program.blocks:
        if block.traced is None:
            continue
        gm = block.graph_module
        readers: dict[fx.Node, dict[str, OnlineHadamard | None]] = {}
        for node in gm.graph.nodes:
            if node.op != "call_module" or node_kind(gm, node) != "linear":
                continue
            source, transform = node.args[0], None
            while source.op == "call_module" and isinstance(gm.get_submodule(source.target), FakeQuantize):
                source = source.args[0]
            if source.op == "call_module" and isinstance(gm.get_submodule(source.target), OnlineHadamard):
                source, transform = source.args[0], gm.get_submodule(source.target)
            readers.setdefault(source, {})[block.qualified(node.target)] = transform
        for linears in readers.values():
            rotated = sorted((name for name, transform in linears.items() if transform is not None), key=natural_key)
            plain = sorted((name for name, transform in linears.items() if transform is None), key=natural_key)
            if rotated and plain:
                raise ExportError(f"vllm: {rotated[0]} has an online rotation and {plain[0]}, which reads the same "
                                  "tensor, has none; vLLM fuses such Linears (q/k/v, gate/up) into one layer, which "
                                  "takes one input transform. Rotate them alike (rotate_inputs' include/exclude), or "
                                  "export with format mindie")


def transform_tensors(program: Program, rotations: dict[str, OnlineHadamard]) -> dict[str, torch.Tensor]:
    """One stored block per group and size, under the first Linear that uses it (readers share it)."""
    tensors: dict[str, torch.Tensor] = {}
    written: set[Transform] = set()
    for prefix in sorted(rotations, key=natural_key):
        transform = transform_of(rotations[prefix])
        if transform not in written:
            written.add(transform)
            tensors[f"{prefix}.{transform.group}_{LOCATION}.weight"] = stored_block(rotations[prefix], program.model.dtype)
    return tensors


def transform_config(program: Program, parts: list[CheckpointLinear],
                     rotations: dict[str, OnlineHadamard]) -> TransformConfig | None:
    """One transform scheme per (type, head_dim), targeting its Linears under their runtime and checkpoint names;
    None without online rotations."""
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme

    if not rotations:
        return None
    by_owner: dict[Hashable, dict[str, None]] = {}
    for prefix, runtime in _linear_names(program, parts).items():
        owner = transform_of(rotations[prefix]) if prefix in rotations else None
        by_owner.setdefault(owner, {}).update(dict.fromkeys((prefix, runtime)))
    targets = target_patterns(by_owner)
    groups = {}
    for transform in sorted((t for t in by_owner if t is not None), key=lambda t: (t.group, t.size)):
        scheme = groups.setdefault(transform.group, TransformScheme(type=transform.type, head_dim=transform.head_dim))
        scheme.apply.append(TransformArgs(targets=targets[transform], location=LOCATION))
    return TransformConfig(config_groups=groups)


def _linear_names(program: Program, parts: list[CheckpointLinear]) -> dict[str, str]:
    """Checkpoint name -> runtime module name of every checkpoint Linear and every float Linear."""
    names = {part.prefix: runtime_linear(part) for part in parts}
    quantized = set(names.values())
    for name, module in program.model.named_modules():
        if isinstance(module, nn.Linear) and name not in quantized:
            names.update(dict.fromkeys(checkpoint_prefixes(program, parts, name), name))
    return names


# --- read-back ----------------------------------------------------------------------------------------


def check_transforms(program: Program, parts: list[CheckpointLinear], raw: dict | None, stored) -> set[str]:
    """Check the written transform config and blocks against the program's rotations; the stored tensor names.

    Each rotated Linear (under both its names) must be taken by exactly its group, with the group's type and
    head_dim, and no other Linear by any; each stored block must rotate a probe as the program's rotation does,
    and a `hadamard` one must be the Sylvester matrix that readers generate in its place."""
    from compressed_tensors.transform import TransformConfig
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix
    from compressed_tensors.utils import match_name

    rotations = expressible_rotations(program, parts)
    if not raw:
        if rotations:
            raise ExportError("vllm: quantization_config has no transform_config, but the program has online rotations")
        return set()
    config = TransformConfig.model_validate(raw)
    for prefix, runtime in _linear_names(program, parts).items():
        expected = transform_of(rotations[prefix]) if prefix in rotations else None
        for name in (prefix, runtime):
            taking = [(group, scheme) for group, scheme in config.config_groups.items() for args in scheme.apply
                      if any(match_name(name, t) for t in args.targets) and not any(match_name(name, i) for i in args.ignore)]
            if expected is None and taking:
                raise ExportError(f"vllm: transform group {taking[0][0]} takes {name}, which has no online rotation")
            if expected is not None and [(g, s.type, s.head_dim) for g, s in taking] != [
                    (expected.group, expected.type, expected.head_dim)]:
                raise ExportError(f"vllm: {name} must be taken by transform group {expected.group} alone "
                                  f"({expected.type}, head_dim {expected.head_dim}), got {[g for g, _ in taking]}")
    for scheme in config.config_groups.values():
        if scheme.randomize or any(a.location != LOCATION or a.inverse for a in scheme.apply):
            raise ExportError("vllm: transform_config holds a transform other than slimc's input rotations")
    names = set(transform_tensors(program, rotations))
    blocks: dict[Transform, torch.Tensor] = {}
    for name in names:
        transform = transform_of(rotations[name.removesuffix(".weight").rpartition(".")[0]])
        blocks[transform] = stored[name]
        if transform.type == "hadamard" and not torch.equal(
                blocks[transform], deterministic_hadamard_matrix(transform.size, blocks[transform].dtype)):
            raise ExportError(f"vllm: {name} is not the Sylvester matrix that readers of type hadamard generate")
        blocks[transform] = blocks[transform].float() / math.sqrt(transform.size)
    for prefix, rotation in rotations.items():
        block = blocks[transform_of(rotation)]
        x = torch.randn(4, rotation.order, generator=torch.Generator().manual_seed(0))
        written = (x.view(4, -1, block.shape[0]) @ block).view(4, -1)
        device = torch.device("cpu") if rotation.base is None else rotation.base.device
        with torch.no_grad():
            applied = rotation(x.to(device)).cpu()
        if not torch.allclose(written, applied, rtol=1e-4, atol=1e-4):
            raise ExportError(f"vllm: the stored transform of {prefix} rotates differently from the program's rotation "
                              f"(by {(written - applied).abs().max():.3g})")
    return names
