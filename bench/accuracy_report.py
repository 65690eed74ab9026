"""The accuracy question's report: summary, Markdown tables, verdict and plot from its results.

Kept apart from the runs (bench/accuracy.py) so that ``--report-only`` redraws everything from
a result file without touching the trainer.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

FROZEN_TAU = 1e9  # larger than any weight move: RST resets the whole tower after every step


def _argmax(rows: list[dict[str, Any]], scores: list[float]) -> dict[str, Any]:
    """The first row with the highest score."""
    return rows[scores.index(max(scores))]


def summarise(data: dict[str, Any]) -> dict[str, Any]:
    """Per setting: means over tasks; per task: the ≤ 0.5 % RST versus full fine-tuning ratios."""
    shifts = data["config"]["shifts"]
    runs = data["runs"]
    rows = []
    for s in data["settings"]:
        per = [runs.get(f"{shift}/{s['key']}") for shift in shifts]
        if any(r is None for r in per):
            continue
        rows.append({
            **s,
            "test": {shift: r["test_accuracy"] for shift, r in zip(shifts, per, strict=True)},
            "target": {shift: r["target_accuracy"] for shift, r in zip(shifts, per, strict=True)},
            "mean_test": sum(r["test_accuracy"] for r in per) / len(per),
            # binomial standard error of the mean held-out accuracy (test images only, one seed)
            "se_mean_test": math.sqrt(sum(r["test_accuracy"] * (1 - r["test_accuracy"]) / r["test_images"]
                                          for r in per)) / len(per),
            "mean_target": sum(r["target_accuracy"] for r in per) / len(per),
            "mean_density": sum(r["density"] for r in per) / len(per),
            "max_density_reached": max(r["density"] for r in per),
            "mean_stored_bytes": sum(r["stored_bytes"] for r in per) / len(per),
            "mean_adapter_bytes": sum(r["adapter_bytes"] for r in per) / len(per),
        })  # fmt: skip
    by_key = {r["key"]: r for r in rows}
    verdict: dict[str, Any] = {}
    ft, lp = by_key.get("cmkd-ft"), by_key.get("linear-probe")
    sparse = [r for r in rows if r["family"] in ("CMKD+RST τ", "CMKD+RST budget") and r["max_density_reached"] <= 0.005]  # fmt: skip
    if ft and sparse:
        for metric in ("test", "target"):
            per_task = {}
            for shift in shifts:
                best = _argmax(sparse, [r[metric][shift] for r in sparse])
                entry = {
                    "best_setting": best["key"],
                    "best_rst": best[metric][shift],
                    "full_ft": ft[metric][shift],
                    "ratio": best[metric][shift] / ft[metric][shift],
                }
                if lp:
                    gain = ft[metric][shift] - lp[metric][shift]
                    entry["linear_probe"] = lp[metric][shift]
                    entry["gain_kept"] = (best[metric][shift] - lp[metric][shift]) / gain if gain > 0 else None  # fmt: skip
                per_task[shift] = entry
            fixed = _argmax(sparse, [r[f"mean_{metric}"] for r in sparse])
            fixed_ratio = {sh: fixed[metric][sh] / ft[metric][sh] for sh in shifts}
            mean_ratio = sum(e["ratio"] for e in per_task.values()) / len(per_task)
            verdict[metric] = {
                "per_task": per_task,
                "mean_ratio_best_per_task": mean_ratio,
                "fixed_setting": fixed["key"],
                "fixed_setting_ratio": fixed_ratio,
                "mean_ratio_fixed_setting": sum(fixed_ratio.values()) / len(fixed_ratio),
                "ratio_of_means_fixed_setting": fixed[f"mean_{metric}"] / ft[f"mean_{metric}"],
                "meets_97": mean_ratio >= 0.97,
                # every RST setting at ≤ 0.5 %, not only the best: the ratio of mean accuracies
                "all_settings_ratio": {
                    r["key"]: r[f"mean_{metric}"] / ft[f"mean_{metric}"] for r in sparse
                },
                "linear_probe_ratio": lp[f"mean_{metric}"] / ft[f"mean_{metric}"] if lp else None,
            }
    return {"rows": rows, "verdict": verdict, "blocks": block_comparison(rows)}


def _at_bytes(ones: list[dict[str, Any]], stored: float) -> tuple[float, float] | None:
    """Unstructured (B = 1) budget accuracy and its standard error at ``stored`` bytes, linear in
    log bytes between the two budget rows around it; None outside their range."""
    for lo, hi in itertools.pairwise(ones):
        a, b = math.log(lo["mean_stored_bytes"]), math.log(hi["mean_stored_bytes"])
        if a <= math.log(stored) <= b and b > a:
            w = (math.log(stored) - a) / (b - a)
            acc = (1 - w) * lo["mean_test"] + w * hi["mean_test"]
            return acc, math.hypot((1 - w) * lo["se_mean_test"], w * hi["se_mean_test"])
    return None


def block_comparison(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Block-RST rows against unstructured RST (B = 1): at the same density budget, and at the same
    stored bytes (B = 1 interpolated); differences with ±1 standard error (independent errors)."""
    ones = sorted((r for r in rows if r["family"] == "CMKD+RST budget"), key=lambda r: r["mean_stored_bytes"])  # fmt: skip
    out = []
    for r in rows:
        if not r["family"].startswith("CMKD+RST budget B="):
            continue
        entry: dict[str, Any] = {"key": r["key"], "block_size": int(r["family"].rsplit("=", 1)[1]),
                                 "max_density": r["max_density"], "mean_test": r["mean_test"],
                                 "se_mean_test": r["se_mean_test"], "mean_stored_bytes": r["mean_stored_bytes"]}  # fmt: skip
        same = next((o for o in ones if o["max_density"] == r["max_density"]), None)
        if same is not None:
            entry["diff_equal_density"] = r["mean_test"] - same["mean_test"]
            entry["se_equal_density"] = math.hypot(r["se_mean_test"], same["se_mean_test"])
            entry["b1_stored_bytes"] = same["mean_stored_bytes"]
        at = _at_bytes(ones, r["mean_stored_bytes"])
        if at is not None:
            entry["diff_equal_bytes"] = r["mean_test"] - at[0]
            entry["se_equal_bytes"] = math.hypot(r["se_mean_test"], at[1])
        out.append(entry)
    return out


def block_table(summary: dict[str, Any]) -> str:
    """Markdown: each block setting's accuracy minus unstructured RST's, at equal density and at
    equal stored bytes, in percentage points ± 1 standard error."""

    def diff(e: dict[str, Any], kind: str) -> str:
        if f"diff_{kind}" not in e:
            return "—"
        return f"{100 * e[f'diff_{kind}']:+.1f} ± {100 * e[f'se_{kind}']:.1f}"

    lines = ["| B | budget | mean test acc. | stored bytes | − B=1, equal density (pp) | − B=1, equal bytes (pp) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for e in summary["blocks"]:
        lines.append(f"| {e['block_size']} | ≤{e['max_density']:.2%} | {100 * e['mean_test']:.1f} % "
                     f"| {e['mean_stored_bytes']:,.0f} | {diff(e, 'equal_density')} | {diff(e, 'equal_bytes')} |")  # fmt: skip
    return "\n".join(lines)


def markdown_table(data: dict[str, Any], summary: dict[str, Any]) -> str:
    shifts = data["config"]["shifts"]
    ft = next((r for r in summary["rows"] if r["key"] == "cmkd-ft"), None)
    head = (
        "| setting | loss | τ | budget | density (mean over tasks) | stored bytes per task | "
        + " | ".join(f"{s} (held-out)" for s in shifts)
        + " | mean held-out | mean transductive | held-out vs CMKD FT |"
    )
    lines = [head, "|" + "---|" * (9 + len(shifts))]
    for r in summary["rows"]:
        tau = "frozen" if r["tau"] >= FROZEN_TAU else f"{r['tau']:g}"
        budget = f"{r['max_density']:.2%}" if r["max_density"] is not None else "–"
        rel = f"{r['mean_test'] / ft['mean_test']:.1%}" if ft else "–"
        stored = f"{r['mean_stored_bytes']:,.0f}"
        if r["tau"] == 0 and r["max_density"] is None:
            stored += f" dense ({r['mean_adapter_bytes']:,.0f} as v1 adapter)"
        lines.append(
            f"| {r['label']} | {'CMKD' if r['method'] == 'cmkd' else 'source-only'} | {tau} | {budget} "
            f"| {r['mean_density']:.4%} | {stored} | "
            + " | ".join(f"{r['test'][s]:.1%}" for s in shifts)
            + f" | **{r['mean_test']:.1%}** | {r['mean_target']:.1%} | {rel} |"
        )
    return "\n".join(lines)


def verdict_text(data: dict[str, Any], summary: dict[str, Any]) -> str:
    v = summary["verdict"].get("test")
    if not v:
        return "(no verdict: full fine-tuning or an RST run at ≤ 0.5 % density is missing)"
    lines = ["| task | best RST ≤ 0.5 % (setting) | CMKD full FT | ratio | linear probe | share of FT's gain over the probe kept |", "|---|---|---|---|---|---|"]  # fmt: skip
    for shift, e in v["per_task"].items():
        kept = f"{e['gain_kept']:.0%}" if e.get("gain_kept") is not None else "n/a (FT ≤ probe)"
        lines.append(
            f"| {shift} | {e['best_rst']:.1%} ({e['best_setting']}) | {e['full_ft']:.1%} "
            f"| {e['ratio']:.1%} | {e.get('linear_probe', float('nan')):.1%} | {kept} |"
        )
    t = summary["verdict"]["target"]
    lines.append("")
    worst = min(v["all_settings_ratio"].items(), key=lambda kv: kv[1])
    lines.append(
        "Every RST setting at ≤ 0.5 % density, mean held-out accuracy / CMKD FT's: "
        + ", ".join(f"{k} {r:.1%}" for k, r in v["all_settings_ratio"].items())
        + f" (worst: {worst[0]}, {worst[1]:.1%}); the linear probe, which changes no tower weight, "
        f"reaches {v['linear_probe_ratio']:.1%}."
    )
    lines.append("")
    lines.append(
        f"Mean ratio, best ≤ 0.5 % RST setting per task (held-out): **{v['mean_ratio_best_per_task']:.1%}** "
        f"→ 97 % criterion {'met' if v['meets_97'] else 'NOT met'}. One fixed setting for all tasks "
        f"({v['fixed_setting']}): {v['mean_ratio_fixed_setting']:.1%}. Transductive: "
        f"{t['mean_ratio_best_per_task']:.1%} (best per task), {t['mean_ratio_fixed_setting']:.1%} "
        f"({t['fixed_setting']})."
    )
    return "\n".join(lines)


COLOURS = {"linear probe": "tab:gray", "source-only FT": "tab:orange", "CMKD FT": "tab:red",
           "ablation": "tab:purple", "CMKD+FixMatch FT": "tab:olive", "CMKD+RST τ": "tab:blue", "CMKD+RST budget": "tab:green",
           "CMKD+RST budget B=2": "black", "CMKD+RST budget B=4": "tab:cyan",
           "CMKD+RST budget B=8": "tab:pink", "CMKD+RST budget B=16": "tab:brown"}  # fmt: skip
MARKERS = {"linear probe": "s", "source-only FT": "D", "CMKD FT": "*", "ablation": "P",
           "CMKD+FixMatch FT": "h",
           "CMKD+RST τ": "o", "CMKD+RST budget": "^", "CMKD+RST budget B=2": "<",
           "CMKD+RST budget B=4": "v", "CMKD+RST budget B=8": ">", "CMKD+RST budget B=16": "X"}  # fmt: skip


def plot(data: dict[str, Any], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(10, 6.2), dpi=110)
    seen: set[str] = set()
    budget_i = 0
    for r in rows:
        fam = r["family"]
        ax.errorbar(r["mean_stored_bytes"], 100 * r["mean_test"], yerr=100 * r["se_mean_test"],
                    fmt="none", ecolor=COLOURS[fam], alpha=0.4, lw=1, zorder=1)  # fmt: skip
        ax.scatter(
            r["mean_stored_bytes"], 100 * r["mean_test"], s=140 if fam == "CMKD FT" else 60,
            c=COLOURS[fam], marker=MARKERS[fam], label=None if fam in seen else fam, zorder=3,
            edgecolors="black", linewidths=0.5,
        )  # fmt: skip
        seen.add(fam)
        if fam == "CMKD+RST budget":  # alternately below-right and above-left of the marker
            budget_i += 1
            text = f"≤{r['max_density']:.2%}\n({r['mean_density']:.3%})"
            offset = (4, -20) if budget_i % 2 else (-34, 6)
        elif fam.startswith("CMKD+RST budget B="):
            text, offset = f"≤{r['max_density']:.2%}", (4, -12)
        elif fam == "CMKD+RST τ":
            text, offset = f"τ={r['tau']:g}\n({r['mean_density']:.3%})", (4, 4)
        else:
            text, offset = r["label"], (6, 4)
        ax.annotate(text, (r["mean_stored_bytes"], 100 * r["mean_test"]), fontsize=7,
                    xytext=offset, textcoords="offset points")  # fmt: skip
        if r["tau"] == 0 and r["max_density"] is None:  # the same weights as a v1 adapter
            ax.scatter(r["mean_adapter_bytes"], 100 * r["mean_test"], s=50, facecolors="none",
                       edgecolors=COLOURS[fam], marker=MARKERS[fam], zorder=2)  # fmt: skip
            ax.plot([r["mean_stored_bytes"], r["mean_adapter_bytes"]], [100 * r["mean_test"]] * 2,
                    ls=":", c=COLOURS[fam], lw=0.8)  # fmt: skip
    ft = next((r for r in rows if r["key"] == "cmkd-ft"), None)
    if ft:
        ax.axhline(97 * ft["mean_test"], ls="--", c="tab:red", lw=0.8,
                   label="97 % of CMKD full fine-tuning")  # fmt: skip
    cfg = data["config"]
    ax.set_xscale("log")
    ax.margins(x=0.08, y=0.12)
    n_test = sorted({r["test_images"] for r in data["runs"].values()})
    ax.text(0.01, 0.01, f"bars: ±1 binomial standard error of the mean ({'/'.join(map(str, n_test))} "
            "held-out images per task, one seed)", transform=ax.transAxes, fontsize=7, va="bottom")  # fmt: skip
    ax.set_xlabel(
        "stored bytes per task (log scale; hollow: a full fine-tune stored as a v1 adapter)"
    )
    ax.set_ylabel(f"mean held-out target accuracy over {len(cfg['shifts'])} tasks (%)")
    ax.set_title(
        f"deltaclip-efflite0/imagenet, Fashion-MNIST photo → {', '.join(cfg['shifts'])}; "
        f"{cfg['steps']} steps, {cfg['image_size']} px, lr {cfg['lr']:g} (WordNet text side)",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


COMPARISON = (("linear-probe", "linear probe (frozen tower)"), ("source-only-ft", "source-only FT"),
              ("cmkd-ft", "CMKD FT"), ("cmkd-ft-no-target", "CMKD FT without its target terms"),
              ("cmkd-fixmatch-ft", "CMKD + FixMatch FT"), ("cmkd-rst-max-0.005", "CMKD + RST ≤ 0.5 %"),
              ("cmkd-rst-max-0.0005", "CMKD + RST ≤ 0.05 %"))  # fmt: skip


def _se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else 0.0


def comparison_table(data: dict[str, Any]) -> str:
    """The method comparison on held-out target images: the teacher's zero-shot accuracy, then
    each setting's, ±1 binomial standard error, and the difference to source-only."""
    shifts = data["config"]["shifts"]
    runs, teacher = data.get("runs", {}), data.get("teacher", {})

    def cell(acc: float, n: int) -> str:
        return f"{acc:.1%} ± {_se(acc, n):.1%}"

    def mean(vals: list[tuple[float, int]]) -> tuple[float, float]:
        m = sum(a for a, _ in vals) / len(vals)
        return m, math.sqrt(sum(_se(a, n) ** 2 for a, n in vals)) / len(vals)

    head = ["row", *(f"{s} (held-out)" for s in shifts), "mean", "vs source-only (mean)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if all(s in teacher for s in shifts):
        vals = [(teacher[s]["accuracy"], teacher[s]["images"]) for s in shifts]
        m, se = mean(vals)
        lines.append("| teacher: the base zero-shot (no training) | "
                     + " | ".join(cell(a, n) for a, n in vals) + f" | {m:.1%} ± {se:.1%} | – |")  # fmt: skip
    base = [runs.get(f"{s}/source-only-ft") for s in shifts]
    base_mean = sum(r["test_accuracy"] for r in base) / len(base) if all(base) else None
    for key, label in COMPARISON:
        rows = [runs.get(f"{s}/{key}") for s in shifts]
        if not all(rows):
            continue
        vals = [(r["test_accuracy"], r["test_images"]) for r in rows if r]
        m, se = mean(vals)
        diff = (
            "–"
            if base_mean is None or key == "source-only-ft"
            else f"{(m - base_mean) * 100:+.1f} pts"
        )
        lines.append(f"| {label} | " + " | ".join(cell(a, n) for a, n in vals)
                     + f" | {m:.1%} ± {se:.1%} | {diff} |")  # fmt: skip
    return "\n".join(lines)
