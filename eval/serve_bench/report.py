"""The report: one JSON holding every configuration's sweep, a markdown rendering of it and
one PNG per metric (one line per server configuration, one panel per workload).

Stdlib only (matplotlib for the PNGs, imported when drawing), so ``python -m eval.serve_bench
report`` runs on any machine with matplotlib, e.g. to merge the JSONs of separate device calls.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

# metric key -> (title, unit, scale from the JSON's unit, how to read the summary)
PLOT_METRICS = {
    "ttft_p50": ("TTFT p50", "ms", 1e3, ("ttft_s", "p50")),
    "ttft_p99": ("TTFT p99", "ms", 1e3, ("ttft_s", "p99")),
    "tpot_p50": ("TPOT p50", "ms", 1e3, ("tpot_s", "p50")),
    "tpot_p99": ("TPOT p99", "ms", 1e3, ("tpot_s", "p99")),
    "output_throughput": ("output tokens/s", "tok/s", 1.0, ("output_throughput",)),
    "request_throughput": ("completed requests/s", "req/s", 1.0, ("request_throughput",)),
}


def metric(summary: dict, path: tuple) -> float | None:
    value = summary
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def rate_key(rate) -> float:
    return math.inf if rate == "inf" else float(rate)


def rate_text(rate) -> str:
    return "inf" if rate == "inf" else f"{float(rate):g}"


def merge(reports: list[dict]) -> dict:
    """Several reports (e.g. one per device call) as one: the first one's settings, every
    configuration in order (a later configuration of the same name replaces an earlier one)."""
    if not reports:
        raise ValueError("nothing to merge")
    merged = dict(reports[0])
    configs: dict[str, dict] = {}
    for report in reports:
        for config in report["configs"]:
            configs[config["name"]] = config
    merged["configs"] = list(configs.values())
    if any(r.get("settings") != reports[0].get("settings") for r in reports[1:]):
        merged["merge_note"] = ("settings differ between the merged reports; each configuration keeps its own "
                                "under configs[].settings")
        for report in reports:
            for config in report["configs"]:
                config.setdefault("settings", report.get("settings"))
    merged.pop("source", None)
    if len(reports) > 1:
        merged["merged_from"] = [r.get("source") or r.get("date") for r in reports]
    return merged


def workloads_of(report: dict) -> list[str]:
    names: list[str] = []
    for config in report["configs"]:
        for name in config.get("results", {}):
            if name not in names:
                names.append(name)
    return names


def ms_text(x) -> str:
    return "–" if x is None else f"{x * 1e3:.1f}"


def _num(x, spec=".1f") -> str:
    return "–" if x is None else format(x, spec)


def baseline_names(report: dict) -> list[str]:
    """The configurations others are compared against: ``settings.baselines`` if set, else
    every ``native-*`` configuration, else the first one."""
    names = [c["name"] for c in report["configs"]]
    wanted = [n for n in (report.get("settings", {}).get("baselines") or []) if n in names]
    return wanted or [n for n in names if n.startswith("native-")] or names[:1]


def comparison_rows(report: dict, workload: str) -> list[dict]:
    """Per rate and non-baseline configuration: output tokens/s over the best baseline's, and the
    best baseline's p99 TTFT over this one's (both > 1.0 = better than every baseline)."""
    bases = baseline_names(report)
    by_name = {c["name"]: {rate_text(s["rate"]): s for s in c.get("results", {}).get(workload, [])}
               for c in report["configs"]}
    rows = []
    rates = sorted({r for per in by_name.values() for r in per}, key=rate_key)
    for rate in rates:
        base = [by_name[b][rate] for b in bases if rate in by_name.get(b, {})]
        best_tput = max((s["output_throughput"] for s in base if s["output_throughput"]), default=None)
        best_ttft = min((s["ttft_s"]["p99"] for s in base if s["ttft_s"]["p99"] is not None), default=None)
        for name, per in by_name.items():
            if name in bases or rate not in per:
                continue
            s = per[rate]
            rows.append({
                "rate": rate, "config": name,
                "throughput_vs_best_baseline": (s["output_throughput"] / best_tput
                                                if best_tput and s["output_throughput"] else None),
                "p99_ttft_speedup_vs_best_baseline": (best_ttft / s["ttft_s"]["p99"]
                                                      if best_ttft and s["ttft_s"]["p99"] else None),
                "failed": s["failed"],
            })
    return rows


def markdown(report: dict) -> str:
    s = report.get("settings", {})
    v = report.get("versions", {})
    lines = [f"# Serving benchmark: {report.get('title') or 'request-rate sweep'}", ""]
    lines.append(f"- date: {report.get('date')}; wall time {_num(report.get('wall_s'), '.0f')} s; "
                 f"host: {report.get('host', {}).get('accelerators') or 'unknown'}")
    if v:
        lines.append("- client side: " + ", ".join(f"{k} {val}" for k, val in v.items() if k != "git")
                     + (f"; repo {str(v['git'].get('commit'))[:12]}{' (dirty)' if v['git'].get('dirty') else ''}"
                        if v.get("git") else ""))
    if s:
        lines.append(f"- model: `{s.get('model')}`; output tokens {s.get('output_len')} (ignore_eos "
                     f"{s.get('ignore_eos')}); seed {s.get('seed')}; up to {s.get('num_requests')} requests and "
                     f"{s.get('max_duration_s')} s of arrivals per rate; request timeout {s.get('request_timeout_s')} s"
                     f"; max concurrency {s.get('max_concurrency') or 'unbounded'}")
        lines.append("- workloads: " + "; ".join(
            f"`{w['name']}` {w['min_tokens']}–{w['max_tokens']} tokens ({w['distribution']}), rates "
            + (", ".join(rate_text(r) for r in w["rates"]) if w["rates"] != "auto" else
               "auto (" + ", ".join(rate_text(r) for r in w.get("auto_rates", [])) + ")") + " req/s"
            for w in s.get("workloads", [])))
        if any(w["rates"] == "auto" for w in s.get("workloads", [])):
            lines.append("- auto rates: the first configuration measured `inf` first; the finite rates are fractions "
                         "of its completed requests/s there, the same for every configuration")
        lines.append("- prompts: random ordinary token ids of the model's tokenizer, sent as id lists "
                     "(exact lengths); Poisson arrivals (`inf`: all at t=0); each rate has its own prompts, "
                     "identical across configurations")
    if report.get("command"):
        lines.append(f"- command: `{report['command']}`")
    if report.get("merge_note"):
        lines.append(f"- note: {report['merge_note']}")
    lines += ["", "## Configurations", "", "| config | server | server version | ready (s) | warm-up (s) | error |",
              "|---|---|---|---:|---:|---|"]
    for c in report["configs"]:
        lines.append(f"| {c['name']} | `{c.get('server_description') or '–'}` | {c.get('server_version') or '–'} "
                     f"| {_num(c.get('ready_s'), '.0f')} | {_num(c.get('warmup_s'), '.0f')} "
                     f"| {(c.get('error') or '').splitlines()[0][:200] if c.get('error') else ''} |")
        if c.get("spec_decode"):
            sd = c["spec_decode"]
            lines.append(f"| ↳ MTP | accepted {sd.get('accepted_tokens')} of {sd.get('draft_tokens')} draft tokens | | | | |")
        if c.get("skipped"):
            lines.append(f"| ↳ skipped | {', '.join(c['skipped'])} | | | | |")
    for workload in workloads_of(report):
        lines += ["", f"## Workload `{workload}`", "",
                  "| config | rate (req/s) | sent | ok | failed | req/s | out tok/s | TTFT p50 | TTFT p99 "
                  "| TPOT p50 | TPOT p99 | ITL p50 | ITL p99 | E2E p50 | E2E p99 | peak in flight |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in report["configs"]:
            for r in c.get("results", {}).get(workload, []):
                lines.append(
                    f"| {c['name']} | {rate_text(r['rate'])} | {r['sent']} | {r['completed']} | {r['failed']} "
                    f"| {_num(r['request_throughput'], '.2f')} | {_num(r['output_throughput'])} "
                    f"| {ms_text(r['ttft_s']['p50'])} | {ms_text(r['ttft_s']['p99'])} | {ms_text(r['tpot_s']['p50'])} "
                    f"| {ms_text(r['tpot_s']['p99'])} | {ms_text(r['itl_s']['p50'])} | {ms_text(r['itl_s']['p99'])} "
                    f"| {ms_text(r['e2e_s']['p50'])} | {ms_text(r['e2e_s']['p99'])} | {r['peak_in_flight']} |")
        lines.append("")
        lines.append("Latencies in ms. TTFT: send to first streamed chunk; TPOT: (E2E − TTFT) / (output tokens − 1) "
                     "per request; ITL: gaps between streamed chunks; throughputs over first send → last response.")
        rows = comparison_rows(report, workload)
        if rows:
            bases = baseline_names(report)
            lines += ["", f"Against the best of {', '.join(f'`{b}`' for b in bases)} at the same rate "
                          "(> 1.00 = better):", "",
                      "| rate (req/s) | config | out tok/s ratio | p99 TTFT speed-up | failed |", "|---:|---|---:|---:|---:|"]
            for row in rows:
                lines.append(f"| {row['rate']} | {row['config']} | {_num(row['throughput_vs_best_baseline'], '.2f')} "
                             f"| {_num(row['p99_ttft_speedup_vs_best_baseline'], '.2f')} | {row['failed']} |")
    failures = [(c["name"], w, rate_text(r["rate"]), reason, n) for c in report["configs"]
                for w, per in c.get("results", {}).items() for r in per for reason, n in r["failure_reasons"].items()]
    warnings = [(c["name"], w, rate_text(r["rate"]), r) for c in report["configs"]
                for w, per in c.get("results", {}).items() for r in per
                if r.get("usage_missing") or r.get("prompt_token_mismatches")]
    if failures:
        lines += ["", "## Failures", "", "| config | workload | rate | reason | requests |", "|---|---|---:|---|---:|"]
        lines += [f"| {n} | {w} | {rate} | {reason.replace('|', '/')} | {k} |" for n, w, rate, reason, k in failures]
    if warnings:
        lines += ["", "## Token accounting warnings", ""]
        lines += [f"- {n} / {w} / rate {rate}: {r['usage_missing']} responses without usage (chunks counted as tokens), "
                  f"{r['prompt_token_mismatches']} with a reported prompt length unlike the one sent" for n, w, rate, r in warnings]
    if report.get("plots"):
        lines += ["", "## Plots", ""] + [f"- ![{name}]({Path(path).name})" for name, path in report["plots"].items()]
    elif report.get("plots_note"):
        lines += ["", f"Plots: {report['plots_note']}"]
    return "\n".join(lines) + "\n"


def plot(report: dict, stem: Path, metrics: list[str] | None = None) -> dict[str, str]:
    """One PNG per metric at ``<stem>_<metric>.png``: x = offered rate (categorical, ``inf``
    last), one line per configuration, one panel per workload. Raises ImportError without
    matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = workloads_of(report)
    colors = {c["name"]: f"C{i % 10}" for i, c in enumerate(report["configs"])}
    written = {}
    for key in metrics or list(PLOT_METRICS):
        title, unit, scale, path = PLOT_METRICS[key]
        panels = max(1, len(workloads))
        fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.4), squeeze=False, layout="constrained")
        for ax, workload in zip(axes[0], workloads):
            rates = sorted({rate_text(r["rate"]) for c in report["configs"]
                            for r in c.get("results", {}).get(workload, [])}, key=rate_key)
            position = {r: i for i, r in enumerate(rates)}
            for c in report["configs"]:
                points = [(position[rate_text(r["rate"])], metric(r, path)) for r in c.get("results", {}).get(workload, [])]
                xs = [x for x, _ in points]
                ys = [float("nan") if y is None else y * scale for _, y in points]
                if points:
                    ax.plot(xs, ys, marker="o", label=c["name"], color=colors[c["name"]])
            ax.set_xticks(range(len(rates)), rates)
            ax.set_xlabel("offered request rate (req/s)")
            ax.set_ylabel(f"{title} ({unit})")
            ax.set_title(f"{title} — {workload}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(textwrap.fill(report.get("title") or "serving benchmark", 70 * panels), fontsize=9)
        out = Path(f"{stem}_{key}.png")
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written[key] = str(out)
    return written


def write(report: dict, stem: Path, draw: bool = True) -> dict:
    """``<stem>.json``, ``<stem>.md`` and (when ``draw`` and matplotlib imports) the PNGs."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    report.pop("plots", None)
    report.pop("plots_note", None)
    if draw:
        try:
            report["plots"] = plot(report, stem)
        except ImportError as e:
            report["plots_note"] = (f"not drawn ({e}); draw them anywhere with matplotlib: "
                                    f"python -m eval.serve_bench report {stem.name}.json --out STEM")
    else:
        report["plots_note"] = "not drawn in this run (python -m eval.serve_bench report <json> draws them)"
    Path(f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    Path(f"{stem}.md").write_text(markdown(report))
    return report
