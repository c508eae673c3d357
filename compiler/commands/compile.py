"""`slimc compile`: config → model → Program → passes → outputs, with a report."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from torch import nn

from slimc.backends import Backend, backend_class
from slimc.commands.export import (
    REPORT_FILE,
    check_disk_space,
    check_output_dir,
    remove_dead_runs,
    scratch_directory,
    spill_directory,
    staged_file,
    staged_output,
)
from slimc.commands.provenance import provenance, resume_identity
from slimc.commands.shape_rules import Plan, check_plan, plan_layers
from slimc.config import SlimcConfig, format_validation_error
from slimc.distributed import SINGLE, World, join, local_device
from slimc.environment import require_extra
from slimc.errors import ConfigError, ExportError
from slimc.frontends import Frontend, check_builtin_dataset, frontend_for
from slimc.ir import Program
from slimc.ir.source import (
    ModelSource,
    check_finite_weights,
    checkpoint_dtype,
    default_model_path,
    resolve_model_source,
    weight_files,
)
from slimc.ir.streaming import BlockWeights, offload_device_map
from slimc.journal import Journal
from slimc.numerics.fidelity import json_safe
from slimc.pipeline import Pipeline
from slimc.progress import MESSAGES, Progress
from slimc.report import LayerRecord, RunReport, directory_size, plot_layer_errors

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GGUF_EXPANSION = 4  # GGUF weights (about 4 bits) are written back as int8 weights and float embeddings
LAYER_PLOT_FILE = "layer_errors.png"  # beside the report: its per-layer errors across depth


def model_dtype(config: SlimcConfig, source: ModelSource) -> torch.dtype:
    """The configured dtype; `auto` keeps the checkpoint's own (float32 for GGUF, which is dequantized)."""
    if config.model.dtype != "auto":
        return DTYPES[config.model.dtype]
    if source.library == "diffusers":  # diffusers configs record no dtype: the checkpoint's own
        return checkpoint_dtype(source) or torch.float32
    declared = getattr(source.config, "dtype", None)  # transformers reads a config.json's `torch_dtype` into it
    if source.gguf_file is None and isinstance(declared, torch.dtype):
        return declared
    if source.gguf_file is None and isinstance(declared, str) and declared in DTYPES:
        return DTYPES[declared]
    return torch.float32


def check_device(device: str) -> None:
    """Fail early, with the fix, for a device this machine cannot use; import torch_npu only for npu."""
    kind = device.split(":", 1)[0]
    if kind == "npu":
        require_extra("npu", "model.device npu")
        import torch_npu  # noqa: F401  (registers torch.npu)
    elif kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device is {device}, but no CUDA device is available; use model.device: cpu")
    elif kind not in ("cpu", "cuda", "npu"):
        raise ConfigError(f"model.device {device!r} is not a device slimc knows; use cpu, cuda[:N] or npu[:N]")


def check_not_inside(source: ModelSource, out_dir: Path) -> None:
    """Never let an output replace the model it is made from."""
    model_dir, out = source.path.resolve(), out_dir.resolve()
    if model_dir == out or out in model_dir.parents:
        raise ExportError(f"--out {out_dir} would replace the model being quantized ({model_dir}); choose another output directory")


def resolve_source(config: SlimcConfig, model_path: str | None) -> ModelSource:
    path = model_path or config.model.path or default_model_path()
    return resolve_model_source(path, trust_remote_code=config.model.trust_remote_code)


def check_does_something(config: SlimcConfig) -> None:
    """A config that quantizes nothing or writes nothing would end in a 'wrote OUT' with nothing of use in it."""
    if not config.pipeline:
        raise ConfigError(f"{config.source_file}: pipeline: the config has no passes, so nothing would be quantized; "
                          "start from a shipped config (slimc configs)")
    if not config.export:
        raise ConfigError(f"{config.source_file}: export: the config names no output format, so nothing would be "
                          "written; add e.g. `export: [{format: mindie}]`")


def build_backends(config: SlimcConfig) -> list[Backend]:
    backends = []
    for index, raw in enumerate(config.export):
        try:
            cls = backend_class(str(raw["format"]))
        except ConfigError as error:
            raise ConfigError(f"{config.where('export', index, 'format')}: export.{index}.format: {error}") from None
        params = {k: v for k, v in raw.items() if k != "format"}
        try:
            backends.append(cls(**params))
        except ValidationError as error:
            raise ConfigError(format_validation_error(error, cls, config.source_file, config.lines, prefix=("export", index))) from None
    names = [b.format_name for b in backends]
    if len(set(names)) != len(names):
        raise ConfigError(f"{config.where('export')}: export: each format may appear once, got {names}")
    kv_steps = [(index, step.kv_cache) for index, step in enumerate(config.pipeline) if getattr(step, "kv_cache", None)]
    for index, backend in enumerate(backends):
        for step_index, scheme in kv_steps:
            refusal = backend.kv_cache_refusal(scheme)
            if refusal:
                raise ConfigError(f"{config.where('export', index, 'format')}: export.{index}: pipeline.{step_index}.kv_cache "
                                  f"quantizes the KV cache to {scheme.dtype}, which format {backend.format_name} cannot "
                                  f"hold: {refusal}")
    qk_steps = [index for index, step in enumerate(config.pipeline) if getattr(step, "online_qk", False)]
    for index, backend in enumerate(backends):
        refusal = backend.qk_rotation_refusal() if qk_steps else None
        if refusal:
            raise ConfigError(f"{config.where('export', index, 'format')}: export.{index}: pipeline.{qk_steps[0]}.online_qk "
                              f"rotates the attention's queries and keys online, which format {backend.format_name} "
                              f"cannot hold: {refusal}")
    return backends


@dataclass
class Inputs:
    """What a config and a model path name, each checked without reading a weight."""

    pipeline: Pipeline
    backends: list[Backend]
    source: ModelSource
    frontend: Frontend


def check_inputs(config: SlimcConfig, model_path: str | None) -> Inputs:
    """The device, pipeline, formats, model source, frontend and calibration dataset, checked; no weight read."""
    check_device(config.model.device)
    pipeline = Pipeline.from_config(config)
    backends = build_backends(config)
    source = resolve_source(config, model_path)
    frontend = frontend_for(source, config.model.family)
    check_builtin_dataset(frontend, config.calibration.dataset, source.architecture, where=config.where("calibration", "dataset"))
    return Inputs(pipeline, backends, source, frontend)


def quantization_plan(config: SlimcConfig, inputs: Inputs) -> Plan:
    """Which layers get which scheme, planned on the model's meta-device skeleton: no weight is read."""
    skeleton = inputs.frontend.skeleton(inputs.source, model_dtype(config, inputs.source))
    return plan_layers(inputs.frontend.build(inputs.source, skeleton), config, config.pipeline)


def output_size(source: ModelSource, backends: list[Backend]) -> int:
    """About the bytes the output takes, known before the model loads: each format rewrites the weights,
    quantized ones no larger than the checkpoint's files (a GGUF's are dequantized: GGUF_EXPANSION)."""
    on_disk = sum(file.stat().st_size for file in weight_files(source))
    return on_disk * (GGUF_EXPANSION if source.is_gguf else 1) * len(backends)


def streams(config: SlimcConfig, source: ModelSource, frontend: Frontend) -> bool:
    """Whether the blocks' weights are read block by block (slimc.ir.streaming) rather than loaded whole."""
    return config.memory.stream_blocks and frontend.streams and not source.is_gguf


def load_streamed(config: SlimcConfig, source: ModelSource, frontend: Frontend, dtype: torch.dtype,
                  scratch: Path) -> tuple[nn.Module, BlockWeights]:
    """The model with its blocks on the meta device, and the weights that read them from the checkpoint's shards;
    what the loader has to convert (fused experts, say) is offloaded under `scratch`."""
    blocks = [block.name for block in frontend.build(source, frontend.skeleton(source, dtype)).blocks]
    device_map = offload_device_map(frontend.skeleton(source, dtype), blocks)
    model = frontend.load(source, dtype=dtype, device=device_map, trust_remote_code=config.model.trust_remote_code,
                          offload_folder=scratch / "offload")
    return model, BlockWeights.detach_from(model)


def load_program(config: SlimcConfig, source: ModelSource, frontend: Frontend, report: RunReport,
                 scratch: Path | None = None) -> Program:
    """Load the model (every frontend loads through here) and cut it into a Program. With a `scratch` directory
    and a config that streams, the blocks stay on the meta device, read when the pipeline reaches each."""
    dtype = model_dtype(config, source)
    weights = None
    with report.timed("load"):
        if scratch is not None and streams(config, source, frontend):
            model, weights = load_streamed(config, source, frontend, dtype, scratch)
        else:
            model = frontend.load(source, dtype=dtype, trust_remote_code=config.model.trust_remote_code)
        check_finite_weights(model, source.path, weights.loader if weights is not None else None)
    program = frontend.build(source, model)
    program.weights = weights
    program.device = config.model.device
    return program


def export_format(program: Program, backend: Backend, staging: Path, progress: Progress) -> Path:
    """Write and verify one format in `staging/.<format>.partial`, renamed to `staging/<format>` once complete."""
    partial = staging / f".{backend.format_name}.partial"
    for subdirectory, part in program.export_parts().items():
        where = f"{backend.format_name}/{subdirectory}".rstrip("/")
        (partial / subdirectory).mkdir(parents=True)
        progress.doing(f"writing {where}")
        backend.export(part, partial / subdirectory)
        progress.doing(f"verifying {where}")
        backend.verify(part, partial / subdirectory)
    return partial.rename(staging / backend.format_name)


def layer_error_points(layers: list[LayerRecord]) -> list[tuple[str, int, float]]:
    """(role, block position, error) of each layer the report measured, as calibrate recorded them."""
    return [(layer.role, layer.block, layer.relative_error) for layer in layers]


@dataclass
class Compiled:
    program: Program
    report: RunReport
    wrote: bool = True  # False in the processes of a multi-process compile that leave the writing to the first


def compile_model(config: SlimcConfig, *, model_path: str | None, out_dir: Path, overwrite: bool = False,
                  resume: bool = False, world: World | None = None, keep_journal: Collection[str] | None = None) -> Compiled:
    """Run the whole compile; the output directory appears only when complete. A streamed compile commits each
    finished block to its journal, which `resume` continues from. Started by torchrun (`world`: by default, as its
    environment says), the processes share the calibration batches and the first writes the outputs. With
    `keep_journal`, the journal stays once the output is written (the returned Program reads its blocks from it),
    holding the state after each block named in it too, for a later compile to start from (slimc.journal.continue_from)."""
    world = join(config.model.device) if world is None else world
    if world.size > 1:
        config.model.device = local_device(config.model.device, world)
    report = RunReport()
    check_does_something(config)
    remove_dead_runs(out_dir)
    check_output_dir(out_dir, overwrite)
    inputs = check_inputs(config, model_path)
    pipeline, backends, source, frontend = inputs.pipeline, inputs.backends, inputs.source, inputs.frontend
    check_not_inside(source, out_dir)
    needed = output_size(source, backends)
    check_disk_space(out_dir, needed)  # before loading: a full disk should not cost a whole compile
    check_plan(quantization_plan(config, inputs), backends, config)  # nor should a layer that no format can hold
    journal = open_journal(config, source, frontend, out_dir, resume=resume, overwrite=overwrite, world=world)
    if journal is not None and keep_journal is not None:
        journal.kept_states = set(keep_journal)
    with scratch_directory(out_dir) as scratch:
        program = load_program(config, source, frontend, report, scratch)
        if journal is None and program.weights is not None:
            program.weights.spill_into(spill_directory(out_dir))
        try:
            batches = frontend.calibration_batches(config.calibration, source, program, report)
            report.details["calibration"] = {"dataset": config.calibration.dataset}  # `slimc eval` refuses to evaluate on it
            report.provenance = provenance(config, source, batches)
            if journal is not None:
                journal.begin(resume_identity(report.provenance))
                program.weights.spill_into(journal.directory, owned=False)
            pipeline.run(program, config, batches, report, journal, world, spill_parent=scratch)
            if backends and world.is_leader:
                with (report.timed("export"), staged_output(out_dir, overwrite, needed) as staging,
                      Progress("export", len(backends), "format") as exporting):
                    for backend in backends:
                        report.outputs[backend.format_name] = directory_size(export_format(program, backend, staging, exporting))
                        exporting.advance()
                    report.finish()
                    (staging / REPORT_FILE).write_text(report.to_json())
                    if report.layers:
                        plot_layer_errors(layer_error_points(report.layers), staging / LAYER_PLOT_FILE,
                                          "relative output error of the quantized layer")
                report.location = out_dir / REPORT_FILE
            world.barrier()  # the other processes return once the outputs are written (or stop if writing failed)
        except BaseException:
            if journal is None:
                if program.weights is not None:  # a failed compile returns no program that could read its spilled blocks
                    program.weights.discard_spill()
            elif journal.begun and journal.committed:
                MESSAGES.warning("the compile stopped with %d blocks committed in %s: `slimc compile ... --resume` "
                                 "continues it", len(journal.committed), journal.directory)
            elif journal.begun and not journal.resuming:
                journal.close()
            raise
    if journal is not None and keep_journal is None:  # the returned Program reads its blocks from a directory of its own
        program.weights.move_spill(spill_directory(out_dir))
        journal.close()
    report.finish()
    return Compiled(program, report, wrote=world.is_leader)


def open_journal(config: SlimcConfig, source: ModelSource, frontend: Frontend, out_dir: Path, *, resume: bool,
                 overwrite: bool, world: World = SINGLE) -> Journal | None:
    """The journal of a streamed compile (slimc.journal); a compile that loads the model whole keeps none, so it
    cannot be resumed, and neither does one of several processes (each holds other calibration inputs)."""
    if world.size > 1:
        if resume:
            raise ConfigError(f"--resume continues a compile run in one process, and this one runs in {world.size}: "
                              "a compile of several processes keeps no journal; resume without --nproc or torchrun, "
                              "or start again with --overwrite")
        return None
    if not streams(config, source, frontend):
        if resume:
            why = ("the model is a GGUF file" if source.is_gguf else "memory.stream_blocks is false" if frontend.streams
                   else f"the {frontend.name} frontend loads it whole")
            raise ConfigError(f"--resume continues a compile that streams its blocks, and this one does not ({why}); "
                              "run it without --resume")
        return None
    return Journal.open(out_dir, resume=resume, overwrite=overwrite)


def record_evaluation(report: RunReport, results: dict) -> None:
    """Add the evaluation of a compile's output (`--eval`) to its published report, replaced in one rename."""
    report.evaluation = json_safe(results)
    if report.location is not None:
        with staged_file(report.location) as temporary:
            temporary.write_text(report.to_json())
