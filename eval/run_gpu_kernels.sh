#!/usr/bin/env bash
# One device call: GPU kernel tests at real shapes + the kernel benchmark.
#   (device) bash eval/run_gpu_kernels.sh            # carry: .vendor .whl
# Writes env.txt, gpu_tests.log, bench.log, kernel_bench.{md,json,png} into $OUT.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT="${OUT:-eval/results/tmp}"
mkdir -p "$OUT"
T0=$(date +%s)
if ! python3 -c "import pytest" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
{
  date -u; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.sm,power.limit,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  command -v nvcc && nvcc --version | tail -1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest plugin_tests/kernels -m gpu -q -rfE \
    --confcutdir=plugin_tests/kernels -p no:cacheprovider ${PYTEST_ARGS:-} > "$OUT/gpu_tests.log" 2>&1
  echo "pytest rc=$? ($(( $(date +%s) - T0 ))s)"; tail -25 "$OUT/gpu_tests.log"
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout "${BENCH_TIMEOUT:-300}" python3 eval/bench_kernels.py --out "$OUT" ${BENCH_ARGS:---sweep} > "$OUT/bench.log" 2>&1
  echo "bench rc=$? ($(( $(date +%s) - T0 ))s)"
  grep -E "^  |NOTE|^\[|^==" "$OUT/bench.log" | cut -c1-200 | tail -90
fi
echo "total $(( $(date +%s) - T0 ))s"
