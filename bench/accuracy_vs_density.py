"""Target accuracy against stored bytes per task: linear probe, fine-tuning, and RST at many densities.

Run (about 25 minutes on 2 idle CPU cores; longer when the machine is shared)::

    .venv/bin/python bench/accuracy_vs_density.py --out docs/study_results.json \
        --plot docs/study_accuracy_vs_bytes.png

``--quick`` is a smoke run of about a minute (tiny data, few steps, few settings; its JSON and
PNG go to the work folder unless ``--out``/``--plot`` say otherwise). Results go to the JSON after every run, and a rerun
with the same settings skips the runs already there, so a killed study resumes where it
stopped (``--fresh`` starts over). ``--report-only`` redraws the plot and prints the table from
the JSON without training.

The tasks are the demo's (``deltaclip_demo/data.py``): Fashion-MNIST ``photo`` as the labelled
source, ``sketch``, ``negative`` and ``faded`` as unlabelled targets, on the offline base
``deltaclip-efflite0/imagenet`` (real ImageNet EfficientNet-Lite0 image tower, *random* text
tower). Every method uses the same data, seed, learning rates and step count; only the loss
(CMKD or source-only) and the rule that decides which tower weights may differ from the base
change:

* ``linear probe``: source-only head on a frozen tower (``--tau 1e9``: every move is reset);
* ``source-only FT``: source-only loss, full fine-tuning (``--tau 0``: nothing is reset);
* ``CMKD FT``: CMKD loss, full fine-tuning (``--tau 0``);
* ablation ``CMKD FT, λ1=λ3=0``: CMKD without its two target terms, full fine-tuning;
* ``CMKD+RST τ=…``: CMKD loss, RST with the threshold τ alone;
* ``CMKD+RST ≤d``: CMKD loss, ``--max-density d`` over a small τ (``--budget-tau``, 3e-5, which
  alone leaves ~11 % of the tower changed, so the budget is what binds; τ = 0 would give the
  same rule but sort the whole tower after every step).

Accuracy is measured on the held-out ``test-<shift>`` folders (images never seen in training),
with the adapter merged into the base exactly as the server does; the trainer's transductive
target accuracy (the paper's protocol) is recorded too. Stored bytes per task are the adapter
file's size; for full fine-tuning they are a dense float32 copy of the tower plus the head
(what a dense checkpoint per task costs), and the size of the same weights as a v1 sparse
adapter is recorded beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file from a checkout without an installed package
    sys.path.insert(0, str(ROOT))

from adapters_store.adapter import merge_state  # noqa: E402
from adapters_store.bases import EFFLITE0, build_base, tower_parameters  # noqa: E402
from adapters_store.format.codec import Limits, read_adapter  # noqa: E402
from adapters_store.head import head_from_state  # noqa: E402
from deltaclip_demo.data import prepare_domains  # noqa: E402
from trainer.cli import build_train_parser, config_from_args  # noqa: E402
from trainer.evaluate import folder_data, predictions, report  # noqa: E402
from trainer.loop import train  # noqa: E402

FROZEN_TAU = 1e9  # larger than any weight move: RST resets the whole tower after every step
# A dense fine-tune stored as a sparse adapter is over the store's 50 % limit; reading it is fine.
STUDY_LIMITS = Limits(max_density=1.0)


@dataclass(frozen=True)
class Setting:
    """One row of the study: a loss (``cmkd``/``source-only``) and a sparsity rule."""

    key: str
    label: str
    family: str  # "linear probe", "source-only FT", "CMKD FT", "CMKD+RST τ", "CMKD+RST budget"
    method: str
    tau: float
    max_density: float | None = None
    extra: tuple[str, ...] = ()  # further ``deltaclip train`` arguments

    @property
    def is_full_ft(self) -> bool:
        return self.tau == 0 and self.max_density is None


def settings_for(taus: list[float], budgets: list[float], budget_tau: float) -> list[Setting]:
    rows = [
        Setting("linear-probe", "linear probe (frozen tower)", "linear probe", "source-only", FROZEN_TAU),
        Setting("source-only-ft", "source-only FT (τ=0)", "source-only FT", "source-only", 0.0),
        Setting("cmkd-ft", "CMKD FT (τ=0)", "CMKD FT", "cmkd", 0.0),
        # Ablation: CMKD without the terms that read the unlabelled target (λ1 = λ3 = 0), i.e.
        # source-only plus the source CE through the (random-text) teacher head. It tells whether
        # CMKD's edge over source-only here comes from the target terms or from the teacher.
        Setting("cmkd-ft-no-target", "CMKD FT, λ1=λ3=0 (no target terms)", "ablation", "cmkd", 0.0,
                extra=("--lambda1", "0", "--lambda3", "0")),
    ]  # fmt: skip
    rows += [
        Setting(f"cmkd-rst-tau-{t:g}", f"CMKD+RST τ={t:g}", "CMKD+RST τ", "cmkd", t) for t in taus
    ]
    rows += [Setting(f"cmkd-rst-max-{d:g}", f"CMKD+RST ≤{d:.2%} (τ={budget_tau:g})", "CMKD+RST budget",
                     "cmkd", budget_tau, d) for d in budgets]  # fmt: skip
    return rows


# ------------------------------------------------------------------------------------ arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="results JSON (default docs/study_results.json)")
    p.add_argument("--plot", type=Path, help="PNG (default docs/study_accuracy_vs_bytes.png)")
    p.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "deltaclip-study",
        help="data, adapters and run logs (default: $TMPDIR/deltaclip-study)",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a smoke run of a few minutes")
    p.add_argument("--fresh", action="store_true", help="ignore results already in --out")
    p.add_argument("--report-only", action="store_true", help="table and plot from --out only")
    p.add_argument("--shifts", nargs="+", default=["sketch", "negative", "faded"])
    p.add_argument("--per-class", type=int, default=50, help="source and target images per class")
    p.add_argument("--test-per-class", type=int, default=50, help="held-out target images")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16, help="per domain")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="image-tower lr, every method")
    p.add_argument("--head-lr", type=float, default=3e-3, help="task-head lr, every method")
    p.add_argument("--taus", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.0005, 0.001, 0.0025, 0.005, 0.01])
    p.add_argument(
        "--budget-tau", type=float, default=3e-5,
        help="τ under the --max-density runs (small enough that the budget is what binds; "
        "τ=0 would top-k the whole tower after every step, ~1 s a step here)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="loader processes per run")
    p.add_argument("--threads", type=int, default=1, help="compute threads (1 is fastest on a busy 2-core machine)")  # fmt: skip
    args = p.parse_args(argv)
    out_dir = args.work if args.quick else Path("docs")  # a smoke run leaves docs/ alone
    prefix = "quick_" if args.quick else ""
    args.out = args.out or out_dir / f"{prefix}study_results.json"
    args.plot = args.plot or out_dir / f"{prefix}study_accuracy_vs_bytes.png"
    if args.quick:
        args.shifts = args.shifts[:2]
        args.per_class, args.test_per_class, args.steps = 8, 8, 6
        args.batch_size, args.image_size = 8, 32
        args.taus, args.budgets = args.taus[:1], [0.005]
    return args


def study_config(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that decides the numbers; results are only reused under an equal config."""
    keys = ("shifts", "per_class", "test_per_class", "steps", "batch_size", "image_size", "lr",
            "head_lr", "taus", "budgets", "budget_tau", "seed", "data_seed", "quick")  # fmt: skip
    return {
        "base": list(EFFLITE0),
        **{k: getattr(args, k) for k in keys},
        "head_lr_mult": args.head_lr / args.lr,
    }


# ------------------------------------------------------------------------------------- running


class HeldOut:
    """Accuracy of adapters on held-out folders, merged into one resident base as served."""

    def __init__(self, image_size: int, threads: int) -> None:
        torch.set_num_threads(threads)
        self.net = build_base(*EFFLITE0)
        self.base_state = {k: v.clone() for k, v in self.net.state_dict().items()}
        self.tower_numel = sum(p.numel() for p in tower_parameters(self.net).values())
        self.image_size = image_size

    @torch.no_grad()
    def accuracy(self, adapter_path: Path, folder: Path) -> dict[str, Any]:
        adapter = read_adapter(adapter_path, STUDY_LIMITS)
        self.net.load_state_dict(merge_state(self.base_state, adapter))
        self.net.eval()
        head = head_from_state(dict(adapter.head)).eval()
        data = folder_data(folder, adapter.meta.class_names, self.net, self.image_size, 100, 0)
        encode = cast(Any, self.net).encode_image
        preds, labels = predictions(
            data.loader, lambda x: {"task": head(encode(x).float())}, torch.device("cpu")
        )
        self.net.load_state_dict(self.base_state)
        out = report(preds["task"], labels, data.class_names)
        head_bytes = sum(t.numel() * t.element_size() for t in adapter.head.values())
        return {"accuracy": out["accuracy"], "images": out["images"], "head_bytes": head_bytes}


def train_argv(args: argparse.Namespace, s: Setting, folders: dict[str, Path], shift: str,
               adapter: Path) -> list[str]:  # fmt: skip
    argv = [
        "--source", str(folders["photo"]), "--target", str(folders[shift]),
        "--task", f"study-{shift}-{s.key}".replace(".", "_"), "--method", s.method,
        "--tau", f"{s.tau:g}", "--base-model", EFFLITE0[0], "--base-pretrained", EFFLITE0[1],
        "--epochs", "1", "--iters", str(args.steps), "--batch-size", str(args.batch_size),
        "--lr", f"{args.lr:g}", "--head-lr-mult", f"{args.head_lr / args.lr:g}",
        "--image-size", str(args.image_size), "--seed", str(args.seed),
        "--workers", str(args.workers), "--threads", str(args.threads),
        "--home", str(args.work / "home"), "--run-dir", str(args.work / "runs" / shift / s.key),
        "--output", str(adapter), "--no-register", "--restart", "--no-progress",
    ]  # fmt: skip
    if s.max_density is not None:
        argv += ["--max-density", f"{s.max_density:g}"]
    return argv + list(s.extra)


def run_one(args: argparse.Namespace, s: Setting, shift: str, folders: dict[str, Path],
            held_out: HeldOut) -> dict[str, Any]:  # fmt: skip
    adapter = args.work / "adapters" / f"{shift}-{s.key}.safetensors"
    argv = train_argv(args, s, folders, shift, adapter)
    cfg, options, settings = config_from_args(build_train_parser().parse_args(argv))
    # The study stores dense fine-tunes as adapters too; the store's default 50 % limit is a
    # serving policy (``DELTACLIP_MAX_DENSITY``), lifted here for these files only.
    settings = settings.model_copy(update={"max_density": 1.0})
    started = time.perf_counter()
    result = train(cfg, options, settings)
    train_s = time.perf_counter() - started
    test = held_out.accuracy(adapter, folders[f"test-{shift}"])
    m = result.metrics
    file_bytes = adapter.stat().st_size
    dense_bytes = held_out.tower_numel * 4 + test["head_bytes"]
    full = s.is_full_ft
    return {
        "shift": shift,
        "setting": s.key,
        **{k: v for k, v in asdict(s).items() if k != "key"},
        "test_accuracy": test["accuracy"],
        "test_images": test["images"],
        "target_accuracy": m["target_accuracy"],
        "target_teacher_accuracy": m["target_teacher_accuracy"],
        "target_images": m["target_images"],
        "source_images": m["source_images"],
        "nnz": m["nnz"],
        "eligible": held_out.tower_numel,
        "density": m["density"],
        "snapped_weights": m["snapped_weights"],
        "adapter_bytes": file_bytes,
        "dense_bytes": dense_bytes,
        "stored_bytes": dense_bytes if full else file_bytes,
        "stored_as": "dense float32 tower + head" if full else "v1 adapter file",
        "train_seconds": round(train_s, 1),
        "argv": ["deltaclip", "train", *argv],
    }


def save(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def code_version() -> dict[str, Any]:
    """The commit the runs were made with, and whether trainer/ or adapters_store/ differed from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "trainer", "adapters_store"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "modified": None}
    return {"commit": commit, "modified": [line[3:] for line in dirty.splitlines()]}


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip_torch": version("open_clip_torch"),
        "device": "cpu",
    }


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    config = study_config(args)
    data: dict[str, Any] = {}
    if args.out.exists() and not args.fresh:
        data = json.loads(args.out.read_text())
        if data.get("config") != config:
            sys.exit(
                f"{args.out} holds results of other settings; pass --fresh to replace them "
                f"(or --out elsewhere)\n  theirs: {data.get('config')}\n  ours:   {config}"
            )
    data.setdefault("config", config)
    data.setdefault("runs", {})
    data["machine"] = machine()
    print(f"preparing Fashion-MNIST domains under {args.work / 'data'}", file=sys.stderr)
    folders, origin = prepare_domains(
        args.work / "data" / f"pc{args.per_class}-t{args.test_per_class}-s{args.data_seed}",
        args.shifts, source_per_class=args.per_class, target_per_class=args.per_class,
        test_per_class=args.test_per_class, seed=args.data_seed,
    )  # fmt: skip
    data["images"] = origin
    held_out = HeldOut(args.image_size, args.threads)
    code = code_version()
    todo = [
        (shift, s)
        for shift in args.shifts
        for s in settings_for(args.taus, args.budgets, args.budget_tau)
    ]
    started = time.perf_counter()
    for i, (shift, s) in enumerate(todo, 1):
        key = f"{shift}/{s.key}"
        if key in data["runs"]:
            continue
        print(f"[{i}/{len(todo)}] {key}", file=sys.stderr, flush=True)
        row = {**run_one(args, s, shift, folders, held_out), "code": code}
        data["runs"][key] = row
        data["study_seconds"] = round(data.get("study_seconds", 0.0) + row["train_seconds"], 1)
        save(args.out, data)
        print(
            f"      test {row['test_accuracy']:.1%}, transductive {row['target_accuracy']:.1%}, "
            f"density {row['density']:.4%}, {row['stored_bytes']:,} B, {row['train_seconds']:.0f}s "
            f"(elapsed {time.perf_counter() - started:.0f}s)",
            file=sys.stderr,
            flush=True,
        )
    data["settings"] = [asdict(s) for s in settings_for(args.taus, args.budgets, args.budget_tau)]
    save(args.out, data)
    return data


# ------------------------------------------------------------------------------------ reporting


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
    sparse = [r for r in rows if r["family"].startswith("CMKD+RST") and r["max_density_reached"] <= 0.005]  # fmt: skip
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
    return {"rows": rows, "verdict": verdict}


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
           "ablation": "tab:purple", "CMKD+RST τ": "tab:blue", "CMKD+RST budget": "tab:green"}  # fmt: skip
MARKERS = {"linear probe": "s", "source-only FT": "D", "CMKD FT": "*", "ablation": "P",
           "CMKD+RST τ": "o", "CMKD+RST budget": "^"}  # fmt: skip


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
        f"{cfg['steps']} steps, {cfg['image_size']} px, lr {cfg['lr']:g} (random text tower)",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work = args.work.resolve()
    wall = time.perf_counter()
    data = json.loads(args.out.read_text()) if args.report_only else run_study(args)
    summary = summarise(data)
    data["summary"] = summary
    if not args.report_only:
        save(args.out, data)
    if summary["rows"]:
        plot(data, summary, args.plot)
    print(markdown_table(data, summary))
    print()
    print(verdict_text(data, summary))
    print(f"\nresults: {args.out}; plot: {args.plot}; this invocation took "
          f"{time.perf_counter() - wall:.0f}s (training time recorded: {data.get('study_seconds', 0):.0f}s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
