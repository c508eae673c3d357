"""The Python API: what the `slimc` commands do, as functions (docs/api.md). `slimc` re-exports them on first use.

    import slimc
    result = slimc.compile("llm/w8a8_dynamic.yaml", model="HuggingFaceTB/SmolLM2-135M-Instruct", out="out")

A config is a path, a shipped config's name (`slimc configs`) or a loaded `SlimcConfig`; a model is a directory,
a .gguf file, a Hugging Face Hub id, or a model object loaded in this process (a transformers or diffusers model,
anything with `save_pretrained`), which is saved as safetensors into a private temporary directory and compiled
from there: slimc reads weights block by block from a checkpoint and copies unchanged tensors from it.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimc.commands.compile import compile_model, record_evaluation, resolve_source
from slimc.commands.evaluate import check_held_out, render_results
from slimc.commands.evaluate import evaluate as evaluate_output
from slimc.commands.explain import trace_report
from slimc.commands.export import REPORT_FILE
from slimc.commands.quantized import written_formats
from slimc.config import SlimcConfig, apply_override, config_from_data, settings_config, with_evaluation
from slimc.config import load_config as load_config_file
from slimc.configs import resolve_config_path
from slimc.environment import existing_ancestor
from slimc.errors import ConfigError
from slimc.ir import Program
from slimc.ir.source import HUB_ID, hub_snapshot, model_files
from slimc.report import RunReport

ConfigLike = str | Path | SlimcConfig
ModelLike = str | Path | Any  # Any: a loaded model with `save_pretrained`


@dataclass
class CompileResult:
    """What `compile` made: the output directory, each format's directory in it, the run report (what
    `slimc compile` prints: `report.render()`), the lowered program, and the evaluation if one was asked for."""

    out: Path
    outputs: dict[str, Path]
    report: RunReport
    program: Program
    evaluation: dict | None = None

    @property
    def report_file(self) -> Path:
        return self.out / REPORT_FILE


def load_config(config: ConfigLike, overrides: Sequence[str] = ()) -> SlimcConfig:
    """A config read from a path or a shipped config's name, or a loaded one, with `--set`-style overrides
    (`"calibration.samples=64"`, values parsed as YAML) applied and the result validated."""
    if not isinstance(config, SlimcConfig):
        return load_config_file(resolve_config_path(config), list(overrides))
    if not overrides:
        return config
    data = {**config.model_dump(exclude={"pipeline"}),
            "pipeline": [{"pass": step.name, **step.model_dump()} for step in config.pipeline]}
    lines = dict(config.lines)
    for assignment in overrides:
        apply_override(data, assignment, lines)
    return config_from_data(data, source=config.source_file, lines=lines)


@contextlib.contextmanager
def model_path(model: ModelLike | None, near: Path | None = None, tokenizer: Any = None) -> Iterator[str | None]:
    """A path (or Hub id) for `model`: as given, or for a loaded model a private temporary directory beside
    `near` (the output: same disk, which the compile's disk check counts) holding it saved with `save_pretrained`,
    `tokenizer` (or processor) saved there too, else the tokenizer and processor files of the checkpoint the model
    was loaded from (`name_or_path`), when that is a directory or a cached Hub model."""
    if model is None or isinstance(model, str | Path):
        yield None if model is None else str(model)
        return
    if not hasattr(model, "save_pretrained"):
        raise ConfigError(f"model must be a path, a Hugging Face Hub id or a model with save_pretrained (a transformers "
                          f"or diffusers model), got {type(model).__name__}")
    parent = existing_ancestor(Path(near)) if near is not None else None
    with tempfile.TemporaryDirectory(prefix=".slimc-model-", dir=parent) as directory:
        model.save_pretrained(directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        elif (origin := _checkpoint_of(model)) is not None:
            for file in model_files(origin):
                if not (Path(directory) / file.name).exists():
                    shutil.copy(file, directory)
        yield directory


def _checkpoint_of(model: Any) -> Path | None:
    """The directory `model` was loaded from, if it is on this machine (a directory, or a cached Hub snapshot)."""
    name = str(getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if name and Path(name).is_dir():
        return Path(name)
    if HUB_ID.fullmatch(name):
        with contextlib.suppress(Exception):  # not cached (offline) or not on the Hub: the tokenizer must be given
            return hub_snapshot(name)
    return None


def compile(config: ConfigLike, *, model: ModelLike | None = None, out: str | Path, overrides: Sequence[str] = (),
            overwrite: bool = False, resume: bool = False, evaluate: bool = False, tokenizer: Any = None) -> CompileResult:
    """`slimc compile CONFIG --model MODEL --out OUT [--set ...] [--overwrite] [--resume] [--eval]`.

    `model` defaults to the config's `model.path`; a loaded model needs its `tokenizer` (or processor) unless it
    was loaded from a checkpoint on this machine. With `evaluate`, every format written is evaluated as
    `slimc eval` does (`CompileResult.evaluation`)."""
    config = load_config(config, overrides)
    out = Path(out)
    if evaluate and config.evaluation.dataset:
        check_held_out(config.evaluation.dataset, config.calibration.dataset)  # before the compile, not after
    with model_path(model, near=out, tokenizer=tokenizer) as path:
        compiled = compile_model(config, model_path=path, out_dir=out, overwrite=overwrite, resume=resume)
        evaluation = None
        if evaluate and compiled.wrote:  # in a multi-process compile, the first process evaluates
            evaluation = evaluate_output(resolve_source(config, path), out, config,
                                         calibrated_on=config.calibration.dataset)
            record_evaluation(compiled.report, evaluation)
    return CompileResult(out=out, outputs=written_formats(out), report=compiled.report, program=compiled.program,
                         evaluation=evaluation)


def evaluate(quantized: str | Path | None = None, *, model: ModelLike | None = None, config: ConfigLike | None = None,
             overrides: Sequence[str] = (), dataset: str | None = None, samples: int | None = None,
             seq_len: int | None = None, batch_size: int | None = None, fidelity: bool = False,
             tokenizer: Any = None) -> dict:
    """`slimc eval --quantized OUT --model MODEL [--config CONFIG] [--corpus DATASET] ... [--fidelity] --json`.

    Measures the float model and every format in `quantized` (a compile output, or one format's directory):
    perplexity for decoder LLMs, fidelity to the float model for the other families (or with `fidelity`).
    `render_results(results)` (slimc.commands.evaluate) prints them as `slimc eval` does."""
    loaded = load_config(config, overrides) if config is not None else settings_config(list(overrides))
    loaded = with_evaluation(loaded, dataset=dataset, samples=samples, seq_len=seq_len, batch_size=batch_size)
    with model_path(model, tokenizer=tokenizer) as path:
        return evaluate_output(resolve_source(loaded, path), Path(quantized) if quantized is not None else None,
                               loaded, fidelity=fidelity)


def trace(model: ModelLike | None = None, *, seq_len: int | None = None, tokenizer: Any = None) -> str:
    """`slimc trace MODEL`: the blocks, leaves and patterns the compiler finds, as the command prints them."""
    with model_path(model, tokenizer=tokenizer) as path:
        return trace_report(path, seq_len=seq_len)


__all__ = ["CompileResult", "compile", "evaluate", "load_config", "render_results", "trace"]
