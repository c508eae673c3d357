"""Benchmark: what rotate's online_qk (a Hadamard on queries and keys after RoPE) does to an int8 KV cache (C8).

The model is compiled twice with the KV cache quantized and nothing else (the rotation of the residual stream and
of the heads in both, so that only online_qk differs), and on evaluation text it measures, per layer, the relative
error of the attention scores q·kᵀ (causal part) and of the keys the cache holds, and the perplexity through the
written Ascend files. Prints one JSON object.

    .venv/bin/python bench/kv_cache_rotation.py                      # SmolLM2-135M
    .venv/bin/python bench/kv_cache_rotation.py --model DIR --samples 64 --eval-samples 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import warnings
from pathlib import Path

import torch

from slimc.backends.mindie_reader import load_ascend_model
from slimc.commands.compile import compile_model
from slimc.commands.evaluate import perplexity
from slimc.config import config_from_data
from slimc.frontends.data import load_corpus, token_samples
from slimc.ir.source import default_model_path, load_model, load_tokenizer, resolve_model_source
from slimc.numerics.modules import KVCacheQuantize
from slimc.patterns import block_graph


def config(online_qk: bool, samples: int) -> dict:
    return {
        "model": {"dtype": "float32"},
        "calibration": {"dataset": "builtin:text", "samples": samples, "seq_len": 512, "batch_size": 4},
        "schemes": {"unused": {"weight": {"dtype": "int8", "granularity": "per_channel"}}},
        "pipeline": [
            {"pass": "norm_fusion"},
            {"pass": "rotate", "seed": 0, "online_down": False, "online_qk": online_qk},
            {"pass": "fake_quant", "rules": [{"scheme": "unused", "include": ["none"], "optional": True}],
             "kv_cache": {"dtype": "int8", "granularity": "per_channel", "symmetric": True}},
            {"pass": "calibrate"},
            {"pass": "lower"},
        ],
        "export": [{"format": "mindie"}],
    }


@torch.no_grad()
def layer_errors(program, ids: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per layer: relative error of the causal scores q·kᵀ, and of the keys, with the int8 cache against without."""
    seen: dict[str, list] = {}
    hooks = []
    for block in program.blocks:
        gm = block.graph_module
        for kernel in block_graph(gm).of_kind("attention"):
            hooks.append(gm.get_submodule(kernel.target).register_forward_pre_hook(
                lambda module, args, name=block.name: seen.setdefault(name, []).append((args[0].float(), args[1].float()))))
    quantizers = [m for block in program.blocks for m in block.graph_module.modules() if isinstance(m, KVCacheQuantize)]
    with program.executing_graphs():
        for mode in ("quantize", "off"):
            for quantizer in quantizers:
                quantizer.mode = mode
            program.model(input_ids=ids, use_cache=False)
    for quantizer in quantizers:
        quantizer.mode = "quantize"
    for hook in hooks:
        hook.remove()
    scores, keys = [], []
    causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    for (q, k), (q_float, k_float) in seen.values():
        repeat = q.shape[1] // k.shape[1]
        s = (q @ k.repeat_interleave(repeat, 1).transpose(-1, -2))[..., causal]
        s_float = (q_float @ k_float.repeat_interleave(repeat, 1).transpose(-1, -2))[..., causal]
        scores.append(float((s - s_float).norm() / s_float.norm()))
        keys.append(float((k - k_float).norm() / k_float.norm()))
    return scores, keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory or GGUF file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--samples", type=int, default=32, help="calibration samples of 512 tokens")
    parser.add_argument("--eval-samples", type=int, default=8, help="evaluation samples of 512 tokens")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    model_path = str(args.model or default_model_path())
    source = resolve_model_source(model_path)
    ids = token_samples(load_tokenizer(source), load_corpus("builtin:text-eval"), samples=args.eval_samples, seq_len=512,
                        recommended=None)
    result = {"float_ppl": perplexity(load_model(source, dtype=torch.float32), ids)}
    with tempfile.TemporaryDirectory() as tmp:
        for online_qk in (False, True):
            out = Path(tmp) / f"online_qk_{online_qk}"
            compiled = compile_model(config_from_data(config(online_qk, args.samples)), model_path=model_path,
                                     out_dir=out)
            scores, keys = layer_errors(compiled.program, ids[:4])
            result[f"online_qk={online_qk}"] = {
                "score_error_mean": statistics.mean(scores), "score_error_max": max(scores),
                "key_error_mean": statistics.mean(keys),
                "ppl": perplexity(load_ascend_model(out / "mindie"), ids),
                "score_error_per_layer": [round(e, 5) for e in scores],
            }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
