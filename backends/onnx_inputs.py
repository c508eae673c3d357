"""What an exported graph computes and takes: the module torch.onnx traces, its sample inputs and dynamic axes.

- Decoder LLMs: a prefill, ``input_ids`` (batch, sequence) int64 -> ``logits`` (batch, sequence, vocab), or
  (batch, 1, vocab) for the last position only, with no cache and no padding (every sequence of a batch is as
  long as the batch).
- Diffusion transformers (Flux, Wan text-to-video): the transformer's forward on the tensors its pipeline
  passes, -> ``sample`` (the denoiser output); batch, token, frame and latent-size axes are dynamic where the
  model allows (torch.export's automatic dynamism: an axis the model fixes stays a number); the non-tensor
  arguments the pipelines pass (empty attention kwargs) are fixed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from slimc.errors import ExportError
from slimc.ir import Program


@dataclass
class GraphSpec:
    """The traced module, its sample tensor inputs and fixed other arguments by name, the inputs' dynamic axes,
    and the name of the output (the module's output, or the first of the tuple it returns)."""

    module: nn.Module
    inputs: dict[str, torch.Tensor]
    dynamic_shapes: dict[str, Any]  # as torch.export takes them: by the forward's parameters, None for constants
    output: str
    constants: dict[str, Any] = field(default_factory=dict)
    tracing: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)

    def run(self) -> torch.Tensor:
        """The module's output on the sample (call it inside `Program.executing_graphs`)."""
        output = self.module(**self.inputs, **self.constants)
        return output[0] if isinstance(output, tuple) else output


class Prefill(nn.Module):
    """``input_ids`` -> logits of every position, or of the last only (`last_only`), without cache."""

    def __init__(self, model: nn.Module, last_only: bool) -> None:
        super().__init__()
        self.model = model
        self.keep = 1 if last_only else 0  # transformers' logits_to_keep: 0 keeps every position

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False, logits_to_keep=self.keep).logits


def graph_spec(program: Program, *, batch: int, seq_len: int, dtype: torch.dtype, last_logits: bool = False,
               seed: int = 0) -> GraphSpec:
    """What to export for `program`; raises ExportError for programs the onnx backend has no graph for."""
    generator = torch.Generator().manual_seed(seed)
    if program.family == "llm":
        vocab = program.model.config.vocab_size
        input_ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
        dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
        return GraphSpec(Prefill(program.model, last_logits).eval(), {"input_ids": input_ids}, {"input_ids": dims}, "logits",
                         tracing=_unpadded_prefill_masks())
    if program.family == "diffusion":
        kind = type(program.model).__name__
        if kind not in _DENOISER_INPUTS:
            raise ExportError(f"onnx: exports the diffusion transformers {', '.join(sorted(_DENOISER_INPUTS))}, not {kind}; "
                              "export it with mindie")
        tensors, axes, constants = _DENOISER_INPUTS[kind](program.model.config, batch, generator, dtype)
        constants["return_dict"] = False
        dynamic = {name: dict.fromkeys(axes.get(name, ()), torch.export.Dim.AUTO) for name in tensors}
        dynamic.update({name: pytree.tree_map(lambda _: None, value) for name, value in constants.items()})
        return GraphSpec(program.model, tensors, dynamic, "sample", constants)
    raise ExportError(f"onnx: exports decoder LLMs (a prefill graph) and diffusion transformers, not a {program.family!r} "
                      "program (its vision or audio stages and their wiring have no graph here); export it with mindie or vllm")


@contextlib.contextmanager
def _unpadded_prefill_masks() -> Iterator[None]:
    """Take, while tracing, the mask decisions transformers takes in eager mode for an unpadded prefill.

    Under tracing transformers builds a causal mask tensor (it cannot read padding values) and checks the
    positions for packed sequences. The graph takes no padding and positions 0..n-1: eager code then passes
    no mask and sdpa's `is_causal` masks the future, which is also how the blocks were traced.
    """
    from transformers import masking_utils

    ignore_mask, find_packed = masking_utils._ignore_causal_mask_sdpa, masking_utils.find_packed_sequence_indices

    def unpadded(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size=None) -> bool:
        if padding_mask is None and local_attention_size is None:
            return True
        return ignore_mask(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size)

    masking_utils._ignore_causal_mask_sdpa = unpadded
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils._ignore_causal_mask_sdpa, masking_utils.find_packed_sequence_indices = ignore_mask, find_packed


# --- diffusion transformers: small latents and texts shaped as each pipeline passes them -----------------
# Each builder gives (tensors, their dynamic axes, the non-tensor arguments). HunyuanVideo has none yet: its
# blocks take the first frame's token count as a Python int, which a dynamic export makes a symbol that the
# traced blocks' input check refuses.
# Timesteps and guidance are small: their sinusoidal embeddings take sin/cos of (value · 1000)-radian
# arguments, whose float32 results differ between runtimes by ~1e-5 at real timesteps, and the quantizers of
# every block amplify that into output differences of ~1e-2 that say nothing about the graph.

_TEXT_TOKENS = 8


def _flux(config, batch: int, generator: torch.Generator, dtype: torch.dtype) -> tuple[dict, dict, dict]:
    grid = 4  # packed latent tokens per side
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    tensors = {
        "hidden_states": torch.randn(batch, grid * grid, config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(batch, _TEXT_TOKENS, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(batch, config.pooled_projection_dim, generator=generator),
        "timestep": torch.full((batch,), 0.001),  # FluxPipeline passes t / 1000
        "img_ids": torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float(),
        "txt_ids": torch.zeros(_TEXT_TOKENS, 3),
    }
    axes = {"hidden_states": (0, 1), "encoder_hidden_states": (0, 1), "pooled_projections": (0,), "timestep": (0,),
            "img_ids": (0,), "txt_ids": (0,)}
    if config.guidance_embeds:
        tensors["guidance"], axes["guidance"] = torch.full((batch,), 0.001), (0,)
    return _cast(tensors, dtype), axes, {"joint_attention_kwargs": {}}


def _wan(config, batch: int, generator: torch.Generator, dtype: torch.dtype) -> tuple[dict, dict, dict]:
    if config.image_dim is not None:
        raise ExportError("onnx: Wan image-to-video transformers (image_dim set) take image embeddings the onnx backend "
                          "has no sample of; export them with mindie")
    pt, ph, pw = config.patch_size
    tensors = _cast({
        "hidden_states": torch.randn(batch, config.in_channels, 2 * pt, 2 * ph, 2 * pw, generator=generator),
        "encoder_hidden_states": torch.randn(batch, _TEXT_TOKENS, config.text_dim, generator=generator),
    }, dtype)
    tensors["timestep"] = torch.full((batch,), 1, dtype=torch.int64)  # UniPC's integer timesteps
    axes = {"hidden_states": (0, 2, 3, 4), "encoder_hidden_states": (0, 1), "timestep": (0,)}
    return tensors, axes, {"attention_kwargs": None}


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {name: t.to(dtype) if t.is_floating_point() else t for name, t in tensors.items()}


_DENOISER_INPUTS = {
    "FluxTransformer2DModel": _flux,
    "WanTransformer3DModel": _wan,
}
