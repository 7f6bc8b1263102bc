"""Target-verify batches (1+k query tokens per request) take the decode attention path;
it attends like softmax attention over the picked keys, computed here from the cache bytes."""

import dataclasses

import pytest
import torch

from vllm_cp_nsa.kernels.dispatch import get_ops
from vllm_cp_nsa.nsa_attention import NsaCaches, build_forward_metadata, sparse_attention
from vllm_cp_nsa.reference_model import PagedBatch

BLOCK, MAX_BLOCKS, HEADS, TOPK = 16, 8, 4, 16


def _latent_rows(cache: torch.Tensor, slots: torch.Tensor, kv_cache_dtype: str) -> torch.Tensor:
    """[len(slots), 576] float64 latent rows at ``slots``: plain rows, or fp8_ds_mla's 656
    bytes (512 fp8 values, 4 fp32 scales of 128 values each, 64 bf16 rope values)."""
    if kv_cache_dtype != "fp8_ds_mla":
        return cache.reshape(-1, 576)[slots].double()
    raw = cache.reshape(-1, 656)[slots]
    values = raw[:, :512].contiguous().view(torch.float8_e4m3fn).double()
    scales = raw[:, 512:528].contiguous().view(torch.float32).double().repeat_interleave(128, dim=1)
    rope = raw[:, 528:].contiguous().view(torch.bfloat16).double()
    return torch.cat([values * scales, rope], dim=1)


def _expected(q, positions, local_req, block_table, cache, kv_cache_dtype, scale):
    """Softmax attention of each row over its picked positions' latent rows (values: the
    first 512 dims); a row with no picks gives zeros."""
    out = torch.zeros(q.shape[0], HEADS, 512, dtype=torch.float64)
    for m in range(q.shape[0]):
        picked = positions[m][positions[m] >= 0].long()
        if local_req[m] < 0 or picked.numel() == 0:
            continue
        slots = block_table[local_req[m], picked // BLOCK].long() * BLOCK + picked % BLOCK
        rows = _latent_rows(cache, slots, kv_cache_dtype)
        probs = torch.softmax(q[m].double() @ rows.T * scale, dim=-1)  # [H, k]
        out[m] = probs @ rows[:, :512]
    return out


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_ds_mla"])
@pytest.mark.parametrize("num_spec", [1, 3])
def test_verify_batch_takes_the_decode_path_and_attends_over_its_picks(kv_cache_dtype, num_spec):
    gen = torch.Generator().manual_seed(num_spec)
    batch = PagedBatch(query_lens=[1 + num_spec] * 4, context_lens=[40, 5, 23, 70], block_size=BLOCK,
                       max_blocks_per_req=MAX_BLOCKS)
    fp8 = kv_cache_dtype == "fp8_ds_mla"
    latent = torch.zeros(batch.num_blocks, BLOCK, 656 if fp8 else 576, dtype=torch.uint8 if fp8 else torch.float32)
    ops = get_ops("torch")
    num_slots = batch.num_blocks * BLOCK
    ops.write_latent_cache(latent, torch.randn(num_slots, 512, generator=gen), torch.randn(num_slots, 64, generator=gen),
                           torch.arange(num_slots), kv_cache_dtype)  # fmt: skip
    caches = NsaCaches(latent, torch.zeros(0), kv_cache_dtype, fp8)
    meta = build_forward_metadata(batch.query_lens, batch.slot_mapping, batch.block_table, BLOCK, 1, 0, None, 0,
                                  1 + num_spec, "cpu")  # fmt: skip
    assert meta.use_decode_kernel  # a verify batch is routed to the decode path
    rows = batch.positions.shape[0]
    positions = torch.full((rows, TOPK), -1, dtype=torch.int32)
    for m, pos in enumerate(batch.positions.tolist()):  # distinct causal picks, some -1 left
        picks = torch.randperm(pos + 1, generator=gen)[: min(pos + 1, TOPK - 2)]
        positions[m, : picks.numel()] = picks.int()
    q = torch.randn(rows, HEADS, 576, generator=gen)
    scale = 576**-0.5
    expected = _expected(q, positions, meta.local_req, batch.block_table, latent, kv_cache_dtype, scale)
    decode = sparse_attention(q, positions, meta, caches, scale, ops)
    assert torch.allclose(decode.double(), expected, rtol=1e-4, atol=1e-5)
    prefill_meta = dataclasses.replace(meta, use_decode_kernel=False)
    assert torch.allclose(sparse_attention(q, positions, prefill_meta, caches, scale, ops).double(), expected,
                          rtol=1e-4, atol=1e-5)  # fmt: skip
    # A mixed batch (one prefill chunk) takes the prefill path.
    mixed = build_forward_metadata([1 + num_spec, 9], torch.arange(10 + num_spec), batch.block_table[:2], BLOCK, 1, 0,
                                   None, 0, 1 + num_spec, "cpu")  # fmt: skip
    assert not mixed.use_decode_kernel


@pytest.mark.parametrize("graph_padded", [False, True])
def test_decode_attention_tp_leaves_decode_batches_unsplit(graph_padded):
    """split_decode=False: a decode / verify batch is not split (every rank holds every row,
    graph padding included, as padding rows); a batch with a prefill piece still is."""
    from vllm_cp_nsa.split_plan import RoundRobinSplit

    kwargs = dict(block_table=torch.zeros(4, 8, dtype=torch.int32), block_size=16, cp_size=2, cp_rank=1,
                  strategy=RoundRobinSplit(), min_tokens_for_cp=0, max_decode_query_len=2, device="cpu",
                  split_decode=False)  # fmt: skip
    num_input = 8 if graph_padded else 6
    decode = build_forward_metadata([2, 2, 2], torch.arange(num_input), num_input_tokens=num_input,
                                    graph_padded=graph_padded, **kwargs)  # fmt: skip
    assert decode.use_decode_kernel and not decode.plan.is_split
    assert decode.plan.skip_reason == "decode attention on a TP partition"
    assert decode.plan.num_tokens == num_input and decode.num_local_rows == num_input
    assert decode.local_req.tolist() == [0, 0, 1, 1, 2, 2] + [-1] * (num_input - 6)
    prefill = build_forward_metadata([5, 2, 2], torch.arange(9), **kwargs)
    assert not prefill.use_decode_kernel and prefill.plan.is_split
    split_too = build_forward_metadata([2, 2, 2], torch.arange(6), **{**kwargs, "split_decode": True})
    assert split_too.plan.is_split


def test_uniform_decode_batches_state_their_rows_per_request():
    """``decode_next_n``: a decode / verify batch run unsplit whose requests (graph padding
    included) all have the same query length states it; mixed lengths, prefill pieces and
    split batches state 0 (their rows are not [requests, next_n])."""
    from vllm_cp_nsa.split_plan import RoundRobinSplit

    kwargs = dict(block_table=torch.zeros(4, 8, dtype=torch.int32), block_size=16, cp_size=1, cp_rank=0,
                  strategy=None, min_tokens_for_cp=0, max_decode_query_len=2, device="cpu")  # fmt: skip

    def next_n(query_lens, num_input=None, **more):
        num_input = num_input or sum(query_lens)
        meta = build_forward_metadata(query_lens, torch.arange(num_input), num_input_tokens=num_input,
                                      graph_padded=num_input > sum(query_lens), **{**kwargs, **more})  # fmt: skip
        return meta.decode_next_n

    assert next_n([2, 2, 2]) == 2
    assert next_n([2, 2, 2], num_input=8) == 2  # a graph-padded verify batch: a padding request of 2
    assert next_n([1, 1], **{**kwargs, "max_decode_query_len": 1}) == 1
    assert next_n([1, 1, 1], num_input=4, **{**kwargs, "max_decode_query_len": 1}) == 1
    assert next_n([2, 1, 2]) == 0  # a request with fewer rows
    assert next_n([2, 2, 2], num_input=7) == 0  # padding that is not a whole request
    assert next_n([5, 2]) == 0  # a prefill piece
    split = dict(cp_size=2, cp_rank=1, strategy=RoundRobinSplit())
    assert next_n([2, 2, 2], **split) == 0
    assert next_n([2, 2, 2], **split, split_decode=False) == 2  # decode attention "tp": unsplit rows


class _RecordingOps:
    """Which indexer entry point ``select_topk_positions`` calls, with what layout."""

    def __init__(self):
        self.calls = []

    def indexer_topk(self, *args, **kwargs):
        self.calls.append(("indexer_topk", None))
        return torch.zeros(1, 1, dtype=torch.int32)

    def indexer_topk_decode(self, q, weights, cache, table, row_req, kv_len, next_n, topk, block_size, fp8):
        self.calls.append(("indexer_topk_decode", next_n, row_req.tolist(), kv_len.tolist()))
        return torch.zeros(1, 1, dtype=torch.int32)


def test_decode_rows_reach_the_indexer_with_their_layout():
    from vllm_cp_nsa.nsa_attention import select_topk_positions

    caches = NsaCaches(torch.zeros(0), torch.zeros(0), "auto", True)
    kwargs = dict(block_table=torch.zeros(4, 8, dtype=torch.int32), block_size=16, cp_size=1, cp_rank=0,
                  strategy=None, min_tokens_for_cp=0, max_decode_query_len=2, device="cpu")  # fmt: skip
    verify = build_forward_metadata([2, 2], torch.arange(6), num_input_tokens=6, graph_padded=True, **kwargs)
    ops = _RecordingOps()
    select_topk_positions(torch.zeros(6, 4, 128), torch.zeros(6, 4), torch.tensor([40, 41, 9, 10, 0, 0]), verify,
                          caches, 2048, ops)  # fmt: skip
    assert ops.calls == [("indexer_topk_decode", 2, [0, 0, 1, 1, -1, -1], [41, 42, 10, 11, 0, 0])]
    mixed = build_forward_metadata([2, 1], torch.arange(3), **kwargs)
    select_topk_positions(torch.zeros(3, 4, 128), torch.zeros(3, 4), torch.tensor([40, 41, 9]), mixed, caches,
                          2048, ops)  # fmt: skip
    assert ops.calls[-1] == ("indexer_topk", None)
