"""The Markdown tables of ``python -m bench plots --tables`` (docs/BENCHMARKS.md), and the labels
the plots share with them."""

from __future__ import annotations

from typing import Any

from bench.harness import print_table

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


def tables_alternatives(alt: dict[str, Any]) -> None:
    if "swap" in alt:
        fwd, rows = alt["swap"]["forward_b1"], alt["swap"]["rows"]
        print(
            f"Batch-1 forward of the image tower: p50 {ms(fwd['p50_ms'])} ms, p99 {ms(fwd['p99_ms'])} ms.\n"
        )
        cells = [
            [label]
            + [
                f"{ms(r[key]['p50_ms'])} / {ms(r[key]['p99_ms'])} ms ({r[key]['vs_forward_b1'] * 100:.2f} %)"
                for r in rows
            ]
            for key, label in SWAP_METHODS
            if key in rows[0]
        ]
        cells.append(
            ["unmerged LoRA: extra cost of every batch-1 forward"]
            + [
                f"+{(r['lora_forward_b1']['p50_ms'] - r['forward_b1_paired']['p50_ms']):.1f} ms (+{(r['lora_forward_b1']['vs_forward_b1'] - 1) * 100:.1f} %)"
                if "forward_b1_paired" in r
                else "n/a"
                for r in rows
            ]
        )
        print_table(
            ["method"]
            + [f"{pct(r['density'])} ({r['nnz']:,} w, LoRA r={r['lora_rank']})" for r in rows],
            cells,
        )
    if "exactness" in alt:
        print_table(
            [
                "dtype",
                "method",
                "cycles",
                "max abs drift of the base",
                "drifted weights",
                "first drift at cycle",
                "fingerprint matches",
                "task weights off by",
            ],
            [
                [
                    r["dtype"],
                    r["method"],
                    f"{r['cycles']:,}",
                    f"{r['max_abs_drift']:.3g}",
                    f"{r['drifted_weights']:,}",
                    "never" if r["first_drift_cycle"] is None else str(r["first_drift_cycle"]),
                    "yes" if r["fingerprint_matches"] else "**no**",
                    "—"
                    if r["task_weights_max_abs_error"] is None
                    else f"{r['task_weights_max_abs_error']:.3g}",
                ]
                for r in alt["exactness"]["rows"]
            ],
        )
    if "memory" in alt:
        print_table(
            [
                "changed weights",
                "nnz",
                "deltaclip prepared bytes (residual + head)",
                "bytes per changed weight",
                "measured RSS per adapter",
                "adapters per GiB",
                "PEFT LoRA bytes (rank)",
                "LoRA per GiB",
                "dense copy bytes",
                "dense per GiB",
            ],
            [
                [
                    pct(r["density"]),
                    f"{r['nnz']:,}",
                    f"{r['prepared_bytes']:,} ({r['residual_bytes']:,} + {r['head_bytes']:,})",
                    f"{r['bytes_per_changed_weight']:.1f}",
                    f"{r['measured_bytes_per_adapter']:,.0f}",
                    f"{r['adapters_per_gib']:,.0f}",
                    f"{r['lora_bytes']:,} (r={r['lora_rank']})",
                    f"{r['lora_per_gib']:,.0f}",
                    f"{r['dense_bytes']:,}",
                    f"{r['dense_per_gib']:.1f}",
                ]
                for r in alt["memory"]["rows"]
            ],
        )
    if "storage" in alt:
        print_table(
            [
                "changed weights",
                "v1 file bytes (whole adapter)",
                "v1 residual bytes per changed weight",
                "reference bytes per changed weight",
                "v1, 2-D weights only",
                "reference, 2-D weights only",
                "reference / v1",
            ],
            [
                [
                    pct(r["density"]),
                    f"{r['v1_file_bytes']:,}",
                    f"{r['v1_per_weight']:.2f}",
                    f"{r['reference_per_weight']:.2f}",
                    f"{r['v1_2d_per_weight']:.2f}",
                    f"{r['reference_2d_per_weight']:.2f}",
                    f"{r['reference_bytes'] / r['v1_residual_bytes']:.2f}×",
                ]
                for r in alt["storage"]["rows"]
            ],
        )


def tables_http(http: dict[str, Any]) -> None:
    for cache, res in (http["http"] if "cache_bytes" in http else {}).items():
        print(f"{cache} cache ({http['cache_bytes'][cache]:,} bytes):\n")
        print_table(
            [
                "N tasks",
                "popularity",
                "requests/s",
                "vs 1 task",
                "p50 ms",
                "p99 ms",
                "cold loads per run",
                "mean batch",
                "errors",
            ],
            [
                [
                    str(r["n"]),
                    r["popularity"],
                    f"{r['rps']:.1f}",
                    f"{r.get('vs_single', 1):.2f}",
                    f"{r['p50_ms']:,.0f}",
                    f"{r['p99_ms']:,.0f}",
                    f"{r['cold_loads_per_rep']:.0f}",
                    f"{r['mean_batch']:.1f}",
                    str(r["errors"]),
                ]
                for r in sorted(res["rows"], key=lambda r: (r["n"], r["popularity"]))
            ],
        )
    if "inprocess" in http:
        print_table(
            [
                "N tasks",
                "popularity",
                "merged model img/s",
                "deltaclip img/s (vs merged)",
                "PEFT mixed img/s (vs merged)",
            ],
            [
                [
                    str(r["n"]),
                    r["popularity"],
                    f"{r['merged_img_s']:.1f}",
                    f"{r['deltaclip_img_s']:.1f} ({r['deltaclip_vs_merged']:.2f})",
                    f"{r['peft_mixed_img_s']:.1f} ({r['peft_mixed_vs_merged']:.2f})",
                ]
                for r in http["inprocess"]["rows"]
            ],
        )
