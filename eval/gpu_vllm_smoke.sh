#!/usr/bin/env bash
# After the staged vLLM stack is unpacked on the device (/tmp/vsite): run the plugin in it.
#   (device) bash eval/gpu_vllm_smoke.sh          # carry: .whl (pluggy)
set -u
cd "$(dirname "$0")/.."
source /tmp/stage/dev/env.sh || exit 5
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
# Lay the plugin out as an installed distribution: package + dist-info with its entry points.
rm -rf /tmp/cpnsa && mkdir -p /tmp/cpnsa && cp -r vllm_cp_nsa /tmp/cpnsa/ && cp -r kernels /tmp/cpnsa/vllm_cp_nsa/kernels
mkdir -p /tmp/cpnsa/vllm_cp_nsa-0.1.0.dist-info
printf 'Metadata-Version: 2.1\nName: vllm-cp-nsa\nVersion: 0.1.0\n' > /tmp/cpnsa/vllm_cp_nsa-0.1.0.dist-info/METADATA
printf '[vllm.general_plugins]\ncp_nsa = vllm_cp_nsa.plugin:register\n\n[vllm_cp_nsa.extensions]\nbuiltin = vllm_cp_nsa.builtins\n' \
  > /tmp/cpnsa/vllm_cp_nsa-0.1.0.dist-info/entry_points.txt
export PYTHONPATH=/tmp/cpnsa:$PYTHONPATH:/tmp/site
export VLLM_ENABLE_V1_MULTIPROCESSING=0
REPO=$(pwd); cd /tmp  # the repo root holds vllm_cp_nsa/ without kernels/: import the laid-out copy
timeout "${TMO:-400}" python3 $REPO/eval/gpu_vllm_smoke.py ${DTYPES:-bfloat16 float32} > "${OUT:-/tmp}/gpu_vllm_smoke.log" 2>&1
echo "rc=$?"; grep -E "RESULT|Error|error|Traceback|vllm_cp_nsa" "${OUT:-/tmp}/gpu_vllm_smoke.log" | cut -c1-400 | tail -40
