"""`slimc record`: a diffusers pipeline run on prompts, every call of its transformer(s) written to a file
that later compiles calibrate from (see slimc.frontends.diffusion_data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimc.commands.compile import check_device, model_dtype, resolve_source
from slimc.commands.export import staged_file
from slimc.errors import DataError
from slimc.frontends import check_builtin_dataset, frontend_for
from slimc.frontends.diffusion_data import (
    PROMPT_SPECS,
    RecordedCall,
    check_uniform,
    is_recorded_inputs,
    load_prompts,
    record_pipeline_calls,
    save_recorded_calls,
)


def record_to_file(config: Any, model_path: str | None, out: Path, *, overwrite: bool = False) -> tuple[Path, list[RecordedCall]]:
    """`slimc record`: run the pipeline at `model_path` (or the config's model.path) with the config's
    calibration settings and write every transformer call to `out` (see `save_recorded_calls`)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"{out} exists; choose another file or pass --overwrite")
    if out.suffix != ".safetensors":
        raise DataError(f"recorded inputs are written as .safetensors; got {out.name}")
    if is_recorded_inputs(config.calibration.dataset):
        raise DataError(f"calibration.dataset {config.calibration.dataset!r} is already recorded inputs; `slimc record` "
                        f"needs prompts: {', '.join(PROMPT_SPECS)}, a .txt or a .jsonl file")
    source = resolve_source(config, model_path)
    if not source.is_pipeline:
        raise DataError(f"{source.path} is not a diffusers pipeline directory (no model_index.json with a transformer); "
                        "`slimc record` runs the whole pipeline: pass the pipeline's directory")
    check_builtin_dataset(frontend_for(source, config.model.family), config.calibration.dataset, source.architecture)
    check_device(config.model.device)
    prompts = load_prompts(config.calibration.dataset, config.calibration.samples)
    calls = record_pipeline_calls(source.path, prompts, config.calibration.diffusion, dtype=model_dtype(config, source),
                                  device=config.model.device, batch_size=config.calibration.batch_size)
    check_uniform(calls)
    with staged_file(out) as partial:  # a killed or failed write leaves no half-written file under `out`
        save_recorded_calls(calls, partial)
    return out, calls
