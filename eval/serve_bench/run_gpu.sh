#!/usr/bin/env bash
# Serving sweep on N GPUs of one host, inside the staged vLLM stack (eval/gpu_vllm_notes.md).
#   (device) bash eval/serve_bench/run_gpu.sh N CONFIGS [serve_bench run flags ...]     # carry: .whl
# e.g.     bash eval/serve_bench/run_gpu.sh 4 native-tp,round-robin-split+dg --rates 2k-64k=1,2,4,8,inf
# CONFIGS: serve_bench configuration names (native-tp, native-pcp, round-robin-split[+dg][+fp8][+mtp], ...).
# MODEL (default /tmp/cmp_real_v32_l3, built like eval/gpu_compare.py's when missing), OUT (default
# /tmp/serve_out), TAG (file stem suffix), BUDGET (s, default 480), TMO (s, default 585).
# Comes back in $OUT (a device call returns at most 8 files): serve_<TAG>.json / .md, driver.log,
# gpu_info.txt, logs.tgz (one server log per configuration). PNGs: render here from the JSON with
# `python -m eval.serve_bench report serve_<TAG>.json --out STEM` where matplotlib imports.
set -u
cd "$(dirname "$0")/../.."
N=${1:?N GPUs}; CONFIGS=${2?configurations (may be empty with --launch)}; shift 2
OUT=${OUT:-/tmp/serve_out}; mkdir -p "$OUT"
source eval/gpu_env.sh || exit 5
REPO=$(pwd)
# The staged stack is unpacked wheels: the vllm distribution is there, its console script is not,
# and eval/server.py runs `vllm serve` wherever the distribution is installed.
if ! command -v vllm >/dev/null; then
  mkdir -p /tmp/sb-bin
  printf '#!/bin/sh\nexec python3 -m vllm.entrypoints.cli.main "$@"\n' > /tmp/sb-bin/vllm && chmod +x /tmp/sb-bin/vllm
  export PATH=/tmp/sb-bin:$PATH
fi
MODEL=${MODEL:-/tmp/cmp_real_v32_l3}
if [ ! -f "$MODEL/BUILD.json" ] && [ ! -f "$MODEL/config.json" ]; then
  python3 eval/make_tiny_model.py "$MODEL" --real-dims --num-layers 3 --num-nextn-predict-layers 1 --device cuda \
    || python3 eval/make_tiny_model.py "$MODEL" --real-dims --num-layers 3 --num-nextn-predict-layers 1
fi
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu_info.txt"
TAG=${TAG:-h200x${N}_$(echo "$CONFIGS" | tr ',+' '-_')}
cd /tmp  # the repo root holds vllm_cp_nsa/ without kernels/: never import the plugin from there
timeout "${TMO:-585}" env PYTHONPATH="$REPO/eval:${PYTHONPATH:-}" python3 -m serve_bench run \
  --configs "$CONFIGS" --n "$N" --model "$MODEL" --dtype bfloat16 --plugin-path /tmp/cpnsa \
  --max-num-batched-tokens 16384 --budget-s "${BUDGET:-480}" --no-plots \
  --out "$OUT/serve_$TAG" --log-dir "$OUT/logs" "$@" 2>&1 | tee "$OUT/driver.log"
echo "rc=${PIPESTATUS[0]}"
tar -C "$OUT" -czf "$OUT/logs.tgz" logs && rm -rf "$OUT/logs"
