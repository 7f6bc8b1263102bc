"""One NSA layer under CP on 2-4 gloo ranks (DESIGN.md §2-§4).

- CP output == no-CP output (fp32, <= 1e-5 relative), round-robin and in-seq;
- every rank selects the same top-k for the same query as the no-CP run;
- padded rows never write the caches, never produce NaN, never change real rows;
  the caches are identical on every rank after the forward.

Run: .venv/bin/python -m pytest plugin_tests/distributed/test_cp_nsa_layer.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from cp_gloo_harness import (
    fill_context, gather_objects, num_cache_blocks, paged_batch, rel_err, run_ranks,
)
from vllm_cp_nsa.communicator import gather_token_rows
from vllm_cp_nsa.kernels.dispatch import get_ops
from vllm_cp_nsa.nsa_attention import build_forward_metadata, select_topk_positions, write_new_tokens
from vllm_cp_nsa.reference_model import Dims, NsaLayer, make_caches, random_hidden
from vllm_cp_nsa.split_plan import InSeqSplit, RoundRobinSplit

pytestmark = pytest.mark.distributed

DIMS = Dims(topk=16)
TOL = 1e-5
STRATEGIES = {"off": None, "round-robin-split": RoundRobinSplit(), "in-seq-split": InSeqSplit()}

# (query_lens, context_lens): prefill chunks over cached context, decodes, requests
# shorter than N, T not divisible by 2, 3 or 4, a pure-decode batch (decode kernel),
# and batches with fewer real tokens than ranks.
BATCHES = [
    ([23, 1, 1, 3, 13], [9, 30, 5, 0, 40]),  # T = 41
    ([37, 1, 5, 60, 2], [0, 20, 3, 10, 7]),  # T = 105
    ([50], [30]),  # one chunk after a 30-token prefix (in-seq's own case)
    ([1, 1, 1, 1, 1, 1, 1], [5, 9, 1, 17, 33, 2, 12]),  # decodes only, T = 7
    ([2, 1], [0, 4]),  # T = 3 < N for N = 4
    ([1], [12]),  # T = 1 < N
]


def _setup(group, query_lens, context_lens, mode, seed=0, poison=None, null_block=False):
    batch = paged_batch(query_lens, context_lens, null_block=null_block)
    caches = make_caches(DIMS, 1, num_cache_blocks(batch, null_block), batch.block_size, "auto",
                         torch.float32, "cpu")
    fill_context(caches, batch, seed=100 + seed, poison=poison)
    meta = build_forward_metadata(
        batch.query_lens, batch.slot_mapping, batch.block_table, batch.block_size, group.world_size,
        group.rank, STRATEGIES[mode], 0, 1, "cpu",
    )
    x = random_hidden(sum(query_lens), DIMS.hidden, seed=200 + seed)
    return batch, caches[0], meta, x


# --------------------------------------------------------------------------- CP == no-CP
def _layer_outputs(group):
    torch.manual_seed(0)
    ops = get_ops("torch")
    layer = NsaLayer(DIMS, torch.Generator().manual_seed(1))
    results = []
    for b, (q, c) in enumerate(BATCHES):
        per_mode = {}
        for mode in STRATEGIES:
            batch, cache, meta, x = _setup(group, q, c, mode, seed=b)
            plan = meta.plan
            out_local = layer(plan.take_local(x), plan.take_local(batch.positions), meta, cache, group, ops)
            per_mode[mode] = dict(
                out=gather_token_rows(out_local, plan, group),
                is_split=plan.is_split,
                decode=meta.use_decode_kernel,
                local_finite=bool(torch.isfinite(out_local).all()),
            )
        results.append(per_mode)
    return results


def test_nsa_layer_cp_equals_no_cp(world):
    results = run_ranks(_layer_outputs, world)
    for b, (q, _) in enumerate(BATCHES):
        ref = results[0][b]["off"]["out"]
        assert ref.shape == (sum(q), DIMS.hidden) and torch.isfinite(ref).all()
        for rank in range(world):
            # The unsplit path is the same computation on every rank.
            assert torch.equal(results[rank][b]["off"]["out"], ref)
            for mode in ("round-robin-split", "in-seq-split"):
                res = results[rank][b][mode]
                assert res["is_split"] == (sum(q) >= world), (q, mode)
                assert res["local_finite"], (q, mode, rank)
                err = rel_err(res["out"], ref)
                assert err <= TOL, f"batch {q} {mode} rank {rank}/{world}: rel err {err:.2e}"
    # The decode-only batch went through the decode kernel, the others through prefill.
    assert results[0][3]["round-robin-split"]["decode"] and not results[0][0]["round-robin-split"]["decode"]


# --------------------------------------------------------------------------- same top-k
def _topk_selections(group):
    ops = get_ops("torch")
    layer = NsaLayer(DIMS, torch.Generator().manual_seed(1))
    results = []
    for b, (q, c) in enumerate(BATCHES[:4]):
        per_mode = {}
        for mode in STRATEGIES:
            batch, cache, meta, x = _setup(group, q, c, mode, seed=b)
            plan = meta.plan
            xl, pl = plan.take_local(x), plan.take_local(batch.positions)
            q_nope, q_pe, kv_c, k_pe, iq, iw, ik = layer.project(xl, pl)
            write_new_tokens(kv_c, k_pe, ik, meta, cache, group, ops)
            sel = select_topk_positions(iq, iw, pl, meta, cache, DIMS.topk, ops)
            # Gather every rank's selection with its plan's local_token_idx.
            if plan.is_split:
                all_sel = group.all_gather(sel)
                all_idx = group.all_gather(plan.local_token_idx)
            else:
                all_sel, all_idx = sel, plan.local_token_idx
            real = all_idx >= 0
            by_token = torch.full((plan.num_tokens, DIMS.topk), -2, dtype=sel.dtype)
            by_token[all_idx[real]] = all_sel[real]
            per_mode[mode] = dict(
                by_token=by_token,
                padding_rows=sel[plan.local_padding_mask],
                positions=batch.positions,
            )
        results.append(per_mode)
    return results


def test_every_rank_selects_same_topk(world):
    results = run_ranks(_topk_selections, world)
    for b, (q, c) in enumerate(BATCHES[:4]):
        ref = results[0][b]["off"]["by_token"]
        positions = results[0][b]["off"]["positions"]
        # Non-trivial selections: each row has min(topk, pos + 1) valid slots, and some
        # rows have more candidates than topk (the choice is really sparse).
        valid = (ref >= 0).sum(1)
        assert torch.equal(valid, torch.clamp(positions + 1, max=DIMS.topk))
        assert bool((positions + 1 > DIMS.topk).any())
        for rank in range(world):
            assert torch.equal(results[rank][b]["off"]["by_token"], ref), f"no-CP top-k differs on rank {rank}"
            for mode in ("round-robin-split", "in-seq-split"):
                got = results[rank][b][mode]["by_token"]
                bad = (got != ref).any(1).nonzero().flatten().tolist()
                assert not bad, f"batch {q} {mode} rank {rank}/{world}: top-k differs for tokens {bad[:10]}"
                pad = results[rank][b][mode]["padding_rows"]
                assert bool((pad == -1).all()), "a padding row selected cache slots"


# --------------------------------------------------------------------------- padding & caches
def _nan_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _poisoned_run(group, null_block=False, batches=BATCHES, nan_padding_inputs=True):
    """Caches poisoned with NaN everywhere but the context; facts checked in the parent."""
    ops = get_ops("torch")
    layer = NsaLayer(DIMS, torch.Generator().manual_seed(1))
    results = []
    for b, (q, c) in enumerate(batches):
        per_mode = {}
        off_caches = None
        for mode in STRATEGIES:
            runs = {}
            for pad_fill in ((0.0, math.nan) if nan_padding_inputs else (0.0,)):
                batch, cache, meta, x = _setup(group, q, c, mode, seed=b, poison=math.nan, null_block=null_block)
                plan = meta.plan
                before = [t.clone() for t in (cache.latent, cache.index)]
                xl = plan.take_local(x).masked_fill(plan.local_padding_mask[:, None], pad_fill)
                out_local = layer(xl, plan.take_local(batch.positions), meta, cache, group, ops)
                after = [cache.latent, cache.index]
                new = batch.slot_mapping.long()
                facts = dict(
                    out_finite=bool(torch.isfinite(out_local).all()),
                    padding_out_finite=bool(torch.isfinite(out_local[plan.local_padding_mask]).all()),
                    has_padding=bool(plan.local_padding_mask.any()),
                    non_batch_slots_untouched=True,
                    real_slots_written=True,
                )
                for t0, t1 in zip(before, after):
                    nslots = t1.numel() // t1.shape[-1]
                    f0, f1 = t0.reshape(nslots, -1), t1.reshape(nslots, -1)
                    untouched = torch.ones(nslots, dtype=torch.bool)
                    untouched[new] = False
                    facts["non_batch_slots_untouched"] &= _nan_equal(f1[untouched], f0[untouched])
                    facts["real_slots_written"] &= bool(f1[new].isfinite().all()) and not _nan_equal(f1[new], f0[new])
                # Identical caches on every rank.
                everyone = gather_objects(group, [t.nan_to_num(nan=1234.5) for t in after])
                facts["caches_identical_on_all_ranks"] = all(
                    torch.equal(mine, theirs) for other in everyone for mine, theirs in zip(everyone[0], other)
                )
                if mode == "off":
                    off_caches = [t.clone() for t in after]
                else:
                    facts["cache_err_vs_no_cp"] = max(
                        rel_err(t1.reshape(-1, t1.shape[-1])[new], t0.reshape(-1, t0.shape[-1])[new])
                        for t0, t1 in zip(off_caches, after)
                    )
                runs["zero" if pad_fill == 0.0 else "nan"] = dict(
                    facts=facts, out_local=out_local, padding=plan.local_padding_mask,
                    after=[t.clone() for t in after], out=gather_token_rows(out_local, plan, group),
                )
            if "nan" in runs:  # garbage in padding rows changes no real row and no cache byte
                zero, nan = runs["zero"], runs["nan"]
                real = ~zero["padding"]
                zero["facts"]["nan_padding_keeps_real_rows"] = (
                    torch.equal(nan["out_local"][real], zero["out_local"][real]) and torch.equal(nan["out"], zero["out"])
                )
                zero["facts"]["nan_padding_keeps_caches"] = all(
                    _nan_equal(a, z) for a, z in zip(nan["after"], zero["after"])
                )
            per_mode[mode] = runs["zero"]["facts"]
        results.append(per_mode)
    return results


def _check_poisoned(results, world, batches, nan_padding_inputs=True):
    for b, (q, c) in enumerate(batches):
        for mode in STRATEGIES:
            for rank in range(world):
                f = results[rank][b][mode]
                where = f"batch {q} ctx {c} {mode} rank {rank}/{world}"
                assert f["out_finite"], f"{where}: NaN/inf in outputs (padding rows finite: {f['padding_out_finite']})"
                assert f["non_batch_slots_untouched"], f"{where}: a slot outside the batch's real slots changed"
                assert f["real_slots_written"], f"{where}: a real token's slot was not written"
                assert f["caches_identical_on_all_ranks"], f"{where}: caches differ between ranks"
                if mode != "off":
                    assert f["cache_err_vs_no_cp"] <= TOL, f"{where}: cache differs from no-CP ({f['cache_err_vs_no_cp']:.2e})"
                if nan_padding_inputs:
                    assert f["nan_padding_keeps_real_rows"], f"{where}: garbage in padding rows changed real rows"
                    assert f["nan_padding_keeps_caches"], f"{where}: padding rows wrote the cache"


def test_padding_never_writes_cache_nor_makes_nan(world):
    results = run_ranks(_poisoned_run, world)
    _check_poisoned(results, world, BATCHES)
    # The check looked at real padding: some split plan had padding rows on some rank.
    assert any(results[r][b][m]["has_padding"]
               for r in range(world) for b in range(len(BATCHES)) for m in ("round-robin-split", "in-seq-split"))


def test_padding_no_nan_with_poisoned_null_block():
    """vLLM's layout: block 0 is the null block, never written. Poison it like every
    other unused slot; padding rows and short rows must still be finite."""
    batches = BATCHES[:1] + BATCHES[3:4]
    results = run_ranks(_poisoned_run, 2, True, batches, False)
    _check_poisoned(results, 2, batches, nan_padding_inputs=False)
