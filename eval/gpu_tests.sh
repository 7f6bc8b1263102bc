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
# One pytest per test folder: the e2e modules import helpers with `from conftest import ...`,
# which resolves to whichever folder's conftest came first when two folders share a process
# (the memory test beside plugin_tests/kernels failed to collect on 2026-12-04).
: > "$OUT/gpu_tests.log"; RC=0
ALL_PATHS=${TEST_PATHS:-plugin_tests/kernels plugin_tests/e2e/test_gpu_graphs.py}
folder() { case "$1" in *.py|*.py::*) dirname "${1%%::*}";; *) echo "${1%/}";; esac; }
# The e2e folder (engine starts, minutes) runs last, so a call's timeout cuts it and not the
# kernel tests behind it (2026-12-05 16:52: two graph replays on a cold host took the whole 270 s).
for DIR in $(for P in $ALL_PATHS; do folder "$P"; done | sort -u | awk '/e2e/ {last = last $0 "\n"; next} {print} END {printf "%s", last}'); do
  PATHS=$(for P in $ALL_PATHS; do [ "$(folder "$P")" = "$DIR" ] && echo "$P"; done)
  echo "## pytest" $PATHS >> "$OUT/gpu_tests.log"
  timeout ${TEST_TIMEOUT:-400} python3 -m pytest -q -p no:cacheprovider -m gpu -rfEs ${PYTEST_ARGS:-} $PATHS >> "$OUT/gpu_tests.log" 2>&1 || RC=$?
done
echo "gpu tests rc=$RC ($(( $(date +%s) - T0 ))s)"; grep -E "^## pytest|passed|failed|FAILED|ERROR|SKIPPED" "$OUT/gpu_tests.log" | cut -c1-300 | tail -25
if [ $# -gt 0 ]; then
  python3 eval/gpu_graph_check.py --out "$OUT" --budget-s ${GRAPH_BUDGET_S:-330} "$@" 2>&1 | grep -E "RESULT|total|Error" | cut -c1-400
fi
echo "total $(( $(date +%s) - T0 ))s"
