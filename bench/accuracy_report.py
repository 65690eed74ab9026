"""The accuracy study's report: tables, verdicts and the accuracy-against-bytes plot.

Kept apart from the runs (bench/accuracy.py) so that ``--report-only`` redraws everything from
a result file without touching the trainer; the statistics are in bench/accuracy_stats.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.accuracy_stats import (
    Interval,
    accuracy,
    interval,
    mcnemar,
    mean_over_shifts,
    paired,
    ratio,
)

BASELINE = "source-only-ft"
# The claims the study is for, each a paired comparison on the three-shift mean.
CLAIMS = (
    ("cmkd-ft", BASELINE, "CMKD beats source-only"),
    ("cmkd-ft", "cmkd-ft-no-target", "CMKD's target terms help (CMKD vs CMKD without them)"),
    ("cmkd-ft", "adabn-ft", "CMKD beats the AdaBN control (more than the head's BN statistics)"),
    ("adabn-ft", BASELINE, "the head's target BN statistics alone help (AdaBN vs source-only)"),
)
RETENTION = ("cmkd-rst-0.005", "cmkd-ft")  # RST ≤ 0.5 % against CMKD full fine-tuning
RETENTION_TARGET = 0.97


def _rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        s
        for s in data.get("settings", [])
        if any(r["setting"] == s["key"] for r in data.get("runs", {}).values())
    ]


def _cell(iv: Interval | None, signed: bool = False) -> str:
    return "–" if iv is None else iv.pct(signed)


def accuracy_table(data: dict[str, Any]) -> str:
    """Held-out target accuracy per row: mean ± 95 % CI over seeds, per shift and on the mean."""
    shifts, runs = data["config"]["shifts"], data["runs"]
    head = ["row", "seeds", *shifts, "mean of shifts", "density", "stored bytes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    teacher = data.get("teacher", {})
    if all(f"test-{s}" in teacher for s in shifts):
        accs = [teacher[f"test-{s}"]["accuracy"] for s in shifts]
        lines.append(
            "| teacher: the base zero-shot (no training) | – | "
            + " | ".join(f"{100 * a:.1f}" for a in accs)
            + f" | {100 * sum(accs) / len(accs):.1f} | – | – |"
        )
    for s in _rows(data):
        per = [accuracy(runs, shift, s["key"]) for shift in shifts]
        mean = mean_over_shifts(runs, shifts, s["key"])
        mine = [r for r in runs.values() if r["setting"] == s["key"]]
        density = sum(r["density"] for r in mine) / len(mine)
        stored = sum(r["stored_bytes"] for r in mine) / len(mine)
        cells = [_cell(interval(list(p.values())) if p else None) for p in per]
        lines.append(
            f"| {s['label']} | {len(mean) or '–'} | "
            + " | ".join(cells)
            + f" | {_cell(interval(list(mean.values())) if mean else None)} "
            f"| {density:.4%} | {stored:,.0f} |"
        )
    return "\n".join(lines)


def difference_table(data: dict[str, Any]) -> str:
    """Each row minus source-only, paired by seed: mean ± 95 % CI; pooled McNemar."""
    shifts, runs = data["config"]["shifts"], data["runs"]
    head = [
        "row − source-only",
        "seeds",
        *shifts,
        "mean of shifts",
        "CI excludes 0",
        "McNemar (pooled): row only / source-only only, p",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in _rows(data):
        if s["key"] == BASELINE:
            continue
        per = [paired(accuracy(runs, sh, s["key"]), accuracy(runs, sh, BASELINE)) for sh in shifts]
        mean = paired(
            mean_over_shifts(runs, shifts, s["key"]), mean_over_shifts(runs, shifts, BASELINE)
        )
        test = mcnemar(runs, shifts, s["key"], BASELINE)
        excl = (
            "–"
            if mean is None or mean.excludes_zero is None
            else ("yes" if mean.excludes_zero else "no")
        )
        mc = "–" if test is None else f"{test.a_only} / {test.b_only}, p = {test.p:.2g}"
        lines.append(
            f"| {s['label']} | {mean.n if mean else '–'} | "
            + " | ".join(_cell(iv, True) for iv in per)
            + f" | {_cell(mean, True)} | {excl} | {mc} |"
        )
    return "\n".join(lines)


def source_val(runs: Any, shifts: list[str], setting: str, seeds: set[int]) -> float | None:
    """Mean source-validation accuracy of a row over ``shifts`` and ``seeds`` (all must exist)."""
    vals = [accuracy(runs, s, setting, "source_val") for s in shifts]
    if not seeds or any(not seeds <= set(v) for v in vals):
        return None
    return sum(v[seed] for v in vals for seed in seeds) / (len(vals) * len(seeds))


TIE = 1e-6  # source-validation accuracies closer than this are equal (see retention_candidates)


def retention_candidates(data: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """The RST ≤ 0.5 % row and its variants, each with its mean source-validation accuracy over
    the seeds they all have; and the key chosen on it (the highest), or ``None`` while incomplete.
    """
    shifts, runs = data["config"]["shifts"], data["runs"]
    base = RETENTION[0]
    keys = [base] + [s["key"] for s in data.get("settings", []) if s.get("variant_of") == base]
    seeds_of = [set(mean_over_shifts(runs, shifts, k)) for k in keys]
    common = set.intersection(*seeds_of) if seeds_of else set()
    out = [
        {"key": k, "seeds": sorted(common), "source_val": source_val(runs, shifts, k, common)}
        for k in keys
    ]
    if any(c["source_val"] is None for c in out):
        return out, None
    # Accuracies are image counts stored as float32: values within TIE of each other are the
    # same count, and a tie goes to the first in the protocol's order (the plain row, then the
    # smaller change), as the lr choice's ties go to the smaller lr.
    best = max(c["source_val"] for c in out)
    return out, next(c["key"] for c in out if c["source_val"] >= best - TIE)


def retention_table(data: dict[str, Any]) -> str:
    """RST ≤ 0.5 % and its variants: source-validation accuracy (the choice), target accuracy,
    and retention of CMKD full fine-tuning, each over seeds (95 % CI)."""
    shifts, runs = data["config"]["shifts"], data["runs"]
    labels = {s["key"]: s["label"] for s in data.get("settings", [])}
    cands, chosen = retention_candidates(data)
    ft = mean_over_shifts(runs, shifts, RETENTION[1])
    head = ["row", "source-val (choice)", "held-out target, mean of shifts", "retention of CMKD FT"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cands:
        mine = mean_over_shifts(runs, shifts, c["key"])
        sv = (
            "–"
            if c["source_val"] is None
            else f"{100 * c['source_val']:.1f} ({len(c['seeds'])} seeds)"
        )
        mark = " **(chosen)**" if c["key"] == chosen else ""
        tgt = _cell(interval(list(mine.values())) if mine else None)
        lines.append(
            f"| {labels.get(c['key'], c['key'])}{mark} | {sv} | {tgt} | {_cell(ratio(mine, ft))} |"
        )
    return "\n".join(lines)


def verdicts(data: dict[str, Any]) -> dict[str, Any]:
    """Each claim: the paired interval on the three-shift mean and whether it excludes zero."""
    shifts, runs = data["config"]["shifts"], data["runs"]
    out: dict[str, Any] = {}
    for a, b, claim in CLAIMS:
        iv = paired(mean_over_shifts(runs, shifts, a), mean_over_shifts(runs, shifts, b))
        out[claim] = (
            None
            if iv is None
            else {
                "difference": iv.mean,
                "ci95": iv.half,
                "seeds": iv.n,
                "resolved": iv.excludes_zero,
                "holds": bool(iv.excludes_zero and iv.mean > 0),
            }
        )
    _, chosen = retention_candidates(data)
    rst_key = chosen or RETENTION[0]
    rst, ft = mean_over_shifts(runs, shifts, rst_key), mean_over_shifts(runs, shifts, RETENTION[1])
    iv = ratio(rst, ft)
    out["RST ≤ 0.5 % keeps ≥ 97 % of CMKD full fine-tuning"] = (
        None
        if iv is None
        else {
            "row": rst_key,
            "chosen_on_source_val": chosen is not None,
            "retention": iv.mean,
            "ci95": iv.half,
            "seeds": iv.n,
            "met": iv.mean >= RETENTION_TARGET,
            "resolved": None if iv.half is None else abs(iv.mean - RETENTION_TARGET) > iv.half,
        }
    )
    return out


def verdict_text(data: dict[str, Any]) -> str:
    lines = []
    for claim, v in verdicts(data).items():
        if v is None:
            lines.append(f"- {claim}: no paired runs yet")
        elif "retention" in v:
            ci = "" if v["ci95"] is None else f" ± {100 * v['ci95']:.1f}"
            lines.append(
                f"- {claim} ({v['row']}): retention {100 * v['retention']:.1f}{ci} % over {v['seeds']} "
                f"seeds: target {'met' if v['met'] else 'missed'}"
                + (
                    ""
                    if v["resolved"]
                    else " (no CI from one seed)"
                    if v["ci95"] is None
                    else " (the CI includes 97 %: not resolved)"
                )
            )
        else:
            ci = "" if v["ci95"] is None else f" ± {100 * v['ci95']:.1f}"
            state = (
                ("resolved: it holds" if v["holds"] else "resolved: it does not hold")
                if v["resolved"]
                else "not resolved (the CI includes 0)"
            )
            lines.append(
                f"- {claim}: {100 * v['difference']:+.1f}{ci} points on the mean of "
                f"shifts over {v['seeds']} paired seeds: {state}"
            )
    return "\n".join(lines)


def selection_text(data: dict[str, Any]) -> str:
    sel = data.get("selection")
    if not sel:
        return "lr selection: not finished"
    vals = ", ".join(f"{lr}: {100 * a:.1f} %" for lr, a in sel["source_val_accuracy"].items())
    return f"lr selection ({sel['rule']}): {vals} → lr {sel['lr']:g}"


def plot(data: dict[str, Any], path: Path) -> None:
    """Mean held-out accuracy (95 % CI over seeds) against stored bytes per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shifts, runs = data["config"]["shifts"], data["runs"]
    fig, ax = plt.subplots(figsize=(10, 6.2), dpi=110)
    for s in _rows(data):
        mean = mean_over_shifts(runs, shifts, s["key"])
        if not mean:
            continue
        iv = interval(list(mean.values()))
        mine = [r for r in runs.values() if r["setting"] == s["key"]]
        x = sum(r["stored_bytes"] for r in mine) / len(mine)
        ax.errorbar(
            x,
            100 * iv.mean,
            yerr=None if iv.half is None else 100 * iv.half,
            fmt="o",
            capsize=3,
            label=f"{s['label']} ({iv.n} seeds)",
        )
    ft = mean_over_shifts(runs, shifts, RETENTION[1])
    if ft:
        ax.axhline(
            100 * RETENTION_TARGET * sum(ft.values()) / len(ft),
            ls="--",
            c="tab:red",
            lw=0.8,
            label="97 % of CMKD full fine-tuning",
        )
    cfg = data["config"]
    ax.set_xscale("log")
    ax.set_xlabel("stored bytes per task (log scale; full fine-tunes as a dense float32 tower)")
    ax.set_ylabel(f"held-out target accuracy, mean of {len(shifts)} shifts (%), 95 % CI over seeds")
    lr = data.get("selection", {}).get("lr")
    ax.set_title(
        f"deltaclip-efflite0/imagenet, Fashion-MNIST photo → {', '.join(shifts)}; "
        f"{cfg['steps']} steps, {cfg['image_size']} px, lr {lr}",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def report(data: dict[str, Any], plot_path: Path) -> None:
    """Print every table and verdict, and draw the plot, from whatever runs the file holds."""
    print(selection_text(data))
    if not data.get("runs"):
        print("no study runs yet")
        return
    print()
    print(accuracy_table(data))
    print()
    print(difference_table(data))
    print()
    print(retention_table(data))
    print()
    print(verdict_text(data))
    plot(data, plot_path)
    print(
        f"\nplot: {plot_path}; runs: {len(data['runs'])}, failures: {len(data.get('failures', []))}, "
        f"run time recorded: {data.get('study_seconds', 0):,.0f} s"
    )
