#!/usr/bin/env bash
# Mutation check (issue 19): break one thing the CP design relies on, run the tests that should
# notice, restore, report which tests failed. A mutation no test catches is a hole in the suite.
#   scripts/mutation_check.sh [kv_allgather|round_robin|fp8_scale|mtp_split ...]   (default: all)
# Needs the repo's .venv (scripts/test.sh sets it up); leaves the tree as it found it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python

mutate() {  # name file old new tests...
  local name=$1 file=$2 old=$3 new=$4; shift 4
  cp "$file" "/tmp/mutation_backup_$name"
  "$PY" - "$file" "$old" "$new" <<'PYEOF' || { echo "$name: the line to mutate is gone from $file"; return 1; }
import sys
path, old, new = sys.argv[1:4]
text = open(path).read()
assert text.count(old) == 1
open(path, "w").write(text.replace(old, new))
PYEOF
  timeout 1800 "$PY" -m pytest -q -p no:cacheprovider "$@" 2>&1 | grep -E "^FAILED|^ERROR|[0-9]+ (passed|failed)" | sed 's/ - .*//' > "/tmp/mutation_$name.txt"
  cp "/tmp/mutation_backup_$name" "$file"
  local caught; caught=$(grep -c "^FAILED\|^ERROR" "/tmp/mutation_$name.txt")
  echo "## $name: $caught failing tests ($(tail -1 "/tmp/mutation_$name.txt" | tr -d '='))"
  grep "^FAILED\|^ERROR" "/tmp/mutation_$name.txt" | sed 's/\[.*//' | sort | uniq -c
  [ "$caught" -gt 0 ]
}

run() {
  case $1 in
    kv_allgather) mutate kv_allgather vllm_cp_nsa/communicator.py \
      "    return plan.restore_token_order(group.all_gather(x_local))" \
      "    return group.all_gather(x_local)[: plan.num_tokens]" \
      plugin_tests/unit plugin_tests/distributed plugin_tests/e2e/test_cp_modes.py ;;
    round_robin) mutate round_robin vllm_cp_nsa/split_plan.py \
      "        return [torch.arange(rank, total, cp_size) for rank in range(cp_size)]" \
      "        return [torch.arange(0, total, cp_size) for rank in range(cp_size)]" \
      plugin_tests/unit plugin_tests/distributed plugin_tests/e2e/test_cp_modes.py ;;
    fp8_scale) mutate fp8_scale kernels/kv_cache_ref.py \
      "    scales = pow2_round_up(torch.clamp(amax / FP8_MAX, min=_SCALE_FLOOR))" \
      "    scales = pow2_round_up(torch.clamp(amax / (2 * FP8_MAX), min=_SCALE_FLOOR))" \
      plugin_tests/unit plugin_tests/distributed plugin_tests/kernels plugin_tests/e2e/test_fp8_kv.py ;;
    mtp_split) mutate mtp_split vllm_cp_nsa/adapter/mtp.py \
      "        hidden, recycled = layer(take(embeds), take(positions), take(hidden_states), meta, plan)" \
      "        hidden, recycled = layer(take(embeds), positions[: take(positions).shape[0]], take(hidden_states), meta, plan)" \
      plugin_tests/unit plugin_tests/distributed plugin_tests/e2e/test_mtp.py plugin_tests/e2e/test_indep_mtp_draft_split.py ;;
    *) echo "unknown mutation $1"; return 2 ;;
  esac
}

STATUS=0
for NAME in "${@:-kv_allgather round_robin fp8_scale mtp_split}"; do
  for N in $NAME; do run "$N" || STATUS=1; done
done
git diff --quiet -- vllm_cp_nsa kernels || { echo "tree not restored"; STATUS=1; }
exit $STATUS
