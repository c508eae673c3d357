"""Building and compiling Programs in memory, for tests of passes and patterns."""

from __future__ import annotations

from pathlib import Path

import torch

from slimc.config import config_from_data
from slimc.frontends.llm import DecoderLLM
from slimc.ir import Program
from slimc.ir.source import ModelSource
from slimc.pipeline import Context, Pipeline
from slimc.report import RunReport

W8A8_DYNAMIC = {
    "weight": {"dtype": "int8", "granularity": "per_channel"},
    "act": {"dtype": "int8", "granularity": "per_token", "dynamic": True},
}
W8A8_STATIC = {
    "weight": {"dtype": "int8", "granularity": "per_channel"},
    "act": {"dtype": "int8", "granularity": "per_tensor", "symmetric": False},
}


def program_of(model) -> Program:
    source = ModelSource(path=Path("."), gguf_file=None, config=model.config, architecture=type(model).__name__)
    return DecoderLLM().build(source, model)


def calibration_ids(vocab_size: int, *, batches: int = 2, batch_size: int = 2, seq_len: int = 24, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab_size, (batch_size, seq_len), generator=generator) for _ in range(batches)]


def run_pipeline(model, pipeline: list[dict], schemes: dict | None = None, batches: list[torch.Tensor] | None = None, **config):
    """Trace and run `pipeline` on the model's blocks; returns (program, report)."""
    program = program_of(model)
    cfg = config_from_data({"schemes": schemes or {}, "pipeline": pipeline, **config})
    batches = batches if batches is not None else calibration_ids(model.config.vocab_size)
    report = RunReport()
    Pipeline.from_config(cfg).run(program, cfg, [{"input_ids": ids} for ids in batches], report)
    return program, report


def context_of(program: Program) -> Context:
    """A pass context with an empty config, for running one pass by hand."""
    return Context(program, config_from_data({}), [], RunReport())


@torch.no_grad()
def logits(program: Program, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits, computed through the blocks' (rewritten) graphs."""
    with program.executing_graphs():
        return program.model(input_ids=ids, use_cache=False).logits


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two outputs, computed in float32 (bfloat16 arithmetic is off in the third digit)."""
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


def rounding_bound(program: Program, inputs: dict, floor: float) -> float:
    """How far another computation of the program's logits may fairly be: the larger of `floor` and twice the
    logits' relative change on `inputs` when every embedding moves by one epsilon of the model's dtype (random signs), the
    pipeline's equivalence-check rule applied to the whole model. Static activation quantizers in bfloat16
    amplify rounding differences into different integer codes; float32 programs stay near `floor`."""
    table = program.model.get_input_embeddings().weight
    signs = torch.randint(0, 2, table.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    original = table.detach().clone()
    with torch.no_grad(), program.executing_graphs():
        expected = program.model(**inputs, use_cache=False).logits
        table.copy_(original.float() * (1 + torch.finfo(table.dtype).eps * signs))
        moved = program.model(**inputs, use_cache=False).logits
        table.copy_(original)
    return max(floor, 2 * relative(moved, expected))
