"""Sizing of the attention scratch vLLM's memory profile must see (vllm_cp_nsa/scratch.py).

The expected numbers are written out here from the allocations of ``nsa_attention`` and the
GPU providers (indexer logits chunk, FlashMLA's padded query / output, the fp8 prefill's
bf16 workspace), not taken from the module under test.
"""

from vllm_cp_nsa.scratch import AttentionShape, BatchBounds, IndexerLimits, attention_phase_bytes, \
    attention_scratch_bytes  # fmt: skip

MIB = 1024**2
# DeepSeek-V3.2 per rank (all heads under CP), bf16, a 64-token-block engine at 160K context.
V32 = AttentionShape(num_heads=128, v_head_dim=128, index_heads=64, topk=2048, dtype_bytes=2, fp8_latent_cache=True)
BOUNDS = BatchBounds(max_rows=8192, max_reqs=256, max_model_len=163840, block_size=64)
VLLM_PROVIDER = IndexerLimits(max_logits_bytes=256 * MIB, max_workspace_bytes=256 * MIB)


def test_each_phase_at_deepseek_v32_shapes():
    phases = attention_phase_bytes(BOUNDS, V32, VLLM_PROVIDER)
    rows, e = 8192, 2
    # new latent (512) + rope (64) + indexer key (128) rows: local, gathered, reordered
    assert phases["gather"] == 3 * rows * 704 * e
    # 409 rows of 163840 fp32 logits fit 256 MiB; top-k scratch of 2048 int32 per chunk row
    chunk = (256 * MIB) // (4 * 163840)
    assert chunk == 409
    picks = rows * 2048 * 4
    assert phases["indexer"] == picks + chunk * 163840 * 4 + chunk * 2048 * 4 + rows * 64 * (4 + 128 * 2)
    # absorbed query, int64 slots + int32 kernel indices, 256 MiB workspace (256 requests x
    # 160K positions x 1152 B would be 45 GiB: the provider caps it), output and lse (128
    # heads: FlashMLA takes the query as it is)
    output = rows * 128 * (512 * e + 4)
    assert phases["attention"] == picks + rows * 128 * 576 * e + rows * 2048 * 12 + 256 * MIB + output
    assert phases["values"] == output + rows * 128 * 128 * e
    assert phases["dense"] == rows * 128 * ((128 + 128) + 2 * (128 + 64) + 128) * e  # kv up, q, k, output
    assert attention_scratch_bytes(BOUNDS, V32, VLLM_PROVIDER) == max(phases.values()) == phases["attention"]
    assert 2600 * MIB < phases["attention"] < 2700 * MIB  # what one layer's attention adds


def test_logits_chunk_is_capped_but_keeps_at_least_one_row():
    logits_row = 163840 * 4

    def indexer(cap):
        return attention_phase_bytes(BOUNDS, V32, IndexerLimits(max_logits_bytes=cap))["indexer"]

    row_bytes = logits_row + 2048 * 4  # logits + top-k scratch of one chunk row
    assert indexer(3 * logits_row) - indexer(2 * logits_row) == row_bytes
    assert indexer(3 * logits_row + logits_row - 1) == indexer(3 * logits_row)  # whole rows only
    assert indexer(1) == indexer(logits_row)  # a row longer than the cap still gets one row
    uncapped = BatchBounds(max_rows=4, max_reqs=4, max_model_len=1000, block_size=64)
    # every row fits: 4 rows of 1024 keys (1000 rounded up to whole blocks)
    assert (attention_phase_bytes(uncapped, V32, IndexerLimits(256 * MIB))["indexer"]
            == 4 * 2048 * 4 + 4 * 1024 * 4 + 4 * 2048 * 4 + 4 * 64 * (4 + 256))


def test_workspace_only_for_an_fp8_cache_and_a_provider_that_has_one():
    bf16_cache = AttentionShape(**{**V32.__dict__, "fp8_latent_cache": False})
    with_ws = attention_phase_bytes(BOUNDS, V32, VLLM_PROVIDER)["attention"]
    assert attention_phase_bytes(BOUNDS, bf16_cache, VLLM_PROVIDER)["attention"] == with_ws - 256 * MIB
    assert attention_phase_bytes(BOUNDS, V32, IndexerLimits(256 * MIB))["attention"] == with_ws - 256 * MIB
    few = BatchBounds(max_rows=8192, max_reqs=2, max_model_len=1000, block_size=64)
    # below the cap: the requests' whole block-table width (1000 -> 1024 positions), bf16 rows
    assert (attention_phase_bytes(few, V32, VLLM_PROVIDER)["attention"]
            - attention_phase_bytes(few, bf16_cache, VLLM_PROVIDER)["attention"]) == 2 * 1024 * 576 * 2


def test_deepgemm_gathered_keys_count_in_the_indexer_phase():
    limits = IndexerLimits(512 * MIB, max_gathered_key_bytes=2 * MIB * 132)
    plain = attention_phase_bytes(BOUNDS, V32, IndexerLimits(512 * MIB))["indexer"]
    assert attention_phase_bytes(BOUNDS, V32, limits)["indexer"] == plain + 264 * MIB


def test_more_rows_need_more():
    grown = BatchBounds(**{**BOUNDS.__dict__, "max_rows": 16384})
    assert attention_scratch_bytes(grown, V32, VLLM_PROVIDER) > attention_scratch_bytes(BOUNDS, V32, VLLM_PROVIDER)


def test_few_heads_are_padded_to_flashmlas_64():
    tiny = AttentionShape(num_heads=4, v_head_dim=32, index_heads=16, topk=64, dtype_bytes=4, fp8_latent_cache=False)
    bounds = BatchBounds(max_rows=128, max_reqs=8, max_model_len=2048, block_size=16)
    phases = attention_phase_bytes(bounds, tiny, IndexerLimits(256 * MIB))
    output = 128 * 64 * (512 * 4 + 4)
    assert phases["values"] == output + 128 * 4 * 32 * 4
    assert phases["attention"] == (128 * 64 * 4 + 128 * 4 * 576 * 4 + 128 * 128 * 12
                                   + 128 * 64 * 576 * 4 + output)  # fmt: skip


def test_fp8_prefill_past_16k_rows_adds_one_piece_of_kernel_output():
    """Past 16K rows FlashMLA's fp8 kernel runs in pieces of 16K rows (int32 strides), each
    piece's output (128 heads x (512 bf16 + fp32 lse)) held beside the whole output."""
    piece = 16 * 1024 * 128 * (512 * 2 + 4)
    bf16_cache = AttentionShape(**{**V32.__dict__, "fp8_latent_cache": False})
    for rows, extra in [(16 * 1024, 0), (16 * 1024 + 1, piece), (65536, piece)]:
        bounds = BatchBounds(**{**BOUNDS.__dict__, "max_rows": rows})
        fp8 = attention_phase_bytes(bounds, V32, VLLM_PROVIDER)["attention"]
        bf16 = attention_phase_bytes(bounds, bf16_cache, VLLM_PROVIDER)["attention"]
        assert fp8 - bf16 == 256 * MIB + extra, rows
