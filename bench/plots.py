"""Plots and Markdown tables from the alternatives / HTTP benchmark results.

    .venv/bin/python bench/plots.py [--alternatives docs/bench/alternatives.json] \
        [--http docs/bench/http_load.json] [--outdir docs/bench] [--tables]

Writes PNGs next to the JSON (matplotlib, Agg backend) and, with ``--tables``, prints the
Markdown tables used in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SWAP_METHODS = [
    ("deltaclip", "deltaclip fused patch+restore"),
    ("deltaclip_1t", "deltaclip, 1 thread"),
    ("deltaclip_index_put_", "deltaclip data, index_put_ (candidate)"),
    ("deltaclip_scatter_", "deltaclip data, scatter_ (candidate)"),
    ("deltaclip_numpy", "deltaclip data, numpy assignment (candidate)"),
    ("loop", "per-tensor Python loop"),
    ("loop_1t", "per-tensor Python loop, 1 thread"),
    ("subtract", "subtract-to-restore"),
    ("subtract_1t", "subtract-to-restore, 1 thread"),
    ("dense_load_state_dict", "dense copy, load_state_dict"),
    ("dense_reload_file", "dense copy, reload from file"),
    ("peft_set_adapter", "PEFT LoRA set_adapter"),
    ("peft_hotswap_state_dict", "PEFT hotswap_adapter_from_state_dict"),
    ("peft_hotswap_file", "PEFT hotswap_adapter (file)"),
    ("peft_merge_unmerge", "PEFT LoRA merged (unmerge+merge)"),
]


def pct(d: float) -> str:
    return f"{d * 100:g}%"


def ms(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 1:
        return f"{x:.1f}"
    return f"{x:.3f}"


# ------------------------------------------------------------------------------ plots


def plot_swap(alt: dict[str, Any], outdir: Path, plt: Any) -> None:
    rows = alt["swap"]["rows"]
    xs = [r["density"] * 100 for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = plt.get_cmap("tab20").colors
    for i, (key, label) in enumerate(SWAP_METHODS):
        if key not in rows[0] or key.endswith("_1t"):
            continue
        style = (
            {"ls": "--", "lw": 1}
            if "candidate" in label
            else {"lw": 2 if key == "deltaclip" else 1.3}
        )
        ax.plot(xs, [r[key]["p50_ms"] for r in rows], marker="o", ms=4, color=colors[i % 20], label=label, **style)  # fmt: skip
    fwd = alt["swap"]["forward_b1"]["p50_ms"]
    ax.axhline(fwd, color="k", ls="--", lw=1, label=f"batch-1 forward ({fwd:.0f} ms)")
    ax.axhline(fwd * 0.02, color="k", ls=":", lw=1, label="2 % of a batch-1 forward")
    ax.set(xscale="log", yscale="log", xlabel="changed weights (% of the ViT-B-16 image tower)",
           ylabel="one task switch, p50 (ms)", title="Swap cost by method")  # fmt: skip
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(outdir / "swap_cost.png", dpi=120)
    plt.close(fig)


def plot_exactness(alt: dict[str, Any], outdir: Path, plt: Any) -> None:
    rows = alt["exactness"]["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, dtype in zip(axes, ("bfloat16", "float16"), strict=True):
        styles = iter([("o", "-"), ("s", "--"), ("^", ":"), ("D", "-.")])
        for r in (r for r in rows if r["dtype"] == dtype):
            curve = {int(k): v for k, v in r["drift_by_cycle"].items()}
            xs = sorted(curve)
            marker, ls = next(styles, ("o", "-"))
            ax.plot(xs, [curve[x] for x in xs], marker=marker, ls=ls, label=r["method"])
        ax.set(xscale="log", yscale="symlog", xlabel="patch/restore cycles", title=dtype)
        ax.set_yscale("symlog", linthresh=1e-6)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("max |W − W0| of the base")
    axes[1].legend(fontsize=7)
    fig.suptitle("Base drift after repeated swaps (0 = bit-identical)")
    fig.tight_layout()
    fig.savefig(outdir / "exactness.png", dpi=120)
    plt.close(fig)


def plot_memory(alt: dict[str, Any], outdir: Path, plt: Any) -> None:
    mem, sto = alt["memory"]["rows"], alt["storage"]["rows"]
    labels = [pct(r["density"]) for r in mem]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    w = 0.25
    xs = range(len(mem))
    a1.bar([x - w for x in xs], [r["adapters_per_gib"] for r in mem], w, label="deltaclip prepared")
    a1.bar(list(xs), [r["lora_per_gib"] for r in mem], w, label="PEFT LoRA (matched params)")
    a1.bar([x + w for x in xs], [r["dense_per_gib"] for r in mem], w, label="dense copy per task")
    a1.set(yscale="log", ylabel="adapters per GiB of memory", xlabel="changed weights", title="Resident memory")  # fmt: skip
    a1.set_xticks(list(xs), labels)
    a1.legend(fontsize=7)
    a2.bar(
        [x - w / 2 for x in xs],
        [r["v1_per_weight"] for r in sto],
        w,
        label="format v1 (safetensors)",
    )
    a2.bar([x + w / 2 for x in xs], [r["reference_per_weight"] for r in sto], w, label="reference (sparse COO pickle)")  # fmt: skip
    a2.set(ylabel="bytes per changed weight (residual only)", xlabel="changed weights", title="Storage")  # fmt: skip
    a2.set_xticks(list(xs), labels)
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(outdir / "memory_storage.png", dpi=120)
    plt.close(fig)


def plot_http(http: dict[str, Any], outdir: Path, plt: Any) -> None:
    caches = list(http.get("http", {}))
    if caches:
        fig, axes = plt.subplots(2, len(caches), figsize=(5.5 * len(caches), 7), squeeze=False)
        for j, cache in enumerate(caches):
            rows = http["http"][cache]["rows"]
            single = next(r for r in rows if r["n"] == 1)
            for kind in ("uniform", "zipf"):
                sel = sorted((r for r in rows if r["popularity"] == kind and r["n"] > 1), key=lambda r: r["n"])  # fmt: skip
                ns = [r["n"] for r in sel]
                axes[0][j].plot(ns, [r["rps"] for r in sel], marker="o", label=kind)
                axes[1][j].plot(ns, [r["p99_ms"] for r in sel], marker="o", label=kind)
            axes[0][j].axhline(single["rps"], color="k", ls="--", lw=1, label="1 task (merged-model bound)")  # fmt: skip
            axes[0][j].axhline(0.95 * single["rps"], color="k", ls=":", lw=1, label="95 % of the bound")  # fmt: skip
            axes[1][j].axhline(single["p99_ms"], color="k", ls="--", lw=1, label="1 task")
            axes[0][j].set(
                xscale="log", ylabel="requests/s", title=f"{cache} cache", ylim=(0, None)
            )
            axes[1][j].set(xscale="log", ylabel="p99 latency (ms)", xlabel="distinct tasks N", ylim=(0, None))  # fmt: skip
            for ax in (axes[0][j], axes[1][j]):
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=7)
        fig.suptitle(f"HTTP /predict, {http['arch']} on {http['device']}, {http['clients']} closed-loop clients")  # fmt: skip
        fig.tight_layout()
        fig.savefig(outdir / "http_throughput.png", dpi=120)
        plt.close(fig)
    if "inprocess" in http:
        rows = http["inprocess"]["rows"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, kind in zip(axes, ("uniform", "zipf"), strict=True):
            sel = sorted((r for r in rows if r["popularity"] == kind or r["n"] == 1), key=lambda r: r["n"])  # fmt: skip
            ns = [r["n"] for r in sel]
            for key, label in (("merged", "merged model (bound)"), ("deltaclip", "deltaclip (grouped)"),
                               ("peft_mixed", "PEFT LoRA mixed adapter_names")):  # fmt: skip
                ax.plot(ns, [r[f"{key}_img_s"] for r in sel], marker="o", label=label)
            ax.set(
                xscale="log", xlabel="distinct tasks N", title=f"in process, {kind}", ylim=(0, None)
            )
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel("images/s")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(outdir / "inprocess_mixed.png", dpi=120)
        plt.close(fig)


# ------------------------------------------------------------------------------ tables


def tables_alternatives(alt: dict[str, Any]) -> None:
    if "swap" in alt:
        sw = alt["swap"]
        fwd = sw["forward_b1"]
        print(f"Batch-1 forward of the image tower: p50 {ms(fwd['p50_ms'])} ms, p99 {ms(fwd['p99_ms'])} ms.\n")  # fmt: skip
        rows = sw["rows"]
        head = "| method | " + " | ".join(f"{pct(r['density'])} ({r['nnz']:,} w, LoRA r={r['lora_rank']})" for r in rows) + " |"  # fmt: skip
        print(head)
        print("|---|" + "---|" * len(rows))
        for key, label in SWAP_METHODS:
            if key not in rows[0]:
                continue
            cells = [
                f"{ms(r[key]['p50_ms'])} / {ms(r[key]['p99_ms'])} ms ({r[key]['vs_forward_b1'] * 100:.2f} %)"
                for r in rows
            ]
            print(f"| {label} | " + " | ".join(cells) + " |")
        cells = [
            f"+{(r['lora_forward_b1']['p50_ms'] - r['forward_b1_paired']['p50_ms']):.1f} ms (+{(r['lora_forward_b1']['vs_forward_b1'] - 1) * 100:.1f} %)"
            if "forward_b1_paired" in r
            else "n/a"
            for r in rows
        ]
        print("| unmerged LoRA: extra cost of every batch-1 forward | " + " | ".join(cells) + " |")
        print()
    if "exactness" in alt:
        print("| dtype | method | cycles | max abs drift of the base | drifted weights | first drift at cycle | fingerprint matches | task weights off by |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        for r in alt["exactness"]["rows"]:
            task = (
                "—"
                if r["task_weights_max_abs_error"] is None
                else f"{r['task_weights_max_abs_error']:.3g}"
            )
            first = r["first_drift_cycle"] if r["first_drift_cycle"] is not None else "never"
            print(f"| {r['dtype']} | {r['method']} | {r['cycles']:,} | {r['max_abs_drift']:.3g} | {r['drifted_weights']:,} "
                  f"| {first} | {'yes' if r['fingerprint_matches'] else '**no**'} | {task} |")  # fmt: skip
        print()
    if "memory" in alt:
        print("| changed weights | nnz | deltaclip prepared bytes (residual + head) | bytes per changed weight | measured RSS per adapter | adapters per GiB | PEFT LoRA bytes (rank) | LoRA per GiB | dense copy bytes | dense per GiB |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in alt["memory"]["rows"]:
            print(f"| {pct(r['density'])} | {r['nnz']:,} | {r['prepared_bytes']:,} ({r['residual_bytes']:,} + {r['head_bytes']:,}) "
                  f"| {r['bytes_per_changed_weight']:.1f} | {r['measured_bytes_per_adapter']:,.0f} | {r['adapters_per_gib']:,.0f} "
                  f"| {r['lora_bytes']:,} (r={r['lora_rank']}) | {r['lora_per_gib']:,.0f} | {r['dense_bytes']:,} | {r['dense_per_gib']:.1f} |")  # fmt: skip
        print()
    if "storage" in alt:
        print("| changed weights | v1 file bytes (whole adapter) | v1 residual bytes per changed weight | reference bytes per changed weight | v1, 2-D weights only | reference, 2-D weights only | reference / v1 |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for r in alt["storage"]["rows"]:
            print(f"| {pct(r['density'])} | {r['v1_file_bytes']:,} | {r['v1_per_weight']:.2f} | {r['reference_per_weight']:.2f} "
                  f"| {r['v1_2d_per_weight']:.2f} | {r['reference_2d_per_weight']:.2f} | {r['reference_bytes'] / r['v1_residual_bytes']:.2f}× |")  # fmt: skip
        print()


def tables_http(http: dict[str, Any]) -> None:
    for cache, res in http.get("http", {}).items():
        print(f"{cache} cache ({http['cache_bytes'][cache]:,} bytes):\n")
        print("| N tasks | popularity | requests/s | vs 1 task | p50 ms | p99 ms | cold loads per run | mean batch | errors |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|")
        for r in sorted(res["rows"], key=lambda r: (r["n"], r["popularity"])):
            print(f"| {r['n']} | {r['popularity']} | {r['rps']:.1f} | {r.get('vs_single', 1):.2f} | {r['p50_ms']:,.0f} "
                  f"| {r['p99_ms']:,.0f} | {r['cold_loads_per_rep']:.0f} | {r['mean_batch']:.1f} | {r['errors']} |")  # fmt: skip
        print()
    if "inprocess" in http:
        ip = http["inprocess"]
        print("| N tasks | popularity | merged model img/s | deltaclip img/s (vs merged) | PEFT mixed img/s (vs merged) |")  # fmt: skip
        print("|---|---|---|---|---|")
        for r in ip["rows"]:
            print(f"| {r['n']} | {r['popularity']} | {r['merged_img_s']:.1f} | {r['deltaclip_img_s']:.1f} ({r['deltaclip_vs_merged']:.2f}) "
                  f"| {r['peft_mixed_img_s']:.1f} ({r['peft_mixed_vs_merged']:.2f}) |")  # fmt: skip
        print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--alternatives", type=Path, default=ROOT / "docs" / "bench" / "alternatives.json")  # fmt: skip
    ap.add_argument("--http", type=Path, default=ROOT / "docs" / "bench" / "http_load.json")
    ap.add_argument("--outdir", type=Path, default=ROOT / "docs" / "bench")
    ap.add_argument("--tables", action="store_true", help="print the Markdown tables")
    args = ap.parse_args()
    alt = json.loads(args.alternatives.read_text()) if args.alternatives.exists() else None
    http = json.loads(args.http.read_text()) if args.http.exists() else None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
        print("matplotlib is not installed: tables only (pip install matplotlib)")
    if plt is not None:
        args.outdir.mkdir(parents=True, exist_ok=True)
        if alt is not None:
            if "swap" in alt:
                plot_swap(alt, args.outdir, plt)
            if "exactness" in alt:
                plot_exactness(alt, args.outdir, plt)
            if "memory" in alt and "storage" in alt:
                plot_memory(alt, args.outdir, plt)
        if http is not None:
            plot_http(http, args.outdir, plt)
        print(f"plots written to {args.outdir}")
    if args.tables:
        if alt is not None:
            tables_alternatives(alt)
        if http is not None:
            tables_http(http)


if __name__ == "__main__":
    main()
