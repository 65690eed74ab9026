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

from bench.plot_tables import SWAP_METHODS, pct, tables_alternatives, tables_http

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = [
    ROOT / "docs" / "bench" / "alternatives.json",
    ROOT / "docs" / "bench" / "http_load.json",
]


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
        ax.plot(
            xs,
            [r[key]["p50_ms"] for r in rows],
            marker="o",
            ms=4,
            color=colors[i % 20],
            label=label,
            **style,
        )
    fwd = alt["swap"]["forward_b1"]["p50_ms"]
    ax.axhline(fwd, color="k", ls="--", lw=1, label=f"batch-1 forward ({fwd:.0f} ms)")
    ax.axhline(fwd * 0.02, color="k", ls=":", lw=1, label="2 % of a batch-1 forward")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="changed weights (% of the ViT-B-16 image tower)",
        ylabel="one task switch, p50 (ms)",
        title="Swap cost by method",
    )
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
    a1.set(
        yscale="log",
        ylabel="adapters per GiB of memory",
        xlabel="changed weights",
        title="Resident memory",
    )
    a1.set_xticks(list(xs), labels)
    a1.legend(fontsize=7)
    a2.bar(
        [x - w / 2 for x in xs],
        [r["v1_per_weight"] for r in sto],
        w,
        label="format v1 (safetensors)",
    )
    a2.bar(
        [x + w / 2 for x in xs],
        [r["reference_per_weight"] for r in sto],
        w,
        label="reference (sparse COO pickle)",
    )
    a2.set(
        ylabel="bytes per changed weight (residual only)", xlabel="changed weights", title="Storage"
    )
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
                sel = sorted(
                    (r for r in rows if r["popularity"] == kind and r["n"] > 1),
                    key=lambda r: r["n"],
                )
                ns = [r["n"] for r in sel]
                axes[0][j].plot(ns, [r["rps"] for r in sel], marker="o", label=kind)
                axes[1][j].plot(ns, [r["p99_ms"] for r in sel], marker="o", label=kind)
            axes[0][j].axhline(
                single["rps"], color="k", ls="--", lw=1, label="1 task (merged-model bound)"
            )
            axes[0][j].axhline(
                0.95 * single["rps"], color="k", ls=":", lw=1, label="95 % of the bound"
            )
            axes[1][j].axhline(single["p99_ms"], color="k", ls="--", lw=1, label="1 task")
            axes[0][j].set(
                xscale="log", ylabel="requests/s", title=f"{cache} cache", ylim=(0, None)
            )
            axes[1][j].set(
                xscale="log", ylabel="p99 latency (ms)", xlabel="distinct tasks N", ylim=(0, None)
            )
            for ax in (axes[0][j], axes[1][j]):
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=7)
        fig.suptitle(
            f"HTTP /predict, {http.get('arch') or http.get('base')} on {http['device']}, {http['clients']} closed-loop clients"
        )
        fig.tight_layout()
        fig.savefig(outdir / "http_throughput.png", dpi=120)
        plt.close(fig)
    if "inprocess" in http:
        rows = http["inprocess"]["rows"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, kind in zip(axes, ("uniform", "zipf"), strict=True):
            sel = sorted(
                (r for r in rows if r["popularity"] == kind or r["n"] == 1), key=lambda r: r["n"]
            )
            ns = [r["n"] for r in sel]
            for key, label in (
                ("merged", "merged model (bound)"),
                ("deltaclip", "deltaclip (grouped)"),
                ("peft_mixed", "PEFT LoRA mixed adapter_names"),
            ):
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


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "results",
        nargs="*",
        type=Path,
        default=DEFAULT_RESULTS,
        help="result JSON files, merged in order (default: the published ones)",
    )
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
