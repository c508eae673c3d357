"""Calibration activations beyond `memory.activations_gb`: batches wait on disk in an ActivationStore and come back
bit for bit (dtype, strides, shared tensors), only the budget's worth is held in memory, and a compile that spills
writes the files of one that does not, also when it is killed and resumed."""

from __future__ import annotations

import gc
import os
import signal
from pathlib import Path

import pytest
import torch
from cli_runs import assert_user_error, slimc
from test_resume import committed, compile_args, interrupting_config, killed_compile
from test_streaming import same_files, save_llm

import slimc.ir.activations as activations
from slimc.commands.cli import resolve_config_path
from slimc.commands.compile import compile_model
from slimc.config import load_config
from slimc.ir.activations import ActivationStore, batch_bytes
from slimc.journal import journal_directory

# 8 batches of one 32-token sample: each batch's block inputs in the tiny Llama hold 6400 bytes in bfloat16, so a
# 1e-5 GB (10.7 kB) budget keeps one batch in memory and spills the other seven
CALIBRATION = ["calibration.samples=8", "calibration.seq_len=32", "calibration.batch_size=1"]
BUDGET = "memory.activations_gb=1e-5"
COMPILES = {
    "llama-w8a8-static": ("llama", "llm/w8a8_static.yaml"),
    "qwen3_moe-w4a4-quarot-gptq": ("qwen3_moe", "llm/w4a4_quarot_gptq.yaml"),
}


def batch(dtype: torch.dtype, seed: int = 0) -> tuple[tuple, dict]:
    """A block call as decoder layers get it: hidden states, position embeddings that two leaves share, an expanded
    mask (stride 0), a transposed tensor, and leaves that are not tensors."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 16, 32, generator=generator).to(dtype)
    cos = torch.randn(2, 16, 8, generator=generator).to(dtype)
    mask = torch.zeros(1, 1, 16, 16, dtype=dtype).expand(2, 1, 16, 16)
    return (hidden,), {"position_embeddings": (cos, cos), "attention_mask": mask, "extra": hidden.transpose(1, 2),
                       "use_cache": False, "cache_position": None}


def assert_same_batch(got, expected) -> None:
    got_leaves, got_spec = torch.utils._pytree.tree_flatten(got)
    expected_leaves, expected_spec = torch.utils._pytree.tree_flatten(expected)
    assert got_spec == expected_spec
    for a, b in zip(got_leaves, expected_leaves, strict=True):
        if isinstance(b, torch.Tensor):
            assert (a.dtype, a.shape, a.stride(), a.device) == (b.dtype, b.shape, b.stride(), b.device)
            assert torch.equal(a, b)
        else:
            assert a == b


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_spilled_batch_comes_back_bit_for_bit_with_its_dtype_strides_and_shared_tensors(dtype, tmp_path):
    store = ActivationStore(budget_bytes=0, directory=tmp_path)
    store.append(batch(dtype))
    assert store.spilled == 1 and store.resident_bytes == 0 and len(list(tmp_path.iterdir())) == 1
    args, kwargs = store[0]
    assert_same_batch((args, kwargs), batch(dtype))
    assert kwargs["position_embeddings"][0] is kwargs["position_embeddings"][1]


def test_only_the_budgets_worth_of_batches_stays_in_memory_and_closing_removes_the_files(tmp_path):
    size = batch_bytes(batch(torch.bfloat16))
    store = ActivationStore(budget_bytes=3 * size, directory=tmp_path)
    store.extend(batch(torch.bfloat16, seed) for seed in range(10))
    assert (store.resident_bytes, store.spilled, store.spilled_bytes) == (3 * size, 7, 7 * size)
    for seed, stored in enumerate(store):
        assert_same_batch(stored, batch(torch.bfloat16, seed))
    store[0] = batch(torch.bfloat16, 20)  # replacing a batch in memory frees its share for the new one
    assert store.resident_bytes == 3 * size and len(list(tmp_path.iterdir())) == 7
    store.close()
    assert list(tmp_path.iterdir()) == [] and len(store) == 0


def test_draining_releases_each_batch_so_the_next_blocks_store_fills_within_one_budget(tmp_path):
    size = batch_bytes(batch(torch.float32))
    inputs = ActivationStore(budget_bytes=4 * size, directory=tmp_path)
    inputs.extend(batch(torch.float32, seed) for seed in range(8))
    following = inputs.like()
    for drained in inputs.drain():
        following.append(drained)
        assert inputs.resident_bytes + following.resident_bytes <= 4 * size
    assert following.resident_bytes == 4 * size and following.spilled == 4
    assert len(list(tmp_path.iterdir())) == 4  # the drained store's files are gone


def resident_set_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident set size from /proc")
def test_spilled_batches_do_not_stay_in_the_processs_memory(tmp_path):
    store = ActivationStore(budget_bytes=0, directory=tmp_path)
    megabytes = 8 * 2**20
    gc.collect()
    before = resident_set_bytes()
    for seed in range(20):  # 160 MB written; one 8 MB batch at a time in memory
        store.append(((torch.full((megabytes // 4,), float(seed)),), {}))
    grown = resident_set_bytes() - before
    assert store.spilled == 20 and grown < 80 * 2**20, f"resident set grew by {grown / 2**20:.0f} MB"
    assert float(store[19][0][0][0]) == 19.0


@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_budget_that_is_not_positive_is_a_config_error_with_the_fix(value, tmp_path):
    result = slimc("compile", "llm/w8a8_dynamic.yaml", "--model", tmp_path, "--out", tmp_path / "out",
                   "--set", f"memory.activations_gb={value}")
    assert_user_error(result, "memory.activations_gb", "above 0", "null")


@pytest.mark.parametrize("case", COMPILES)
def test_a_compile_that_spills_most_batches_writes_the_files_of_one_that_does_not(case, tmp_path, monkeypatch):
    family, config = COMPILES[case]
    model = save_llm(family, tmp_path / "model")
    writes, held = [], []  # the files the stores write; what a store holds in memory after each batch it takes
    save_file, setitem = activations.save_file, ActivationStore.__setitem__
    monkeypatch.setattr(activations, "save_file", lambda tensors, path: (writes.append(path), save_file(tensors, path))[1])
    monkeypatch.setattr(ActivationStore, "__setitem__",
                        lambda store, index, value: (setitem(store, index, value), held.append(store.resident_bytes)))
    runs = {}
    for name, settings in {"in-memory": CALIBRATION, "spilled": [*CALIBRATION, BUDGET]}.items():
        writes.clear(), held.clear()
        compile_model(load_config(resolve_config_path(config), settings), model_path=str(model), out_dir=tmp_path / name)
        runs[name] = (len(writes), max(held))
    budget = 1e-5 * 2**30
    assert runs["in-memory"][0] == 0 and runs["in-memory"][1] > 4 * budget
    assert runs["spilled"][0] >= 7 * 2 and runs["spilled"][1] <= budget  # 7 of 8 batches, at each of 2 blocks
    assert same_files(tmp_path / "in-memory", tmp_path / "spilled") == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no spill directory left


def test_a_killed_compile_resumes_with_spilling_to_the_files_of_one_that_never_spilled(tmp_path):
    model = save_llm("llama", tmp_path / "model")
    interrupting = interrupting_config(tmp_path, "llm/w8a8_static.yaml", "model.layers.1")
    out = tmp_path / "resumed"
    killed = killed_compile(*compile_args(interrupting, model, out, [*CALIBRATION, BUDGET]))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert committed(out) == ["model.layers.0"]
    assert len(list((journal_directory(out) / "model.layers.0.inputs").iterdir())) == 8

    resumed = slimc(*compile_args(interrupting, model, out, [*CALIBRATION, BUDGET], "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    whole = tmp_path / "whole"
    assert slimc(*compile_args(interrupting, model, whole, CALIBRATION)).returncode == 0
    assert same_files(out, whole) == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_the_dry_run_estimate_holds_the_budgets_worth_of_activations_and_counts_the_rest_on_disk(tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from slimc.commands import doctor
    from slimc.commands.compile import resolve_source
    from slimc.frontends import frontend_for

    AutoConfig.for_model("qwen2", num_hidden_layers=2, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                         num_key_value_heads=4, dtype="bfloat16", architectures=["Qwen2ForCausalLM"]).save_pretrained(tmp_path)
    save_file({"unread": torch.zeros(1)}, tmp_path / "model.safetensors")  # the skeleton reads no weight
    found = {}
    for budget in (None, 2):
        settings = ["calibration.samples=512", "calibration.seq_len=2048", "calibration.batch_size=4"]
        config = load_config(resolve_config_path("llm/w8a8_dynamic.yaml"),
                             settings + ([] if budget is None else [f"memory.activations_gb={budget}"]))
        source = resolve_source(config, str(tmp_path))
        frontend = frontend_for(source)
        found[budget] = doctor.estimate(frontend.build(source, frontend.skeleton(source, torch.bfloat16)), config, streamed=True)
    one_copy = 512 * 2048 * 3584 * 2  # 7 GiB of bfloat16 hidden states
    batch = one_copy * 4 // 512
    assert found[None].activation_bytes == 2 * one_copy and found[None].spilled_activation_bytes == 0
    assert found[2].activation_bytes == 2 * 2**30 + 2 * batch
    assert found[2].spilled_activation_bytes == one_copy - 2 * 2**30
    assert found[None].peak_memory_bytes - found[2].peak_memory_bytes == 2 * one_copy - 2 * 2**30 - 2 * batch
    assert found[2].disk_bytes(1) - found[None].disk_bytes(1) == one_copy - 2 * 2**30
