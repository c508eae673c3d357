"""`slimc doctor`: is this environment, machine and (optionally) model + config ready for a compile?

Checks the library versions against their tested ranges, the accelerators torch sees, free memory and
disk; with a model and a config, which layers the config would quantize and what the compile would need
(peak memory, disk, output size), estimated from the model's modules on the meta device: no weight is read.
"""

from __future__ import annotations

import importlib.util
import platform
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from slimc import __version__
from slimc.environment import free_disk_bytes, free_memory_bytes, human_size, library_statuses, missing_extra
from slimc.ir.activations import GB

if TYPE_CHECKING:
    from slimc.config import SlimcConfig
    from slimc.ir import Program

# Peak host memory of a compile that loads the whole model (GGUF, diffusers, memory.stream_blocks false),
# measured on bf16 checkpoints of Qwen2.5-7B widths (2 and 4 layers, 4 x 128 calibration tokens): about 2.1
# times the model's size in memory plus 1.2 GiB.
PEAK_PER_MODEL_BYTE = 2.1
PEAK_BASE_BYTES = int(1.2 * 2**30)
# A streamed compile holds what is outside the blocks and, while it works on a block, that block with its working
# copies (PEAK_PER_BLOCK_BYTE times its size) and its calibration activations (ACTIVATION_COPIES of every
# sample's inputs); finished blocks are spilled to disk, and the formats are written and verified one block at a
# time. What is left of growth with depth is GROWTH_PER_LOWERED_BYTE times each block's lowered size: measured with
# bench/scale.py on Qwen2.5-7B widths (W8A8 dynamic, 4 x 128 tokens, docs/scale.md), 2 and 8 layers peaked at
# 2.50 and 2.60 GiB, 0.017 GiB a layer (0.08 times a layer's lowered size).
PEAK_PER_BLOCK_BYTE = 1.5
ACTIVATION_COPIES = 2
GROWTH_PER_LOWERED_BYTE = 0.1
SCALE_BYTES_PER_ROW = 8  # a float32 scale and offset per output channel


@dataclass
class Estimate:
    model_bytes: int  # the model in memory at the compile's dtype
    layers: Counter = field(default_factory=Counter)  # scheme label -> quantized layers
    float_layers: int = 0  # Linears and experts inside blocks that stay float
    output_bytes: int = 0  # one export format
    streamed: bool = False  # blocks read one at a time (slimc.ir.streaming)
    resident_bytes: int = 0  # outside the blocks: in memory throughout
    largest_block_bytes: int = 0
    lowered_blocks_bytes: int = 0  # every block as lowered (a streamed compile spills them to disk)
    activation_bytes: int = 0  # one stage's calibration inputs and outputs held in memory
    spilled_activation_bytes: int = 0  # those beyond memory.activations_gb, on disk while a block runs

    @property
    def peak_memory_bytes(self) -> int:
        if not self.streamed:
            return int(self.model_bytes * PEAK_PER_MODEL_BYTE) + PEAK_BASE_BYTES
        block = int(self.largest_block_bytes * PEAK_PER_BLOCK_BYTE) + self.activation_bytes
        return self.resident_bytes + block + int(self.lowered_blocks_bytes * GROWTH_PER_LOWERED_BYTE) + PEAK_BASE_BYTES

    def disk_bytes(self, formats: int) -> int:
        """The output's formats, and while it runs, a streamed compile's spilled blocks and the per-block files of
        the format being written."""
        if not self.streamed:
            return self.output_bytes * formats + self.spilled_activation_bytes
        return self.output_bytes * (formats + 1) + self.lowered_blocks_bytes + self.spilled_activation_bytes


@dataclass
class Diagnosis:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def render(self) -> str:
        text = "\n".join(self.lines)
        if self.problems:
            return text + "\n\nproblems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        return text + "\n\nall checks passed"


def in_memory_bytes(model) -> int:
    """Parameters and buffers; a tied weight once per name, as the exports write it."""
    tensors = (*(p for _, p in model.named_parameters(remove_duplicate=False)), *model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def check_libraries(diagnosis: Diagnosis) -> None:
    diagnosis.lines.append(f"slimc {__version__}, python {platform.python_version()} ({platform.machine()})")
    for status in library_statuses():
        if status.optional_and_absent:
            verdict = f'optional: pip install "slimc[{status.extra}]"'
        else:
            verdict = "ok" if status.in_range else "OUTSIDE the tested range" if status.installed else "MISSING"
        diagnosis.lines.append(f"  {status.describe():70s} {verdict}")
        if not status.in_range and not status.optional_and_absent:
            diagnosis.problems.append(f"{status.describe()}: install a tested version (pip install -c constraints.txt "
                                      "slimc, or see docs/compatibility.md)")
    npu = "installed" if importlib.util.find_spec("torch_npu") else "not installed (needed only for model.device: npu)"
    diagnosis.lines.append(f"  torch_npu {npu}")


def check_machine(diagnosis: Diagnosis, out: Path) -> None:
    cuda = f"{torch.cuda.device_count()} ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "none"
    devices = [f"cuda: {cuda}"]
    if importlib.util.find_spec("torch_npu"):
        import torch_npu  # noqa: F401  (registers torch.npu)

        devices.append(f"npu: {torch.npu.device_count() if torch.npu.is_available() else 'none'}")
    memory = free_memory_bytes()
    diagnosis.lines += [f"accelerators: {', '.join(devices)}",
                        f"memory available: {human_size(memory) if memory is not None else 'unknown'}",
                        f"disk free under {out}: {human_size(free_disk_bytes(out))}"]


def estimate(program: Program, config: SlimcConfig, *, streamed: bool = False) -> Estimate:
    """Which layers the config quantizes and the sizes that follow, for a Program built on the meta device."""
    from slimc.plan import QuantPlan

    plan = QuantPlan.resolve(program, config, config.pipeline)
    result = Estimate(model_bytes=in_memory_bytes(program.model), float_layers=len(plan.float_layers), streamed=streamed)
    for block in program.blocks:
        float_bytes = in_memory_bytes(block.module)
        lowered = float_bytes
        for name, module in block.module.named_modules():
            assigned = plan.scheme(block.qualified(name))
            if assigned is None:
                continue
            result.layers[assigned.scheme.label] += 1
            for weight in (p for p in module.parameters(recurse=False) if p.dim() >= 2):
                rows = weight.numel() // weight.shape[-1]
                lowered += (weight.numel() * assigned.scheme.weight.bits // 8 + rows * SCALE_BYTES_PER_ROW
                            - weight.numel() * weight.element_size())
        result.largest_block_bytes = max(result.largest_block_bytes, float_bytes)
        result.lowered_blocks_bytes += lowered
    blocks_bytes = sum(in_memory_bytes(block.module) for block in program.blocks)
    result.resident_bytes = result.model_bytes - blocks_bytes
    result.output_bytes = result.resident_bytes + result.lowered_blocks_bytes
    model_config = getattr(program.model, "config", None)
    hidden = getattr(model_config.get_text_config(), "hidden_size", 0) if hasattr(model_config, "get_text_config") else 0
    one_copy = config.calibration.samples * config.calibration.seq_len * hidden * program.dtype.itemsize
    result.activation_bytes = ACTIVATION_COPIES * one_copy
    budget = config.memory.activations_gb
    if budget is not None:  # the budget's worth in memory, and the batch being worked on; the rest on disk
        batch = one_copy * config.calibration.batch_size // config.calibration.samples
        result.activation_bytes = min(result.activation_bytes, int(budget * GB) + ACTIVATION_COPIES * batch)
        result.spilled_activation_bytes = max(0, one_copy - int(budget * GB))
    return result


def check_compile(diagnosis: Diagnosis, config: SlimcConfig, model_path: str | None, out: Path) -> None:
    """The model's family, the layers the config quantizes, and whether memory and disk suffice."""
    from slimc.commands.compile import build_backends, model_dtype, resolve_source, streams
    from slimc.frontends import frontend_for

    source = resolve_source(config, model_path)
    frontend = frontend_for(source, config.model.family)
    dtype = model_dtype(config, source)
    diagnosis.lines.append(f"model: {source.path / (source.gguf_file or '')} ({source.architecture}, frontend "
                           f"{frontend.name}, computed in {str(dtype).removeprefix('torch.')})")
    program = frontend.build(source, frontend.skeleton(source, dtype))
    if not config.pipeline:
        diagnosis.lines.append(f"  {len(program.blocks)} blocks, {human_size(in_memory_bytes(program.model))} in "
                               "memory; give a config to see what it would quantize and need")
        return
    found = estimate(program, config, streamed=streams(config, source, frontend))
    formats = [b.format_name for b in build_backends(config)]
    disk_needed = found.disk_bytes(len(formats))
    layers = ", ".join(f"{label} {count}" for label, count in sorted(found.layers.items())) or "none"
    diagnosis.lines += [
        f"config: {config.source_file}",
        f"  quantized layers: {layers}; float layers in blocks: {found.float_layers}",
        f"  estimated peak memory: {human_size(found.peak_memory_bytes)} (the model is "
        f"{human_size(found.model_bytes)} in memory; "
        + (f"blocks read one at a time, the largest {human_size(found.largest_block_bytes)}; lowered ones spilled "
           f"to disk: {human_size(found.lowered_blocks_bytes)})" if found.streamed else "loaded whole)"),
        f"  estimated output: {human_size(found.output_bytes)} per format; disk needed {human_size(disk_needed)} for "
        f"{', '.join(formats) or 'no format'}" + (" and the spilled blocks while it runs" if found.streamed else ""),
        f"  calibration activations: {human_size(found.activation_bytes)} in memory"
        + (f", {human_size(found.spilled_activation_bytes)} on disk (memory.activations_gb: "
           f"{config.memory.activations_gb:g})" if config.memory.activations_gb is not None else ""),
    ]
    check_resources(diagnosis, config, found, disk_needed, out)


def check_resources(diagnosis: Diagnosis, config: SlimcConfig, found: Estimate, disk_needed: int, out: Path) -> None:
    if not found.layers:
        diagnosis.problems.append("the config quantizes no layer of this model: check its fake_quant rules")
    memory = free_memory_bytes()
    if memory is not None and memory < found.peak_memory_bytes:
        diagnosis.problems.append(f"about {human_size(found.peak_memory_bytes)} of memory needed, {human_size(memory)} "
                                  "available: free memory or use a larger machine")
    disk = free_disk_bytes(out)
    if disk < disk_needed:
        diagnosis.problems.append(f"about {human_size(disk_needed)} of disk needed under {out}, {human_size(disk)} "
                                  "free: free space or choose another --out")
    device = config.model.device.split(":", 1)[0]
    if device == "cuda" and not torch.cuda.is_available():
        diagnosis.problems.append("model.device is cuda, but torch sees no CUDA device")
    if device == "npu" and (message := missing_extra("npu", "model.device npu")):
        diagnosis.problems.append(message)


def diagnose(config: SlimcConfig | None = None, model_path: str | None = None, out: Path = Path(".")) -> Diagnosis:
    diagnosis = Diagnosis()
    check_libraries(diagnosis)
    check_machine(diagnosis, out)
    if config is not None or model_path is not None:
        from slimc.config import settings_config

        check_compile(diagnosis, config or settings_config(), model_path, out)
    return diagnosis
