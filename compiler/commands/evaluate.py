"""What quantization lost, on held-out data: perplexity for decoder LLMs, fidelity for every other family.

`evaluate` picks the measure from the model's frontend (`Frontend.evaluation_metric`; `fidelity=True`
forces fidelity, on a language model's logits) and the held-out dataset from the evaluation settings,
else the frontend's `evaluation_dataset`; it refuses the dataset the output was calibrated on. Every format
in the output is measured (slimc.commands.quantized reads each back with the format's own reader), each
under `quantized` in the results, by format name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from slimc.commands.compile import REPORT_FILE, model_dtype, streams
from slimc.commands.quantized import holds_files, load_quantized_model, written_formats
from slimc.commands.streamed_eval import (
    next_token_nll,
    reading_float,
    streamed_float_program,
    streamed_perplexity,
)
from slimc.config import CalibrationConfig, SlimcConfig
from slimc.errors import ConfigError, DataError
from slimc.frontends import Frontend, check_builtin_dataset, frontend_for
from slimc.frontends.data import corpus_token_samples
from slimc.ir import Program
from slimc.ir.source import ModelSource, load_tokenizer
from slimc.numerics.fidelity import compare_models
from slimc.progress import tracked

ROTATION_TOLERANCE = 1e-2  # relative change of an embedding beyond any dtype rounding: the stream was rotated


@torch.no_grad()
def perplexity(model: nn.Module, input_ids: torch.LongTensor, *, batch_size: int = 4, progress: bool = False) -> float:
    """exp of the mean next-token negative log-likelihood over every window (row) of `input_ids` (n, seq_len).

    Each row is one unpadded window, so every position but the last predicts a token. The NLL is
    summed in float32 and divided once by the token count, so batch size does not change the result.
    """
    check_windows(input_ids, batch_size)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))  # an onnxruntime session has none
    was_training = model.training
    model.eval()
    total_nll = 0.0
    total_tokens = 0
    try:
        for batch in tracked(input_ids.split(batch_size), "perplexity", "batch", shown=progress):
            batch = batch.to(device)
            output = model(input_ids=batch, use_cache=False)
            nll, tokens = next_token_nll(getattr(output, "logits", output), batch)
            total_nll += nll
            total_tokens += tokens
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)


def check_windows(input_ids: torch.Tensor, batch_size: int) -> None:
    """Refuse windows `perplexity` cannot score (fewer than two tokens each) and a batch size below one."""
    if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] < 2:
        raise DataError(
            f"perplexity needs input_ids of shape (windows, seq_len) with seq_len >= 2, got {tuple(input_ids.shape)}"
        )
    if batch_size < 1:
        raise DataError(f"batch_size must be positive, got {batch_size}")


def evaluate_perplexity(
    source: ModelSource, quantized: Path | None, *, corpus: str, samples: int, seq_len: int, batch_size: int = 4,
    config: SlimcConfig | None = None,
) -> dict:
    """Perplexity of the float model, in the compile's dtype (`model.dtype`), and, if given, of each format of the
    quantized model rebuilt from its files (`config`: the model settings, such as that dtype). Where the compile
    streams its blocks (`memory.stream_blocks`), the float model and the mindie format are evaluated block by
    block (slimc.commands.streamed_eval), to the same figures."""
    config = config or SlimcConfig()
    frontend = frontend_for(source, config.model.family)
    formats = written_formats(quantized) if quantized is not None else {}
    ids, _ = corpus_token_samples(load_tokenizer(source), corpus, samples=samples, seq_len=seq_len, recommended=None)
    check_windows(ids, batch_size)
    results: dict = {"corpus": corpus, "tokens": int(ids.numel()), "samples": int(ids.shape[0]), "seq_len": seq_len}
    streamed = streams(config, source, frontend)
    if streamed:
        with streamed_float_program(config, source, frontend) as program:
            results["float_ppl"] = streamed_perplexity(program, reading_float(program), ids, batch_size=batch_size,
                                                       progress=True)
    else:
        float_model = frontend.load(source, dtype=model_dtype(config, source), trust_remote_code=config.model.trust_remote_code)
        results["float_ppl"] = perplexity(float_model, ids, batch_size=batch_size, progress=True)
        del float_model
    if formats:
        results["quantized"] = {}
    for name, directory in formats.items():
        if streamed and name == "mindie" and holds_files("mindie", directory):
            ppl = streamed_ascend_perplexity(directory, frontend, ids, batch_size=batch_size, progress=True)
        else:
            model = load_quantized_model(name, directory, config)
            ppl = perplexity(model, ids, batch_size=batch_size, progress=True)
            del model
        results["quantized"][name] = {"quantized_dir": str(directory), "quantized_ppl": ppl,
                                      "relative_change": ppl / results["float_ppl"] - 1.0}
    return results


def streamed_ascend_perplexity(directory: Path, frontend: Frontend, ids: torch.Tensor, *, batch_size: int,
                               progress: bool = False) -> float:
    """The perplexity of an Ascend output read block by block by its own reader (AscendBlocks)."""
    from slimc.backends.mindie_reader import AscendBlocks

    reader = AscendBlocks(directory)
    program = frontend.build(reader.output.source, reader.model)
    reader.read_outside(block.name for block in program.blocks)
    return streamed_perplexity(program, lambda block: reader.reading(block.name), ids, batch_size=batch_size,
                               progress=progress)


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
                                      batch_size=ev.batch_size, config=config)
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
    """Block and model outputs of each format of the quantized model rebuilt from its files against the float model.

    The float model computes in the dtype the compile used (`model.dtype`, `auto`: the checkpoint's), as the
    quantized one does: a bfloat16 model against a float32 reference would count bfloat16's rounding as
    quantization loss."""
    formats = written_formats(quantized)
    float_model = frontend.load(source, dtype=model_dtype(config, source), trust_remote_code=config.model.trust_remote_code)
    program = frontend.build(source, float_model)
    batches = frontend.calibration_batches(evaluation_settings(config, dataset), source, program)
    if not batches:
        raise DataError(f"{dataset} gave no evaluation batch; give more data or smaller evaluation sizes")
    results: dict = {"dataset": dataset, "batches": len(batches), "quantized": {}}
    for name, directory in formats.items():
        quantized_model = load_quantized_model(name, directory, config)
        blocks = [block.name for block in program.blocks]
        notes = []
        if name == "onnx":
            blocks = []
            notes.append("the ONNX graph runs as one onnxruntime session: only the model outputs are compared")
        elif residual_stream_rotated(program, quantized_model):
            blocks = []
            notes.append("the quantized model's residual stream is rotated (rotate pass), so its block outputs are in "
                         "another basis: only the model outputs are compared")
        report = compare_models(float_model, quantized_model, batches, program.call, blocks, progress=True)
        report.notes[:0] = notes
        results["quantized"][name] = {"quantized_dir": str(directory), **report.to_dict()}
        del quantized_model
    return results


def render_results(results: dict) -> str:
    """Evaluation results for the terminal: perplexities, or a fidelity table per format."""
    quantized = results.get("quantized", {})
    if results["metric"] == "fidelity":
        from slimc.numerics.fidelity import render

        common = {key: value for key, value in results.items() if key != "quantized"}
        return "\n\n".join(render({**common, **entry}) for entry in quantized.values())
    lines = [f"perplexity on {results['corpus']} ({results['tokens']} tokens):", f"  float      {results['float_ppl']:.4f}"]
    for name, entry in quantized.items():
        lines.append(f"  {name:10s} {entry['quantized_ppl']:.4f}  ({entry['relative_change'] * 100:+.2f}%, "
                     f"from {entry['quantized_dir']})")
    return "\n".join(lines)


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
