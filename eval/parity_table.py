"""Issue 18's table from gpu_compare.py reports: the plugin against vLLM's own model at -tp 1,
one row per (weights, KV dtype, MTP, round-robin or not) variant, every point a ratio.

    python3 eval/parity_table.py eval/results/compare_h100_n1_v034_*_1205?.json [--out table.md]

TTFT: vLLM's own median / the plugin's (> 1 = the plugin faster); decode: the plugin's ms per
token / vLLM's own (< 1 = faster). A report run with ``--rounds`` counts with every round's
samples pooled. A point further than ``--goal`` (0.97) behind is marked ``**behind**``. Each
row names its card, vLLM version, date and report, since ratios compare only within one run.
``--latest`` folds the reports into one row per variant, each point from the newest report that
measured it (the state of the table after several sessions' runs), naming which report gave which
points. ``--pool`` takes the reports as one: calls made back to back on one machine (same card,
vLLM and checkpoint), every engine of every call a round, all samples pooled. At host-bound points
(1K, decode) engines of one config differed by about 5 % on one host (H100, 12-06), so one pair
of engines cannot settle a ratio there; several calls' engines together can.

Standard library only; run names and pooled rounds through gpu_compare.py's own functions.
Runs on the GPU host or here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gpu_compare import pooled_rounds, ratio_to_reference, variant_suffix, without_round

TTFT_POINTS = ["1K", "4K", "16K", "32K", "64K", "8x1K", "4x4K"]
DECODE_POINTS = ["1", "8"]
# the plugin's configurations at -tp 1 and what the row calls them
PLUGIN_CONFIGS = {"plugin-off": "plugin", "plugin-rr": "plugin round-robin"}
NATIVE = "native-tp"


def weights_of(meta: dict) -> str:
    if meta.get("weights") == "bf16":
        return "bf16"
    return "fp8" if meta["model_config"].get("quantization_config") else "bf16"


def pooled_report(paths: list[Path]) -> tuple[dict, str]:
    """The reports as one (``--pool``) and its name: the runs of the k-th report (k >= 2) renamed
    as further rounds (``native-tp@2`` of call 2 -> ``native-tp@c2.2``). Refused unless every
    report ran on the same card, vLLM and checkpoint, and on the same machine where the reports
    say (``gpu_compare.machine_id``)."""
    reports = [json.loads(path.read_text()) for path in paths]

    def identity(report):
        versions = next((r["versions"] for r in report["runs"].values() if r.get("versions")), {})
        return report["meta"]["gpu"], versions.get("vllm"), weights_of(report["meta"]), report["meta"]["model_config"]

    first, machine = identity(reports[0]), reports[0]["meta"].get("machine")
    for path, report in zip(paths[1:], reports[1:]):
        if identity(report) != first:
            raise SystemExit(f"--pool: {path.name} is not from the card / vLLM / checkpoint of {paths[0].name}")
        # reports from before gpu_compare recorded the machine (12-06 07:10) are taken on trust
        if machine and report["meta"].get("machine") and report["meta"]["machine"] != machine:
            raise SystemExit(f"--pool: {path.name} ran on another machine than {paths[0].name}")
    runs = dict(reports[0]["runs"])
    for k, report in enumerate(reports[1:], start=2):
        for name, run in report["runs"].items():
            round_no = name[len(without_round(name)) + 1:]
            runs[f"{without_round(name)}@c{k}" + (f".{round_no}" if round_no else "")] = run
    meta = {**reports[0]["meta"], "date": f"{reports[0]['meta']['date']} … {reports[-1]['meta']['date']}"}
    return {"meta": meta, "runs": runs}, " + ".join(path.name for path in paths)


def report_rows(report: dict, report_name: str) -> list[dict]:
    """One row per plugin configuration and variant of a report (a file's, or ``pooled_report``'s)
    named ``report_name``: its points' ratios and times (every round's samples pooled:
    ``gpu_compare.pooled_rounds``)."""
    meta, runs = report["meta"], report["runs"]
    pooled = pooled_rounds({name: run for name, run in runs.items() if run.get("ttft") or run.get("decode")})
    versions = next((r["versions"] for r in runs.values() if r.get("versions")), {})
    rows = []
    for base, plugin in pooled.items():
        variant = variant_suffix(base)
        config, native = base[: len(base) - len(variant)], pooled.get(NATIVE + variant)
        if config not in PLUGIN_CONFIGS or not native:
            continue
        points = {}
        for key, labels in (("ttft", TTFT_POINTS), ("decode", DECODE_POINTS)):
            scale = 1e3 if key == "ttft" else 1.0
            for label in labels:
                if label in native[key] and label in plugin[key]:
                    a, b = native[key][label][0], plugin[key][label][0]
                    points[f"{key}:{label}"] = {"ratio": ratio_to_reference(key, a, b),
                                                "native": a * scale, "plugin": b * scale}
        kv = "fp8" if "+fp8" in variant else "bf16"
        rows.append({
            "variant": f"{weights_of(meta)} weights, {kv} KV" + (", MTP k=1" if "+mtp" in variant else "")
                       + ("" if config == "plugin-off" else f" ({PLUGIN_CONFIGS[config]})"),
            "gpu": meta["gpu"], "vllm": versions.get("vllm", "?"), "date": meta["date"], "report": report_name,
            "rounds": min(plugin["rounds"], native["rounds"]), "points": points,
        })
    return rows


def _source(row: dict) -> str:
    rounds = f", {row['rounds']} rounds pooled" if row["rounds"] > 1 else ""
    return f"{row['gpu']}, {row['vllm']}, {row['date']}, `{row['report']}`{rounds}"


def latest_rows(rows: list[dict]) -> list[dict]:
    """One row per variant: each point from the newest row (by report date) that has it."""
    merged: dict[str, dict] = {}
    for row in sorted(rows, key=lambda r: r["date"], reverse=True):
        into = merged.setdefault(row["variant"], {"variant": row["variant"], "points": {}, "sources": []})
        new = {key: point for key, point in row["points"].items() if key not in into["points"]}
        if new:
            into["points"].update(new)
            labels = " ".join(key.split(":")[1] if key.startswith("ttft") else f"b{key.split(':')[1]}"
                              for key in new)
            into["sources"].append(f"{_source(row)} ({labels})")
    for row in merged.values():
        row["source"] = "; ".join(row.pop("sources"))
    return list(merged.values())


def _cell(point: dict | None, decode: bool, goal: float) -> str:
    if point is None:
        return "–"
    ratio = point["ratio"]
    behind = ratio > 2 - goal if decode else ratio < goal
    digits = 3 if behind and round(ratio, 2) == round(2 - goal if decode else goal, 2) else 2  # 1.031, not 1.03
    text = f"{ratio:.{digits}f}" + ("×" if decode else "")
    return f"**{text} behind**" if behind else text


def render(rows: list[dict], goal: float) -> str:
    points = [("ttft", p) for p in TTFT_POINTS] + [("decode", p) for p in DECODE_POINTS]
    shown = [(k, p) for k, p in points if any(f"{k}:{p}" in r["points"] for r in rows)]
    header = ["variant"] + [p if k == "ttft" else f"decode b{p}" for k, p in shown] + ["card, vLLM, date, report"]
    lines = [f"Ratio to vLLM's own DeepSeek-V3.2 at -tp 1 (TTFT: speed, > 1 = the plugin faster; decode: time, "
             f"< 1 = faster; **behind**: more than {1 - goal:.0%} behind)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [_cell(r["points"].get(f"{k}:{p}"), k == "decode", goal) for k, p in shown]
        lines.append("| " + " | ".join([r["variant"]] + cells + [r.get("source") or _source(r)]) + " |")
    lines += ["", "Times (ms; TTFT median, decode ms per token): vLLM's own / the plugin", "",
              "| " + " | ".join(header[:-1]) + " |", "|" + "---|" * (len(header) - 1)]
    for r in rows:
        cells = []
        for k, p in shown:
            point = r["points"].get(f"{k}:{p}")
            spec = ".1f" if k == "ttft" else ".2f"
            cells.append("–" if point is None else f"{point['native']:{spec}} / {point['plugin']:{spec}}")
        lines.append("| " + " | ".join([r["variant"]] + cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("reports", nargs="+", help="gpu_compare.py report JSONs (compare_<gpu>_n1*.json)")
    ap.add_argument("--goal", type=float, default=0.97, help="the parity goal (issue 18: 0.97)")
    ap.add_argument("--latest", action="store_true",
                    help="one row per variant, each point from the newest report that measured it")
    ap.add_argument("--pool", action="store_true",
                    help="the reports as one: back-to-back calls on one machine, every engine a round")
    ap.add_argument("--out", help="also write the table here")
    args = ap.parse_args(argv)
    if args.pool:
        report, name = pooled_report([Path(p) for p in args.reports])
        rows = report_rows(report, name)
    else:
        rows = [row for path in map(Path, args.reports)
                for row in report_rows(json.loads(path.read_text()), path.name)]
    if args.latest:
        rows = latest_rows(rows)
    text = render(rows, args.goal) if rows else "no report with vLLM's own model and the plugin side by side\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
