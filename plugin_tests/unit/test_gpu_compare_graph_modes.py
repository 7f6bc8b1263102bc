"""eval/gpu_compare.py's `plugin-off-decodegraphs` run (issue 18: what the batches the CP split
runs eagerly at N > 1 cost): the same engine as `plugin-off` but vLLM's FULL_DECODE_ONLY graph
mode, with the capture sizes every run shares."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "eval"))

import gpu_compare  # noqa: E402


def _args():
    return argparse.Namespace(n=1, max_num_batched_tokens=16384, gpu_memory_utilization=0.85, eager=False,
                              cpu_dry_run=False, plugin_path=None)


def test_decode_graphs_run_differs_from_plugin_off_only_in_graph_mode():
    eager_prefill = gpu_compare.llm_kwargs(gpu_compare.CONFIGS["plugin-off-decodegraphs"], _args(), Path("/m"),
                                           "auto", False, 4352)
    graphed = gpu_compare.llm_kwargs(gpu_compare.CONFIGS["plugin-off"], _args(), Path("/m"), "auto", False, 4352)
    assert eager_prefill["compilation_config"] == {"cudagraph_capture_sizes": gpu_compare.CAPTURE_SIZES,
                                                   "cudagraph_mode": "FULL_DECODE_ONLY"}
    assert "cudagraph_mode" not in graphed["compilation_config"]
    eager_prefill.pop("compilation_config")
    graphed.pop("compilation_config")
    assert eager_prefill == graphed


def test_graph_mode_does_not_leak_into_the_shared_capture_sizes():
    gpu_compare.llm_kwargs(gpu_compare.CONFIGS["plugin-off-decodegraphs"], _args(), Path("/m"), "auto", False, 4352)
    native = gpu_compare.llm_kwargs(gpu_compare.CONFIGS["native-tp"], _args(), Path("/m"), "auto", False, 4352)
    assert native["compilation_config"] == {"cudagraph_capture_sizes": gpu_compare.CAPTURE_SIZES}
