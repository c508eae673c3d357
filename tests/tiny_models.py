"""Tiny, seeded, random-initialised models of the real transformers classes.

The whole test suite builds its models here, so every test runs the real modeling code of
each family (attention dispatch, routers, fused experts) at a size that runs in milliseconds.
Norm weights are drawn around 1 (not left at 1) so that folding a scale into a norm changes
the numbers a test can see.
"""

from __future__ import annotations

import torch
from module_calls import module_calls
from torch import nn
from transformers import (
    Glm4MoeConfig,
    Glm4MoeForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe", "glm4_moe")

VOCAB_SIZE = 512
HIDDEN_SIZE = 64

_COMMON = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": HIDDEN_SIZE,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# Sizes (for tiny_causal_lm's `sizes`) of a model whose shapes the defaults do not reach: GQA 3:1, a head_dim (32)
# that is not hidden / heads (40), widths that are not powers of two (240 = 60·4 and 352 = 44·8 Hadamard orders).
ODD_SIZES = {"hidden_size": 240, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 32,
             "intermediate_size": 352}

_BUILDERS: dict[str, tuple[type, type, dict]] = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    "qwen3_moe": (
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
        {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
         "decoder_sparse_step": 1, "norm_topk_prob": True},
    ),
    "glm4_moe": (
        Glm4MoeConfig,
        Glm4MoeForCausalLM,
        {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 1,
         "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "use_qk_norm": True},
    ),
}


def tiny_causal_lm(
    family: str, *, seed: int = 0, tie_word_embeddings: bool = False, dtype: torch.dtype = torch.float32,
    sizes: dict | None = None,
) -> PreTrainedModel:
    """A 2-layer, hidden-64 causal LM of `family` (one of FAMILIES) in eval mode, with sdpa attention.

    `sizes` overrides config entries (e.g. hidden_size) for models of other shapes."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    config_cls, model_cls, extra = _BUILDERS[family]
    config = config_cls(**{**_COMMON, **extra, **(sizes or {})}, tie_word_embeddings=tie_word_embeddings)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = model_cls(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            owner = model.get_submodule(name.rpartition(".")[0])
            if "Norm" in type(owner).__name__:
                param.copy_(1.0 + 0.25 * torch.randn(param.shape, generator=generator))
            elif not isinstance(owner, nn.Embedding):
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    return model.to(dtype).eval()


def tiny_batch(seq_len: int = 16, *, batch: int = 2, pad: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids` (batch, seq_len) and an `attention_mask` whose first row is left-padded by `pad` tokens."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB_SIZE, (batch, seq_len), generator=generator)
    attention_mask = torch.ones(batch, seq_len, dtype=torch.long)
    attention_mask[0, :pad] = 0
    input_ids[0, :pad] = 0
    return input_ids, attention_mask


def capture_layer_inputs(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> list[tuple[tuple, dict]]:
    """The `(args, kwargs)` each decoder layer is called with during one forward (no cache)."""
    layers = [(f"model.layers.{i}", layer) for i, layer in enumerate(model.model.layers)]
    calls = module_calls(layers, lambda: model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False))
    return [(args, kwargs) for _, args, kwargs, _ in calls]
