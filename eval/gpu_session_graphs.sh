#!/usr/bin/env bash
# One device call (staged stack unpacked): the vllm kernel provider's GPU tests, then
# CUDA-graph replays vs eager inside real vLLM (eval/gpu_graph_check.py).
#   (device) bash eval/gpu_session_graphs.sh [graph-check config names...]   # carry: .whl
set -u
cd "$(dirname "$0")/.."
source eval/gpu_env.sh || exit 5
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
PYTHONPATH=$CPNSA_PYTHONPATH:$PYTHONPATH timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -m gpu \
  -rfE plugin_tests/kernels/test_vllm_provider.py > "$OUT/gpu_vllm_provider_tests.log" 2>&1
echo "provider tests rc=$? ($(( $(date +%s) - T0 ))s)"; tail -15 "$OUT/gpu_vllm_provider_tests.log" | cut -c1-300
export PYTHONPATH=$CPNSA_PYTHONPATH:$PYTHONPATH
python3 eval/gpu_graph_check.py --out "$OUT" --budget-s ${GRAPH_BUDGET_S:-330} "$@" 2>&1 | grep -E "RESULT|total|Error" | cut -c1-400
echo "total $(( $(date +%s) - T0 ))s"
