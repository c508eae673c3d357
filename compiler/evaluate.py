"""Perplexity: how much a language model lost, measured on held-out text."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from slimc.data import load_corpus, token_samples
from slimc.errors import DataError
from slimc.frontends.hf import ModelSource, load_model, load_tokenizer


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
    """The Ascend files of a compile output: OUT/mindie, or OUT itself if it is that directory."""
    from slimc.backends.mindie_reader import DESCRIPTION_FILE

    for candidate in (path / "mindie", path):
        if (candidate / DESCRIPTION_FILE).is_file():
            return candidate
    raise DataError(f"{path} holds no Ascend output ({DESCRIPTION_FILE}); pass the --out directory of `slimc compile`")


def evaluate_perplexity(
    source: ModelSource, quantized: Path | None, *, corpus: str, samples: int, seq_len: int, batch_size: int = 4
) -> dict:
    """Perplexity of the float model and, if given, of the quantized model rebuilt from its written files."""
    from slimc.backends.mindie_reader import load_ascend_model

    directory = quantized_output_dir(quantized) if quantized is not None else None
    ids = token_samples(load_tokenizer(source), load_corpus(corpus), samples=samples, seq_len=seq_len, recommended=None)
    results: dict = {"corpus": corpus, "tokens": int(ids.numel()), "samples": int(ids.shape[0]), "seq_len": seq_len}
    float_model = load_model(source, dtype=torch.float32)
    results["float_ppl"] = perplexity(float_model, ids, batch_size=batch_size, progress=True)
    del float_model
    if directory is not None:
        results["quantized_dir"] = str(directory)
        results["quantized_ppl"] = perplexity(load_ascend_model(directory), ids, batch_size=batch_size, progress=True)
        results["relative_change"] = results["quantized_ppl"] / results["float_ppl"] - 1.0
    return results
