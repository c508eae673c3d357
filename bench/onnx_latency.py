"""Benchmark: onnxruntime CPU latency and throughput of a prefill, int8 ONNX export against the float one.
Prints a table and one JSON object.

    nice .venv/bin/python bench/onnx_latency.py                      # SmolLM2-135M, 1 x 512 tokens
    .venv/bin/python bench/onnx_latency.py --model DIR --batch 4 --seq-len 256 --threads 8

The float graph is the model exported as it loads (through the same `onnx` backend, with no quantized
layers); the int8 graph is the model compiled with the shipped W8A8_DYNAMIC config (int8 per-channel
weights, int8 per-token dynamic activations: MatMulInteger) through a quick pipeline: smoothing at a fixed
alpha 0.5 instead of the searched grid, and `--samples` (4) calibration windows (dynamic activations need no
calibration; the scales of the weights do not depend on it). Latency is the median of `--runs` runs after
`--warmup` runs, in one onnxruntime session per graph with all graph optimizations. Each pair is measured
twice: with every position's logits (the model's forward) and with the last position's only (`logits: last`,
what generation reads after a prefill), since the float head over every position is a large part of the time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from slimc.backends.onnx import OnnxBackend
from slimc.commands.cli import resolve_config_path
from slimc.commands.compile import compile_model, resolve_source
from slimc.config import config_from_data, load_config
from slimc.frontends import frontend_for
from slimc.ir import Program

QUICK_PIPELINE = ["pipeline.0.search=false", "pipeline.0.alpha=0.5", "export=[{format: onnx}]"]


def float_program(model: str) -> Program:
    """The model as loaded, as a Program with no quantized layers."""
    source = resolve_source(config_from_data({}), model or None)
    frontend = frontend_for(source)
    return frontend.build(source, frontend.load(source, dtype=torch.float32))


def int8_program(model: str, out_dir: Path, samples: int) -> Program:
    """The model compiled W8A8_DYNAMIC (written and verified as onnx into `out_dir`)."""
    config = load_config(resolve_config_path("llm/w8a8_dynamic.yaml"), [f"calibration.samples={samples}", *QUICK_PIPELINE])
    return compile_model(config, model_path=model or None, out_dir=out_dir).program


def export(program: Program, out_dir: Path, logits: str) -> float:
    """Write the program's onnx graph to `out_dir`; returns the seconds it took."""
    out_dir.mkdir(parents=True)
    start = time.perf_counter()
    OnnxBackend(logits=logits).export(program, out_dir)
    return time.perf_counter() - start


def measure(model_dir: Path, input_ids: np.ndarray, threads: int, warmup: int, runs: int) -> dict:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    start = time.perf_counter()
    session = onnxruntime.InferenceSession(str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    load_seconds = time.perf_counter() - start
    for _ in range(warmup):
        session.run(["logits"], {"input_ids": input_ids})
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(["logits"], {"input_ids": input_ids})
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    size = sum(p.stat().st_size for p in model_dir.iterdir() if p.name.startswith("model.onnx"))
    return {"median_ms": median * 1e3, "min_ms": min(seconds) * 1e3, "tokens_per_s": input_ids.size / median,
            "session_load_s": load_seconds, "onnx_bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="model dir or .gguf (default: SmolLM2-135M)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--samples", type=int, default=4, help="calibration windows of 512 tokens")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        programs = {"float32": float_program(args.model)}
        vocab = programs["float32"].model.config.vocab_size
        start = time.perf_counter()
        programs["int8 W8A8_DYNAMIC"] = int8_program(args.model, Path(tmp) / "compiled", args.samples)
        compile_seconds = time.perf_counter() - start
        input_ids = np.random.default_rng(0).integers(0, vocab, (args.batch, args.seq_len), dtype=np.int64)
        for logits in ("all", "last"):
            for graph, program in programs.items():
                out_dir = Path(tmp) / f"{graph.split()[0]}-{logits}"
                seconds = export(program, out_dir, logits)
                rows.append({"graph": graph, "logits": logits, "export_s": seconds,
                             **measure(out_dir, input_ids, args.threads, args.warmup, args.runs)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    speedups = {logits: next(r["median_ms"] for r in rows if r["logits"] == logits and r["graph"] == "float32")
                / next(r["median_ms"] for r in rows if r["logits"] == logits and r["graph"] != "float32")
                for logits in ("all", "last")}
    print(f"prefill of {args.batch} x {args.seq_len} tokens, onnxruntime CPU, {args.threads} threads, median of {args.runs} runs")
    print(f"{'graph':18s} {'logits':>6s} {'median ms':>10s} {'min ms':>8s} {'tokens/s':>9s} {'onnx MiB':>9s} {'export s':>9s}")
    for r in rows:
        print(f"{r['graph']:18s} {r['logits']:>6s} {r['median_ms']:10.1f} {r['min_ms']:8.1f} {r['tokens_per_s']:9.0f} "
              f"{r['onnx_bytes'] / 2**20:9.1f} {r['export_s']:9.1f}")
    print(f"int8 speedup: {speedups['all']:.2f}x (all positions' logits), {speedups['last']:.2f}x (last position's); "
          f"compile {compile_seconds:.0f} s")
    print(json.dumps({"batch": args.batch, "seq_len": args.seq_len, "threads": args.threads, "runs": args.runs,
                      "compile_s": compile_seconds, "results": rows, "speedup": speedups}))


if __name__ == "__main__":
    main()
