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
