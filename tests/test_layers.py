"""The package's floor plan: the layer contract in pyproject.toml holds (checked by `lint-imports`), no module
imports another in a cycle, a violation of either is caught, and a pass written against the documented API
before the core moved into sub-packages still runs.

import-linter and grimp read a package from one directory; slimc is assembled from several by setuptools'
package-dir (compiler/ is `slimc`, passes/ is `slimc.passes`, ...), so the checks run on a view of symlinks
laid out as the installed package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

import torch
from programs import W8A8_DYNAMIC, run_pipeline
from tiny_models import tiny_causal_lm

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def package_view(where: Path) -> Path:
    """`where/slimc`: the installed package's layout, each directory a symlink into the repository."""
    package_dirs = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-dir"]
    view = where / "slimc"
    view.mkdir(parents=True)
    for entry in (ROOT / package_dirs["slimc"]).iterdir():
        if entry.name != "__pycache__":
            (view / entry.name).symlink_to(entry)
    for package, directory in package_dirs.items():
        if package != "slimc":
            (view / package.removeprefix("slimc.")).symlink_to(ROOT / directory)
    return where


def lint_imports(view: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--config", str(PYPROJECT), "--no-cache"], cwd=view,
                          env={**os.environ, "PYTHONPATH": str(view)}, capture_output=True, text=True, timeout=300)


CYCLES = """
import json, grimp, networkx
graph = grimp.build_graph("slimc", exclude_type_checking_imports=True, cache_dir=None)
imports = networkx.DiGraph()
for module in graph.modules:
    imports.add_edges_from((module, imported) for imported in graph.find_modules_directly_imported_by(module))
print(json.dumps(list(networkx.simple_cycles(imports))))
"""


def import_cycles(view: Path) -> list[list[str]]:
    """Cycles among the modules' runtime imports (imports under TYPE_CHECKING never run), read in a process whose
    `slimc` is the view's."""
    result = subprocess.run([sys.executable, "-c", CYCLES], cwd=view, env={**os.environ, "PYTHONPATH": str(view)},
                            capture_output=True, text=True, timeout=300, check=True)
    return json.loads(result.stdout)


def with_module(view: Path, package: str, name: str, source: str) -> None:
    """Add a module to one package of the view (the package becomes a copy, the repository is untouched)."""
    directory = view / "slimc" / package
    if directory.is_symlink():
        target = directory.resolve()
        directory.unlink()
        shutil.copytree(target, directory, ignore=shutil.ignore_patterns("__pycache__"))
    (directory / f"{name}.py").write_text(textwrap.dedent(source))


def test_the_layer_contract_holds(tmp_path):
    result = lint_imports(package_view(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_no_module_imports_itself_through_others(tmp_path):
    assert import_cycles(package_view(tmp_path)) == []


@pytest.mark.parametrize(("package", "source", "named"), [
    ("ir", "from slimc.frontends import llm\n", "slimc.ir.upward -> slimc.frontends.llm"),
    ("numerics", "import slimc.pipeline\n", "slimc.numerics.upward -> slimc.pipeline"),
    ("passes", "from slimc.backends import mindie\n", "slimc.passes.upward -> slimc.backends.mindie"),
    ("frontends", "from slimc.backends.base import Backend\n", "slimc.frontends.upward -> slimc.backends.base"),
    ("backends", "from slimc.commands import compile\n", "slimc.backends.upward -> slimc.commands.compile"),
])
def test_an_import_across_the_layers_breaks_the_contract(tmp_path, package, source, named):
    view = package_view(tmp_path)
    with_module(view, package, "upward", source)
    result = lint_imports(view)
    assert result.returncode != 0
    assert "1 broken" in result.stdout and named in result.stdout


def test_a_new_core_module_must_be_given_a_layer(tmp_path):
    view = package_view(tmp_path)
    (view / "slimc" / "unplaced.py").write_text("X = 1\n")
    result = lint_imports(view)
    assert result.returncode != 0 and "slimc.unplaced" in result.stdout


def test_a_cycle_is_found(tmp_path):
    view = package_view(tmp_path)
    with_module(view, "numerics", "ping", "from slimc.numerics import pong\n")
    with_module(view, "numerics", "pong", "from slimc.numerics import ping\n")
    assert ["slimc.numerics.ping", "slimc.numerics.pong"] in [sorted(cycle) for cycle in import_cycles(view)]


# The example of docs/passes.md as it read before the core moved into sub-packages, with the module paths the
# docs named then (slimc.patterns, slimc.fold, slimc.quant, slimc.pipeline.Context).
PASS_WRITTEN_BEFORE_THE_MOVE = '''
import torch

from slimc.fold import fold_norm
from slimc.ir import Block
from slimc.passes import Pass
from slimc.patterns import find_linears
from slimc.pipeline import Context
from slimc.quant import fake_quantize


class ClipWeightOutliers(Pass):
    """Clip each Linear's weights to `sigmas` standard deviations per output row."""

    sigmas: float = 6.0

    def run_block(self, block: Block, ctx: Context) -> None:
        assert callable(fold_norm) and callable(fake_quantize)
        for target in find_linears(block.graph_module):
            weight = block.leaf(target).weight
            limit = self.sigmas * weight.float().std(dim=1, keepdim=True)
            with torch.no_grad():
                weight.copy_(weight.float().clamp(-limit, limit).to(weight.dtype))
            ctx.report.note(f"clipped {block.qualified(target)}")
'''


def test_a_pass_written_against_the_api_before_the_move_still_runs(tmp_path, monkeypatch):
    (tmp_path / "oldpasses.py").write_text(PASS_WRITTEN_BEFORE_THE_MOVE)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("oldpasses", "slimc.quant", "slimc.fold"):  # imported afresh, so the old paths warn
        monkeypatch.delitem(sys.modules, name, raising=False)
    model = tiny_causal_lm("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 50.0
    pipeline = [
        {"pass": "oldpasses:ClipWeightOutliers", "sigmas": 5.0},
        {"pass": "fake_quant", "rules": [{"scheme": "w8a8_dynamic"}]},
        {"pass": "calibrate"},
        {"pass": "lower"},
    ]
    with pytest.warns(DeprecationWarning, match="slimc.quant moved to slimc.numerics.quant"):
        program, report = run_pipeline(model, pipeline, {"w8a8_dynamic": W8A8_DYNAMIC})
    assert "clipped model.layers.0.mlp.up_proj" in report.notes
    assert program.blocks[0].module.mlp.up_proj.dequantized_weight()[0, 0] < 40.0  # clipped from 50
