"""Decoder-only language models: Llama, Qwen2, Qwen3, Qwen3-MoE, GLM-4.7 (Glm4Moe).

A model is its embeddings (prologue), a stack of decoder layers (the blocks), and the final
norm and head (epilogue). Blocks are found as the module list holding `num_hidden_layers`
layers of one class, so a model laid out like these needs no new code beyond its class name here.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from slimc.config import CalibrationConfig
from slimc.errors import ModelLoadError
from slimc.frontends.base import Frontend
from slimc.frontends.mix import text_windows
from slimc.ir import Block, Program, Stage
from slimc.ir.hooks import temporary_hooks
from slimc.ir.source import ModelSource, load_tokenizer
from slimc.report import RunReport


def decoder_layers(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    """The qualified name and module list of the repeated decoder layers."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and len({type(m) for m in module}) == 1:
            return name, module
    raise ModelLoadError(f"{type(model).__name__}: found no list of {num_layers} decoder layers to cut into blocks")


@torch.no_grad()
def module_feeding(model: nn.Module, head: nn.Module, layers: nn.ModuleList) -> str | None:
    """The module after the decoder layers whose output the head reads, found by running two tokens."""
    inside = {id(m) for m in layers.modules()} | {id(head), id(model.get_input_embeddings())}
    outputs: dict[str, torch.Tensor] = {}
    head_input: list[torch.Tensor] = []
    with temporary_hooks() as hooks:
        for name, module in model.named_modules():
            if id(module) not in inside and not list(module.children()):
                hooks.after(module, lambda m, args, out, n=name: outputs.__setitem__(n, out))
        hooks.before(head, lambda m, args: head_input.append(args[0]))
        model(input_ids=torch.tensor([[1, 2]], device=head.weight.device), use_cache=False)  # 0 is often padding
    x = head_input[0]
    for name, out in outputs.items():
        if isinstance(out, torch.Tensor) and out.shape[-1] == x.shape[-1] and out.shape[-2] >= x.shape[-2] \
                and torch.equal(out[..., -x.shape[-2]:, :], x):
            return name
    return None


class DecoderLLM(Frontend):
    name = "llm"
    architectures = (
        "LlamaForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Qwen3MoeForCausalLM",
        "Glm4MoeForCausalLM",
    )
    description = "decoder-only language models"
    evaluation_dataset = "builtin:text-eval"
    evaluation_metric = "perplexity"

    def build(self, source: ModelSource, model: nn.Module) -> Program:
        config = model.config
        prefix, layers = decoder_layers(model, config.num_hidden_layers)
        blocks = [Block(f"{prefix}.{i}", layer, layers, i, role="text") for i, layer in enumerate(layers)]
        program = Program(model=model, family=self.name, source=source, stages=[Stage("text", blocks)], call=call_without_cache)
        program.tied_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        names = {id(module): name for name, module in model.named_modules()}
        program.embeddings = [names[id(model.get_input_embeddings())]]
        program.head = names[id(model.get_output_embeddings())]
        program.find_head_norm = functools.partial(module_feeding, model, model.get_output_embeddings(), layers)
        return program

    def calibration_batches(self, calibration: CalibrationConfig, source: ModelSource, program: Program,
                            report: RunReport | None = None) -> list[dict]:
        return [{"input_ids": ids} for ids in text_batches(calibration, load_tokenizer(source), report)]


def call_without_cache(model: nn.Module, batch: dict) -> object:
    return model(**batch, use_cache=False)


def text_batches(calibration: CalibrationConfig, tokenizer, report: RunReport | None = None) -> list[torch.Tensor]:
    """Windows of `calibration.seq_len` tokens of the calibration text, `batch_size` to a batch."""
    ids, fingerprint = text_windows(tokenizer, calibration.dataset, samples=calibration.samples,
                                    seq_len=calibration.seq_len, split=calibration.split, column=calibration.column)
    if report is not None:
        report.metrics["calibration_tokens"] = float(ids.numel())
        report.note(f"calibration: {ids.shape[0]} × {ids.shape[1]} tokens of {calibration.dataset} "
                    f"(sha256 {fingerprint[:12]} of the text read)")
    return list(ids.split(calibration.batch_size))
