"""Question "accuracy": target accuracy against stored bytes per task — linear probe, fine-tuning,
and RST at many densities (about 25 minutes on 2 idle CPU cores; longer when the machine is shared).

    python -m bench accuracy --out docs/study_results.json --plot docs/study_accuracy_vs_bytes.png

``--quick`` is a smoke run of about a minute (tiny data, few steps, few settings). Results go to
the JSON after every run, and a rerun with the same settings skips the runs already there, so a
killed study resumes where it stopped (``--fresh`` starts over). ``--report-only`` redraws the plot
and prints the tables from the JSON without training (bench/accuracy_report.py).

The tasks are the demo's (Fashion-MNIST ``photo`` as the labelled source, ``sketch``,
``negative`` and ``faded`` as unlabelled targets) on the offline base
``deltaclip-efflite0/imagenet``. Every setting (:func:`settings_for`: linear probe, source-only and
CMKD full fine-tuning, an ablation without CMKD's target terms, CMKD+RST by threshold τ and by
``--max-density`` budget; docs/METHOD.md) uses the same data, seed, learning rates and step
count; only the loss and the rule that decides which tower weights may differ from the base
change. Accuracy is measured on held-out ``test-<shift>`` folders with the adapter merged into the
base as the server does; stored bytes per task are the adapter file's size, or for full
fine-tuning a dense float32 tower plus head (docs/STUDY.md explains the protocol).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch

from adapters_store.adapter import merge_state
from adapters_store.bases import EFFLITE0, build_base, tower_parameters
from adapters_store.format.codec import Limits, read_adapter
from adapters_store.head import head_from_state
from bench.accuracy_report import (
    FROZEN_TAU,
    block_table,
    comparison_table,
    markdown_table,
    plot,
    summarise,
    verdict_text,
)
from bench.harness import Result, add_common, csv_list

ROOT = Path(__file__).resolve().parents[1]
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


def settings_for(
    taus: list[float],
    budgets: list[float],
    budget_tau: float,
    block_sizes: tuple[int, ...] | list[int] = (1,),
) -> list[Setting]:
    rows = [
        Setting("linear-probe", "linear probe (frozen tower)", "linear probe", "source-only", FROZEN_TAU),
        Setting("source-only-ft", "source-only FT (τ=0)", "source-only FT", "source-only", 0.0),
        Setting("cmkd-ft", "CMKD FT (τ=0)", "CMKD FT", "cmkd", 0.0),
        # Ablation: CMKD without the terms that read the unlabelled target (λ1 = λ3 = 0), i.e.
        # source-only plus the source CE through the (random-text) teacher head. It tells whether
        # CMKD's edge over source-only here comes from the target terms or from the teacher.
        Setting("cmkd-ft-no-target", "CMKD FT, λ1=λ3=0 (no target terms)", "ablation", "cmkd", 0.0,
                extra=("--lambda1", "0", "--lambda3", "0")),
        Setting("cmkd-fixmatch-ft", "CMKD+FixMatch FT (τ=0)", "CMKD+FixMatch FT", "cmkd", 0.0,
                extra=("--fixmatch",)),
    ]  # fmt: skip
    rows += [
        Setting(f"cmkd-rst-tau-{t:g}", f"CMKD+RST τ={t:g}", "CMKD+RST τ", "cmkd", t) for t in taus
    ]
    rows += [Setting(f"cmkd-rst-max-{d:g}", f"CMKD+RST ≤{d:.2%} (τ={budget_tau:g})", "CMKD+RST budget",
                     "cmkd", budget_tau, d) for d in budgets]  # fmt: skip
    # Block-structured RST (docs/METHOD.md): the same budgets, weights changed in blocks of B.
    rows += [Setting(f"cmkd-rst-max-{d:g}-b{b}", f"CMKD+RST ≤{d:.2%}, B={b} (τ={budget_tau:g})",
                     f"CMKD+RST budget B={b}", "cmkd", budget_tau, d, extra=("--block-size", str(b)))
             for b in block_sizes if b > 1 for d in budgets]  # fmt: skip
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p, reps=1)
    p.set_defaults(threads=1, merge=True)  # 1 thread is fastest on a busy 2-core machine
    p.add_argument("--plot", type=Path, help="PNG (default: next to --out)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "deltaclip-study",
                   help="data, adapters and run logs (default: $TMPDIR/deltaclip-study)")  # fmt: skip
    p.add_argument("--fresh", dest="merge", action="store_false", help="ignore results already in --out")  # fmt: skip
    p.add_argument("--report-only", action="store_true", help="table and plot from --out only")
    p.add_argument("--combine", type=Path, nargs="+", metavar="JSON",
                   help="merge per-shift result files (runs of --shifts X in parallel processes) "
                   "into --out, then report")  # fmt: skip
    p.add_argument("--shifts", nargs="+", default=["sketch", "negative", "faded"])
    p.add_argument("--per-class", type=int, default=50, help="source and target images per class")
    p.add_argument("--test-per-class", type=int, default=50, help="held-out target images")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16, help="per domain")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="image-tower lr, every method")
    p.add_argument("--head-lr", type=float, default=3e-3, help="task-head lr, every method")
    p.add_argument("--taus", type=float, nargs="*", default=[3e-5, 1e-4, 3e-4])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.0005, 0.001, 0.0025, 0.005, 0.01])
    p.add_argument("--budget-tau", type=float, default=3e-5,
                   help="τ under the --max-density runs (small enough that the budget is what binds; "
                   "τ=0 would top-k the whole tower after every step, ~1 s a step here)")  # fmt: skip
    p.add_argument("--block-sizes", type=csv_list(int), default=[1],
                   help="block sizes of the --max-density runs, e.g. 1,4,16 (1: unstructured RST)")  # fmt: skip
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="loader processes per run")


def study_config(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that decides the numbers; results are only reused under an equal config."""
    keys = ("shifts", "per_class", "test_per_class", "steps", "batch_size", "image_size", "lr",
            "head_lr", "taus", "budgets", "budget_tau", "seed", "data_seed", "quick")  # fmt: skip
    blocks = sorted(set(args.block_sizes) - {1})  # only when asked: older results stay reusable
    return {
        "base": list(EFFLITE0),
        **{k: getattr(args, k) for k in keys},
        "head_lr_mult": args.head_lr / args.lr,
        **({"block_sizes": blocks} if blocks else {}),
    }


class HeldOut:
    """Accuracy of adapters on held-out folders, merged into one resident base as served."""

    def __init__(self, image_size: int) -> None:
        self.net = build_base(*EFFLITE0)
        self.base_state = {k: v.clone() for k, v in self.net.state_dict().items()}
        self.tower_numel = sum(p.numel() for p in tower_parameters(self.net).values())
        self.image_size = image_size

    @torch.no_grad()
    def accuracy(self, adapter_path: Path, folder: Path) -> dict[str, Any]:
        from trainer.evaluate import folder_data, predictions, report

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


def teacher_accuracy(folder: Path, image_size: int) -> dict[str, Any]:
    """Zero-shot accuracy of the base's text side (the CMKD teacher) on a held-out folder."""
    from adapters_store.zeroshot import DEFAULT_TEMPLATE
    from trainer.evaluate import evaluate_zero_shot

    out = evaluate_zero_shot(*EFFLITE0, folder, template=DEFAULT_TEMPLATE, num_workers=0,
                             image_size=image_size)  # fmt: skip
    return {"accuracy": out["accuracy"], "images": out["images"],
            "per_class_accuracy": out["per_class_accuracy"]}  # fmt: skip


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
    from trainer.cli import main as train_main

    adapter = args.work / "adapters" / f"{shift}-{s.key}.safetensors"
    argv = train_argv(args, s, folders, shift, adapter)
    # The study stores dense fine-tunes as adapters too; the store's default 50 % limit is a
    # serving policy (DELTACLIP_MAX_DENSITY), lifted here for these runs only.
    previous = os.environ.get("DELTACLIP_MAX_DENSITY")
    os.environ["DELTACLIP_MAX_DENSITY"] = "1.0"
    started = time.perf_counter()
    try:
        m = train_main(argv)
    finally:
        if previous is None:
            os.environ.pop("DELTACLIP_MAX_DENSITY", None)
        else:
            os.environ["DELTACLIP_MAX_DENSITY"] = previous
    train_s = time.perf_counter() - started
    test = held_out.accuracy(adapter, folders[f"test-{shift}"])
    file_bytes = adapter.stat().st_size
    dense_bytes = held_out.tower_numel * 4 + test["head_bytes"]
    full = s.is_full_ft
    return {
        "shift": shift, "setting": s.key, **{k: v for k, v in asdict(s).items() if k != "key"},
        "test_accuracy": test["accuracy"], "test_images": test["images"],
        **{k: m[k] for k in ("target_accuracy", "target_teacher_accuracy", "target_images",
                             "source_images", "nnz", "density", "snapped_weights")},
        "eligible": held_out.tower_numel, "adapter_bytes": file_bytes, "dense_bytes": dense_bytes,
        "stored_bytes": dense_bytes if full else file_bytes,
        "stored_as": "dense float32 tower + head" if full else "v1 adapter file",
        "train_seconds": round(train_s, 1), "argv": ["deltaclip", "train", *argv],
    }  # fmt: skip


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


def run_study(args: argparse.Namespace, data: dict[str, Any], save: Any) -> None:
    from deltaclip_demo.data import prepare_domains

    config = study_config(args)
    if data.get("config", config) != config:
        sys.exit(
            f"{args.out} holds results of other settings; pass --fresh to replace them "
            f"(or --out elsewhere)\n  theirs: {data.get('config')}\n  ours:   {config}"
        )
    data.setdefault("config", config)
    data.setdefault("runs", {})
    print(f"preparing Fashion-MNIST domains under {args.work / 'data'}", file=sys.stderr)
    folders, origin = prepare_domains(
        args.work / "data" / f"pc{args.per_class}-t{args.test_per_class}-s{args.data_seed}",
        args.shifts, source_per_class=args.per_class, target_per_class=args.per_class,
        test_per_class=args.test_per_class, seed=args.data_seed,
    )  # fmt: skip
    data["images"] = origin
    held_out = HeldOut(args.image_size)
    code = code_version()
    teacher = data.setdefault("teacher", {})
    for shift in args.shifts:  # the base's zero-shot answer: CMKD's teacher before training
        if shift not in teacher:
            teacher[shift] = teacher_accuracy(folders[f"test-{shift}"], args.image_size)
            save()
    settings = settings_for(args.taus, args.budgets, args.budget_tau, args.block_sizes)
    data["settings"] = [asdict(s) for s in settings]  # a report can be drawn from a partial file
    todo = [(shift, s) for shift in args.shifts for s in settings]
    started = time.perf_counter()
    for i, (shift, s) in enumerate(todo, 1):
        key = f"{shift}/{s.key}"
        if key in data["runs"]:
            continue
        print(f"[{i}/{len(todo)}] {key}", file=sys.stderr, flush=True)
        row = {**run_one(args, s, shift, folders, held_out), "code": code}
        data["runs"][key] = row
        data["study_seconds"] = round(data.get("study_seconds", 0.0) + row["train_seconds"], 1)
        save()
        print(f"      test {row['test_accuracy']:.1%}, transductive {row['target_accuracy']:.1%}, "
              f"density {row['density']:.4%}, {row['stored_bytes']:,} B, {row['train_seconds']:.0f}s "
              f"(elapsed {time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)  # fmt: skip
    save()


def combine(data: dict[str, Any], parts: list[dict[str, Any]]) -> None:
    """One study from per-shift parts that differ only in their shifts (the config says so)."""
    configs = [{k: v for k, v in part["config"].items() if k != "shifts"} for part in parts]
    if any(c != configs[0] for c in configs):
        sys.exit("--combine: the files were made with different settings")
    data["config"] = {
        **parts[0]["config"],
        "shifts": [s for p in parts for s in p["config"]["shifts"]],
    }
    for key in ("runs", "teacher"):
        data[key] = {k: v for part in parts for k, v in part.get(key, {}).items()}
    data["settings"], data["images"] = parts[0]["settings"], parts[0]["images"]
    data["study_seconds"] = round(sum(p.get("study_seconds", 0.0) for p in parts), 1)
    data["combined_from"] = [p.get("command") for p in parts]


def run(args: argparse.Namespace, result: Result) -> None:
    if args.quick:
        args.shifts = args.shifts[:2]
        args.per_class, args.test_per_class, args.steps = 8, 8, 6
        args.batch_size, args.image_size = 8, 32
        args.taus, args.budgets = args.taus[:1], [0.005]
    args.out = result.path
    args.plot = args.plot or result.path.with_suffix(".png")
    args.work = args.work.resolve()
    if args.combine:
        combine(result.data, [json.loads(path.read_text()) for path in args.combine])
    elif args.report_only:
        result.write = False  # redraw only: the result file stays as it was
    else:
        run_study(args, result.data, result.save)
    summary = summarise(result.data)
    result["summary"] = summary
    if summary["rows"]:
        plot(result.data, summary, args.plot)
    print(comparison_table(result.data))
    print()
    print(markdown_table(result.data, summary))
    print()
    print(verdict_text(result.data, summary))
    if summary.get("blocks"):
        print()
        print(block_table(summary))
    print(f"\nresults: {args.out}; plot: {args.plot} (training time recorded: "
          f"{result.data.get('study_seconds', 0):.0f}s)")  # fmt: skip
