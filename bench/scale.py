"""Benchmark: peak memory, time and output size of compiling large-model shapes, on synthetic checkpoints.
Prints a table and one JSON object.

    .venv/bin/python bench/scale.py --quick                              # tiny widths, checks the script in minutes
    .venv/bin/python bench/scale.py                                      # Qwen2.5-7B widths (2, 8 layers), Qwen3-MoE
    .venv/bin/python bench/scale.py --configs llm/w8a8_dynamic.yaml llm/w4a4_quarot_gptq.yaml --layers 2 4 8

The checkpoints have real widths but few layers and random bf16 weights (normal, std 0.02; norms ones), in
safetensors shards of `--shard-gb` with an index, a config.json and the SmolLM2 tokenizer (vocab 49152):
`qwen2-7b` is Qwen2.5-7B's layer (hidden 3584, intermediate 18944, 28 heads, 4 KV heads, untied head) at each
of `--layers`; `qwen3-moe-128` is Qwen3-30B-A3B's (128 experts, 8 active, hidden 2048, expert intermediate
768) at 2 layers. They are written tensor by tensor from the model's skeleton on the meta device, in the
checkpoint layout of the hub (transformers' own conversion reverted: one tensor per expert), so the whole
model is never in memory; they are kept under `--work` and reused.

Each config compiles each checkpoint in its own `slimc compile` process on `--samples` x `--seq-len`
calibration tokens; peak memory is that process's peak RSS, and the peaks of its anonymous and file-backed
resident memory, sampled (the file-backed pages, mappings of the checkpoint and spill files, are the kernel's to
drop when memory is short). Time per block is the passes' time in the
compile's report (capture, trace and passes) over the layers; "other" is the rest of the wall time (process
start, calibration data, export and its check). The per-layer growth of peak memory and time
between the fewest and most `qwen2-7b` layers gives a linear extrapolation to full models: per parameter of
a layer, so a Qwen2.5-72B, Qwen3-235B or GLM-4.7 layer counts by its size against a 7B-width one. It is an
extrapolation, not a measurement: it assumes memory grows with depth as measured, and its base holds the
working set of one 7B-width block, where a larger model's block needs more.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from children import stop_children_on_sigterm
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.core_model_loading import revert_weight_conversion

VOCAB = 49152  # SmolLM2's tokenizer, the one the checkpoints carry
SEED = 0
INIT_STD = 0.02


@dataclass(frozen=True)
class Shape:
    model_type: str
    widths: dict
    quick_widths: dict


SHAPES = {
    "qwen2-7b": Shape("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                                    num_key_value_heads=4),
                      dict(hidden_size=256, intermediate_size=1344, num_attention_heads=4, num_key_value_heads=2)),
    "qwen3-moe-128": Shape("qwen3_moe", dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                             num_experts=128, num_experts_per_tok=8, num_attention_heads=32,
                                             num_key_value_heads=4, head_dim=128),
                           dict(hidden_size=256, intermediate_size=768, moe_intermediate_size=64, num_experts=128,
                                num_experts_per_tok=8, num_attention_heads=4, num_key_value_heads=2, head_dim=64)),
}
DENSE = "qwen2-7b"  # the shape whose layer counts give the per-layer growth
MOE_LAYERS = 2

# Full models the growth extrapolates to: (model type, layers, widths) as their released config.json gives them.
TARGETS = {
    "Qwen2.5-7B": ("qwen2", 28, SHAPES[DENSE].widths),
    "Qwen2.5-72B": ("qwen2", 80, dict(hidden_size=8192, intermediate_size=29568, num_attention_heads=64,
                                      num_key_value_heads=8)),
    "Qwen3-235B-A22B": ("qwen3_moe", 94, dict(hidden_size=4096, moe_intermediate_size=1536, num_experts=128,
                                              num_experts_per_tok=8, num_attention_heads=64, num_key_value_heads=4,
                                              head_dim=128)),
    "GLM-4.7": ("glm4_moe", 92, dict(hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
                                     n_routed_experts=160, n_shared_experts=1, num_experts_per_tok=8,
                                     num_attention_heads=96, num_key_value_heads=8, head_dim=128,
                                     first_k_dense_replace=3)),
}


def model_config(model_type: str, layers: int, widths: dict) -> PretrainedConfig:
    return AutoConfig.for_model(model_type, num_hidden_layers=layers, vocab_size=VOCAB, tie_word_embeddings=False,
                                dtype="bfloat16", **widths)


def skeleton(config: PretrainedConfig) -> torch.nn.Module:
    """The model with every tensor on the meta device: names and shapes, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def layer_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for layer in model.model.layers for p in layer.parameters())


def checkpoint_units(model: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    """The checkpoint's tensors (meta), by decoder layer or top-level module, named and shaped as on the hub."""
    units: dict[str, dict[str, torch.Tensor]] = {}
    for name, parameter in model.named_parameters():
        in_layer = name.startswith("model.layers.")
        units.setdefault(".".join(name.split(".")[:3]) if in_layer else name, {})[name] = parameter
    return [revert_weight_conversion(model, unit) for unit in units.values()]


def random_tensor(name: str, shape: torch.Size) -> torch.Tensor:
    """Seeded by name, so that a tensor is the same whichever shard it lands in."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(SEED ^ zlib.crc32(name.encode()))
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, INIT_STD, generator=generator)


def write_checkpoint(directory: Path, config: PretrainedConfig, shard_bytes: int, tokenizer) -> None:
    """A sharded bf16 checkpoint of random weights, one shard in memory at a time; written beside
    `directory` and renamed into place when complete."""
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model = skeleton(config)
    config.architectures = [type(model).__name__]
    shards: list[dict[str, torch.Tensor]] = [{}]
    for name, tensor in (item for unit in checkpoint_units(model) for item in unit.items()):
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and sum(t.numel() * t.element_size() for t in shards[-1].values()) + size > shard_bytes:
            shards.append({})
        shards[-1][name] = tensor
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: random_tensor(name, t.shape) for name, t in shard.items()}, staging / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
    (staging / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(directory)


@functools.cache
def smollm2_tokenizer():
    from slimc.ir.source import default_model_path, load_tokenizer, resolve_model_source

    return load_tokenizer(resolve_model_source(default_model_path()))


def resident(pid: int) -> tuple[int, int]:
    """A process's resident anonymous and file-backed bytes now (Linux; (0, 0) once it has exited)."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile"):
                    found[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return found.get("RssAnon", 0), found.get("RssFile", 0)


class ResidentPeaks(threading.Thread):
    """Samples a child's anonymous and file-backed resident memory every `interval` seconds and keeps each
    peak, and the machine's load average. The file-backed pages (the checkpoint's and spill files' mappings) are
    the kernel's to drop when memory is short; the anonymous ones are what a compile needs."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.anon = self.file = 0
        self.load_sum, self.samples = 0.0, 0  # the machine's 1-minute load average, summed over the samples
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            anon, file = resident(self.pid)
            self.anon, self.file = max(self.anon, anon), max(self.file, file)
            self.load_sum, self.samples = self.load_sum + os.getloadavg()[0], self.samples + 1

    @property
    def load_average(self) -> float:
        return self.load_sum / max(self.samples, 1)


def compile_checkpoint(config_name: str, model: Path, out: Path, log: Path, samples: int, seq_len: int) -> dict:
    """Compile in a child process; its own peak RSS comes from wait4 (RUSAGE_CHILDREN would be the
    largest of every child so far), its anonymous and file-backed peaks from sampling."""
    command = [sys.executable, "-m", "slimc.commands.cli", "compile", config_name, "--model", str(model),
               "--out", str(out), "--overwrite", "--set", f"calibration.samples={samples}",
               "--set", f"calibration.seq_len={seq_len}"]
    start = time.perf_counter()
    with log.open("w") as stream:
        child = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT)
        peaks = ResidentPeaks(child.pid)
        peaks.start()
        try:
            _, status, usage = os.wait4(child.pid, 0)
        except BaseException:  # SIGTERM or Ctrl-C: the compile stops with the script
            child.kill()
            child.wait()
            raise
        finally:
            peaks.done.set()
            peaks.join()
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise SystemExit(f"{' '.join(command)} exited with {child.returncode} (log {log}):\n{tail}")
    peak = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    report = json.loads((out / "slimc_report.json").read_text())
    seconds, cpu_seconds = report["seconds"], report["cpu_seconds"]
    passes = sum(v for step, v in seconds.items() if step not in ("total", "load", "export"))
    passes_cpu = sum(v for step, v in cpu_seconds.items() if step not in ("total", "load", "export"))
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "load_average": peaks.load_average,
            "peak_rss_bytes": peak, "peak_anon_bytes": peaks.anon, "peak_file_bytes": peaks.file,
            "load_s": seconds["load"], "passes_s": passes, "passes_cpu_s": passes_cpu,
            "other_s": wall - seconds["load"] - passes,
            "output_bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file())}


def growth(rows: list[dict], config_name: str) -> dict | None:
    """Peak memory and time added per `qwen2-7b` layer, between its fewest and most layers."""
    dense = sorted((r for r in rows if r["shape"] == DENSE and r["config"] == config_name), key=lambda r: r["layers"])
    if len(dense) < 2 or dense[0]["layers"] == dense[-1]["layers"]:
        return None
    low, high = dense[0], dense[-1]
    added = high["layers"] - low["layers"]
    per_layer_s = (high["passes_s"] - low["passes_s"]) / added
    found = {"config": config_name, "from_layers": low["layers"], "to_layers": high["layers"],
             "seconds_per_layer": per_layer_s, "layer_parameters": low["layer_parameters"] / low["layers"],
             "base_seconds": low["passes_s"] - low["layers"] * per_layer_s}
    for peak in ("peak_rss_bytes", "peak_anon_bytes"):
        per_layer_bytes = (high[peak] - low[peak]) / added
        found[f"{peak}_per_layer"] = per_layer_bytes
        found[f"base_{peak}"] = low[peak] - low["layers"] * per_layer_bytes
        found[f"{peak}_added"] = high[peak] / low[peak] - 1
    return found


def extrapolate(measured: dict) -> list[dict]:
    """Linear in the parameters of a model's layers; the base (embeddings and head at vocab 49152, libraries,
    calibration data, and the working set of the one 7B-width block being compiled) stays the measured one."""
    rows = []
    for target, (model_type, layers, widths) in TARGETS.items():
        parameters = layer_parameters(skeleton(model_config(model_type, layers, widths)))
        layers_measured = parameters / measured["layer_parameters"]
        rows.append({"config": measured["config"], "model": target, "layers": layers, "layer_parameters": parameters,
                     **{peak: measured[f"base_{peak}"] + layers_measured * measured[f"{peak}_per_layer"]
                        for peak in ("peak_rss_bytes", "peak_anon_bytes")},
                     "passes_s": measured["base_seconds"] + layers_measured * measured["seconds_per_layer"]})
    return rows


def main() -> None:
    stop_children_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["llm/w8a8_dynamic.yaml"])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    parser.add_argument("--layers", nargs="+", type=int, default=[2, 8], help=f"layer counts of {DENSE}")
    parser.add_argument("--samples", type=int, default=4, help="calibration samples")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sample")
    parser.add_argument("--shard-gb", type=float, default=1.0, help="checkpoint shard size (GB)")
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / ".scale",
                        help="where checkpoints are kept (and reused), outputs and logs written")
    parser.add_argument("--quick", action="store_true", help="tiny widths (hidden 256) of the same shapes")
    args = parser.parse_args()
    runs = [(shape, layers) for shape in args.shapes for layers in (args.layers if shape == DENSE else [MOE_LAYERS])]
    rows = []
    for shape, layers in runs:
        name = f"{shape}-{layers}l" + ("-quick" if args.quick else "")
        config = model_config(SHAPES[shape].model_type, layers,
                              SHAPES[shape].quick_widths if args.quick else SHAPES[shape].widths)
        checkpoint = args.work / "checkpoints" / name
        if not (checkpoint / "model.safetensors.index.json").exists():
            print(f"writing {checkpoint}", file=sys.stderr, flush=True)
            write_checkpoint(checkpoint, config, int(args.shard_gb * 1e9), smollm2_tokenizer())
        checkpoint_bytes = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
        for config_name in args.configs:
            out = args.work / "out" / f"{name}-{Path(config_name).stem}"
            out.parent.mkdir(parents=True, exist_ok=True)
            print(f"compiling {name} with {config_name}", file=sys.stderr, flush=True)
            measured = compile_checkpoint(config_name, checkpoint, out, out.with_suffix(".log"), args.samples, args.seq_len)
            rows.append({"shape": shape, "layers": layers, "config": config_name, "checkpoint_bytes": checkpoint_bytes,
                         "layer_parameters": layer_parameters(skeleton(config)), **measured,
                         "block_s": measured["passes_s"] / layers, "block_cpu_s": measured["passes_cpu_s"] / layers})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    growths = [g for g in (growth(rows, name) for name in args.configs) if g is not None]
    extrapolations = [row for g in growths for row in extrapolate(g)]

    widths = "quick widths (hidden 256), not the real ones" if args.quick else "real widths"
    print(f"synthetic bf16 checkpoints, {widths}; {args.samples} x {args.seq_len} calibration tokens; one process per compile")
    print(f"{'shape':14s} {'layers':>6s} {'config':28s} {'ckpt GB':>8s} {'peak GiB':>9s} {'anon GiB':>9s} "
          f"{'file GiB':>9s} {'wall s':>8s} {'CPU s':>8s} {'load s':>7s} {'s/block':>8s} {'CPU s/block':>11s} {'other s':>8s} "
          f"{'out GB':>7s} {'loadavg':>8s}")
    for r in rows:
        print(f"{r['shape']:14s} {r['layers']:6d} {r['config']:28s} {r['checkpoint_bytes'] / 1e9:8.2f} "
              f"{r['peak_rss_bytes'] / 2**30:9.2f} {r['peak_anon_bytes'] / 2**30:9.2f} "
              f"{r['peak_file_bytes'] / 2**30:9.2f} {r['wall_s']:8.1f} {r['cpu_s']:8.1f} {r['load_s']:7.1f} {r['block_s']:8.1f} "
              f"{r['block_cpu_s']:11.1f} {r['other_s']:8.1f} {r['output_bytes'] / 1e9:7.2f} {r['load_average']:8.1f}")
    for g in growths:
        print(f"{g['config']}: each {DENSE} layer adds {g['peak_rss_bytes_per_layer'] / 2**30:.3f} GiB of peak RSS "
              f"({g['peak_anon_bytes_per_layer'] / 2**30:.3f} GiB anonymous) and {g['seconds_per_layer']:.1f} s; "
              f"{g['to_layers']} layers peak {100 * g['peak_rss_bytes_added']:+.1f}% RSS "
              f"({100 * g['peak_anon_bytes_added']:+.1f}% anonymous) against {g['from_layers']}")
    print("peak: the process's peak RSS (wait4); anon, file: the peaks of its anonymous and file-backed resident "
          "memory, sampled every 50 ms (file-backed pages are the kernel's to drop under memory pressure)")
    print("s/block: capture, trace and passes in slimc_report.json over the layers, wall and the process's CPU "
          "seconds (all its threads); other s: the rest of the wall time (start, calibration data, export and its "
          "check); CPU s: the whole process's; loadavg: the machine's 1-minute load average, averaged over the "
          "compile (other jobs on the cores stretch the wall times, much less the CPU seconds)")
    if extrapolations:
        print("EXTRAPOLATION, not measured: linear in the layers' parameters from the growth above; embeddings and "
              "head at vocab 49152, and the base holds one 7B-width block's working set (a larger block needs more)"
              + ("; from quick widths, so it only checks the script" if args.quick else ""))
        print(f"{'config':28s} {'model':16s} {'layers':>6s} {'layer params':>13s} {'peak GiB':>9s} {'anon GiB':>9s} "
              f"{'passes h':>9s}")
        for e in extrapolations:
            print(f"{e['config']:28s} {e['model']:16s} {e['layers']:6d} {e['layer_parameters'] / 1e9:12.1f}B "
                  f"{e['peak_rss_bytes'] / 2**30:9.1f} {e['peak_anon_bytes'] / 2**30:9.1f} {e['passes_s'] / 3600:9.2f}")
    print(json.dumps({"quick": args.quick, "samples": args.samples, "seq_len": args.seq_len, "results": rows,
                      "per_layer_growth": growths, "extrapolation": extrapolations}))


if __name__ == "__main__":
    main()
