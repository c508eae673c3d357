"""A Hugging Face Hub cache on disk, laid out as huggingface_hub writes it, for tests that run offline."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REVISION = "0123456789abcdef0123456789abcdef01234567"


def use_hub_cache(monkeypatch: pytest.MonkeyPatch, cache: Path) -> Path:
    """Make `cache` the Hub cache of this process and of the processes it starts."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def cache_model(cache: Path, repo_id: str, model_dir: Path) -> Path:
    """Put the files of `model_dir` in `cache` as the main revision of the Hub model `repo_id`; its snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot
