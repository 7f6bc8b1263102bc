"""Plot a gpu_compare.py report (JSON) on any machine with matplotlib, e.g. after the GPU run.

    python eval/plot_compare.py compare_h100_n2.json [-o compare_h100_n2.png]

Three panels: single-prompt TTFT against prompt length (log-log), TTFT speed-up against
native-tp of the same kv / MTP variant and round, and decode milliseconds per output token.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gpu_compare import variant_suffix


def _single_prompt_ttft(run: dict) -> tuple[list[int], list[float]]:
    points = sorted((m["prompt_tokens"], m["median_s"] * 1e3) for m in run.get("ttft", {}).values()
                    if m.get("kind") == "single")
    return [p for p, _ in points], [t for _, t in points]


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {name: run for name, run in report["runs"].items() if run.get("ttft") or run.get("decode")}
    all_lengths = sorted({n for run in runs.values() for n in _single_prompt_ttft(run)[0]})
    fig, (ax_ttft, ax_speed, ax_decode) = plt.subplots(1, 3, figsize=(17, 5))
    # one colour per run in all three panels
    color = {name: f"C{i % 10}" for i, name in enumerate(runs)}
    for name, run in runs.items():
        lengths, ms = _single_prompt_ttft(run)
        if lengths:
            ax_ttft.plot(lengths, ms, marker="o", label=name, color=color[name])
        base_name = "native-tp" + variant_suffix(name)
        base = dict(zip(*_single_prompt_ttft(report["runs"].get(base_name, {}))))
        speed = [(n, base[n] / t) for n, t in zip(lengths, ms) if n in base]
        if speed and name != base_name:
            ax_speed.plot([n for n, _ in speed], [s for _, s in speed], marker="o", label=f"{name} vs {base_name}",
                          color=color[name])
    for ax in (ax_ttft, ax_speed):
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_lengths, [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in all_lengths])
        ax.set_xlabel("prompt tokens")
        ax.grid(True, which="both", alpha=0.3)
    if not ax_speed.get_lines():
        ax_speed.text(0.5, 0.5, "no native-tp TTFT to compare with", transform=ax_speed.transAxes, ha="center")
    ax_ttft.set_yscale("log")
    ax_ttft.set_ylabel("TTFT (ms, median)")
    ax_ttft.set_title("single-prompt TTFT")
    ax_speed.axhline(1.0, color="gray", linewidth=1)
    ax_speed.set_ylabel("native-tp TTFT / run TTFT")
    ax_speed.set_title("speed-up vs vLLM native TP (> 1 = faster)")

    batch_sizes = sorted({int(b) for run in runs.values() for b in run.get("decode", {})})
    width = 0.8 / max(len(runs), 1)
    for i, (name, run) in enumerate(runs.items()):
        values = [run.get("decode", {}).get(str(b), {}).get("ms_per_token") for b in batch_sizes]
        xs = [j + i * width for j, v in enumerate(values) if v is not None]
        if xs:
            ax_decode.bar(xs, [v for v in values if v is not None], width, label=name, color=color[name])
    ax_decode.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(batch_sizes))],
                         [f"batch {b}" for b in batch_sizes])
    ax_decode.set_ylabel("ms per output token")
    ax_decode.set_title("decode")
    for ax in (ax_ttft, ax_speed, ax_decode):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    meta = report["meta"]
    fig.suptitle(f"vLLM native vs vllm_cp_nsa: {meta['gpu']} x{meta['n']}, {meta['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("-o", "--out", type=Path, help="PNG path (default: the report's, .png)")
    args = ap.parse_args(argv)
    out = args.out or args.report.with_suffix(".png")
    plot(json.loads(args.report.read_text()), out)
    print(out)


if __name__ == "__main__":
    main()
