"""The MTP draft layer under CP equals the draft without CP (2-4 gloo ranks): draft
prefill after a prompt chunk and multi-token draft / verify-shaped batches."""

from __future__ import annotations

import pytest
import torch

from cp_gloo_harness import num_cache_blocks, paged_batch, rel_err, run_ranks
from vllm_cp_nsa.communicator import FullMoeCommunicator, ScatteredMoeCommunicator
from vllm_cp_nsa.kernels.dispatch import get_ops
from vllm_cp_nsa.reference_model import Dims, MtpLayer, make_caches, random_hidden
from vllm_cp_nsa.split_plan import InSeqSplit, RoundRobinSplit

pytestmark = pytest.mark.distributed

DIMS = Dims(topk=16)
STRATEGIES = {"off": None, "round-robin-split": RoundRobinSplit(), "in-seq-split": InSeqSplit()}
# Draft prefill of two prompts (one starting at position 0), then decode-like steps with
# 3 draft tokens per request (verify-shaped), then single-token draft steps.
BATCHES = [([30, 17], [0, 12]), ([3, 3, 3, 3], [31, 40, 9, 22]), ([1, 1, 1], [44, 50, 3])]


def _run(group):
    ops = get_ops("torch")
    out = {}
    for comm in (FullMoeCommunicator(), ScatteredMoeCommunicator()):
        layer = MtpLayer(DIMS, seed=3, group=group, communicator=comm)
        for mode, strategy in STRATEGIES.items():
            for b, (q, c) in enumerate(BATCHES):
                batch = paged_batch(q, c)
                cache = make_caches(DIMS, 1, num_cache_blocks(batch), batch.block_size, "auto", torch.float32,
                                    "cpu")[0]
                embeds = random_hidden(sum(q), DIMS.hidden, seed=10 + b)
                previous = random_hidden(sum(q), DIMS.hidden, seed=20 + b)
                out[(comm.name, mode, b)] = layer(embeds, previous, batch, cache, group, strategy, ops,
                                                  max_decode_query_len=4)
    return out


def test_mtp_draft_under_cp_equals_no_cp(world):
    results = run_ranks(_run, world)
    for rank in range(world):
        for (comm, mode, b), (hidden, recycled) in results[rank].items():
            ref_hidden, ref_recycled = results[0][(comm, "off", b)]
            assert hidden.shape == (sum(BATCHES[b][0]), DIMS.hidden)
            assert rel_err(hidden, ref_hidden) <= 1e-5, (comm, mode, b, rank)
            assert rel_err(recycled, ref_recycled) <= 1e-5, (comm, mode, b, rank)
