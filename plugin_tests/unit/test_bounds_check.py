"""The opt-in bounds checks (``VLLM_CP_NSA_CHECK_BOUNDS=1``): a batch whose indices stay inside
the block table and the caches passes; each kind of index that would send a kernel outside
them is named; the attention runs them before it writes anything, only when asked."""

from __future__ import annotations

import pytest
import torch

from vllm_cp_nsa import nsa_attention as nsa
from vllm_cp_nsa.bounds_check import CHECK_BOUNDS_ENV, batch_bounds_errors, bounds_checks_enabled, check_batch_bounds
from vllm_cp_nsa.nsa_attention import NsaCaches, build_forward_metadata

BLOCK, NUM_BLOCKS = 16, 8


def _batch(query_lens=(5, 3), context=(0, 20), max_seq_len=None):
    """Two requests' metadata over blocks 0..7 (request r: blocks 4r..4r+3) and their rows' positions."""
    table = torch.arange(NUM_BLOCKS, dtype=torch.int32).view(2, 4)
    positions = torch.cat([torch.arange(c, c + n) for c, n in zip(context, query_lens)])
    slots = torch.cat([table[r].long().repeat_interleave(BLOCK)[c : c + n] * BLOCK + torch.arange(c, c + n) % BLOCK
                       for r, (c, n) in enumerate(zip(context, query_lens))])  # fmt: skip
    meta = build_forward_metadata(list(query_lens), slots, table, BLOCK, 1, 0, None, 0, 1, "cpu",
                                  max_seq_len=max_seq_len)  # fmt: skip
    return meta, positions


def _errors(meta, positions, num_blocks=NUM_BLOCKS, slots=None):
    return batch_bounds_errors(meta.local_req, meta.local_kv_len(positions),
                               meta.slot_mapping if slots is None else slots, meta.block_table, BLOCK, num_blocks)  # fmt: skip


def test_a_batch_inside_its_table_and_caches_passes():
    meta, positions = _batch()
    assert _errors(meta, positions) == []
    check_batch_bounds(meta.local_req, meta.local_kv_len(positions), meta.slot_mapping, meta.block_table, BLOCK,
                       NUM_BLOCKS)  # fmt: skip


def test_padding_rows_are_not_checked():
    meta, positions = _batch()
    local_req = torch.cat([meta.local_req, torch.tensor([-1, -1])])
    kv_len = torch.cat([meta.local_kv_len(positions), torch.tensor([0, 10**6])])
    slots = torch.cat([meta.slot_mapping, torch.tensor([-1, -1])])
    assert batch_bounds_errors(local_req, kv_len, slots, meta.block_table, BLOCK, NUM_BLOCKS) == []


def test_keys_past_a_narrowed_table_are_named():
    """A prefill batch keeps only the columns its ``max_seq_len`` needs; a key length past them
    would read columns the table no longer has."""
    meta, positions = _batch(max_seq_len=25)  # 2 columns of 16: positions up to 31
    assert meta.block_table.shape[1] == 2 and _errors(meta, positions) == []
    kv_len = meta.local_kv_len(positions).clone()
    kv_len[-1] = 41
    (error,) = batch_bounds_errors(meta.local_req, kv_len, meta.slot_mapping, meta.block_table, BLOCK, NUM_BLOCKS)
    assert "key ranges up to 41 beyond the block table's 2 columns x 16 = 32 positions: rows [7]" in error


def test_positions_past_the_table_read_no_further_than_it():
    """vLLM 0.34 captures the MTP drafter's prefill graphs with a dummy batch while the drafter
    reads stale positions (up to max_model_len - 1): the key lengths stop at the table's width,
    so the checks pass; positions inside it keep their own lengths."""
    meta, positions = _batch(max_seq_len=25)  # 2 columns of 16
    inside = meta.local_kv_len(positions).tolist()
    stale = positions.clone()
    stale[-1], stale[0] = 2047, 40
    kv_len = meta.local_kv_len(stale)
    assert kv_len.tolist() == [32] + inside[1:-1] + [32]
    assert _errors(meta, stale) == []


def test_blocks_outside_the_cache_are_named():
    meta, positions = _batch()  # request 1's keys 0..22 lie in its first two blocks, 4 and 5
    assert _errors(meta, positions, num_blocks=6) == []
    meta, positions = _batch(context=(0, 40))  # its keys reach its third block, block 6
    errors = _errors(meta, positions, num_blocks=6)
    assert errors == ["request 1: block-table columns [2] name blocks [6] of a 6-block cache",
                      "new tokens [5, 6, 7] map to slots [104, 105, 106] of 96"]  # fmt: skip


def test_slots_outside_the_cache_and_requests_outside_the_table_are_named():
    meta, positions = _batch()
    slots = meta.slot_mapping.clone()
    slots[2] = NUM_BLOCKS * BLOCK
    (error,) = _errors(meta, positions, slots=slots)
    assert error == f"new tokens [2] map to slots [{NUM_BLOCKS * BLOCK}] of {NUM_BLOCKS * BLOCK}"
    errors = batch_bounds_errors(torch.tensor([0, 2]), torch.tensor([1, 1]), torch.tensor([0, 1]), meta.block_table,
                                 BLOCK, NUM_BLOCKS)  # fmt: skip
    assert errors == ["local rows name requests 0..2 of a 2-request block table"]
    assert batch_bounds_errors(torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([0]), meta.block_table, BLOCK,
                               NUM_BLOCKS) == ["2 local rows but 1 key lengths"]  # fmt: skip


@pytest.mark.parametrize("enabled", [False, True])
def test_the_attention_checks_before_it_writes_only_when_asked(monkeypatch, enabled):
    if enabled:
        monkeypatch.setenv(CHECK_BOUNDS_ENV, "1")
    else:
        monkeypatch.delenv(CHECK_BOUNDS_ENV, raising=False)
    assert bounds_checks_enabled() is enabled

    class Written(Exception):
        pass

    def write(*args):
        raise Written

    monkeypatch.setattr(nsa, "write_new_tokens", write)
    meta, positions = _batch(max_seq_len=25)
    small = 4  # caches of 4 blocks: request 1's blocks 4 and 5 lie outside them
    caches = NsaCaches(latent=torch.zeros(small, BLOCK, 656, dtype=torch.uint8),
                       index=torch.zeros(small, BLOCK * 132, dtype=torch.uint8), kv_cache_dtype="fp8_ds_mla",
                       index_fp8=True)  # fmt: skip
    n, empty = positions.shape[0], torch.empty(0)
    with pytest.raises(ValueError if enabled else Written, match="of a 4-block cache" if enabled else None):
        nsa.nsa_attention(q_nope=torch.zeros(n, 2, 32), q_pe=empty, kv_c=empty, k_pe=empty, index_q=empty,
                          index_weights=empty, index_k=empty, local_positions=positions, w_uk_t=empty,
                          w_uv=torch.zeros(2, 512, 32), meta=meta, caches=caches, topk=2048, sm_scale=1.0, group=None,
                          ops=None)  # fmt: skip
