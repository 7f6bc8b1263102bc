#!/usr/bin/env bash
# One device call on a 4-GPU host: the TTFT benchmark at N=2 (GPUs 0,1) and N=4.
#   (device) bash eval/run_gpu_ttft.sh          # writes ttft_n{2,4}.{md,json}, logs, env.txt to $OUT
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-eval/results/tmp}"; mkdir -p "$OUT"
# The GPU hosts have no vLLM and no install of this package: lay the source tree out as
# the installed package (kernels/ -> vllm_cp_nsa.kernels).
rm -rf /tmp/cpnsa && mkdir -p /tmp/cpnsa && cp -r vllm_cp_nsa /tmp/cpnsa/ && cp -r kernels /tmp/cpnsa/vllm_cp_nsa/kernels
export PYTHONPATH=/tmp/cpnsa PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
{ date -u; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv
  nvidia-smi topo -m; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1; head -8 "$OUT/env.txt"
T0=$(date +%s)
CUDA_VISIBLE_DEVICES=0,1 timeout "${N2_TIMEOUT:-230}" python3 -m torch.distributed.run --standalone --nproc_per_node=2 \
  eval/bench_ttft.py --out "$OUT" ${BENCH_ARGS:-} > "$OUT/ttft_n2.log" 2>&1
echo "n2 rc=$? $(( $(date +%s) - T0 ))s"; grep -E "^\||Error|error" "$OUT/ttft_n2.log" | tail -30
timeout "${N4_TIMEOUT:-250}" python3 -m torch.distributed.run --standalone --nproc_per_node=4 \
  eval/bench_ttft.py --out "$OUT" ${BENCH_ARGS:-} > "$OUT/ttft_n4.log" 2>&1
echo "n4 rc=$? $(( $(date +%s) - T0 ))s"; grep -E "^\||Error|error" "$OUT/ttft_n4.log" | tail -30
