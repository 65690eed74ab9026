"""The harness's plots: PNGs and Markdown tables from result files of the swap, storage and http
questions.

    python -m bench plots [RESULT.json ...] [--outdir docs/bench] [--tables]

The files are merged in order, and every section found is drawn (matplotlib, Agg backend):
``swap`` → swap_cost.png, ``exactness`` → exactness.png, ``memory`` + ``storage`` →
memory_storage.png, ``http`` grid → http_throughput.png, ``inprocess`` → inprocess_mixed.png.
With ``--tables`` it prints the Markdown tables used in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.harness import print_table

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = [ROOT / "docs" / "bench" / "alternatives.json", ROOT / "docs" / "bench" / "http_load.json"]  # fmt: skip
SWAP_METHODS = [
    ("deltaclip", "deltaclip fused patch+restore"),
    ("deltaclip_1t", "deltaclip, 1 thread"),
    ("between_forwards", "deltaclip, between forward passes"),
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
    caches = list(http["http"]) if "cache_bytes" in http else []
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
        fig.suptitle(f"HTTP /predict, {http.get('arch') or http.get('base')} on {http['device']}, {http['clients']} closed-loop clients")  # fmt: skip
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
        fwd, rows = alt["swap"]["forward_b1"], alt["swap"]["rows"]
        print(f"Batch-1 forward of the image tower: p50 {ms(fwd['p50_ms'])} ms, p99 {ms(fwd['p99_ms'])} ms.\n")  # fmt: skip
        cells = [[label] + [f"{ms(r[key]['p50_ms'])} / {ms(r[key]['p99_ms'])} ms ({r[key]['vs_forward_b1'] * 100:.2f} %)" for r in rows]
                 for key, label in SWAP_METHODS if key in rows[0]]  # fmt: skip
        cells.append(["unmerged LoRA: extra cost of every batch-1 forward"] + [
            f"+{(r['lora_forward_b1']['p50_ms'] - r['forward_b1_paired']['p50_ms']):.1f} ms (+{(r['lora_forward_b1']['vs_forward_b1'] - 1) * 100:.1f} %)"
            if "forward_b1_paired" in r else "n/a" for r in rows])  # fmt: skip
        print_table(["method"] + [f"{pct(r['density'])} ({r['nnz']:,} w, LoRA r={r['lora_rank']})" for r in rows], cells)  # fmt: skip
    if "exactness" in alt:
        print_table(["dtype", "method", "cycles", "max abs drift of the base", "drifted weights", "first drift at cycle", "fingerprint matches", "task weights off by"],
                    [[r["dtype"], r["method"], f"{r['cycles']:,}", f"{r['max_abs_drift']:.3g}", f"{r['drifted_weights']:,}",
                      "never" if r["first_drift_cycle"] is None else str(r["first_drift_cycle"]), "yes" if r["fingerprint_matches"] else "**no**",
                      "—" if r["task_weights_max_abs_error"] is None else f"{r['task_weights_max_abs_error']:.3g}"]
                     for r in alt["exactness"]["rows"]])  # fmt: skip
    if "memory" in alt:
        print_table(["changed weights", "nnz", "deltaclip prepared bytes (residual + head)", "bytes per changed weight", "measured RSS per adapter", "adapters per GiB", "PEFT LoRA bytes (rank)", "LoRA per GiB", "dense copy bytes", "dense per GiB"],
                    [[pct(r["density"]), f"{r['nnz']:,}", f"{r['prepared_bytes']:,} ({r['residual_bytes']:,} + {r['head_bytes']:,})",
                      f"{r['bytes_per_changed_weight']:.1f}", f"{r['measured_bytes_per_adapter']:,.0f}", f"{r['adapters_per_gib']:,.0f}",
                      f"{r['lora_bytes']:,} (r={r['lora_rank']})", f"{r['lora_per_gib']:,.0f}", f"{r['dense_bytes']:,}", f"{r['dense_per_gib']:.1f}"]
                     for r in alt["memory"]["rows"]])  # fmt: skip
    if "storage" in alt:
        print_table(["changed weights", "v1 file bytes (whole adapter)", "v1 residual bytes per changed weight", "reference bytes per changed weight", "v1, 2-D weights only", "reference, 2-D weights only", "reference / v1"],
                    [[pct(r["density"]), f"{r['v1_file_bytes']:,}", f"{r['v1_per_weight']:.2f}", f"{r['reference_per_weight']:.2f}",
                      f"{r['v1_2d_per_weight']:.2f}", f"{r['reference_2d_per_weight']:.2f}", f"{r['reference_bytes'] / r['v1_residual_bytes']:.2f}×"]
                     for r in alt["storage"]["rows"]])  # fmt: skip


def tables_http(http: dict[str, Any]) -> None:
    for cache, res in (http["http"] if "cache_bytes" in http else {}).items():
        print(f"{cache} cache ({http['cache_bytes'][cache]:,} bytes):\n")
        print_table(["N tasks", "popularity", "requests/s", "vs 1 task", "p50 ms", "p99 ms", "cold loads per run", "mean batch", "errors"],
                    [[str(r["n"]), r["popularity"], f"{r['rps']:.1f}", f"{r.get('vs_single', 1):.2f}", f"{r['p50_ms']:,.0f}",
                      f"{r['p99_ms']:,.0f}", f"{r['cold_loads_per_rep']:.0f}", f"{r['mean_batch']:.1f}", str(r["errors"])]
                     for r in sorted(res["rows"], key=lambda r: (r["n"], r["popularity"]))])  # fmt: skip
    if "inprocess" in http:
        print_table(["N tasks", "popularity", "merged model img/s", "deltaclip img/s (vs merged)", "PEFT mixed img/s (vs merged)"],
                    [[str(r["n"]), r["popularity"], f"{r['merged_img_s']:.1f}", f"{r['deltaclip_img_s']:.1f} ({r['deltaclip_vs_merged']:.2f})",
                      f"{r['peft_mixed_img_s']:.1f} ({r['peft_mixed_vs_merged']:.2f})"] for r in http["inprocess"]["rows"]])  # fmt: skip


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("results", nargs="*", type=Path, default=DEFAULT_RESULTS,
                    help="result JSON files, merged in order (default: the published ones)")  # fmt: skip
    ap.add_argument("--outdir", type=Path, default=ROOT / "docs" / "bench")
    ap.add_argument("--tables", action="store_true", help="print the Markdown tables")


def run(args: argparse.Namespace, result: None) -> int:
    """Plot every section found in the result files (a swap, storage and http result, or the
    published alternatives.json and http_load.json), and print their tables with ``--tables``."""
    merged: dict[str, Any] = {}
    for path in args.results:
        if path.exists():
            merged.update(json.loads(path.read_text()))
    plt: Any
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
        print("matplotlib is not installed: tables only (pip install matplotlib)")
    if plt is not None:
        args.outdir.mkdir(parents=True, exist_ok=True)
        if "swap" in merged:
            plot_swap(merged, args.outdir, plt)
        if "exactness" in merged:
            plot_exactness(merged, args.outdir, plt)
        if "memory" in merged and "storage" in merged:
            plot_memory(merged, args.outdir, plt)
        if "inprocess" in merged or (
            isinstance(merged.get("http"), dict) and "large" in merged["http"]
        ):
            plot_http(merged, args.outdir, plt)
        print(f"plots written to {args.outdir}")
    if args.tables:
        tables_alternatives(merged)
        tables_http(merged)
    return 0
