"""A batch whose rows all have at most ``topk`` keys skips the indexer: its rows attend over
all their keys, which is what the indexer's top-k would select (checked here against the
indexer itself), built once per forward; any other batch, decode / verify batches, and a
batch of unknown length keep the indexer."""

import dataclasses

import pytest
import torch

from vllm_cp_nsa.kernels.dispatch import get_ops
from vllm_cp_nsa.nsa_attention import NsaCaches, build_forward_metadata, nsa_attention, select_topk_positions
from vllm_cp_nsa.reference_model import PagedBatch
from vllm_cp_nsa.split_plan import RoundRobinSplit

BLOCK, MAX_BLOCKS, TOPK, INDEX_HEADS, HEADS = 8, 6, 32, 4, 4


class _CountingOps:
    """The torch provider, counting indexer calls."""

    def __init__(self):
        self.ops, self.indexer_calls = get_ops("torch"), 0

    def indexer_topk(self, *args, **kwargs):
        self.indexer_calls += 1
        return self.ops.indexer_topk(*args, **kwargs)

    def indexer_topk_decode(self, *args, **kwargs):
        self.indexer_calls += 1
        return self.ops.indexer_topk_decode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.ops, name)


def _batch_and_caches(query_lens, context_lens, gen):
    batch = PagedBatch(query_lens=query_lens, context_lens=context_lens, block_size=BLOCK,
                       max_blocks_per_req=MAX_BLOCKS)  # fmt: skip
    num_slots = batch.num_blocks * BLOCK
    latent = torch.zeros(batch.num_blocks, BLOCK, 576)
    index = torch.zeros(batch.num_blocks, BLOCK, 128)
    ops = get_ops("torch")
    ops.write_latent_cache(latent, torch.randn(num_slots, 512, generator=gen), torch.randn(num_slots, 64, generator=gen),
                           torch.arange(num_slots), "auto")  # fmt: skip
    ops.write_indexer_cache(index, torch.randn(num_slots, 128, generator=gen), torch.arange(num_slots), BLOCK, False)
    return batch, NsaCaches(latent, index, "auto", False)


def _meta(batch, max_seq_len, cp_size=1, cp_rank=0, max_decode_query_len=1):
    strategy = RoundRobinSplit() if cp_size > 1 else None
    return build_forward_metadata(batch.query_lens, batch.slot_mapping, batch.block_table, BLOCK, cp_size, cp_rank,
                                  strategy, 0, max_decode_query_len, "cpu", max_seq_len=max_seq_len)  # fmt: skip


def _local_positions(batch, meta):
    return batch.positions[meta.plan.local_token_idx.clamp(min=0)]


def _picks(positions):
    return [sorted(p for p in row if p >= 0) for row in positions.tolist()]


@pytest.mark.parametrize("cp_size,cp_rank", [(1, 0), (2, 0), (2, 1)])
def test_rows_get_every_key_the_indexer_would_pick_without_the_indexer(cp_size, cp_rank):
    gen = torch.Generator().manual_seed(10 * cp_size + cp_rank)
    # a prefill, a chunk after 13 cached tokens, a decode row: the longest sequence has 30 keys
    batch, caches = _batch_and_caches([17, 9, 1], [0, 13, 29], gen)
    max_seq_len = max(q + c for q, c in zip(batch.query_lens, batch.context_lens))
    assert max_seq_len == 30 <= TOPK
    meta = _meta(batch, max_seq_len, cp_size, cp_rank)
    positions = _local_positions(batch, meta)
    rows = positions.shape[0]
    index_q = torch.randn(rows, INDEX_HEADS, 128, generator=gen)
    weights = torch.randn(rows, INDEX_HEADS, generator=gen)
    ops = _CountingOps()

    got = select_topk_positions(index_q, weights, positions, meta, caches, TOPK, ops)
    assert ops.indexer_calls == 0
    assert got.dtype == torch.int32 and got.shape == (rows, max_seq_len)
    kv_len = meta.local_kv_len(positions)
    want = ops.ops.indexer_topk(index_q, weights, caches.index, meta.block_table, meta.local_req, kv_len, TOPK, BLOCK,
                                False)  # fmt: skip
    assert _picks(got) == _picks(want)
    assert _picks(got) == [list(range(n)) for n in kv_len.tolist()]  # every key, padding rows none
    # the next layer of the same forward gets the same tensor
    assert select_topk_positions(index_q, weights, positions, meta, caches, TOPK, ops) is got


def test_longer_batches_decode_batches_and_unknown_lengths_keep_the_indexer():
    gen = torch.Generator().manual_seed(3)
    long_batch, caches = _batch_and_caches([20, 3], [20, 0], gen)
    decode_batch, _ = _batch_and_caches([1, 1], [5, 9], gen)
    cases = [
        (long_batch, _meta(long_batch, 40)),  # 40 keys > TOPK: the indexer chooses
        (long_batch, _meta(long_batch, None)),  # length unknown
        (decode_batch, _meta(decode_batch, 10)),  # decode: captured in CUDA graphs, no host branch
    ]
    assert cases[2][1].use_decode_kernel
    for batch, meta in cases:
        positions = _local_positions(batch, meta)
        rows = positions.shape[0]
        ops = _CountingOps()
        got = select_topk_positions(torch.randn(rows, INDEX_HEADS, 128, generator=gen),
                                    torch.randn(rows, INDEX_HEADS, generator=gen), positions, meta, caches, TOPK, ops)
        assert ops.indexer_calls == 1 and got.shape == (rows, TOPK)


def test_attention_over_every_key_equals_the_indexer_path():
    """The layer's output with the indexer skipped equals the output through the indexer
    (same keys, another order) on the same batch."""
    gen = torch.Generator().manual_seed(5)
    batch, caches = _batch_and_caches([12, 7], [0, 18], gen)
    meta = _meta(batch, 25)
    rows = batch.positions.shape[0]
    inputs = dict(
        q_nope=torch.randn(rows, HEADS, 16, generator=gen), q_pe=torch.randn(rows, HEADS, 64, generator=gen),
        kv_c=torch.randn(rows, 512, generator=gen), k_pe=torch.randn(rows, 64, generator=gen),
        index_q=torch.randn(rows, INDEX_HEADS, 128, generator=gen), index_weights=torch.randn(rows, INDEX_HEADS, generator=gen),
        index_k=torch.randn(rows, 128, generator=gen), local_positions=batch.positions,
        w_uk_t=torch.randn(HEADS, 16, 512, generator=gen) / 8, w_uv=torch.randn(HEADS, 512, 8, generator=gen) / 8,
        caches=caches, topk=TOPK, sm_scale=576**-0.5, group=None,
    )  # fmt: skip
    skipping, indexing = _CountingOps(), _CountingOps()
    out = nsa_attention(meta=meta, ops=skipping, **inputs)
    ref = nsa_attention(meta=dataclasses.replace(meta, max_seq_len=None), ops=indexing, **inputs)
    assert skipping.indexer_calls == 0 and indexing.indexer_calls == 1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _kv_up(w_uk_t, w_uv):
    """kv_b_proj as the layer holds it: per head the P key dims (W_UK) then the V value dims (W_UV)."""

    def up(kv_c):
        k_nope = torch.einsum("tc,hpc->thp", kv_c, w_uk_t)
        v = torch.einsum("tc,hcv->thv", kv_c, w_uv)
        return torch.cat([k_nope, v], dim=-1).flatten(1)

    return up


def _layer_inputs(rows, gen, caches, positions):
    return dict(
        q_nope=torch.randn(rows, HEADS, 16, generator=gen), q_pe=torch.randn(rows, HEADS, 64, generator=gen),
        kv_c=torch.randn(rows, 512, generator=gen), k_pe=torch.randn(rows, 64, generator=gen),
        index_q=torch.randn(rows, INDEX_HEADS, 128, generator=gen), index_weights=torch.randn(rows, INDEX_HEADS, generator=gen),
        index_k=torch.randn(rows, 128, generator=gen), local_positions=positions,
        w_uk_t=torch.randn(HEADS, 16, 512, generator=gen) / 8, w_uv=torch.randn(HEADS, 512, 8, generator=gen) / 8,
        caches=caches, topk=TOPK, sm_scale=576**-0.5, group=None,
    )  # fmt: skip


def test_whole_prompts_run_dense_causal_attention_equal_to_the_sparse_path():
    """Prompts with nothing cached, all within topk: the dense MHA form (keys and values
    up-projected, causal attention per prompt) gives the sparse path's output, without the
    indexer or the sparse kernels."""
    gen = torch.Generator().manual_seed(8)
    batch, caches = _batch_and_caches([11, 1, 20], [0, 0, 0], gen)
    real = batch.positions.shape[0]
    meta = build_forward_metadata(batch.query_lens, batch.slot_mapping, batch.block_table, BLOCK, 1, 0, None, 0, 1,
                                  "cpu", max_seq_len=20, seq_lens=[11, 1, 20])  # fmt: skip
    prompts = meta.whole_prompts
    assert prompts is not None and prompts.cu_seqlens.tolist() == [0, 11, 12, 32]
    assert (prompts.max_len, prompts.num_tokens) == (20, 32) == (20, real)
    inputs = _layer_inputs(real, gen, caches, batch.positions)
    dense_ops, sparse_ops = _CountingOps(), _CountingOps()
    calls = []
    dense_ops.dense_causal_attention = lambda *a: calls.append(a[3].tolist()) or dense_ops.ops.dense_causal_attention(*a)
    out = nsa_attention(meta=meta, ops=dense_ops, kv_up_proj=_kv_up(inputs["w_uk_t"], inputs["w_uv"]), **inputs)
    ref = nsa_attention(meta=meta, ops=sparse_ops, **inputs)  # no kv_up_proj: the sparse path
    assert calls == [[0, 11, 12, 32]] and dense_ops.indexer_calls == 0
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["context", "split", "decode", "no seq_lens", "longer than topk"])
def test_batches_that_are_not_whole_prompts_keep_the_sparse_path(case):
    lens = {"context": ([9, 4], [9, 6]), "split": ([9, 4], [9, 4]), "decode": ([1, 1], [1, 1]),
            "no seq_lens": ([9, 4], None), "longer than topk": ([40, 4], [40, 4])}[case]  # fmt: skip
    query_lens, seq_lens = lens
    gen = torch.Generator().manual_seed(9)
    batch, caches = _batch_and_caches(query_lens, [s - q for s, q in zip(seq_lens or query_lens, query_lens)], gen)
    cp_size = 2 if case == "split" else 1
    meta = build_forward_metadata(batch.query_lens, batch.slot_mapping, batch.block_table, BLOCK, cp_size, 0,
                                  RoundRobinSplit() if cp_size > 1 else None, 0, 1, "cpu",
                                  max_seq_len=max(seq_lens or query_lens), seq_lens=seq_lens)  # fmt: skip
    assert (meta.whole_prompts is not None) == (case == "longer than topk")  # whole, but past topk
    positions = _local_positions(batch, meta)
    inputs = _layer_inputs(positions.shape[0], gen, caches, positions)
    ops = _CountingOps()
    ops.dense_causal_attention = None  # must not be reached
    if case == "split":  # the other rank's rows: a group that gathers nothing new is enough here
        inputs["group"] = _SoloGroup(cp_size)
    nsa_attention(meta=meta, ops=ops, kv_up_proj=_kv_up(inputs["w_uk_t"], inputs["w_uv"]), **inputs)
    assert ops.indexer_calls == (1 if case in ("decode", "longer than topk") else 0)


class _SoloGroup:
    """A CP group of one process standing in for ``world_size`` ranks: its all-gather repeats
    the local rows (the values do not matter where only the path is checked)."""

    def __init__(self, world_size):
        self.world_size, self.rank = world_size, 0

    def all_gather(self, x):
        return torch.cat([x] * self.world_size)
