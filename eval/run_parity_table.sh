#!/usr/bin/env bash
# Issue 18's table in one command, on one GPU: vLLM's own DeepSeek-V3.2 against the plugin at
# -tp 1 (unsplit, and round-robin, which must cost nothing) on the release-format checkpoint,
# fp8 block weights and their bf16 copy, bf16 and fp8 KV, MTP k=1; TTFT 1K-64K, 8x1K, 4x4K, decode
# b1 / b8; a prefill profile of each variant (run 1), then eval/parity_table.py over the reports.
#   (device) bash eval/run_parity_table.sh                 # every part, one after another (~40 min)
#   (device) PARTS=bf16w bash eval/run_parity_table.sh     # one part per call (a lent device: 600 s)
# Parts: fp8w (fp8 weights, bf16 + fp8 KV), mtp (fp8 weights, fp8 KV, MTP k=1), bf16w (bf16
# weights, bf16 KV). ROUNDS (default 2) runs each engine again, alternating (gpu_compare --rounds).
# Needs the staged stack (eval/run_gpu_compare.sh). What comes back in $OUT: <part>/compare_* and
# parity_table.md.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/parity_out}; mkdir -p "$OUT"
PARTS=${PARTS:-fp8w mtp bf16w}
ROUNDS=${ROUNDS:-2}
LENGTHS=${LENGTHS:-1K,4K,16K,32K,64K}
# one part's wall time: its own default fits every part on an unlimited host; a lent device's
# 600 s calls set TMO / BUDGET_S (and fewer LENGTHS / ROUNDS) per call
BUDGET_S=${BUDGET_S:-2400}
COMMON="--preset release --reps ${REPS:-5} --rounds $ROUNDS --lengths $LENGTHS --profile-length ${PROFILE_LENGTH:-4K}"
COMMON="$COMMON --budget-s $BUDGET_S"
PHASES="warmup,ttft,batches,decode,profile"
for part in $PARTS; do
  case $part in
    fp8w)  args="--kv-dtypes auto,fp8 --phases $PHASES"; configs="native-tp plugin-off plugin-rr" ;;
    mtp)   args="--kv-dtypes fp8 --mtp on --phases warmup,ttft,decode,profile"; configs="native-tp plugin-off" ;;
    bf16w) args="--weights bf16 --kv-dtypes auto --phases $PHASES"; configs="native-tp plugin-off" ;;
    *) echo "unknown part '$part' (fp8w, mtp, bf16w)"; exit 2 ;;
  esac
  TMO=${TMO:-$(( ${BUDGET_S%.*} + 30 ))} OUT="$OUT/$part" COMPARE_ARGS="$COMMON $args ${EXTRA_ARGS:-}" bash eval/run_gpu_compare.sh 1 $configs
done
python3 eval/parity_table.py "$OUT"/*/compare_*_n1.json --out "$OUT/parity_table.md"
