"""Benchmark: what rotate's online_qk (a Hadamard per head on queries and keys after RoPE) does to an int8 KV cache
(C8, static per-channel scales), layer by layer on a real model.

The float model runs with a recording attention kernel: on the calibration text each layer's keys and values set the
ranges of slimc's own KV cache quantizers (`KVCacheQuantize`), one set for the keys as they are and one for the keys
rotated by `QKHadamard`; on the evaluation text it measures, per layer and with the float model's inputs, the relative
error of the causal attention scores q·kᵀ and of the keys, and the perplexity with each cache (keys and values
quantized in every layer). The residual and head rotations (R1, R2) leave q and k as they are, so this isolates
online_qk. Prints one JSON object.

    .venv/bin/python bench/kv_cache_rotation.py                   # SmolLM2-135M
    .venv/bin/python bench/kv_cache_rotation.py --model DIR --samples 64 --eval-samples 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

from slimc.commands.evaluate import perplexity
from slimc.frontends.data import load_corpus, token_samples
from slimc.ir.source import default_model_path, load_model, load_tokenizer, resolve_model_source
from slimc.numerics.modules import KVCacheQuantize, QKHadamard
from slimc.schemes import KVCacheScheme

C8 = KVCacheScheme(dtype="int8", granularity="per_channel", symmetric=True)
VARIANTS = ("plain", "online_qk")


class Recorder:
    """The attention kernel of every layer: calibrates, measures or applies the two caches, then runs sdpa."""

    def __init__(self, layers: int, heads: int, head_dim: int) -> None:
        self.rotation = QKHadamard(head_dim, "k_proj")
        self.caches = {variant: [(KVCacheQuantize(C8, heads, head_dim, "key", "k_proj"),
                                  KVCacheQuantize(C8, heads, head_dim, "value", "v_proj")) for _ in range(layers)]
                       for variant in VARIANTS}
        self.mode = "calibrate"  # or "measure", or a variant whose cache the attention reads
        self.sums = {variant: [[0.0, 0.0, 0.0, 0.0] for _ in range(layers)] for variant in VARIANTS}

    def freeze(self) -> None:
        for caches in self.caches.values():
            for key, value in caches:
                key.freeze()
                value.freeze()

    def __call__(self, module, query, key, value, *args, **kwargs):
        layer = module.layer_idx
        if self.mode == "calibrate":
            for variant, caches in self.caches.items():
                caches[layer][0](self.rotation(key) if variant == "online_qk" else key)
                caches[layer][1](value)
        elif self.mode == "measure":
            self._measure(layer, query.float(), key.float())
        else:
            rotated = self.mode == "online_qk"
            cache_key, cache_value = self.caches[self.mode][layer]
            query, key = (self.rotation(query), self.rotation(key)) if rotated else (query, key)
            key, value = cache_key(key), cache_value(value)
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    def _measure(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
        repeat = query.shape[1] // key.shape[1]
        causal = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool).tril()
        scores = (query @ key.repeat_interleave(repeat, 1).transpose(-1, -2))[..., causal]
        for variant in VARIANTS:
            rotated = variant == "online_qk"
            q, k = (self.rotation(query), self.rotation(key)) if rotated else (query, key)
            cached = self.caches[variant][layer][0](k)
            quantized = (q @ cached.repeat_interleave(repeat, 1).transpose(-1, -2))[..., causal]
            sums = self.sums[variant][layer]
            sums[0] += float((quantized - scores).square().sum())
            sums[1] += float(scores.square().sum())
            sums[2] += float((cached - k).square().sum())
            sums[3] += float(k.square().sum())


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory or GGUF file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--samples", type=int, default=32, help="calibration samples of 512 tokens")
    parser.add_argument("--eval-samples", type=int, default=8, help="evaluation samples of 512 tokens")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    source = resolve_model_source(str(args.model or default_model_path()))
    tokenizer = load_tokenizer(source)
    calibration = token_samples(tokenizer, load_corpus("builtin:text"), samples=args.samples, seq_len=512, recommended=None)
    evaluation = token_samples(tokenizer, load_corpus("builtin:text-eval"), samples=args.eval_samples, seq_len=512,
                               recommended=None)
    model = load_model(source, dtype=torch.float32)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    recorder = Recorder(config.num_hidden_layers, config.num_key_value_heads, head_dim)
    result = {"float_ppl": perplexity(model, evaluation)}
    AttentionInterface.register("kv_cache_rotation_bench", recorder)
    model.config._attn_implementation = "kv_cache_rotation_bench"
    for batch in calibration.split(4):
        model(input_ids=batch, use_cache=False)
    recorder.freeze()
    recorder.mode = "measure"
    for batch in evaluation.split(4):
        model(input_ids=batch, use_cache=False)
    for variant in VARIANTS:
        recorder.mode = variant
        scores = [(s[0] / s[1]) ** 0.5 for s in recorder.sums[variant]]
        keys = [(s[2] / s[3]) ** 0.5 for s in recorder.sums[variant]]
        result[variant] = {"c8_ppl": perplexity(model, evaluation), "score_error_mean": statistics.mean(scores),
                           "score_error_max": max(scores), "key_error_mean": statistics.mean(keys),
                           "score_error_per_layer": [round(e, 5) for e in scores]}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
