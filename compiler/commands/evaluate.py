"""What quantization lost, on held-out data: perplexity for decoder LLMs, fidelity for every other family.

`evaluate` picks the measure from the model's frontend (`Frontend.evaluation_metric`; `fidelity=True`
forces fidelity, on a language model's logits) and the held-out dataset from the evaluation settings,
else the frontend's `evaluation_dataset`; it refuses the dataset the output was calibrated on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from slimc.commands.compile import REPORT_FILE, model_dtype
from slimc.config import CalibrationConfig, SlimcConfig
from slimc.errors import ConfigError, DataError
from slimc.frontends import Frontend, check_builtin_dataset, frontend_for
from slimc.frontends.data import corpus_token_samples
from slimc.ir import Program
from slimc.ir.source import ModelSource, load_model, load_tokenizer
from slimc.numerics.fidelity import compare_models

ROTATION_TOLERANCE = 1e-2  # relative change of an embedding beyond any dtype rounding: the stream was rotated


@torch.no_grad()
def perplexity(model: nn.Module, input_ids: torch.LongTensor, *, batch_size: int = 4, progress: bool = False) -> float:
    """exp of the mean next-token negative log-likelihood over every window (row) of `input_ids` (n, seq_len).

    Each row is one unpadded window, so every position but the last predicts a token. The NLL is
    summed in float32 and divided once by the token count, so batch size does not change the result.
    """
    if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] < 2:
        raise DataError(
            f"perplexity needs input_ids of shape (windows, seq_len) with seq_len >= 2, got {tuple(input_ids.shape)}"
        )
    if batch_size < 1:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll = 0.0
    total_tokens = 0
    try:
        for batch in tqdm(input_ids.split(batch_size), desc="perplexity", unit="batch", disable=not progress):
            batch = batch.to(device)
            output = model(input_ids=batch, use_cache=False)
            logits = getattr(output, "logits", output)[:, :-1].float()
            targets = batch[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            total_nll += nll.item()
            total_tokens += targets.numel()
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)


def quantized_output_dir(path: Path) -> Path:
    """The Ascend files of a compile output: OUT/mindie, or OUT itself if it is that directory (the files, or one
    subdirectory of them per exported part)."""
    from slimc.backends.mindie_reader import DESCRIPTION_FILE

    for candidate in (path / "mindie", path):
        if (candidate / DESCRIPTION_FILE).is_file() or any((d / DESCRIPTION_FILE).is_file() for d in candidate.glob("*/")):
            return candidate
    raise DataError(f"{path} holds no Ascend output ({DESCRIPTION_FILE}); pass the --out directory of `slimc compile`")


def evaluate_perplexity(
    source: ModelSource, quantized: Path | None, *, corpus: str, samples: int, seq_len: int, batch_size: int = 4
) -> dict:
    """Perplexity of the float model and, if given, of the quantized model rebuilt from its written files."""
    from slimc.backends.mindie_reader import load_ascend_model

    directory = quantized_output_dir(quantized) if quantized is not None else None
    ids, _ = corpus_token_samples(load_tokenizer(source), corpus, samples=samples, seq_len=seq_len, recommended=None)
    results: dict = {"corpus": corpus, "tokens": int(ids.numel()), "samples": int(ids.shape[0]), "seq_len": seq_len}
    float_model = load_model(source, dtype=torch.float32)
    results["float_ppl"] = perplexity(float_model, ids, batch_size=batch_size, progress=True)
    del float_model
    if directory is not None:
        results["quantized_dir"] = str(directory)
        results["quantized_ppl"] = perplexity(load_ascend_model(directory), ids, batch_size=batch_size, progress=True)
        results["relative_change"] = results["quantized_ppl"] / results["float_ppl"] - 1.0
    return results


def evaluate(source: ModelSource, quantized: Path | None, config: SlimcConfig, *, fidelity: bool = False,
             calibrated_on: str | None = None) -> dict:
    """Perplexity or fidelity (as the frontend says, or fidelity when asked) on the evaluation dataset.

    `calibrated_on` is the calibration dataset of the output (by default read from its slimc_report.json);
    evaluating on it is refused, since it would measure the data the scales were fitted to.
    """
    frontend = frontend_for(source, config.model.family)
    dataset = config.evaluation.dataset or frontend.evaluation_dataset
    check_builtin_dataset(frontend, dataset, source.architecture, "evaluation.dataset (--corpus)")
    if calibrated_on is None and quantized is not None:
        calibrated_on = calibration_dataset_of(quantized)
    check_held_out(dataset, calibrated_on)
    if frontend.evaluation_metric == "perplexity" and not fidelity:
        ev = config.evaluation
        results = evaluate_perplexity(source, quantized, corpus=dataset, samples=ev.samples, seq_len=ev.seq_len,
                                      batch_size=ev.batch_size)
        return {"metric": "perplexity", **results}
    if quantized is None:
        raise DataError(f"{source.architecture} is evaluated by fidelity to the float model, which needs the quantized "
                        "model: pass --quantized OUT (the --out directory of `slimc compile`)")
    return {"metric": "fidelity", **evaluate_fidelity(source, quantized, config, frontend, dataset)}


def evaluation_settings(config: SlimcConfig, dataset: str) -> CalibrationConfig:
    """What frontends read to make batches, for held-out data: the evaluation's dataset and sizes, with the
    calibration's image size and diffusion sampling."""
    ev = config.evaluation
    return config.calibration.model_copy(update={"dataset": dataset, "samples": ev.samples, "seq_len": ev.seq_len,
                                                 "batch_size": ev.batch_size})


def evaluate_fidelity(source: ModelSource, quantized: Path, config: SlimcConfig, frontend: Frontend, dataset: str) -> dict:
    """Block and model outputs of the quantized model rebuilt from its written files against the float model.

    The float model computes in the dtype the compile used (`model.dtype`, `auto`: the checkpoint's), as the
    quantized one does: a bfloat16 model against a float32 reference would count bfloat16's rounding as
    quantization loss."""
    directory = quantized_output_dir(quantized)
    float_model = frontend.load(source, dtype=model_dtype(config, source), trust_remote_code=config.model.trust_remote_code)
    program = frontend.build(source, float_model)
    batches = frontend.calibration_batches(evaluation_settings(config, dataset), source, program)
    if not batches:
        raise DataError(f"{dataset} gave no evaluation batch; give more data or smaller evaluation sizes")
    quantized_model = load_quantized_model(directory)
    blocks = [block.name for block in program.blocks]
    notes = []
    if residual_stream_rotated(program, quantized_model):
        blocks = []
        notes.append("the quantized model's residual stream is rotated (rotate pass), so its block outputs are in "
                     "another basis: only the model outputs are compared")
    report = compare_models(float_model, quantized_model, batches, program.call, blocks, progress=True)
    report.notes[:0] = notes
    return {"dataset": dataset, "batches": len(batches), "quantized_dir": str(directory), **report.to_dict()}


def load_quantized_model(directory: Path) -> nn.Module:
    """The model the Ascend files compute. An output written in parts (one subdirectory per model of the
    program, named as the program's model names its child: Wan2.2's `transformer/`, `transformer_2/`) gives
    a container holding each part's model under that name, so block names and `program.call` apply to it."""
    from slimc.backends.mindie_reader import DESCRIPTION_FILE, load_ascend_model

    if (directory / DESCRIPTION_FILE).is_file():
        return load_ascend_model(directory)
    container = nn.Module()
    for part in sorted(d for d in directory.iterdir() if (d / DESCRIPTION_FILE).is_file()):
        container.add_module(part.name, load_ascend_model(part))
    return container.eval()


@torch.no_grad()
def residual_stream_rotated(program: Program, quantized_model: nn.Module) -> bool:
    """Whether the embeddings writing the residual stream (float in every output) were rotated: then every
    block reads and writes its hidden states rotated, and only the model outputs compare."""
    for name in program.embeddings:
        reference = program.model.get_submodule(name).weight.float()
        written = quantized_model.get_submodule(name).weight.float()
        if written.shape != reference.shape or (written - reference).norm() > ROTATION_TOLERANCE * reference.norm():
            return True
    return False


def calibration_dataset_of(quantized: Path) -> str | None:
    """The calibration dataset a `slimc compile` output records in its report, if it has one."""
    for candidate in (Path(quantized) / REPORT_FILE, Path(quantized).parent / REPORT_FILE):
        if candidate.is_file():
            try:
                dataset = json.loads(candidate.read_text())["details"]["calibration"]["dataset"]
            except (ValueError, KeyError, TypeError):
                return None
            return dataset if isinstance(dataset, str) else None
    return None


def check_held_out(dataset: str, calibrated_on: str | None) -> None:
    """Refuse to evaluate on the calibration dataset (the same spec, or the same file)."""
    if calibrated_on is None:
        return
    same = dataset == calibrated_on or (
        not dataset.startswith("builtin:") and not calibrated_on.startswith("builtin:")
        and Path(dataset).expanduser().resolve() == Path(calibrated_on).expanduser().resolve()
    )
    if same:
        raise ConfigError(f"the evaluation dataset {dataset} is the calibration dataset; evaluate on held-out data "
                          "(--corpus, or evaluation.dataset in the config; by default the model family's own)")
