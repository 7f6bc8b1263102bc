"""eval/profile_summary.py on synthetic chrome traces: categories, sums, busy / span / idle,
ranks, .json.gz and tar inputs, the CPU-op fallback, and the side-by-side markdown."""

from __future__ import annotations

import gzip
import json
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "eval"))

import profile_summary as ps  # noqa: E402

T0 = 5_000_000_000.0  # µs, like Kineto's absolute timestamps


def kernel(name: str, ts: float, dur: float, stream: int = 7, cat: str = "kernel") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "pid": 0, "tid": stream, "ts": T0 + ts, "dur": dur,
            "args": {"device": 0, "stream": stream}}


def fake_trace(scale: float = 1.0, rank: int | None = None) -> dict:
    """One prefill step: µs durations; the NCCL all-gather (stream 20) overlaps the GEMM."""
    s = scale
    events = [
        {"ph": "M", "name": "process_name", "pid": 0, "tid": 0, "args": {"name": "python"}},
        {"ph": "X", "cat": "user_annotation", "name": "execute_context_1(16384)_generation_0(0)",
         "pid": 100, "tid": 100, "ts": T0 - 50, "dur": 2000},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 100, "tid": 100, "ts": T0, "dur": 30},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": 100, "tid": 100, "ts": T0, "dur": 5},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamIsCapturing", "pid": 100, "tid": 100, "ts": T0 + 6,
         "dur": 2},
        {"ph": "X", "cat": "gpu_user_annotation", "name": "execute_context_1(16384)_generation_0(0)",
         "pid": 0, "tid": 7, "ts": T0, "dur": 1500},
        {"ph": "f", "cat": "ac2g", "name": "ac2g", "pid": 0, "tid": 7, "ts": T0, "id": 1},
        kernel("Memcpy HtoD (Pageable -> Device)", 0, 10, cat="gpu_memcpy"),
        kernel("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", 10, 100 * s),        # gemm
        kernel("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", 50, 80, stream=20),
        kernel("_indexer_logits_kernel", 200, 300 * s),                          # indexer
        kernel("_topk_kernel", 500, 100 * s),                                    # indexer
        kernel("void vllm::indexer_k_quant_and_cache_kernel<__nv_bfloat16>", 600, 20),  # kv write
        kernel("_write_latent_plain_kernel", 620, 10),                           # kv write
        kernel("_sparse_mla_fwd_kernel", 640, 200 * s),                          # attention
        kernel("fused_moe_kernel", 900, 150),                                    # moe
        kernel("void vllm::rms_norm_kernel<c10::BFloat16>", 1050, 25),           # norm
        kernel("void vllm::moe::topkGatingSoftmax<8>", 1075, 5),                 # moe
        kernel("some_unknown_kernel", 1080, 20),                                 # other
        kernel("Memset (Device)", 1100, 2, cat="gpu_memset"),
    ]
    trace = {"schemaVersion": 1, "traceEvents": events}
    if rank is not None:
        trace["distributedInfo"] = {"backend": "nccl", "rank": rank, "world_size": 2}
    return trace


def test_categorize_table_order():
    assert ps.categorize("void vllm::indexer_k_quant_and_cache_kernel<x>") == "kv-cache write"
    assert ps.categorize("void vllm::cp_gather_indexer_k_quant_cache_kernel<x>") == "indexer"
    assert ps.categorize("void deep_gemm::sm90_fp8_paged_mqa_logits<1>") == "indexer"
    assert ps.categorize("void vllm::top_k_per_row_prefill<1>") == "indexer"
    assert ps.categorize("_topk_kernel") == "indexer"
    assert ps.categorize("void vllm::moe::grouped_topk_fused_kernel<float>") == "moe"
    assert ps.categorize("void flash::flash_fwd_splitkv_mla_kernel<x>") == "attention"
    assert ps.categorize("_combine_splits_kernel") == "attention"
    assert ps.categorize("void vllm::cross_device_reduce_1stage<x>") == "collectives"
    assert ps.categorize("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n") == "gemm"
    assert ps.categorize("triton_poi_fused_add_mul_0") == "norm/rope/elementwise"
    # names seen in the 2026-11-28 H100 traces of vLLM 0.32
    assert ps.categorize("void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<x>") \
        == "attention"
    assert ps.categorize("void vllm::topKPerRowPrefill<512, false>(float const*, int const*)") == "indexer"
    assert ps.categorize("_fused_q_kernel") == "norm/rope/elementwise"
    assert ps.categorize("void sm90::prefill::sparse_fwd::sparse_attn_fwd_kernel<x>") == "attention"
    assert ps.categorize("whatever") == ps.OTHER


def test_summarize_trace_sums():
    s = ps.summarize_trace(fake_trace())
    c = s["categories"]
    assert s["source"] == "gpu"
    assert c["gemm"] == pytest.approx(0.100)
    assert c["collectives"] == pytest.approx(0.080)
    assert c["indexer"] == pytest.approx(0.400)
    assert c["kv-cache write"] == pytest.approx(0.030)
    assert c["attention"] == pytest.approx(0.200)
    assert c["moe"] == pytest.approx(0.155)
    assert c["norm/rope/elementwise"] == pytest.approx(0.025)
    assert c["memcpy/memset"] == pytest.approx(0.012)
    assert c[ps.OTHER] == pytest.approx(0.020)
    assert s["kernel_ms"] == pytest.approx(sum(c.values())) == pytest.approx(1.022)
    # Union: the all-gather (50..130) overlaps the GEMM (10..110) by 60 µs; gaps 130..200, 110..? etc.
    intervals = [(0, 10), (10, 110), (50, 130), (200, 500), (500, 600), (600, 620), (620, 630), (640, 840),
                 (900, 1050), (1050, 1075), (1075, 1080), (1080, 1100), (1100, 1102)]
    assert s["busy_ms"] == pytest.approx(ps._union_ms(intervals)) == pytest.approx(1.022 - 0.060)
    assert s["span_ms"] == pytest.approx(1.102)
    assert s["idle_ms"] == pytest.approx(1.102 - 0.962)
    assert s["launches"] == 13
    assert (s["steps"], s["step_ms"]) == (1, pytest.approx(2.0))
    assert s["kernels"]["_indexer_logits_kernel"] == {"category": "indexer", "calls": 1, "ms": pytest.approx(0.3)}
    # the host's side: one launch call among the runtime calls, one aten op
    assert (s["host_launch_calls"], s["host_cpu_ops"]) == (1, 1)
    assert s["host_api_ms"] == pytest.approx(0.005 + 0.002)
    # gpu_user_annotation, cuda_runtime and cpu_op events are not GPU time
    assert "cudaLaunchKernel" not in s["kernels"] and "aten::mm" not in s["kernels"]


def test_collect_runs_json_gz_tar_and_markdown(tmp_path):
    profiles = tmp_path / "profiles"
    for run, scale in (("native-tp", 1.0), ("plugin-rr", 2.0)):
        folder = profiles / run
        folder.mkdir(parents=True)
        for rank in (0, 1):
            name = f"prefill16K_dp0_pp0_tp{rank}_dcp0_ep{rank}_rank{rank}.1700000000000000000.pt.trace.json"
            data = json.dumps(fake_trace(scale)).encode()
            if run == "plugin-rr":  # vLLM's default: gzip
                (folder / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    (profiles / "native-tp" / "stray.txt").write_text("not a trace")

    runs = ps.collect_runs([profiles])
    assert list(runs) == ["native-tp", "plugin-rr"]
    assert list(runs["plugin-rr"]["ranks"]) == ["0", "1"]
    means = {n: ps.run_means(r) for n, r in runs.items()}
    assert means["native-tp"]["categories"]["indexer"] == pytest.approx(0.4)
    assert means["plugin-rr"]["categories"]["indexer"] == pytest.approx(0.8)
    assert means["plugin-rr"]["categories"]["attention"] == pytest.approx(0.4)
    assert means["plugin-rr"]["kernel_ms"] == pytest.approx(1.022 + 0.7)

    md = ps.render_markdown(runs)
    indexer_row = next(line for line in md.splitlines() if line.startswith("| indexer |"))
    assert "0.40 (39%)" in indexer_row and "0.80" in indexer_row and "+0.40" in indexer_row
    assert "plugin-rr − native-tp" in md and "Top kernels: plugin-rr" in md
    assert "| plugin-rr | 1 |" in md  # per-rank table
    assert "| host: kernel / graph launch calls | 1 | 1 | +0 |" in md

    # The same traces from a tar archive (how the device call brings them back), run names kept.
    archive = tmp_path / "raw.tgz"
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "plugin-rr.result.json").write_text(json.dumps({"name": "plugin-rr"}))  # not a trace: skipped
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(logs, arcname="logs")
        tar.add(profiles, arcname="profiles")
    from_tar = ps.collect_runs([archive])
    assert list(from_tar) == ["native-tp", "plugin-rr"]
    assert ps.run_means(from_tar["plugin-rr"])["categories"] == pytest.approx(means["plugin-rr"]["categories"])

    # Individual files and --json through main()
    out_json = tmp_path / "summary.json"
    files = sorted(str(p) for p in (profiles / "plugin-rr").iterdir())
    ps.main(files + ["--json", str(out_json), "--top", "3"])
    stored = json.loads(out_json.read_text())
    assert list(stored) == ["plugin-rr"] and len(stored["plugin-rr"]["ranks"]) == 2


def test_rank_from_distributed_info_and_newest_trace(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "a.1.pt.trace.json").write_text(json.dumps(fake_trace(1.0, rank=1)))
    (folder / "a.2.pt.trace.json").write_text(json.dumps(fake_trace(3.0, rank=1)))
    runs = ps.collect_runs([folder])
    assert list(runs["run"]["ranks"]) == ["1"]
    assert runs["run"]["ranks"]["1"]["categories"]["indexer"] == pytest.approx(1.2)  # the newer one
    assert runs["run"]["notes"]


def test_cpu_only_trace_falls_back_to_cpu_op_self_time():
    events = [
        {"ph": "X", "cat": "cpu_op", "name": "aten::linear", "pid": 1, "tid": 1, "ts": 0.0, "dur": 100.0},
        {"ph": "X", "cat": "cpu_op", "name": "aten::addmm", "pid": 1, "tid": 1, "ts": 10.0, "dur": 80.0},
        {"ph": "X", "cat": "cpu_op", "name": "aten::silu", "pid": 1, "tid": 1, "ts": 120.0, "dur": 30.0},
        {"ph": "X", "cat": "cpu_op", "name": "aten::addmm", "pid": 1, "tid": 2, "ts": 5.0, "dur": 40.0},
    ]
    s = ps.summarize_trace({"traceEvents": events})
    assert s["source"].startswith("cpu_op")
    assert s["kernels"]["aten::linear"]["ms"] == pytest.approx(0.020)  # 100 - its child's 80
    assert s["kernels"]["aten::addmm"]["ms"] == pytest.approx(0.120)
    assert s["categories"]["gemm"] == pytest.approx(0.140)
    assert s["kernel_ms"] == pytest.approx(0.170)
    assert s["busy_ms"] is None
    md = ps.render_markdown({"dry": {"ranks": {"0": s}}})
    assert "Not GPU time" in md


def test_empty_input(tmp_path):
    assert ps.collect_runs([tmp_path]) == {}
    assert "no trace files found" in ps.render_markdown({})


def test_attribute_kernels_to_the_host_ops_that_launched_them(tmp_path, capsys):
    """Kernels are matched to their launch by correlation id and to the innermost host ops
    around that launch on its thread; step annotations and other threads do not count."""
    def op(name, ts, dur, tid=1, cat="cpu_op"):
        return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": T0 + ts, "dur": dur}

    def launch(ts, corr, tid=1):
        return {**op("cudaLaunchKernel", ts, 2, tid, "cuda_runtime"), "args": {"correlation": corr}}

    def gpu(name, dur, corr, cat="kernel"):
        return {**kernel(name, 1000 + corr, dur, cat=cat), "args": {"correlation": corr, "stream": 7}}

    events = [
        op("execute_context_1(16)_generation_0(0)", 0, 500, cat="user_annotation"),
        op("aten::masked_fill", 10, 100), op("aten::clone", 12, 40), op("aten::copy_", 14, 30),
        launch(20, 1),                                    # masked_fill > clone > copy_
        op("aten::masked_fill_", 60, 40), launch(70, 2),  # masked_fill > masked_fill_
        op("aten::cat", 200, 20), launch(205, 3), launch(210, 4),
        op("aten::mm", 300, 20, tid=2), launch(305, 5, tid=2),
        launch(400, 6),                                   # only the step annotation around it
    ]
    events += [gpu("Memcpy DtoD (Device -> Device)", 300, 1, "gpu_memcpy"), gpu("elementwise_kernel<128>", 500, 2),
               gpu("CatArrayBatchedCopy", 100, 3), gpu("CatArrayBatchedCopy", 150, 4), gpu("nvjet_gemm", 900, 5),
               gpu("elementwise_kernel<128>", 50, 6), gpu("unlaunched_kernel", 70, 99)]
    rows = ps.attribute_kernels({"traceEvents": events})
    assert rows == [
        ("aten::mm", "nvjet_gemm", 1, pytest.approx(0.9)),
        ("aten::masked_fill > aten::masked_fill_", "elementwise_kernel<128>", 1, pytest.approx(0.5)),
        ("aten::masked_fill > aten::clone > aten::copy_", "Memcpy DtoD (Device -> Device)", 1, pytest.approx(0.3)),
        ("aten::cat", "CatArrayBatchedCopy", 2, pytest.approx(0.25)),
        ("(no host op)", "elementwise_kernel<128>", 1, pytest.approx(0.05)),
    ]
    assert [r[1] for r in ps.attribute_kernels({"traceEvents": events}, "cat|memcpy")] == \
        ["Memcpy DtoD (Device -> Device)", "CatArrayBatchedCopy"]
    path = tmp_path / "run" / "x_rank0.pt.trace.json.gz"
    path.parent.mkdir()
    path.write_bytes(gzip.compress(json.dumps({"traceEvents": events}).encode()))
    ps.main([str(tmp_path / "run"), "--attribute", "Cat", "--top", "3"])
    out = capsys.readouterr().out
    assert "### run: x_rank0.pt.trace.json.gz" in out and "| aten::cat | CatArrayBatchedCopy | 2 | 0.250 |" in out


def test_trace_prefix_separates_prefill_and_decode_profiles(tmp_path, capsys):
    """gpu_compare's profile and profile_decode phases write into one run folder; each summary
    reads only its own traces (by vLLM's profile_prefix), also from a tar archive."""
    folder = tmp_path / "profiles" / "plugin-rr"
    folder.mkdir(parents=True)
    for prefix, scale in (("prefill16K", 1.0), ("decode8", 5.0)):
        name = f"{prefix}_dp0_pp0_tp0_dcp0_ep0_rank0.1700000000000000000.pt.trace.json"
        (folder / name).write_text(json.dumps(fake_trace(scale)))
    indexer = {p: ps.run_means(ps.collect_runs([folder.parent], trace_prefix=p)["plugin-rr"])["categories"]["indexer"]
               for p in ("prefill", "decode")}
    assert indexer == {"prefill": pytest.approx(0.4), "decode": pytest.approx(2.0)}
    assert ps.collect_runs([folder.parent], trace_prefix="verify") == {}
    archive = tmp_path / "raw.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder.parent, arcname="profiles")
    from_tar = ps.collect_runs([archive], trace_prefix="decode")
    assert ps.run_means(from_tar["plugin-rr"])["categories"]["indexer"] == pytest.approx(2.0)
    ps.main([str(folder.parent), "--trace-prefix", "decode", "--title", "Decode profile"])
    out = capsys.readouterr().out
    assert out.startswith("## Decode profile: GPU time per category") and "2.00" in out


def test_host_side_of_the_engine_step():
    """Inside the step (thread 1, 0..1000 µs): aten ops' self time, Python functions of a
    stacked trace, runtime calls and the blocking ones among them, and the untraced rest;
    events outside the step or on other threads do not count."""
    def ev(name, ts, dur, cat="cpu_op", tid=1):
        return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": T0 + ts, "dur": dur}

    events = [
        ev("execute_context_1(1024)_generation_0(0)", 0, 1000, cat="user_annotation"),
        ev("model.forward", 10, 500, cat="python_function"),       # self: 500 - 100 - 250 = 150
        ev("aten::copy_", 20, 100),                                 # self: 100 - 60 = 40
        ev("cudaMemcpyAsync", 30, 60, cat="cuda_runtime"),
        ev("aten::item", 200, 250),                                 # self: 250 - 200 = 50
        ev("cudaStreamSynchronize", 210, 200, cat="cuda_runtime"),  # blocking
        ev("aten::mm", 600, 100),                                   # self: 100 - 10 = 90
        ev("cudaLaunchKernel", 650, 10, cat="cuda_runtime"),
        ev("aten::mm", 1200, 100),                                  # after the step: not counted
        ev("aten::mm", 100, 100, tid=2),                            # another thread: not counted
    ]
    s = ps.summarize_trace({"traceEvents": events + [kernel("nvjet_gemm", 700, 50)]})
    assert s["host_op_ms"] == pytest.approx((150 + 40 + 50 + 90) / 1e3)
    assert s["host_blocking_ms"] == pytest.approx(0.200)
    # covered: 10..510 (forward and all inside it) and 600..700 -> 600 of 1000 µs
    assert s["host_untraced_ms"] == pytest.approx(0.400)
    assert s["host_ops"]["cudaStreamSynchronize"] == {"calls": 1, "ms": pytest.approx(0.2)}
    assert s["host_ops"]["model.forward"] == {"calls": 1, "ms": pytest.approx(0.15)}
    assert s["host_ops"]["aten::mm"] == {"calls": 1, "ms": pytest.approx(0.09)}
    assert list(s["host_ops"])[0] == "cudaStreamSynchronize"

    md = ps.render_markdown({"plugin": {"ranks": {"0": s}}, "native": {"ranks": {"0": ps.summarize_trace(fake_trace())}}},
                            baseline="native")
    assert "| **host: in blocking CUDA calls (syncs)** | 0.20 | 0.00 | +0.20 |" in md
    assert "Host ops by self time inside the engine steps" in md
    assert "| cudaStreamSynchronize | 0.200 (1) | – |" in md


def test_host_side_without_steps_is_unknown():
    s = ps.summarize_trace({"traceEvents": [kernel("nvjet_gemm", 0, 50)]})
    assert (s["host_op_ms"], s["host_blocking_ms"], s["host_untraced_ms"], s["host_ops"]) == (None, None, None, {})
    assert "| **host: in blocking CUDA calls (syncs)** | – |" in ps.render_markdown({"r": {"ranks": {"0": s}}})
