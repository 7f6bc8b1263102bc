#!/usr/bin/env bash
# One device call (a stack staged by eval/stage_gpu_stack.sh and unpacked, any vLLM it
# stages): every GPU-marked test (kernels, the vllm providers, CUDA-graph replays inside
# vLLM), then optionally the graph-check driver.
#   (device) bash eval/gpu_tests.sh [graph-check config names...]   # carry: .whl
# TEST_PATHS narrows the tests (default: plugin_tests/kernels and the graph e2e test).
set -u
cd "$(dirname "$0")/.."
source eval/gpu_env.sh || exit 5
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$CPNSA_PYTHONPATH:$PYTHONPATH
T0=$(date +%s)
python3 -c "import torch, vllm; print('stack: vLLM', vllm.__version__, '| torch', torch.__version__, '|', torch.cuda.get_device_name())" 2>&1 | tail -1 | tee "$OUT/stack.txt"
timeout ${TEST_TIMEOUT:-400} python3 -m pytest -q -p no:cacheprovider -m gpu -rfEs ${PYTEST_ARGS:-} \
  ${TEST_PATHS:-plugin_tests/kernels plugin_tests/e2e/test_gpu_graphs.py} > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$? ($(( $(date +%s) - T0 ))s)"; grep -E "passed|failed|FAILED|ERROR|SKIPPED" "$OUT/gpu_tests.log" | cut -c1-300 | tail -25
if [ $# -gt 0 ]; then
  python3 eval/gpu_graph_check.py --out "$OUT" --budget-s ${GRAPH_BUDGET_S:-330} "$@" 2>&1 | grep -E "RESULT|total|Error" | cut -c1-400
fi
echo "total $(( $(date +%s) - T0 ))s"
