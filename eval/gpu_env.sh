# Source on a GPU host after the staged vLLM stack is unpacked (/tmp/vsite, staged by
# eval/stage_gpu_stack.sh for any ENGINE/VERSION it knows: vLLM 0.32.0 / 0.33.0 / 0.34.0):
# vLLM's env (one-GPU NCCL shim when the image's NCCL lacks symbols the staged torch links),
# the real NCCL when staged, pytest / pluggy, and the plugin laid out as an installed
# distribution (entry points included) at /tmp/cpnsa. Sets CPNSA_PYTHONPATH (prepend it to
# PYTHONPATH to load the plugin) and REPO. Native-vLLM runs simply leave /tmp/cpnsa off PYTHONPATH.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source /tmp/stage/dev/env.sh || return 5
echo "gpu_env: staged $(head -1 /tmp/stage/dev/stack.txt 2>/dev/null || echo 'stack (no stack.txt: staged by the 0.32-only stage.sh)')"
IMAGE_PURELIB=$(PYTHONPATH= python3 -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')
if [ -f "$VSITE/nvidia/nccl/lib/libnccl.so.2" ] && [ ! -L "$VSITE/nvidia" ]; then
  # Staged with EXTRA_WHEELS=nvidia-nccl-cu13: torch finds libs via $ORIGIN/../../nvidia/*,
  # so the image's other CUDA libraries are linked in beside the staged NCCL, and the
  # one-GPU symbol shim is not preloaded.
  for lib in "$IMAGE_PURELIB"/nvidia/*; do
    [ -e "$VSITE/nvidia/$(basename "$lib")" ] || ln -s "$lib" "$VSITE/nvidia/"
  done
  unset LD_PRELOAD
  echo "gpu_env: NCCL $(python3 -c "import ctypes;l=ctypes.CDLL('$VSITE/nvidia/nccl/lib/libnccl.so.2');v=ctypes.c_int();l.ncclGetVersion(ctypes.byref(v));print(v.value)") from the staged wheel"
fi
# Tests import both `kernels` (repo root) and `vllm_cp_nsa.kernels`: mirror the install
# mapping in this (throwaway) copy of the repo.
[ -e "$REPO/vllm_cp_nsa/kernels" ] || ln -s ../kernels "$REPO/vllm_cp_nsa/kernels"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$REPO"/.whl/*.whl 2>/dev/null
rm -rf /tmp/cpnsa && mkdir -p /tmp/cpnsa && cp -rL "$REPO/vllm_cp_nsa" /tmp/cpnsa/
mkdir -p /tmp/cpnsa/vllm_cp_nsa-0.1.0.dist-info
printf 'Metadata-Version: 2.1\nName: vllm-cp-nsa\nVersion: 0.1.0\n' > /tmp/cpnsa/vllm_cp_nsa-0.1.0.dist-info/METADATA
# entry points straight from pyproject.toml, so the device sees every group the install has
python3 - "$REPO/pyproject.toml" > /tmp/cpnsa/vllm_cp_nsa-0.1.0.dist-info/entry_points.txt <<'PY'
import sys, tomllib
for group, entries in tomllib.load(open(sys.argv[1], "rb"))["project"]["entry-points"].items():
    print(f"[{group}]"); [print(f"{name} = {target}") for name, target in entries.items()]; print()
PY
export PYTHONPATH=$PYTHONPATH:/tmp/site CPNSA_PYTHONPATH=/tmp/cpnsa
