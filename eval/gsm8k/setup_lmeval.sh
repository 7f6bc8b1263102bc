#!/usr/bin/env bash
# Create .venv-lmeval (repo root) with lm-eval[api]==0.4.13: the GSM8K harness runs
# lm-eval from it as a subprocess, so it never touches vLLM's .venv. No torch.
# Idempotent: does nothing when the venv already imports lm_eval 0.4.13. ~1.5 min fresh.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${LMEVAL_VENV:-.venv-lmeval}
PY=${PYTHON:-python3}
SPEC="lm-eval[api]==0.4.13"
ok() { "$VENV/bin/python" -c "import importlib.metadata as m, lm_eval.api.registry; assert m.version('lm_eval') == '0.4.13'" 2>/dev/null; }
if [ -x "$VENV/bin/python" ] && ok; then
  echo "$VENV: lm-eval 0.4.13 already installed"
  exit 0
fi
# pip, minus the machine's "Location ... is ignored" warnings about absent local index folders.
pip_q() {
  local rc=0 log
  log=$(mktemp)
  "$VENV/bin/pip" "$@" >"$log" 2>&1 || rc=$?
  grep -v "is ignored: it is neither a file nor a directory" "$log" >&2 || true
  rm -f "$log"
  return "$rc"
}
rm -rf "$VENV"
"$PY" -m venv "$VENV"
pip_q install -q --upgrade pip
pip_q install -q "$SPEC"
ok || { echo "$VENV: lm-eval import check failed" >&2; exit 1; }
"$VENV/bin/python" -c "import importlib.metadata as m; print('$VENV: lm-eval', m.version('lm_eval'), 'ready')"
