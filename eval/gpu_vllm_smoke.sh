#!/usr/bin/env bash
# After the staged vLLM stack is unpacked on the device (/tmp/vsite): run the plugin in it.
#   (device) bash eval/gpu_vllm_smoke.sh          # carry: .whl (pluggy)
set -u
cd "$(dirname "$0")/.."
source eval/gpu_env.sh || exit 5
export PYTHONPATH=$CPNSA_PYTHONPATH:$PYTHONPATH VLLM_ENABLE_V1_MULTIPROCESSING=0
cd /tmp  # import the laid-out copy of the plugin
timeout "${TMO:-400}" python3 $REPO/eval/gpu_vllm_smoke.py ${DTYPES:-bfloat16 float32} > "${OUT:-/tmp}/gpu_vllm_smoke.log" 2>&1
echo "rc=$?"; grep -E "RESULT|Error|error|Traceback|vllm_cp_nsa" "${OUT:-/tmp}/gpu_vllm_smoke.log" | cut -c1-400 | tail -40
