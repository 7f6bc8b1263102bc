"""Target-verify batches (1+k query tokens per request) take the decode attention path;
it gives the same outputs as the prefill path on the same inputs."""

import dataclasses

import pytest
import torch

from vllm_cp_nsa.communicator import gather_token_rows
from vllm_cp_nsa.kernels.dispatch import get_ops
from vllm_cp_nsa.nsa_attention import build_forward_metadata
from vllm_cp_nsa.reference_model import Dims, NsaLayer, PagedBatch, make_caches, random_hidden


class _SoloGroup:
    world_size, rank = 1, 0

    def all_gather(self, x):
        return x

    def all_reduce(self, x):
        return x


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_ds_mla"])
@pytest.mark.parametrize("num_spec", [1, 3])
def test_verify_batch_uses_decode_path_and_matches_prefill_path(kv_cache_dtype, num_spec):
    dims = Dims(topk=16)
    layer = NsaLayer(dims, torch.Generator().manual_seed(0))
    batch = PagedBatch(query_lens=[1 + num_spec] * 4, context_lens=[40, 5, 23, 70], block_size=16,
                       max_blocks_per_req=8)
    x = random_hidden(sum(batch.query_lens), dims.hidden, seed=1)
    outs = {}
    for forced in ("decode", "prefill"):
        caches = make_caches(dims, 1, batch.num_blocks, 16, kv_cache_dtype, torch.float32, "cpu")[0]
        # Same cached context for both runs.
        gen = torch.Generator().manual_seed(2)
        ops = get_ops("torch")
        for r, c in enumerate(batch.context_lens):
            slots = r * 8 * 16 + torch.arange(c)
            ops.write_latent_cache(caches.latent, torch.randn(c, 512, generator=gen), torch.randn(c, 64, generator=gen),
                                   slots, kv_cache_dtype)
            ops.write_indexer_cache(caches.index, torch.randn(c, 128, generator=gen), slots, 16,
                                    kv_cache_dtype == "fp8_ds_mla")
        meta = build_forward_metadata(batch.query_lens, batch.slot_mapping, batch.block_table, 16, 1, 0, None, 0,
                                      1 + num_spec, "cpu")
        assert meta.use_decode_kernel  # a verify batch is routed to the decode path
        if forced == "prefill":
            meta = dataclasses.replace(meta, use_decode_kernel=False)
        out = layer(x, batch.positions, meta, caches, _SoloGroup(), ops)
        outs[forced] = gather_token_rows(out, meta.plan, _SoloGroup())
    assert torch.allclose(outs["decode"], outs["prefill"], rtol=1e-5, atol=1e-6)
    # A mixed batch (one prefill chunk) takes the prefill path.
    mixed = build_forward_metadata([1 + num_spec, 9], torch.arange(10 + num_spec), batch.block_table[:2], 16, 1, 0,
                                   None, 0, 1 + num_spec, "cpu")
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
