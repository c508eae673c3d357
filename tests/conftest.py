"""Shared fixtures: tiny model directories on disk, offline Hugging Face, and both import styles.

Test modules import the tiny builders either as `tiny_models` or as `tests.tiny_models`; the
repository root and tests/ are both put on sys.path so that each works however pytest is started.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
for _path in (str(TESTS_DIR), str(REPO_ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from tiny_models import tiny_causal_lm  # noqa: E402
from tiny_tokenizer import tiny_tokenizer  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker takes its share of the cores: torch's default of one thread per core in
    every worker oversubscribes the machine, and the tiny models' matmuls gain nothing from threads anyway."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(autouse=True)
def hf_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reaches the Hugging Face Hub, in this process or in the subprocesses it starts."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def save_tiny_model(path: Path, family: str, dtype: torch.dtype = torch.float32) -> Path:
    """A tiny `family` model in `dtype` saved as safetensors with config.json and the tiny tokenizer."""
    tiny_causal_lm(family, dtype=dtype).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny-model modules run torch on one thread: their small matmuls gain nothing from more, and on a
    machine shared with other work the contended threads made them many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def vllm_per_token_scales(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-token dynamic scales as vLLM's int8 kernel computes them, amax / 127 (transformers' compressed-tensors
    simulation divides by 127.5 instead, half a code wider than the int8 range)."""
    from compressed_tensors.quantization.lifecycle import forward

    def amax_over_qmax(value, args, module, global_scale=None):
        qmax = 2 ** (args.num_bits - 1) - 1
        scale = value.abs().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / qmax
        return scale.to(value.dtype), torch.zeros_like(scale, dtype=torch.int8)

    monkeypatch.setattr(forward, "compute_dynamic_scales_and_zp", amax_over_qmax)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LlamaForCausalLM directory (model.safetensors, config.json, tokenizer); treat as read-only."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_qwen3_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3MoeForCausalLM directory (fused experts); treat as read-only."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3-moe", "qwen3_moe")
