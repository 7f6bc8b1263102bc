#!/usr/bin/env bash
# Download the vllm==0.24.0 CUDA wheel (built for torch 2.11 + CUDA 13, like the device machines)
# on the CPU machine and extract only what eval/bench_kernels.py loads into the git-ignored
# folder .vendor/ (carried to the device with `carry: [".vendor"]`; must stay <= 60 MiB).
#
#   bash eval/fetch_vendor_kernels.sh            # -> .vendor/_flashmla_C.abi3.so, .vendor/deep_gemm/...
#
# Never commit .vendor/ (it is in .gitignore).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENDOR="$ROOT/.vendor"
WHEEL_DIR="${WHEEL_DIR:-/tmp/vllm_wheel_0240}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
mkdir -p "$WHEEL_DIR"
if ! ls "$WHEEL_DIR"/vllm-0.24.0-*.whl >/dev/null 2>&1; then
  "$PY" -m pip download --no-deps vllm==0.24.0 --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEEL_DIR"
fi
WHEEL="$(ls "$WHEEL_DIR"/vllm-0.24.0-*.whl | head -1)"
echo "wheel: $WHEEL ($(du -h "$WHEEL" | cut -f1))"
rm -rf "$VENDOR" && mkdir -p "$VENDOR"
TMP="$(mktemp -d)"
# FlashMLA: sparse prefill + (fp8) decode ops live in _flashmla_C; it needs no other vLLM .so
# (gpu_anchors.md). DeepGEMM: the vendored package (python + its _C extension + JIT headers).
unzip -q "$WHEEL" 'vllm/_flashmla_C.abi3.so' 'vllm/third_party/deep_gemm/*' -d "$TMP"
cp "$TMP/vllm/_flashmla_C.abi3.so" "$VENDOR/"
cp -r "$TMP/vllm/third_party/deep_gemm" "$VENDOR/deep_gemm"
rm -rf "$TMP"
# Strip what the benchmark does not load: caches, tests, docs.
find "$VENDOR" -name '__pycache__' -prune -exec rm -rf {} + 2>/dev/null || true
find "$VENDOR" \( -name '*.pyc' -o -name '*.md' \) -delete 2>/dev/null || true
# Dependencies of the shared objects, for the record (libtorch / libcudart come from the device's torch).
rm -f "$VENDOR"/deep_gemm/_C.cpython-3{10,11,13,14}-*.so
for so in $(find "$VENDOR" -name '*.so'); do
  echo "== $so"; (readelf -d "$so" 2>/dev/null | grep NEEDED) || true
done
SIZE_KB=$(du -sk "$VENDOR" | cut -f1)
echo ".vendor size: $((SIZE_KB / 1024)) MiB"
if [ "$SIZE_KB" -gt $((60 * 1024)) ]; then
  echo "ERROR: .vendor exceeds 60 MiB; strip more" >&2; exit 1
fi
