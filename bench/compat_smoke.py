"""Compatibility smoke set: every family's tiny model through its shipped configs and the mindie export
(the export verifies itself by reading the files back), and Llama through vllm and onnx.

Run inside one environment; `bench/compat.py` runs it in several and writes docs/compatibility.md.

    .venv/bin/python bench/compat_smoke.py --json results.json [--only llama qwen3_vl onnx]

Each row is compiled in this process, one after another; a failing row records its error and the
next one runs. Prints one line per row and writes the rows, with the library versions, as JSON.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

LIBRARIES = ("torch", "transformers", "diffusers", "compressed-tensors", "onnx", "onnxscript", "onnxruntime")
LLM_FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe", "glm4_moe")
LLM_CONFIGS = ("llm/w8a8_dynamic.yaml", "llm/w8a8_static.yaml", "llm/w4a4_quarot_gptq.yaml",
               "llm/w4a8_quarot_gptq.yaml", "llm/w4a16_gptq.yaml")
# Calibration shrunk to the tiny models (as the test suite does); one smoothing alpha instead of the grid.
LLM_SETTINGS = ["calibration.samples=4", "calibration.seq_len=32", "calibration.batch_size=2"]
VL_SETTINGS = ["calibration.samples=4", "calibration.batch_size=2", "calibration.image_size=56", "calibration.seq_len=64"]
OMNI_SETTINGS = ["calibration.samples=2", "calibration.batch_size=2", "calibration.seq_len=256",
                 "calibration.audio_seconds=1"]
OMNI_IMAGE_SIZE = {"qwen2_5_omni": 112, "qwen3_omni_moe": 128}
DIFFUSION_SETTINGS = ["calibration.samples=1", "calibration.diffusion.steps=2", "calibration.diffusion.max_sequence_length=16"]
DIFFUSION_SIZES = {"flux": ["calibration.diffusion.height=16", "calibration.diffusion.width=16"],
                   "hunyuan_video": ["calibration.diffusion.height=32", "calibration.diffusion.width=32",
                                     "calibration.diffusion.frames=5"],
                   "wan": ["calibration.diffusion.height=32", "calibration.diffusion.width=32", "calibration.diffusion.frames=5"]}
DIFFUSION_CONFIGS = {"flux": "flux", "hunyuan_video": "hunyuan_video", "wan": "wan2_2"}


@dataclass
class Row:
    family: str
    config: str
    backend: str
    status: str = "not run"
    seconds: float = 0.0
    error: str = ""


@dataclass
class Case:
    row: Row
    save_model: Callable[[Path], Path]
    settings: list[str]


def _llm(family: str) -> Callable[[Path], Path]:
    def save(directory: Path) -> Path:
        from conftest import save_tiny_model

        return save_tiny_model(directory, family)
    return save


def _multimodal(kind: str) -> Callable[[Path], Path]:
    def save(directory: Path) -> Path:
        from tiny_multimodal import save_tiny_multimodal

        return save_tiny_multimodal(kind, directory)
    return save


def _omni(kind: str) -> Callable[[Path], Path]:
    def save(directory: Path) -> Path:
        from tiny_omni import save_tiny_full_omni

        return save_tiny_full_omni(kind, directory)
    return save


def _pipeline(kind: str) -> Callable[[Path], Path]:
    def save(directory: Path) -> Path:
        from tiny_diffusion import save_tiny_pipeline

        return save_tiny_pipeline(kind, directory, two_experts=kind == "wan", weight_std=0.3)
    return save


def _export(backend: str) -> str:
    return f"export=[{{format: {backend}}}]"


def cases() -> list[Case]:
    found = []
    for family in LLM_FAMILIES:
        for config in LLM_CONFIGS:
            groups = ["schemes.w4a16.weight.group_size=16"] if "w4a16" in config else []  # tiny experts are 32 wide
            found.append(Case(Row(family, config, "mindie"), _llm(family), LLM_SETTINGS + groups))
    found.append(Case(Row("glm4_moe", "glm4_moe/w8a8.yaml", "mindie"), _llm("glm4_moe"), LLM_SETTINGS))
    for backend in ("vllm", "onnx"):
        found.append(Case(Row("llama", "llm/w8a8_dynamic.yaml", backend), _llm("llama"), LLM_SETTINGS + [_export(backend)]))
    for kind in ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v_moe"):
        found.append(Case(Row(kind, f"{kind}/w8a8.yaml", "mindie"), _multimodal(kind), VL_SETTINGS))
    for kind in ("qwen2_5_omni", "qwen3_omni_moe"):
        settings = OMNI_SETTINGS + [f"calibration.image_size={OMNI_IMAGE_SIZE[kind]}"]
        found.append(Case(Row(kind, f"{kind}/w8a8.yaml", "mindie"), _omni(kind), settings))
    for kind, folder in DIFFUSION_CONFIGS.items():
        for scheme in ("w8a8", "w4a4"):
            settings = DIFFUSION_SETTINGS + DIFFUSION_SIZES[kind] + ["pipeline.0.search_grid=[0.5]"]
            found.append(Case(Row(kind, f"{folder}/{scheme}.yaml", "mindie"), _pipeline(kind), settings))
    return found


def run(case: Case, root: Path) -> Row:
    from slimc.commands.cli import resolve_config_path
    from slimc.commands.compile import compile_model
    from slimc.config import load_config

    row = case.row
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model_dir = case.save_model(root / "model")
            config = load_config(resolve_config_path(row.config), case.settings)
            compile_model(config, model_path=str(model_dir), out_dir=root / "out")
        if not (root / "out" / row.backend).is_dir():
            raise RuntimeError(f"no {row.backend} output was written")
        row.status = "pass"
    except Exception as error:  # a row's failure is its result; the next row runs
        row.status = "fail"
        row.error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
        traceback.print_exc()
    row.seconds = round(time.perf_counter() - start, 1)
    return row


def versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="where to write the rows and versions")
    parser.add_argument("--only", nargs="*", help="families or backends to run (default: all)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # tiny matmuls; more threads only contend
    rows = []
    for case in cases():
        if args.only and not {case.row.family, case.row.backend} & set(args.only):
            continue
        with tempfile.TemporaryDirectory() as root:
            row = run(case, Path(root))
        rows.append(row)
        print(f"{row.status:5s} {row.seconds:6.1f}s  {row.family:15s} {row.config:28s} {row.backend:7s} {row.error}", flush=True)
        args.json.write_text(json.dumps({"versions": versions(), "rows": [asdict(r) for r in rows]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
