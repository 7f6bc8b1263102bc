"""Importing the plugin's core and its kernel providers imports no Triton kernel module.

The kernel tests switch the Triton interpreter on during collection and off after it; a
kernel module imported earlier (by another test package's imports) keeps compiled-mode
``@triton.jit`` helpers, which interpreted kernels cannot call. So kernel modules are
imported on first use (the kernels package docstring: "triton is imported lazily").
"""

import subprocess
import sys


def test_core_and_providers_import_without_triton():
    code = (
        "import sys\n"
        "import vllm_cp_nsa.nsa_attention, vllm_cp_nsa.reference_model, vllm_cp_nsa.communicator\n"
        "import vllm_cp_nsa.adapter.vllm_kernels, vllm_cp_nsa.adapter.vllm_deepgemm, vllm_cp_nsa.builtins\n"
        "import vllm_cp_nsa.adapter.builtins, vllm_cp_nsa.kernels.budgets, vllm_cp_nsa.extensions\n"
        "vllm_cp_nsa.extensions.kernel_providers()\n"
        "bad = sorted(m for m in sys.modules if m == 'triton' or m.startswith('triton.')\n"
        "             or m.endswith(('._triton_utils', '.slots', '.empty_rows', '.indexer_q_quant', '.kv_cache')))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
