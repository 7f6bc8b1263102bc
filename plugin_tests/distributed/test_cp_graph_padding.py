"""Inputs padded up to a CUDA-graph capture size: the split treats the extra rows as
padding (no KV write, no effect on real rows), on 2-4 gloo ranks."""

from __future__ import annotations

import pytest
import torch

from cp_gloo_harness import num_cache_blocks, paged_batch, rel_err, run_ranks
from vllm_cp_nsa.communicator import FullMoeCommunicator
from vllm_cp_nsa.graph_sizing import cp_capture_sizes
from vllm_cp_nsa.kernels.dispatch import get_ops
from vllm_cp_nsa.reference_model import Dims, LayerStack, make_caches, random_hidden
from vllm_cp_nsa.split_plan import RoundRobinSplit, build_split_plan

pytestmark = pytest.mark.distributed

DIMS = Dims(topk=16)
# Decode / verify batches (1 + k tokens per request) and a mixed one.
BATCHES = [([3, 3, 3], [20, 7, 40]), ([1] * 5, [9, 3, 30, 12, 1]), ([2, 17, 1], [5, 0, 11])]


def _run(group):
    ops = get_ops("torch")
    stack = LayerStack(DIMS, 2, 0, group, FullMoeCommunicator())
    out = []
    for b, (q, c) in enumerate(BATCHES):
        num_tokens = sum(q)
        sizes = cp_capture_sizes(cp_size=group.world_size, num_speculative_tokens=max(q) - 1,
                                 max_num_seqs=8, max_num_batched_tokens=512).sizes
        padded = next(s for s in sizes if s >= num_tokens + 1)  # at least one padding row
        results = {}
        for name, rows in (("exact", num_tokens), ("padded", padded)):
            batch = paged_batch(q, c)
            caches = make_caches(DIMS, 2, num_cache_blocks(batch), batch.block_size, "auto", torch.float32, "cpu")
            for cache in caches:
                cache.latent.fill_(7.0)
                cache.index.fill_(7.0)
            hidden = random_hidden(num_tokens, DIMS.hidden, seed=b)
            # vLLM's padding rows: garbage inputs (not zeros) past the real tokens.
            hidden = torch.cat([hidden, torch.full((rows - num_tokens, DIMS.hidden), 1e3)])
            result = stack(hidden, batch, caches, group, RoundRobinSplit(), ops)
            written = torch.cat([(cache.latent != 7.0).view(-1, cache.latent.shape[-1]).any(1).nonzero().flatten()
                                 for cache in caches])
            plan = build_split_plan(q, group.world_size, group.rank, RoundRobinSplit(), num_input_tokens=rows)
            results[name] = dict(out=result, written=written, rows_per_rank=plan.rows_per_rank,
                                 slots=batch.slot_mapping)
        out.append((padded, results))
    return out


def test_padded_graph_inputs_are_padding(world):
    results = run_ranks(_run, world)
    for rank in range(world):
        for (padded, r), (q, _) in zip(results[rank], BATCHES):
            assert padded % world == 0
            assert r["padded"]["rows_per_rank"] == padded // world
            assert r["padded"]["out"].shape == (sum(q), DIMS.hidden)
            assert rel_err(r["padded"]["out"], r["exact"]["out"]) <= 1e-6
            expected = torch.cat([r["exact"]["slots"]] * 2).sort().values
            assert torch.equal(r["padded"]["written"].sort().values, expected)
            assert torch.equal(r["exact"]["written"].sort().values, expected)


# The layout of a FULL-graph replay, run eagerly on CPU (no graph is captured here; the
# replays themselves run in e2e/test_gpu_graphs.py): vLLM pads a uniform decode / verify
# batch to a capture size by adding requests with no tokens (block table rows -> null
# block 0, slots -1), and the index tensors go through the same persistent buffers a
# capture-size batch filled first.
GRAPH_BATCHES = [(2, [20, 7, 40]), (1, [9, 3, 30, 12, 1]), (3, [5])]


def _run_graph_padded(group, strategy_name):
    from vllm_cp_nsa.nsa_attention import MetadataBuffers
    from vllm_cp_nsa.split_plan import InSeqSplit

    strategy = RoundRobinSplit() if strategy_name == "round-robin" else InSeqSplit()
    ops = get_ops("torch")
    stack = LayerStack(DIMS, 2, 0, group, FullMoeCommunicator())
    buffers = MetadataBuffers(256, "cpu")
    out = []
    for b, (q, contexts) in enumerate(GRAPH_BATCHES):
        num_reqs, num_tokens = len(contexts), q * len(contexts)
        size = next(s for s in cp_capture_sizes(cp_size=group.world_size, num_speculative_tokens=q - 1,
                                                max_num_seqs=16, max_num_batched_tokens=512,
                                                decode_only=True).sizes if s > num_tokens)
        results = {}
        # a capture-size batch (all real), the padded batch (same buffers), the unpadded batch
        runs = (("capture_size", [q] * (size // q), [3] * (size // q), size, True),
                ("padded", [q] * num_reqs + [0] * (size // q - num_reqs), contexts + [0] * (size // q - num_reqs),
                 size, True),
                ("eager", [q] * num_reqs, contexts, num_tokens, False))
        for name, query_lens, context_lens, rows, graph_padded in runs:
            batch = paged_batch(query_lens, context_lens, null_block=True)
            batch.block_table[num_reqs if name == "padded" else len(query_lens):] = 0
            caches = make_caches(DIMS, 2, num_cache_blocks(batch, null_block=True), batch.block_size, "auto",
                                 torch.float32, "cpu")
            for cache in caches:
                cache.latent.fill_(7.0)
                cache.index.fill_(7.0)
            real = sum(query_lens)
            hidden = torch.cat([random_hidden(real, DIMS.hidden, seed=b), torch.full((rows - real, DIMS.hidden), 1e3)])
            result = stack(hidden, batch, caches, group, strategy, ops, max_decode_query_len=q,
                           graph_padded=graph_padded, buffers=buffers if graph_padded else None)
            written = torch.cat([(cache.latent != 7.0).view(-1, cache.latent.shape[-1]).any(1).nonzero().flatten()
                                 for cache in caches])
            results[name] = dict(out=result, written=written, slots=batch.slot_mapping, rows=rows)
        out.append(results)
    return out


@pytest.mark.parametrize("strategy_name", ["round-robin", "in-seq"])
def test_graph_padded_batch_in_persistent_buffers_equals_unpadded(world, strategy_name):
    """Eager CPU runs of the padded layout a FULL graph replays (see the comment above)."""
    results = run_ranks(_run_graph_padded, world, strategy_name)
    for rank in range(world):
        for r, (q, contexts) in zip(results[rank], GRAPH_BATCHES):
            num_tokens = q * len(contexts)
            padded, eager = r["padded"], r["eager"]
            assert padded["out"].shape == (padded["rows"], DIMS.hidden)  # every input row comes back
            assert rel_err(padded["out"][:num_tokens], eager["out"]) <= 1e-6
            assert torch.isfinite(padded["out"]).all()
            expected = torch.cat([eager["slots"]] * 2).sort().values  # 2 layers, real tokens only
            assert torch.equal(padded["written"].sort().values, expected)
