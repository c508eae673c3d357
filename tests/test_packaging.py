"""The built wheel works on its own: installed into a fresh venv and run from outside the repository.

The fresh venv sees the development venv's site-packages through a .pth file (so torch and the
other dependencies are not installed again), but slimc itself comes only from the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
# Build from a copy of the working tree, so that no build/ or *.egg-info lands in the repository and no
# stale build/lib from an earlier build can leak into the wheel.
NOT_COPIED = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", "tests", "out", "runs"
)
SHIPPED_FILES = (
    "slimc/configs/llm/w8a8_dynamic.yaml",
    "slimc/passes/smooth.py",
    "slimc/frontends/llm.py",
    "slimc/backends/mindie.py",
)


def run(command: list, *, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command to completion and require exit status 0 (its output is in the failure message)."""
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert result.returncode == 0, f"{' '.join(map(str, command))} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`python -m build --wheel` of the working tree: the wheel and what the build printed."""
    work = tmp_path_factory.mktemp("wheel")
    shutil.copytree(REPO_ROOT, work / "source", ignore=NOT_COPIED)
    result = run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", work / "dist", work / "source"])
    (built,) = (work / "dist").glob("slimc-*.whl")
    return built, result.stdout + result.stderr


@pytest.fixture(scope="module")
def wheel(build: tuple[Path, str]) -> Path:
    return build[0]


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    """A new venv with the wheel installed and the development venv's packages visible (for torch etc.)."""
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site_packages = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    # A plain path line: the development venv's own .pth files (the editable slimc) are not processed.
    (site_packages / "dev_site_packages.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "--disable-pip-version-check", wheel])
    return venv


@pytest.fixture
def outside(tmp_path: Path) -> dict:
    """Keyword arguments for running in a directory outside the repository, with the repo not on PYTHONPATH."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return {"cwd": tmp_path, "env": {**env, "HF_HUB_OFFLINE": "1"}}


def test_the_wheel_contains_the_modules_and_the_shipped_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(SHIPPED_FILES) <= names
    shipped = {f"slimc/configs/{path.relative_to(REPO_ROOT / 'configs')}" for path in (REPO_ROOT / "configs").glob("*/*.yaml")}
    assert shipped and shipped <= names


def test_the_build_prints_no_packaging_warning(build):
    _, output = build
    assert "would be ignored" not in output and "absent from the `packages` configuration" not in output


def test_the_wheel_declares_the_slimc_console_script(wheel):
    with zipfile.ZipFile(wheel) as archive:
        (entry_points,) = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
        text = archive.read(entry_points).decode()
    console_scripts = text.split("[console_scripts]", 1)[1].split("\n[", 1)[0]
    assert "slimc = slimc.commands.cli:main" in console_scripts


def test_the_installed_console_script_shows_its_help(fresh_venv, outside):
    result = run([fresh_venv / "bin" / "slimc", "--help"], **outside)
    assert "compile" in result.stdout


def test_the_installed_package_is_imported_from_the_fresh_venv_not_the_repository(fresh_venv, outside):
    result = run([fresh_venv / "bin" / "python", "-c", "import slimc; print(slimc.__file__)"], **outside)
    location = Path(result.stdout.strip()).resolve()
    assert location.is_relative_to(fresh_venv.resolve())
    assert not location.is_relative_to(REPO_ROOT)


def test_the_installed_slimc_lists_the_shipped_configs(fresh_venv, outside):
    result = run([fresh_venv / "bin" / "slimc", "configs"], **outside)
    assert "llm/w8a8_dynamic.yaml" in result.stdout
    assert "llm/w8a8_static.yaml" in result.stdout


def test_the_installed_slimc_compiles_the_tiny_model_with_a_shipped_config(fresh_venv, outside, tiny_llama_dir, tmp_path):
    run(
        [
            fresh_venv / "bin" / "slimc", "compile", "llm/w8a8_dynamic.yaml", "--model", tiny_llama_dir,
            "--out", tmp_path / "out", "--set", "calibration.samples=2", "--set", "calibration.seq_len=32",
            "--set", "calibration.batch_size=2",
        ],
        **outside,
    )
    assert (tmp_path / "out" / "mindie" / "quant_model_weights.safetensors").exists()
    assert (tmp_path / "out" / "slimc_report.json").exists()
