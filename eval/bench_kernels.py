"""Kernel throughput benchmark for one GPU (standalone: torch + triton, no vLLM).

Measures, on the same card in the same run:
- ceilings: bf16 matmul rate (8192^3, torch) and device-to-device copy bandwidth;
- this package's Triton kernels: sparse MLA prefill / decode (bf16 and fp8_ds_mla caches),
  indexer logits + top-k (prefill chunk and paged decode), KV-cache writes;
- the vendor kernels shipped in the ``vllm==0.24.0`` wheel (``eval/fetch_vendor_kernels.sh``
  extracts them into ``.vendor/``): FlashMLA ``sparse_prefill_fwd`` / ``sparse_decode_fwd`` and
  DeepGEMM ``fp8_mqa_logits`` / ``fp8_paged_mqa_logits``. Missing vendor pieces are skipped
  with a note.

Prints tables and writes ``kernel_bench.md`` / ``.json`` (and ``.png`` when matplotlib is
there) into ``$OUT`` or ``eval/results/``.

    python eval/bench_kernels.py [--quick] [--sweep] [--out DIR]

FLOP counts: sparse MLA ``2*T*H*topk*(576+512)``; indexer logits ``2*H*128*sum(kv_len)``.
Timing: ``triton.testing.do_bench`` medians (it flushes L2 between reps).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from kernels import attention_ref, indexer_topk, kv_cache, kv_cache_ref, sparse_mla  # noqa: E402

VENDOR = os.path.join(ROOT, ".vendor")
SCALE = 576**-0.5
RESULTS: dict = {"rows": [], "notes": []}


def log(*a):
    print(*a, flush=True)


def note(msg: str):
    log("NOTE:", msg)
    RESULTS["notes"].append(msg)


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def launch_overrides(module, **cfg):
    """Force launch parameters of one kernel module while the block runs (the sweeps), by
    wrapping its default-config function: ``sparse_mla._default_config`` (``block_h``,
    ``block_n``, ``num_warps``, ``num_stages``) or ``indexer_topk._launch_config`` (its keys);
    ``skip_topk=1`` on the indexer launches no top-k kernel (times the logits alone). The
    production modules keep no benchmark state."""
    cfg = {k: int(v) for k, v in cfg.items() if v is not None}
    saved = {}
    if module is sparse_mla:
        default = sparse_mla._default_config

        def patched(*args):
            keys = ("block_h", "block_n", "num_warps", "num_stages")
            return tuple(cfg.get(k, v) for k, v in zip(keys, default(*args)))

        saved["_default_config"] = default
        sparse_mla._default_config = patched
    else:
        launch = indexer_topk._launch_config
        if cfg.pop("skip_topk", 0):
            saved["_topk_kernel"] = indexer_topk._topk_kernel
            indexer_topk._topk_kernel = _NoLaunch()
        saved["_launch_config"] = launch
        indexer_topk._launch_config = lambda *args: {**launch(*args), **cfg}
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def bench(fn, warmup=10, rep=60) -> float:
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def add_row(section, case, impl, ms, tflops=None, gbs=None, extra=""):
    row = dict(section=section, case=case, impl=impl, ms=ms, tflops=tflops, gbs=gbs, extra=extra)
    RESULTS["rows"].append(row)
    t = f"{tflops:8.1f} TFLOP/s" if tflops is not None else " " * 15
    g = f"{gbs:8.0f} GB/s" if gbs is not None else " " * 13
    log(f"  {section:<14} {case:<44} {impl:<26} {ms:9.4f} ms {t} {g} {extra}")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------ ceilings
def ceilings():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b, rep=200)
    mm = 2 * 8192**3 / ms / 1e9
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_(0, 255)
    y = torch.empty_like(x)
    ms_c = bench(lambda: y.copy_(x), rep=200)
    bw = 2 * x.numel() / ms_c / 1e6
    RESULTS["ceilings"] = dict(matmul_tflops=mm, matmul_ms=ms, copy_gbs=bw, copy_ms=ms_c)
    add_row("ceiling", "bf16 matmul 8192^3 (torch)", "cuBLAS", ms, tflops=mm)
    add_row("ceiling", "D2D copy 1 GiB (read+write)", "torch copy_", ms_c, gbs=bw)
    del a, b, x, y


# ---------------------------------------------------------------------- vendor libs
def load_flashmla():
    so = os.path.join(VENDOR, "_flashmla_C.abi3.so")
    if not os.path.exists(so):
        note(f"FlashMLA not found at {so}: run eval/fetch_vendor_kernels.sh and carry .vendor")
        return None
    try:
        torch.ops.load_library(so)
        return torch.ops._flashmla_C
    except Exception as e:  # pragma: no cover
        note(f"FlashMLA load failed: {e!r}")
        return None


def load_deepgemm():
    if not os.path.isdir(os.path.join(VENDOR, "deep_gemm")):
        note("DeepGEMM not found in .vendor: run eval/fetch_vendor_kernels.sh")
        return None
    sys.path.insert(0, VENDOR)
    try:
        import deep_gemm  # type: ignore

        return deep_gemm
    except Exception as e:  # pragma: no cover
        note(f"DeepGEMM import failed: {e!r}")
        return None


# ------------------------------------------------------------------- data builders
def latent_cache(num_slots, kv_cache_dtype, block_size=64, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    nb = -(-num_slots // block_size)
    kv_c = torch.randn(nb * block_size, 512, device="cuda", generator=g, dtype=torch.bfloat16)
    k_pe = torch.randn(nb * block_size, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    row = 656 if kv_cache_dtype == "fp8_ds_mla" else 576
    dt = torch.uint8 if kv_cache_dtype == "fp8_ds_mla" else torch.bfloat16
    cache = torch.empty(nb, block_size, row, dtype=dt, device="cuda")
    kv_cache.write_latent_cache(
        cache, kv_c, k_pe, torch.arange(nb * block_size, device="cuda"), kv_cache_dtype
    )
    return cache


def random_indices(rows, num_slots, topk, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    out = torch.empty(rows, topk, dtype=torch.int32, device="cuda")
    for i in range(0, rows, 512):
        r = min(512, rows - i)
        out[i : i + r] = torch.rand(r, num_slots, device="cuda", generator=g).topk(topk).indices.int()
    return out


# ---------------------------------------------------------------- sparse MLA prefill
def mla_flops(rows, heads, topk):
    return 2 * rows * heads * topk * (576 + 512)


def bench_mla_prefill(fm, quick, sweep):
    log("\n== sparse MLA prefill (T rows x H heads, top-k 2048)")
    cases = [(4096, 128, 32768), (4096, 64, 32768)]
    if not quick:
        cases += [(16384, 128, 32768), (4096, 128, 262144)]
    sweep_cfgs = [dict(block_n=32, num_stages=3), dict(block_n=32, num_stages=2)]
    topk = 2048
    for ci, (rows, heads, nslots) in enumerate(cases):
        configs = [None] + (sweep_cfgs if sweep and ci == 0 else [])
        q = torch.randn(rows, heads, 576, device="cuda", dtype=torch.bfloat16)
        idx = random_indices(rows, nslots, topk)
        flops = mla_flops(rows, heads, topk)
        case = f"T={rows} H={heads} kv={nslots}"
        for kvd in ("auto", "fp8_ds_mla"):
            cache = latent_cache(nslots, kvd)
            ref_out = None
            for cfg in configs:
                name = "triton" + ("" if cfg is None else " " + ",".join(f"{k}={v}" for k, v in cfg.items()))
                name += " bf16" if kvd == "auto" else " fp8"
                try:
                    with launch_overrides(sparse_mla, **(cfg or {})):
                        fn = lambda: sparse_mla.sparse_mla_prefill(q, cache, idx, SCALE, 512, kvd)  # noqa: E731
                        out, lse = fn()
                        torch.cuda.synchronize()
                        if ref_out is None:
                            r = min(rows, 32)
                            ro, rl = attention_ref.sparse_mla(q[:r], cache, idx[:r], SCALE, 512, kvd)
                            err = rel(out[:r], ro)
                            ref_out = ro
                        else:
                            err = rel(out[: ref_out.shape[0]], ref_out)
                        ms = bench(fn)
                    add_row("mla_prefill", case, name, ms, tflops=flops / ms / 1e9,
                            extra=f"relerr={err:.2e}")  # fmt: skip
                except Exception as e:
                    note(f"mla prefill {case} {name} failed: {str(e)[:300]}")
            if fm is not None and kvd == "auto":
                try:
                    kv = cache.view(-1, 1, 576)
                    out = torch.empty(rows, heads, 512, device="cuda", dtype=torch.bfloat16)
                    idx3 = idx.view(rows, 1, topk)
                    fn = lambda: fm.sparse_prefill_fwd(q, kv, idx3, SCALE, 512, None, None, out)  # noqa: E731
                    res = fn()
                    torch.cuda.synchronize()
                    tri, _ = sparse_mla.sparse_mla_prefill(q, cache, idx, SCALE, 512, kvd)
                    err = rel(tri, res[0])
                    ms = bench(fn)
                    add_row("mla_prefill", case, "FlashMLA sparse_prefill", ms,
                            tflops=flops / ms / 1e9, extra=f"triton-vs-flashmla={err:.2e}")  # fmt: skip
                except Exception as e:
                    note(f"FlashMLA prefill {case} failed: {str(e)[:300]}")
            del cache
        del q, idx
        torch.cuda.empty_cache()


# ----------------------------------------------------------------- sparse MLA decode
def bench_mla_decode(fm, quick, sweep=False):
    log("\n== sparse MLA decode / verify (B x S rows, H=128, top-k 2048, kv 65536 slots)")
    heads, topk, nslots = 128, 2048, 65536
    cases = [(1, 1), (32, 1), (64, 2), (128, 1)] if not quick else [(32, 1), (64, 2)]
    for kvd in ("fp8_ds_mla", "auto"):
        cache = latent_cache(nslots, kvd)
        row_bytes = 656 if kvd == "fp8_ds_mla" else 1152
        for b, s in cases:
            rows = b * s
            q = torch.randn(b, s, heads, 576, device="cuda", dtype=torch.bfloat16)
            idx = random_indices(rows, nslots, topk).view(b, s, topk)
            flops = mla_flops(rows, heads, topk)
            nbytes = rows * topk * row_bytes + q.numel() * 2 + rows * heads * 512 * 2
            case = f"B={b} S={s} {'fp8' if kvd != 'auto' else 'bf16'}"
            try:
                fn = lambda: sparse_mla.sparse_mla_decode(q, cache, idx, SCALE, 512, kvd)  # noqa: E731
                out, _ = fn()
                torch.cuda.synchronize()
                ro, _ = attention_ref.sparse_mla(q.flatten(0, 1)[:16], cache, idx.flatten(0, 1)[:16], SCALE, 512, kvd)
                err = rel(out.flatten(0, 1)[:16], ro)
                ms = bench(fn)
                add_row("mla_decode", case, "triton split-K", ms, tflops=flops / ms / 1e9,
                        gbs=nbytes / ms / 1e6, extra=f"relerr={err:.2e}")  # fmt: skip
            except Exception as e:
                note(f"mla decode {case} failed: {str(e)[:300]}")
            for splits in ((1, 2, 4, 8) if sweep and rows >= 32 else ()):
                try:
                    fn = lambda: sparse_mla.sparse_mla_decode(q, cache, idx, SCALE, 512, kvd, num_splits=splits)  # noqa: E731
                    fn()
                    ms = bench(fn)
                    add_row("mla_decode", case, f"triton splits={splits}", ms, tflops=flops / ms / 1e9,
                            gbs=nbytes / ms / 1e6)  # fmt: skip
                except Exception as e:
                    note(f"mla decode {case} splits={splits} failed: {str(e)[:200]}")
            if fm is not None and kvd == "fp8_ds_mla":
                try:
                    kc = cache.view(cache.shape[0], cache.shape[1], 1, 656)
                    state = {"meta": None, "splits": None}

                    def run(kc=kc):
                        o, l, meta, ns = fm.sparse_decode_fwd(
                            q, kc, idx, None, None, state["meta"], state["splits"],
                            None, None, None, 512, SCALE, None,
                        )  # fmt: skip
                        state["meta"], state["splits"] = meta, ns
                        return o

                    try:
                        o = run()
                    except Exception:
                        kc = cache.view(torch.float8_e4m3fn).view(cache.shape[0], cache.shape[1], 1, 656)
                        state["meta"] = state["splits"] = None
                        o = run(kc)
                    torch.cuda.synchronize()
                    tri, _ = sparse_mla.sparse_mla_decode(q, cache, idx, SCALE, 512, kvd)
                    err = rel(tri, o)
                    ms = bench(lambda: run(kc))
                    add_row("mla_decode", case, "FlashMLA sparse_decode", ms,
                            tflops=flops / ms / 1e9, gbs=nbytes / ms / 1e6,
                            extra=f"triton-vs-flashmla={err:.2e}")  # fmt: skip
                except Exception as e:
                    note(f"FlashMLA decode {case} failed: {str(e)[:300]}")
            del q, idx
        del cache
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------- indexer
def indexer_inputs(lens_req, rows, heads=64, block_size=64, fp8=True, seed=3):
    g = torch.Generator(device="cuda").manual_seed(seed)
    nblk = [-(-n // block_size) for n in lens_req]
    num_blocks = sum(nblk)
    perm = torch.randperm(num_blocks, device="cuda", generator=g)
    bt = torch.zeros(len(lens_req), max(nblk), dtype=torch.int32, device="cuda")
    used = 0
    for r, nb in enumerate(nblk):
        bt[r, :nb] = perm[used : used + nb].int()
        used += nb
    if fp8:
        cache = torch.empty(num_blocks, block_size * 132, dtype=torch.uint8, device="cuda")
    else:
        cache = torch.empty(num_blocks, block_size, 128, dtype=torch.bfloat16, device="cuda")
    for r, n in enumerate(lens_req):
        pos = torch.arange(n, device="cuda")
        slots = bt[r][pos // block_size].long() * block_size + pos % block_size
        k = torch.randn(n, 128, device="cuda", generator=g, dtype=torch.bfloat16)
        kv_cache.write_indexer_cache(cache, k, slots, block_size, fp8)
    rreq = torch.tensor([r for r, _ in rows], dtype=torch.int32, device="cuda")
    rlen = torch.tensor([n for _, n in rows], dtype=torch.int32, device="cuda")
    q = torch.randn(len(rows), heads, 128, device="cuda", generator=g)
    w = torch.randn(len(rows), heads, device="cuda", generator=g) * heads**-0.5
    return q, w, cache, bt, rreq, rlen


def bench_indexer(dg, quick, sweep):
    log("\n== indexer logits + top-k 2048 (64 heads x 128, fp8 keys)")
    heads, topk, bs = 64, 2048, 64
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    # prefill: the last T positions of one request of L keys (causal lengths)
    pre_cases = [(4096, 16384)] + ([] if quick else [(2048, 65536)])
    for t, L in pre_cases:
        rows = [(0, L - t + 1 + i) for i in range(t)]
        q, w, cache, bt, rreq, rlen = indexer_inputs([L], rows, heads, bs, True)
        qf8 = (q * 4).to(torch.float8_e4m3fn)
        q16 = q.to(torch.bfloat16)
        tot_keys = int(rlen.sum())
        flops = 2 * heads * 128 * tot_keys
        case = f"prefill T={t} L={L}"
        configs = [None, dict(skip_topk=1)]
        if sweep and t == pre_cases[0][0]:
            configs += [dict(group=1), dict(group=2), dict(trans=0, group=1),
                        dict(skip_topk=1, group=2)]  # fmt: skip
        for qq, qname in ((q16, "q bf16"), (qf8, "q fp8")):
            for cfg in configs if qname == "q bf16" else [None]:
                name = f"triton {qname}" + ("" if cfg is None else " " + ",".join(f"{k}={v}" for k, v in cfg.items()))
                try:
                    with launch_overrides(indexer_topk, **(cfg or {})):
                        fn = lambda: indexer_topk.indexer_topk(qq, w, cache, bt, rreq, rlen, topk, bs, True, max_kv_len=L)  # noqa: E731
                        out = fn()
                        torch.cuda.synchronize()
                        ms = bench(fn)
                    if cfg and cfg.get("skip_topk"):
                        add_row("indexer", case, name + " (logits only)", ms, tflops=flops / ms / 1e9)
                        continue
                    sub = slice(0, t, max(1, t // 8))
                    ref = attention_ref.indexer_topk_paged(qq[sub], w[sub], cache, bt, rreq[sub], rlen[sub], topk, bs, True)
                    same = sum(set(a.tolist()) == set(b.tolist()) for a, b in zip(out[sub], ref))
                    add_row("indexer", case, name + " (logits+topk)", ms, tflops=flops / ms / 1e9,
                            extra=f"sets-equal {same}/{ref.shape[0]}")  # fmt: skip
                except Exception as e:
                    note(f"indexer {case} {name} failed: {str(e)[:400]}")
        # top-k alone on a logits buffer
        try:
            logits = torch.randn(t, L, device="cuda")
            outb = torch.empty(t, topk, dtype=torch.int32, device="cuda")
            scratch = torch.empty(t, topk, dtype=torch.int32, device="cuda")
            tk_cfgs = [(2048, 4, 8), (8192, 16, 8)]
            if sweep and t == pre_cases[0][0]:
                tk_cfgs += [(4096, 8, 8), (2048, 4, 11), (4096, 4, 8)]
            ref_sets = None
            for blk, nw, rb in tk_cfgs:
                kfn = lambda: indexer_topk._topk_kernel[(t,)](  # noqa: E731
                    logits, logits.stride(0), rlen, rreq, outb, outb.stride(0), scratch,
                    scratch.stride(0), 0, topk, KP=2048, BLOCK=blk, RADIX_BITS=rb, num_warps=nw)  # fmt: skip
                kfn()
                torch.cuda.synchronize()
                chk = outb[:: max(1, t // 16)].clone()
                if ref_sets is None:
                    ref_sets = chk
                ok = bool(torch.equal(chk, ref_sets))
                ms = bench(kfn)
                add_row("indexer", case, f"triton top-k only block={blk} warps={nw} radix={rb}", ms,
                        gbs=4 * tot_keys / ms / 1e6, extra=f"same-as-first={ok}")  # fmt: skip
            ms = bench(lambda: torch.topk(logits, topk, dim=1))
            add_row("indexer", case, "torch.topk (full rows)", ms, gbs=4 * t * L / ms / 1e6)
        except Exception as e:
            note(f"top-k only {case} failed: {str(e)[:300]}")
        if dg is not None:
            try:
                nb = cache.shape[0]
                k_vals = cache.view(nb, -1)[:, : bs * 128].reshape(nb, bs, 128)
                kv = torch.empty(L, 128, dtype=torch.float8_e4m3fn, device="cuda")
                ks = torch.empty(L, dtype=torch.float32, device="cuda")
                pos = torch.arange(L, device="cuda")
                blk = bt[0][pos // bs].long()
                off = pos % bs
                kv.view(torch.uint8)[:] = k_vals[blk, off]
                ks[:] = cache.view(nb, -1)[:, bs * 128 :].contiguous().view(torch.float32)[blk, off]
                ks_start = torch.zeros(t, dtype=torch.int32, device="cuda")
                ke = rlen.clone()
                wf = w * 0.25  # q was scaled by 4 for fp8

                def dg_logits():
                    try:
                        return dg.fp8_fp4_mqa_logits((qf8, None), (kv, ks), wf, ks_start, ke, clean_logits=False)
                    except (AttributeError, TypeError):
                        return dg.fp8_mqa_logits(qf8, (kv, ks), wf, ks_start, ke, clean_logits=False)

                lg = dg_logits()
                torch.cuda.synchronize()
                ms = bench(dg_logits)
                add_row("indexer", case, "DeepGEMM fp8_mqa_logits (logits only)", ms, tflops=flops / ms / 1e9)
                ms2 = bench(lambda: torch.topk(lg, topk, dim=1))
                add_row("indexer", case, "DeepGEMM logits + torch.topk", ms + ms2, tflops=flops / (ms + ms2) / 1e9)
            except Exception as e:
                note(f"DeepGEMM mqa_logits {case} failed: {str(e)[:400]}")
        del q, w, cache, bt
        torch.cuda.empty_cache()

    # decode: B requests, next_n rows each, context L (paged)
    dec_cases = [(64, 1, 32768)] + ([] if quick else [(128, 2, 16384)])
    for b, nn, L in dec_cases:
        rows = [(r, L - nn + 1 + j) for r in range(b) for j in range(nn)]
        q, w, cache, bt, rreq, rlen = indexer_inputs([L] * b, rows, heads, bs, True)
        qf8 = (q * 4).to(torch.float8_e4m3fn)
        q16 = q.to(torch.bfloat16)
        flops = 2 * heads * 128 * int(rlen.sum())
        case = f"decode B={b} next_n={nn} L={L}"
        for qq, qname in ((q16, "q bf16"), (qf8, "q fp8")):
            try:
                fn = lambda: indexer_topk.indexer_topk(qq, w, cache, bt, rreq, rlen, topk, bs, True, max_kv_len=L)  # noqa: E731
                fn()
                ms = bench(fn)
                add_row("indexer", case, f"triton {qname} (logits+topk)", ms, tflops=flops / ms / 1e9)
            except Exception as e:
                note(f"indexer {case} {qname} failed: {str(e)[:300]}")
        if dg is not None:
            try:
                kc = cache.view(cache.shape[0], bs, 1, 132)
                ctx = torch.full((b, nn), L, dtype=torch.int32, device="cuda")
                ctx -= torch.arange(nn - 1, -1, -1, dtype=torch.int32, device="cuda")[None]
                wf = (w * 0.25).contiguous()
                q4 = qf8.view(b, nn, heads, 128)
                try:
                    meta = dg.get_paged_mqa_logits_metadata(ctx, bs, num_sms)
                    ctx_used = ctx
                except Exception:
                    ctx_used = ctx[:, -1].contiguous()
                    meta = dg.get_paged_mqa_logits_metadata(ctx_used, bs, num_sms)

                def dg_paged():
                    try:
                        return dg.fp8_fp4_paged_mqa_logits((q4, None), kc, wf, ctx_used, bt, meta, L, clean_logits=False)
                    except (AttributeError, TypeError):
                        return dg.fp8_paged_mqa_logits(q4, kc, wf, ctx_used, bt, meta, L, clean_logits=False)

                dg_paged()
                torch.cuda.synchronize()
                ms = bench(dg_paged)
                add_row("indexer", case, "DeepGEMM fp8_paged_mqa_logits (logits only)", ms, tflops=flops / ms / 1e9)
            except Exception as e:
                note(f"DeepGEMM paged_mqa_logits {case} failed: {str(e)[:400]}")
        del q, w, cache, bt
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------ kv writes
def bench_kv_writes():
    log("\n== KV-cache writes (T tokens, bf16 input, block 64)")
    t, nslots = 16384, 262144
    g = torch.Generator(device="cuda").manual_seed(9)
    kv_c = torch.randn(t, 512, device="cuda", dtype=torch.bfloat16, generator=g)
    k_pe = torch.randn(t, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(t, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    slots = torch.randperm(nslots, device="cuda", generator=g)[:t]
    for kvd, row in (("fp8_ds_mla", 656), ("auto", 1152)):
        dt = torch.uint8 if kvd == "fp8_ds_mla" else torch.bfloat16
        cache = torch.zeros(nslots // 64, 64, 656 if kvd == "fp8_ds_mla" else 576, dtype=dt, device="cuda")
        ms = bench(lambda: kv_cache.write_latent_cache(cache, kv_c, k_pe, slots, kvd))
        nbytes = t * (576 * 2 + row)
        add_row("kv_write", f"latent T={t} {kvd}", "triton", ms, gbs=nbytes / ms / 1e6)
        flat = cache.view(-1, cache.shape[-1])
        ms = bench(lambda: kv_cache_ref.write_latent_cache(cache, kv_c, k_pe, slots, kvd))
        add_row("kv_write", f"latent T={t} {kvd}", "torch reference", ms, gbs=nbytes / ms / 1e6)
        del cache, flat
    for fp8 in (True, False):
        if fp8:
            cache = torch.zeros(nslots // 64, 64 * 132, dtype=torch.uint8, device="cuda")
        else:
            cache = torch.zeros(nslots // 64, 64, 128, dtype=torch.bfloat16, device="cuda")
        ms = bench(lambda: kv_cache.write_indexer_cache(cache, k, slots, 64, fp8))
        nbytes = t * (256 + (132 if fp8 else 256))
        add_row("kv_write", f"indexer T={t} fp8={fp8}", "triton", ms, gbs=nbytes / ms / 1e6)
        del cache


# ------------------------------------------------------------------------- reports
def gpu_name() -> str:
    p = torch.cuda.get_device_properties(0)
    return f"{p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB)"


def write_reports(out_dir: str):
    os.makedirs(out_dir, exist_ok=True)
    c = RESULTS.get("ceilings", {})
    lines = [
        f"# Kernel benchmark — {RESULTS['gpu']}",
        "",
        f"- date: {RESULTS['date']}; torch {torch.__version__}, triton {triton.__version__}, "
        f"CUDA {torch.version.cuda}",
        f"- command: `{RESULTS['command']}`",
        f"- ceilings on this card: bf16 matmul {c.get('matmul_tflops', float('nan')):.0f} TFLOP/s, "
        f"D2D copy {c.get('copy_gbs', float('nan')):.0f} GB/s",
        "",
        "| section | case | implementation | ms | TFLOP/s | % matmul | GB/s | % copy | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    mm = c.get("matmul_tflops")
    bw = c.get("copy_gbs")
    for r in RESULTS["rows"]:
        tf = r["tflops"]
        gb = r["gbs"]
        lines.append(
            f"| {r['section']} | {r['case']} | {r['impl']} | {r['ms']:.4f} | "
            f"{'' if tf is None else f'{tf:.1f}'} | {'' if tf is None or not mm else f'{100 * tf / mm:.0f}%'} | "
            f"{'' if gb is None else f'{gb:.0f}'} | {'' if gb is None or not bw else f'{100 * gb / bw:.0f}%'} | "
            f"{r['extra']} |"
        )
    # ratios vs vendor
    lines += ["", "## Triton vs vendor (same inputs, same card)", ""]
    by = {}
    for r in RESULTS["rows"]:
        by.setdefault((r["section"], r["case"]), []).append(r)
    for (sec, case), rs in by.items():
        vend = [r for r in rs if r["impl"].startswith(("FlashMLA", "DeepGEMM fp8_mqa", "DeepGEMM fp8_paged"))]
        tri = [r for r in rs if r["impl"].startswith("triton") and "only" not in r["impl"]]
        if vend and tri:
            best = min(tri, key=lambda r: r["ms"])
            for v in vend:
                lines.append(
                    f"- {sec} {case}: best Triton `{best['impl']}` {best['ms']:.3f} ms vs "
                    f"{v['impl']} {v['ms']:.3f} ms -> **{v['ms'] / best['ms']:.2f}x** of vendor speed"
                )
    if RESULTS["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in RESULTS["notes"]]
    md = os.path.join(out_dir, "kernel_bench.md")
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "kernel_bench.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)
    log(f"\nwrote {md}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in RESULTS["rows"] if r["section"] in ("mla_prefill", "mla_decode", "indexer") and r["tflops"]]
        fig, ax = plt.subplots(figsize=(12, max(4, 0.28 * len(rows))))
        labels = [f"{r['case']} | {r['impl']}"[:90] for r in rows]
        colors = ["tab:orange" if r["impl"].startswith(("FlashMLA", "DeepGEMM")) else "tab:blue" for r in rows]
        ax.barh(range(len(rows)), [r["tflops"] for r in rows], color=colors)
        ax.set_yticks(range(len(rows)), labels, fontsize=6)
        ax.invert_yaxis()
        if mm:
            ax.axvline(mm, color="k", ls="--", lw=1, label=f"bf16 matmul {mm:.0f}")
            ax.legend(fontsize=7)
        ax.set_xlabel("TFLOP/s")
        ax.set_title(f"vllm_cp_nsa kernels vs vendor — {RESULTS['gpu']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "kernel_bench.png"), dpi=110)
        log("wrote kernel_bench.png")
    except Exception as e:
        note(f"no PNG: {e!r}")
        with open(md, "a") as f:
            f.write(f"\n(no PNG: {e!r})\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time alternative kernel configs")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "eval", "results"))
    ap.add_argument("--only", default="", help="comma list: ceil,prefill,decode,indexer,kv")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    torch.manual_seed(0)
    RESULTS["gpu"] = gpu_name()
    RESULTS["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    RESULTS["command"] = "python " + " ".join(sys.argv)
    log(f"GPU: {RESULTS['gpu']}; torch {torch.__version__}; triton {triton.__version__}")
    only = set(args.only.split(",")) if args.only else {"ceil", "prefill", "decode", "indexer", "kv"}
    fm = load_flashmla() if ({"prefill", "decode"} & only) else None
    dg = load_deepgemm() if "indexer" in only else None
    steps = [("ceil", ceilings), ("prefill", lambda: bench_mla_prefill(fm, args.quick, args.sweep)),
             ("decode", lambda: bench_mla_decode(fm, args.quick, args.sweep)),
             ("kv", bench_kv_writes), ("indexer", lambda: bench_indexer(dg, args.quick, args.sweep))]  # fmt: skip
    for key, step in steps:
        if key not in only:
            continue
        t0 = time.time()
        try:
            step()
        except Exception:
            note(f"step {key} crashed: {traceback.format_exc()[-800:]}")
        log(f"[{key}: {time.time() - t0:.1f}s]")
        write_reports(args.out)


if __name__ == "__main__":
    main()
