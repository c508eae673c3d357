"""Compatibility matrix: the smoke set (bench/compat_smoke.py) in fresh environments of the tested libraries'
oldest allowed versions, the lock, and the newest allowed versions; the result is docs/compatibility.md.

    .venv/bin/python bench/compat.py                          # oldest, lock, newest -> docs/compatibility.md
    .venv/bin/python bench/compat.py --envs oldest --only llama vllm onnx

Environments are virtual environments under runs/compat/ (kept between runs; --fresh rebuilds them):
- lock:   constraints.txt, as setup.sh and CI install it;
- oldest: each tested library (slimc.environment.TESTED_LIBRARIES) at the lower bound of its range in
          pyproject.toml; pip resolves the rest;
- newest: each at the newest release its range allows; pip resolves the rest.
torch comes from the registry like the rest (on this project's machines pip takes the CPU build of 2.13.0
from local disk; a newer torch is a CUDA build of several GB).
Prints each environment's rows as they run, then the matrix as a table and as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

from slimc.environment import TESTED_LIBRARIES, range_text

ROOT = Path(__file__).resolve().parent.parent

ENVIRONMENTS = ("oldest", "lock", "newest")
INTRO = """\
slimc reaches into the internals of torch (fx, the onnx exporter), transformers (modeling code, masks,
checkpoint conversion), diffusers, compressed-tensors and onnx/onnxscript/onnxruntime. pyproject.toml gives
each the range tested here: from the oldest version tested up to below the next minor that was not. What
happens outside a range:

- At start-up slimc prints one warning line naming every installed library outside its range, and runs on
  (a new model may need a newer transformers): `slimc: warning: untested library versions: transformers
  5.26.0 (tested >=5.23, <5.26); ...`.
- `slimc doctor` lists each library against its range, the accelerators torch sees (CUDA; NPUs through
  torch_npu when it is installed), free memory and disk, and exits 1 with the reasons when something is
  outside. With a config and a model (`slimc doctor llm/w8a8_dynamic.yaml --model DIR [--out DIR]`) it also
  names the model's family, counts the layers the config would quantize per scheme, and estimates the peak
  memory, output size and disk of the compile from the model's modules on the meta device (no weight is
  read); too little memory or disk for the estimate is a reason too. The peak-memory estimate is 2.1 times
  the model's size in memory plus 1.2 GiB, measured on bf16 Qwen2.5-7B-width checkpoints (the whole model
  is loaded today); it overestimates small models (SmolLM2-135M: 2.47 GiB estimated, 1.6 GiB measured;
  output 319 MiB estimated, 323 MiB written).
- `setup.sh` installs the lock, `constraints.txt`: every package at the version CI tests, so the README's
  commands give the same result next month. `SLIMC_UNLOCKED=1 ./setup.sh` installs the newest versions the
  ranges allow instead. To move the lock: make a fresh environment without it, `pip freeze
  --exclude-editable` into constraints.txt (keeping its header), then run this matrix and the tests.

Why the bounds are where they are (each found by running the smoke set on older releases):

| library | lower bound | what fails below it |
|---|---|---|
| torch | 2.13 | the only CPU build tested here (the newest, 2.14, is a CUDA build, tested in `newest`) |
| transformers | 5.23 | 5.22: fused MoE experts' checkpoint conversion is not a split by rows, so the exports cannot name expert tensors; 5.0: no `AttentionInterface.get_interface` |
| diffusers | 0.37 | 0.36: the Wan pipeline needs `ftfy` to clean prompts |
| compressed-tensors | 0.16 | 0.15: the compressors lack `compression_param_names` (0.12: `compress` takes `names_to_scheme`; 0.14 needs transformers < 5) |
| onnx | 1.17 | (the oldest release tested; passes) |
| onnxscript | 0.6 | 0.5: no exporter API for torch 2.11 and newer (`onnxscript._framework_apis.torch_2_11`), which torch 2.13 asks for |
| onnxruntime | 1.20.1 | (the oldest release tested; passes) |
"""
VENVS = ROOT / "runs" / "compat"
DOC = ROOT / "docs" / "compatibility.md"


def tested_requirements() -> dict[str, Requirement]:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    found = {Requirement(line).name: Requirement(line) for line in dependencies}
    return {name: found[name] for name in TESTED_LIBRARIES}


def released_versions(python: Path, name: str) -> list[Version]:
    """Every release of `name` on the package index, newest first."""
    out = subprocess.run([str(python), "-m", "pip", "index", "versions", name], capture_output=True, text=True, check=True)
    listed = next(line for line in out.stdout.splitlines() if line.startswith("Available versions:"))
    return [Version(v.strip()) for v in listed.split(":", 1)[1].split(",")]


def pins(environment: str, python: Path) -> list[str]:
    """The `-c` constraints of an environment, one `name==version` per tested library (none for the lock)."""
    if environment == "lock":
        return []
    chosen = []
    for name, requirement in tested_requirements().items():
        allowed = [v for v in released_versions(python, name) if v in requirement.specifier and not v.is_prerelease]
        chosen.append(f"{name}=={min(allowed) if environment == 'oldest' else max(allowed)}")
    return chosen


def build(environment: str, fresh: bool) -> Path:
    """The environment's python, creating and installing it unless it exists (and --fresh is not given)."""
    venv = VENVS / environment
    python = venv / "bin" / "python"
    if fresh and venv.exists():
        shutil.rmtree(venv)
    if python.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip", "setuptools", "wheel"], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text("\n".join(pins(environment, python)) + "\n")
    lock = ["-c", str(ROOT / "constraints.txt")] if environment == "lock" else []
    torch = next((line for line in constraints.read_text().split() if line.startswith("torch==")), "torch==2.13.0")
    subprocess.run([*pip, *lock, "-c", str(constraints), torch], check=True)  # first, so no other torch is pulled in
    subprocess.run([*pip, *lock, "-c", str(constraints), "-e", f"{ROOT}[test]"], check=True)
    return python


def run(environment: str, fresh: bool, only: list[str]) -> dict:
    python = build(environment, fresh)
    results = VENVS / f"{environment}.json"
    command = [str(python), str(ROOT / "bench" / "compat_smoke.py"), "--json", str(results)]
    print(f"== {environment}", flush=True)
    subprocess.run(command + (["--only", *only] if only else []), check=False, stderr=subprocess.DEVNULL)
    return json.loads(results.read_text())


def markdown(results: dict[str, dict]) -> str:
    names = list(results)
    lines = ["# Compatibility", "", INTRO, "",
             "## Matrix", "",
             "The smoke set (`bench/compat_smoke.py`: every family's tiny model through each of its shipped configs and "
             "the mindie export, which verifies itself by reading its files back; Llama through vllm and onnx) run in "
             "fresh environments by `.venv/bin/python bench/compat.py`. `oldest` pins every tested library to the lower "
             "bound of its range in pyproject.toml, `newest` to the newest release the range allows, `lock` installs "
             "constraints.txt (what `setup.sh` and CI install).", "",
             "| library | tested range | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for name, requirement in tested_requirements().items():
        lines.append(f"| {name} | {range_text(requirement.specifier)} | "
                     + " | ".join(results[env]["versions"].get(name, "?") for env in names) + " |")
    lines.append(f"| python | | {' | '.join(results[env]['versions']['python'] for env in names)} |")
    lines += ["", "| family | config | backend | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    rows: dict[tuple, dict[str, dict]] = {}
    for env in names:
        for row in results[env]["rows"]:
            rows.setdefault((row["family"], row["config"], row["backend"]), {})[env] = row
    failures = []
    for key, by_env in rows.items():
        cells = []
        for env in names:
            row = by_env.get(env)
            cells.append("—" if row is None else ("pass" if row["status"] == "pass" else "**fail**"))
            if row is not None and row["status"] != "pass":
                failures.append(f"- {env}, {' '.join(key)}: {row['error']}")
        lines.append(f"| {key[0]} | `{key[1]}` | {key[2]} | " + " | ".join(cells) + " |")
    lines += ["", "## Failures", "", *(failures or ["None."]), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", choices=ENVIRONMENTS, default=list(ENVIRONMENTS))
    parser.add_argument("--only", nargs="*", default=[], help="families or backends to run (default: the whole set)")
    parser.add_argument("--fresh", action="store_true", help="rebuild the environments")
    parser.add_argument("--no-doc", action="store_true", help=f"print only; do not write {DOC.relative_to(ROOT)}")
    args = parser.parse_args()
    results = {env: run(env, args.fresh, args.only) for env in args.envs}
    text = markdown(results)
    print(text)
    print(json.dumps(results))
    if not args.no_doc:
        DOC.write_text(text)


if __name__ == "__main__":
    main()
