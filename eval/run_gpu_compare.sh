#!/usr/bin/env bash
# The plugin against vLLM's own TP and PCP inside a staged real vLLM (eval/stage_gpu_stack.sh), on N GPUs of one host.
#   (device) bash eval/run_gpu_compare.sh N [CONFIG ...]        # carry: .whl (pluggy)
# The staged stack must already be unpacked in /tmp/vsite (eval/gpu_vllm_notes.md). CONFIGs are
# gpu_compare.py names (default: native-tp plugin-rr plugin-inseq native-pcp); more driver flags
# through COMPARE_ARGS, e.g. COMPARE_ARGS="--kv-dtypes auto,fp8 --lengths 4K,64K --budget-s 400".
# What comes back in $OUT: compare_<gpu>_n<N>.{json,md,png}, compare_driver.log (GPU facts first),
# profile_summary.md / decode_profile.md (profiling phases), raw.tgz (per-run logs and traces).
set -u
cd "$(dirname "$0")/.."
N=${1:-2}
shift $(( $# > 0 ? 1 : 0 ))
CONFIGS=$(IFS=,; echo "$*")
OUT=${OUT:-/tmp/compare_out}; mkdir -p "$OUT"
# vLLM's env, the staged NCCL (several GPUs), pytest / pluggy, and the plugin laid out as an
# installed distribution in /tmp/cpnsa; the driver puts /tmp/cpnsa on PYTHONPATH for the
# plugin's runs only.
source eval/gpu_env.sh || exit 5
REPO=$(pwd); cd /tmp  # the repo root holds vllm_cp_nsa/ without kernels/: never import it from there
# GPU facts head the driver log (a call brings back at most 8 files: raw.tgz must be one of them)
{ nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader; nvidia-smi topo -m; } \
  > "$OUT/compare_driver.log" 2>&1
timeout "${TMO:-585}" python3 "$REPO/eval/gpu_compare.py" drive --n "$N" --out "$OUT" --plugin-path /tmp/cpnsa \
  ${CONFIGS:+--configs "$CONFIGS"} ${COMPARE_ARGS:-} 2>&1 | tee -a "$OUT/compare_driver.log"
echo "rc=${PIPESTATUS[0]}"
cat "$OUT"/compare_*_n"$N".md 2>/dev/null
# A device call brings back at most 8 files from $OUT: summarize the traces, then pack the
# per-run logs and traces into raw.tgz (KEEP_RAW=1 leaves them as they are).
if [ -d "$OUT/profiles" ]; then
  python3 "$REPO/eval/profile_summary.py" "$OUT/profiles" --trace-prefix prefill --top 25 > "$OUT/profile_summary.md" 2>&1
  python3 "$REPO/eval/profile_summary.py" "$OUT/profiles" --trace-prefix decode --top 25 --title "Decode profile" > "$OUT/decode_profile.md" 2>&1
fi
if [ "${KEEP_RAW:-0}" != 1 ]; then
  tar -C "$OUT" -czf "$OUT/raw.tgz" $(cd "$OUT" && ls -d logs profiles 2>/dev/null) && rm -rf "$OUT/logs" "$OUT/profiles"
fi
