"""Benchmark: compile a model with shipped configs and measure time, peak memory, output size and
perplexity through the written Ascend files. Prints a table and one JSON object.

    .venv/bin/python bench/compile_llm.py                         # SmolLM2-135M, both W8A8 configs
    .venv/bin/python bench/compile_llm.py --model DIR --configs llm/w8a8_dynamic.yaml --samples 32
    .venv/bin/python bench/compile_llm.py --configs llm/w4a4_quarot_gptq.yaml --variants shipped rtn rotation-rtn
    .venv/bin/python bench/compile_llm.py --eval-corpus builtin:eval       # perplexity per domain and overall
    .venv/bin/python bench/compile_llm.py --calibration builtin:mix --eval-corpus builtin:eval

`--variants` compiles each config as shipped and/or with its rotation and weight algorithm changed:
`rtn` (no rotation, round to nearest), `rotation-rtn` (rotation, round to nearest), `gptq` (no
rotation, GPTQ) — the rows of the low-bit table in docs/lowbit.md; `autoround` and `rotation-autoround`
(AutoRound with its default settings, without or with rotation); `learned` and `learned-rtn` learn the
rotations (`rotate: {learn: ...}` from `--learn`, e.g. `--learn iterations=20 samples=8`; `heads=false` learns R1 only).

`--tune KEY=VALUE ...` adds a `tune:` section (e.g. `--tune max_ppl_increase=0.004 "fallback=[float]" step=4`):
the rounds are measured on `builtin:validation` unless `dataset=` says otherwise, and the written round is then
evaluated on `--eval-corpus` like any other row; the row adds the rounds, the fallen-back layers and their size cost.

`--set KEY=VALUE ...` overrides settings of every compiled config as `slimc compile --set` does (list items by
index: `pipeline.4.gptq.sequential=true` is the W4A4 config's calibrate step).

Each config is compiled in its own process so that peak memory is that config's own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from children import stop_children_on_sigterm

VARIANTS = {  # variant -> (the rotate step: dropped, kept, or kept and learned; weight algorithm, None keeps the config's)
    "shipped": ("keep", None),
    "rtn": ("drop", "rtn"),
    "rotation-rtn": ("keep", "rtn"),
    "gptq": ("drop", "gptq"),
    "learned": ("learn", None),
    "learned-rtn": ("learn", "rtn"),
    "autoround": ("drop", "autoround"),
    "rotation-autoround": ("keep", "autoround"),
}

CHILD = """
import json, sys, time, warnings
from pathlib import Path
from slimc.commands.cli import resolve_config_path
from slimc.commands.compile import compile_model, resolve_source
from slimc.commands.tune import tune_compile
from slimc.config import load_config
from slimc.commands.evaluate import evaluate_perplexity
from slimc.report import peak_memory_bytes

name, model, out, samples, eval_samples = sys.argv[1], sys.argv[2] or None, Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
eval_corpus, calibration, changes = sys.argv[6] or None, sys.argv[7], json.loads(sys.argv[8])
warnings.simplefilter("ignore")
config = load_config(resolve_config_path(name), [f"calibration.samples={samples}",
                                                *([f"calibration.dataset={calibration}"] if calibration else []),
                                                *(f"tune.{setting}" for setting in changes["tune"]), *changes["set"]])
start = time.perf_counter()
if config.tune is None:
    report, tuned = compile_model(config, model_path=model, out_dir=out).report, {}
else:
    report = tune_compile(config, model_path=model, out_dir=out).report
    tuned = {key: report.tune[key] for key in ("rounds", "fallen_back", "size_cost", "outcome")}
seconds = time.perf_counter() - start
peak = peak_memory_bytes()["host"]
ppl = evaluate_perplexity(resolve_source(config, model), out, corpus=eval_corpus or config.evaluation.dataset,
                          samples=eval_samples, seq_len=config.evaluation.seq_len)
domains = {domain: {"float_ppl": figures["float_ppl"], **ppl["quantized"]["mindie"]["domains"][domain]}
           for domain, figures in ppl.get("domains", {}).items()}
print(json.dumps({"config": name, "compile_seconds": seconds, "peak_memory_bytes": peak,
                  "output_bytes": report.outputs.get("mindie"), "eval_corpus": ppl["corpus"],
                  "float_ppl": ppl["float_ppl"], "quantized_ppl": ppl["quantized"]["mindie"]["quantized_ppl"],
                  "relative_change": ppl["quantized"]["mindie"]["relative_change"], "domains": domains, "tune": tuned}))
"""


def variant_config(name: str, variant: str, directory: Path, learn: dict) -> str:
    """The config `name` changed as `variant` says (`learn`: the rotate step's learn settings), written to
    `directory`; the name itself when shipped."""
    if variant == "shipped":
        return name
    from slimc.commands.cli import resolve_config_path

    rotation, algorithm = VARIANTS[variant]
    data = yaml.safe_load(Path(resolve_config_path(name)).read_text())
    data["pipeline"] = [step for step in data["pipeline"] if rotation != "drop" or step["pass"] != "rotate"]
    for step in data["pipeline"]:
        if step["pass"] == "rotate" and rotation == "learn":
            step["learn"] = learn
        if step["pass"] == "calibrate" and algorithm is not None:
            step["weight_algorithm"] = algorithm
            if algorithm != "gptq":
                step.pop("gptq", None)
    path = directory / f"{Path(name).stem}-{variant}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def main() -> None:
    stop_children_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="model dir or .gguf (default: SmolLM2-135M)")
    parser.add_argument("--configs", nargs="+", default=["llm/w8a8_dynamic.yaml", "llm/w8a8_static.yaml"])
    parser.add_argument("--samples", type=int, default=128, help="calibration windows of 512 tokens")
    parser.add_argument("--eval-samples", type=int, default=40)
    parser.add_argument("--eval-corpus", default="", help="evaluation data (default: the config's evaluation.dataset); "
                        "builtin:eval adds a perplexity table per domain")
    parser.add_argument("--calibration", default="", help="calibration data (default: the config's calibration.dataset)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["shipped"])
    parser.add_argument("--tune", nargs="*", default=[], metavar="KEY=VALUE",
                        help="add a tune: section with these settings (max_ppl_increase and fallback at least)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every compile, as slimc compile --set takes them "
                        "(e.g. pipeline.4.gptq.sequential=true)")
    parser.add_argument("--learn", nargs="*", default=[], metavar="KEY=VALUE",
                        help="the learned variants' rotate.learn settings (iterations, lr, samples, heads; defaults otherwise)")
    args = parser.parse_args()
    learn = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.learn)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            for variant in args.variants:
                out = Path(tmp) / f"out{len(rows)}"
                config = variant_config(name, variant, Path(tmp), learn)
                done = subprocess.run(
                    [sys.executable, "-c", CHILD, config, args.model, str(out), str(args.samples), str(args.eval_samples),
                     args.eval_corpus, args.calibration, json.dumps({"tune": args.tune, "set": args.set})],
                    check=True, capture_output=True, text=True,
                )
                rows.append({**json.loads(done.stdout.strip().splitlines()[-1]), "config": name, "variant": variant})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"{'config':28s} {'variant':13s} {'compile s':>9s} {'peak MiB':>9s} {'out MiB':>8s} {'float ppl':>10s} "
          f"{'quant ppl':>10s} {'× float':>8s}")
    for r in rows:
        print(f"{r['config']:28s} {r['variant']:13s} {r['compile_seconds']:9.1f} {r['peak_memory_bytes'] / 2**20:9.0f} "
              f"{r['output_bytes'] / 2**20:8.1f} {r['float_ppl']:10.4f} {r['quantized_ppl']:10.4f} {1 + r['relative_change']:8.3f}")
    print_domains(rows)
    for r in rows:
        if r["tune"]:
            print(f"\n{r['config']} tune: {r['tune']['outcome']}")
            for item in r["tune"]["fallen_back"]:
                print(f"  {item['layer']}: {item['from']} -> {item['to']} ({item['reason']})")
    print(json.dumps({"results": rows}))


def print_domains(rows: list[dict]) -> None:
    """Perplexity per evaluation domain (float / quantized, × float), for rows evaluated on a corpus of domains."""
    rows = [r for r in rows if r["domains"]]
    if not rows:
        return
    names = list(rows[0]["domains"])
    print(f"\nperplexity by domain of {rows[0]['eval_corpus']} (float / quantized, × float):")
    print(f"{'config':28s} {'variant':13s} " + " ".join(f"{name:>26s}" for name in [*names, "overall"]))
    for r in rows:
        cells = [*(r["domains"][name] for name in names), r]
        texts = [f"{c['float_ppl']:.3f} / {c['quantized_ppl']:.3f} ×{1 + c['relative_change']:.3f}" for c in cells]
        print(f"{r['config']:28s} {r['variant']:13s} " + " ".join(f"{text:>26s}" for text in texts))


if __name__ == "__main__":
    main()
