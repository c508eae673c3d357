"""What quantization lost, on held-out data: perplexity for decoder LLMs, fidelity for every other family.

`evaluate` picks the measure from the model's frontend (`Frontend.evaluation_metric`; `fidelity=True`
forces fidelity, on a language model's logits) and the held-out dataset from the evaluation settings,
else the frontend's `evaluation_dataset`; it refuses the dataset the output was calibrated on. Every format
in the output is measured (slimc.commands.quantized reads each back with the format's own reader), each
under `quantized` in the results, by format name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from slimc.commands.compile import REPORT_FILE, model_dtype, streams
from slimc.commands.quantized import holds_files, load_quantized_model, written_formats
from slimc.commands.streamed_eval import (
    next_token_nll,
    perplexity_of,
    reading_float,
    streamed_float_program,
    streamed_nlls,
)
from slimc.config import CalibrationConfig, SlimcConfig
from slimc.errors import ConfigError, DataError
from slimc.frontends import Frontend, check_builtin_dataset, frontend_for
from slimc.frontends.mix import MIXES, domain_windows, share_text, text_windows
from slimc.ir import Program
from slimc.ir.source import ModelSource, load_tokenizer
from slimc.numerics.fidelity import compare_models
from slimc.progress import tracked

ROTATION_TOLERANCE = 1e-2  # relative change of an embedding beyond any dtype rounding: the stream was rotated


def perplexity(model: nn.Module, input_ids: torch.LongTensor, *, batch_size: int = 4, progress: bool = False) -> float:
    """exp of the mean next-token negative log-likelihood over every window (row) of `input_ids` (n, seq_len).

    Each row is one unpadded window, so every position but the last predicts a token. The NLL is
    summed in float32 and divided once by the token count, so batch size does not change the result.
    """
    check_windows(input_ids, batch_size)
    return perplexity_of(batch_nlls(model, list(input_ids.split(batch_size)), progress=progress))


@torch.no_grad()
def batch_nlls(model: nn.Module, batches: list[torch.LongTensor], *, progress: bool = False) -> list[tuple[float, int]]:
    """The summed next-token NLL (float32) and the tokens it sums over, of each batch of windows."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))  # an onnxruntime session has none
    was_training = model.training
    model.eval()
    nlls = []
    try:
        for batch in tracked(batches, "perplexity", "batch", shown=progress):
            batch = batch.to(device)
            output = model(input_ids=batch, use_cache=False)
            nlls.append(next_token_nll(getattr(output, "logits", output), batch))
    finally:
        model.train(was_training)
    return nlls


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
    config: SlimcConfig | None = None, float_losses: dict | None = None,
) -> dict:
    """Perplexity of the float model, in the compile's dtype (`model.dtype`), and, if given, of each format of the
    quantized model rebuilt from its files (`config`: the model settings, such as that dtype). Where the compile
    streams its blocks (`memory.stream_blocks`), the float model and the mindie format are evaluated block by
    block (slimc.commands.streamed_eval), to the same figures. A corpus of several domains (`builtin:eval`)
    has each domain's perplexity under `domains` too; the overall one weighs every token the same.

    `float_losses`, where given, keeps the float model's losses between calls on the same model and settings
    (tune's rounds): the first call fills it, later ones skip the float model."""
    config = config or SlimcConfig()
    frontend = frontend_for(source, config.model.family)
    formats = written_formats(quantized) if quantized is not None else {}
    domains = evaluation_windows(load_tokenizer(source), corpus, samples=samples, seq_len=seq_len, config=config)
    for ids in domains.values():
        check_windows(ids, batch_size)
    # Batches never span two domains, so each domain's figure is the one its windows give alone.
    named = [(name, batch) for name, ids in domains.items() for batch in ids.split(batch_size)]
    batches = [batch for _, batch in named]
    tokens = sum(int(ids.numel()) for ids in domains.values())
    results: dict = {"corpus": corpus, "tokens": tokens, "samples": sum(int(ids.shape[0]) for ids in domains.values()),
                     "seq_len": seq_len}
    streamed = streams(config, source, frontend)
    float_nlls = (float_losses or {}).get("nlls")
    if float_nlls is None:
        float_nlls = _float_nlls(config, source, frontend, batches, streamed)
        if float_losses is not None:
            float_losses["nlls"] = float_nlls
    results["float_ppl"] = perplexity_of(float_nlls)
    by_domain = corpus in MIXES
    if by_domain:
        results["domains"] = {name: {"samples": int(ids.shape[0]), "tokens": int(ids.numel()),
                                     "float_ppl": domain_perplexity(float_nlls, named, name)}
                              for name, ids in domains.items()}
    if formats:
        results["quantized"] = {}
    for name, directory in formats.items():
        if streamed and name == "mindie" and holds_files("mindie", directory):
            nlls = streamed_ascend_nlls(directory, frontend, batches, progress=True)
        else:
            model = load_quantized_model(name, directory, config)
            nlls = batch_nlls(model, batches, progress=True)
            del model
        ppl = perplexity_of(nlls)
        entry = results["quantized"][name] = {"quantized_dir": str(directory), "quantized_ppl": ppl,
                                              "relative_change": ppl / results["float_ppl"] - 1.0}
        if by_domain:
            entry["domains"] = {}
            for domain, figures in results["domains"].items():
                domain_ppl = domain_perplexity(nlls, named, domain)
                entry["domains"][domain] = {"quantized_ppl": domain_ppl,
                                            "relative_change": domain_ppl / figures["float_ppl"] - 1.0}
    return results


def evaluation_windows(tokenizer, corpus: str, *, samples: int, seq_len: int,
                       config: SlimcConfig) -> dict[str, torch.LongTensor]:
    """The evaluation windows by domain: a mix's domains, else the corpus as its one domain."""
    if corpus in MIXES:
        return domain_windows(tokenizer, corpus, samples=samples, seq_len=seq_len)[0]
    ev = config.evaluation
    ids, _ = text_windows(tokenizer, corpus, samples=samples, seq_len=seq_len, recommended=None,
                          split=ev.split if corpus == ev.dataset else None,
                          column=ev.column if corpus == ev.dataset else None)
    return {corpus: ids}


def domain_perplexity(nlls: list[tuple[float, int]], named: list[tuple[str, torch.Tensor]], domain: str) -> float:
    return perplexity_of([nll for nll, (name, _) in zip(nlls, named, strict=True) if name == domain])


def streamed_ascend_perplexity(directory: Path, frontend: Frontend, ids: torch.Tensor, *, batch_size: int,
                               progress: bool = False) -> float:
    """The perplexity of an Ascend output read block by block by its own reader (AscendBlocks)."""
    return perplexity_of(streamed_ascend_nlls(directory, frontend, list(ids.split(batch_size)), progress=progress))


def streamed_ascend_nlls(directory: Path, frontend: Frontend, batches: list[torch.Tensor], *,
                         progress: bool = False) -> list[tuple[float, int]]:
    """`streamed_nlls` of an Ascend output read block by block by its own reader (AscendBlocks)."""
    from slimc.backends.mindie_reader import AscendBlocks

    reader = AscendBlocks(directory)
    program = frontend.build(reader.output.source, reader.model)
    reader.read_outside(block.name for block in program.blocks)
    return streamed_nlls(program, lambda block: reader.reading(block.name), batches, progress=progress)


def _float_nlls(config: SlimcConfig, source: ModelSource, frontend: Frontend, batches: list[torch.Tensor],
                streamed: bool) -> list[tuple[float, int]]:
    if streamed:
        with streamed_float_program(config, source, frontend) as program:
            return streamed_nlls(program, reading_float(program), batches, progress=True)
    float_model = frontend.load(source, dtype=model_dtype(config, source), trust_remote_code=config.model.trust_remote_code)
    return batch_nlls(float_model, batches, progress=True)


def evaluate(source: ModelSource, quantized: Path | None, config: SlimcConfig, *, fidelity: bool = False,
             calibrated_on: str | None = None, float_losses: dict | None = None) -> dict:
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
                                      batch_size=ev.batch_size, config=config, float_losses=float_losses)
        return {"metric": "perplexity", **results}
    if quantized is None:
        raise DataError(f"{source.architecture} is evaluated by fidelity to the float model, which needs the quantized "
                        "model: pass --quantized OUT (the --out directory of `slimc compile`)")
    return {"metric": "fidelity", **evaluate_fidelity(source, quantized, config, frontend, dataset)}


def evaluation_settings(config: SlimcConfig, dataset: str) -> CalibrationConfig:
    """What frontends read to make batches, for held-out data: the evaluation's dataset and sizes, with the
    calibration's image size and diffusion sampling."""
    ev = config.evaluation
    own = dataset == ev.dataset  # the evaluation's split and column belong to its own dataset, not to --corpus
    return config.calibration.model_copy(update={"dataset": dataset, "samples": ev.samples, "seq_len": ev.seq_len,
                                                 "batch_size": ev.batch_size, "split": ev.split if own else None,
                                                 "column": ev.column if own else None})


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
    lines = [f"perplexity on {results['corpus']} ({results['tokens']} tokens):"]
    if "domains" in results:
        return "\n".join(lines + domain_table(results))
    lines.append(f"  float      {results['float_ppl']:.4f}")
    for name, entry in quantized.items():
        lines.append(f"  {name:10s} {entry['quantized_ppl']:.4f}  ({entry['relative_change'] * 100:+.2f}%, "
                     f"from {entry['quantized_dir']})")
    return "\n".join(lines)


def domain_table(results: dict) -> list[str]:
    """One column per domain and one for all (token-weighted); a row for the float model and one per format,
    with the change from float under each quantized figure."""
    domains = results["domains"]
    width = max(18, *(len(name) + 2 for name in domains))
    header = f"  {'':10s}" + "".join(f"{name:>{width}s}" for name in [*domains, "overall"])
    tokens = f"  {'tokens':10s}" + "".join(f"{entry['tokens']:>{width}d}" for entry in domains.values()) + \
        f"{results['tokens']:>{width}d}"
    rows = [header, tokens, f"  {'float':10s}" + "".join(
        f"{value:>{width}.4f}" for value in [*(entry["float_ppl"] for entry in domains.values()), results["float_ppl"]])]
    for name, entry in results.get("quantized", {}).items():
        cells = [*entry["domains"].values(), entry]
        texts = [f"{cell['quantized_ppl']:.4f} ({cell['relative_change'] * 100:+.2f}%)" for cell in cells]
        rows.append(f"  {name:10s}" + "".join(f"{text:>{width}s}" for text in texts))
    sources = [f"  ({name}: {entry['quantized_dir']})" for name, entry in results.get("quantized", {}).items()]
    return rows + sources


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
    """Refuse to evaluate on the calibration dataset (the same spec, a mix and a split it holds, or the same file)."""
    if calibrated_on is None:
        return
    same = share_text(dataset, calibrated_on) or (
        not dataset.startswith("builtin:") and not calibrated_on.startswith("builtin:")
        and Path(dataset).expanduser().resolve() == Path(calibrated_on).expanduser().resolve()
    )
    if same:
        shared = "is the calibration dataset" if dataset == calibrated_on else f"shares text with the calibration dataset {calibrated_on}"
        raise ConfigError(f"the evaluation dataset {dataset} {shared}; evaluate on held-out data "
                          "(--corpus, or evaluation.dataset in the config; by default the model family's own)")
