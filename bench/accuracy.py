"""Question "accuracy": what CMKD and RST buy, with seeds, paired differences and CIs (docs/STUDY.md).

    python -m bench accuracy --out /work/study/results.json --work /work/study/work --jobs 2

The tasks are the demo's (Fashion-MNIST ``photo`` as the labelled source; ``sketch``,
``negative`` and ``faded`` as unlabelled targets) on the offline base ``deltaclip-efflite0``.
Every row (:func:`settings`) is ``deltaclip train`` with the same data, run length, learning rates
and seeds; only the loss and the sparsity rule change. Each run is a process of its own
(``bench/accuracy_job.py``), ``--jobs`` at a time; its adapter is merged into the base as the
server does and scored on held-out target images and on labelled source images held out from
training, keeping every image's prediction.

**No target labels in any choice.** The image-tower learning rate is chosen first, on the
held-out *source* images (``photo-val``): source-only fine-tuning at each ``--lr-grid`` value and
``--selection-seeds``, the best mean source-validation accuracy wins. Everything else is fixed in
advance (the defaults below; docs/STUDY.md says why each). Target labels are only read to score.

**Provenance.** Every run records the commit it ran from, whether the whole tree differed from
it (``git status``, bench/ included), its seed, steps, wall time, start and end. Outputs go
outside the tree (``--out``, ``--work``), so the study leaves it clean; a dirty tree or a result
file made at another commit is refused (``--allow-dirty`` only for trying the harness). Every
invocation is listed under ``sessions``; a failed run is kept under ``failures``.

**Resumable.** The result file is rewritten after every run; a rerun with the same settings
skips the runs already there. ``--report-only`` prints the tables and draws the plots from it.
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.harness import Result, add_common, csv_list

ROOT = Path(__file__).resolve().parents[1]
FROZEN_TAU = 1e9  # larger than any weight move: RST resets the whole tower after every step


@dataclass(frozen=True)
class Setting:
    """One row of the study: a loss, a sparsity rule, and whether it is a core row (more seeds)."""

    key: str
    label: str
    method: str
    tau: float
    max_density: float | None = None
    extra: tuple[str, ...] = ()  # further ``deltaclip train`` arguments
    core: bool = False
    lr_mult: float = 1.0  # the run's image-tower lr: the chosen lr × this
    variant_of: str | None = None  # a retention variant of this row (chosen on source-val)


def settings(budgets: list[float], budget_tau: float, block_budget: float) -> list[Setting]:
    """The study's rows; ``core`` rows get ``--core-seeds`` seeds, the others ``--other-seeds``."""
    rows = [
        Setting("source-only-ft", "source-only FT", "source-only", 0.0, core=True),
        # AdaBN control: target batches pass through the head in train mode, no target loss. It
        # separates the head's BatchNorm statistics from what CMKD's loss does.
        Setting("adabn-ft", "source-only FT + AdaBN (target BN statistics)", "source-only", 0.0,
                extra=("--adabn",), core=True),
        Setting("cmkd-ft", "CMKD FT", "cmkd", 0.0, core=True),
        # Ablation: CMKD without the terms that read the unlabelled target (λ1 = λ3 = 0).
        Setting("cmkd-ft-no-target", "CMKD FT without its target terms (λ1 = λ3 = 0)", "cmkd", 0.0,
                extra=("--lambda1", "0", "--lambda3", "0"), core=True),
        Setting("linear-probe", "linear probe (frozen tower)", "source-only", FROZEN_TAU),
        Setting("cmkd-fixmatch-ft", "CMKD + FixMatch FT", "cmkd", 0.0, extra=("--fixmatch",)),
    ]  # fmt: skip
    for d in budgets:
        rows.append(Setting(f"cmkd-rst-{d:g}", f"CMKD + RST ≤ {d:.2%}", "cmkd", budget_tau, d,
                            core=d == max(budgets)))  # fmt: skip
    rows.append(Setting(f"cmkd-rst-{block_budget:g}-b16", f"CMKD + RST ≤ {block_budget:.2%}, B = 16",
                        "cmkd", budget_tau, block_budget, extra=("--block-size", "16")))  # fmt: skip
    # RST retention: variants of the largest budget's row that the method allows; the study
    # picks one on the source validation images (never the target's labels).
    top = max(budgets)
    base = f"cmkd-rst-{top:g}"
    rows += [
        Setting(f"{base}-end", f"CMKD + RST ≤ {top:.2%}, budget applied at the end", "cmkd",
                budget_tau, top, extra=("--budget-at-end",), variant_of=base),
        Setting(f"{base}-lr3x", f"CMKD + RST ≤ {top:.2%}, image-tower lr × 3", "cmkd", budget_tau,
                top, lr_mult=3.0, variant_of=base),
        Setting(f"{base}-lr10x", f"CMKD + RST ≤ {top:.2%}, image-tower lr × 10", "cmkd",
                budget_tau, top, lr_mult=10.0, variant_of=base),
    ]  # fmt: skip
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p, reps=1)
    p.set_defaults(threads=1, merge=True)  # one thread per run; --jobs runs side by side
    s = p.add_argument_group("study")
    s.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "deltaclip-study",
                   help="data, adapters, run folders and logs (default: $TMPDIR/deltaclip-study)")  # fmt: skip
    s.add_argument("--jobs", type=int, default=2, help="runs at a time (one process each)")
    s.add_argument("--report-only", action="store_true", help="tables and plots from --out only")
    s.add_argument("--plot", type=Path, help="accuracy-vs-bytes PNG (default: next to --out)")
    s.add_argument("--allow-dirty", action="store_true",
                   help="run from a modified tree (rows say so; never for a reported study)")  # fmt: skip
    s.add_argument("--max-runs", type=int, help="stop after this many runs (the rest on resume)")
    s.add_argument("--rows", type=csv_list(str), help="only these setting keys")
    d = p.add_argument_group("protocol (fixed in advance; the result file records it)")
    d.add_argument("--shifts", type=csv_list(str), default=["sketch", "negative", "faded"])
    d.add_argument("--per-class", type=int, default=50, help="source and target images per class")
    d.add_argument("--test-per-class", type=int, default=100, help="held-out target images")
    d.add_argument("--source-val-per-class", type=int, default=50,
                   help="labelled source images held out from training (for choices)")  # fmt: skip
    d.add_argument("--data-seed", type=int, default=0)
    d.add_argument("--steps", type=int, default=60, help="optimiser steps of every run")
    d.add_argument("--batch-size", type=int, default=16, help="per domain")
    d.add_argument("--image-size", type=int, default=128)
    d.add_argument("--head-lr", type=float, default=3e-3,
                   help="task-head lr (the product's EfficientNet default, 3e-6 × 1000)")  # fmt: skip
    d.add_argument("--lr-grid", type=csv_list(float), default=[1e-4, 3e-4, 1e-3, 3e-3],
                   help="image-tower lrs tried on the source validation images")  # fmt: skip
    d.add_argument("--selection-seeds", type=csv_list(int), default=[0, 1])
    d.add_argument("--core-seeds", type=int, default=5)
    d.add_argument("--other-seeds", type=int, default=3)
    d.add_argument("--budgets", type=csv_list(float), default=[0.005, 0.0025, 0.001, 0.0005])
    d.add_argument("--block-budget", type=float, default=0.005)
    d.add_argument("--budget-tau", type=float, default=3e-5,
                   help="τ under the budget runs (small, so that the budget is what binds)")  # fmt: skip


def apply_quick(args: argparse.Namespace) -> None:
    """A smoke run of the whole pipeline: tiny data, few steps, two shifts, few seeds."""
    args.shifts = args.shifts[:2]
    args.per_class, args.test_per_class, args.source_val_per_class = 4, 4, 2
    args.steps, args.batch_size, args.image_size = 3, 4, 32
    args.lr_grid, args.selection_seeds = args.lr_grid[-2:], [0]
    args.core_seeds, args.other_seeds = 2, 1


def study_config(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that decides the numbers; runs are only reused under an equal config."""
    keys = ("shifts", "per_class", "test_per_class", "source_val_per_class", "data_seed", "steps",
            "batch_size", "image_size", "head_lr", "lr_grid", "selection_seeds", "core_seeds",
            "other_seeds", "budgets", "block_budget", "budget_tau", "quick")  # fmt: skip
    return {"base": "deltaclip-efflite0/imagenet", **{k: getattr(args, k) for k in keys}}


def git(*argv: str) -> str:
    return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout  # fmt: skip


def code_state() -> dict[str, Any]:
    """The commit, and every path of the whole tree that differs from it (bench/ included)."""
    modified = [line[3:] for line in git("status", "--porcelain").splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip(), "dirty": bool(modified),
            "modified": modified}  # fmt: skip


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Study:
    """The result file, the plan of runs, and the processes that run them."""

    def __init__(self, args: argparse.Namespace, result: Result) -> None:
        self.args, self.result, self.data = args, result, result.data
        self.work: Path = args.work
        self.code = code_state()
        self.rows = settings(args.budgets, args.budget_tau, args.block_budget)
        if args.rows:
            self.rows = [r for r in self.rows if r.key in args.rows]
        self.started = 0

    def check_provenance(self) -> None:
        config = study_config(self.args)
        if self.data.get("config", config) != config:
            sys.exit(f"{self.args.out} holds a study of other settings; use another --out\n"
                     f"  theirs: {self.data.get('config')}\n  ours:   {config}")  # fmt: skip
        if self.code["dirty"] and not self.args.allow_dirty:
            sys.exit("the tree differs from its commit (" + ", ".join(self.code["modified"][:5])
                     + "); commit first, or run from a clean worktree (--allow-dirty only to try)")  # fmt: skip
        commits = {r["code"]["commit"] for r in self.data.get("runs", {}).values()}
        if commits - {self.code["commit"]}:
            sys.exit(f"{self.args.out} holds runs from commit(s) {sorted(commits)}; this is "
                     f"{self.code['commit']}: resume from that commit (git worktree add)")  # fmt: skip
        self.data["config"] = config
        for key in ("runs", "selection_runs"):
            self.data.setdefault(key, {})
        self.data.setdefault("failures", [])
        self.data.setdefault("sessions", []).append(
            {"started_at": now(), "pid": os.getpid(), "command": self.data["command"], **self.code}
        )
        self.data["settings"] = [asdict(r) for r in self.rows]
        self.result.save()

    def prepare(self) -> dict[str, str]:
        from deltaclip_demo.data import prepare_domains

        a = self.args
        root = self.work / "data" / (f"pc{a.per_class}-t{a.test_per_class}-v{a.source_val_per_class}"
                                     f"-s{a.data_seed}")  # fmt: skip
        print(f"preparing Fashion-MNIST domains under {root}", file=sys.stderr, flush=True)
        folders, origin = prepare_domains(
            root, a.shifts, source_per_class=a.per_class, target_per_class=a.per_class,
            test_per_class=a.test_per_class, seed=a.data_seed,
            source_val_per_class=a.source_val_per_class,
        )  # fmt: skip
        self.data["images"] = origin
        return {k: str(v) for k, v in folders.items()}

    def teacher(self, folders: dict[str, str]) -> None:
        """The base's zero-shot answer (CMKD's teacher, untrained), per image; never a choice."""
        from adapters_store.zeroshot import DEFAULT_TEMPLATE
        from trainer.evaluate import evaluate_zero_shot

        from .accuracy_job import digits

        teacher = self.data.setdefault("teacher", {})
        for name in [f"test-{s}" for s in self.args.shifts] + ["photo-val"]:
            if name not in teacher:
                out = evaluate_zero_shot(*self.data["config"]["base"].split("/"), folders[name],
                                         template=DEFAULT_TEMPLATE, num_workers=0,
                                         image_size=self.args.image_size, keep_predictions=True)  # fmt: skip
                teacher[name] = {"accuracy": out["accuracy"], "images": out["images"],
                                 "predictions": digits(out["predictions"]),
                                 "labels": digits(out["labels"])}  # fmt: skip
                self.result.save()

    def spec(self, key: str, shift: str, row: Setting, seed: int, lr: float,
             folders: dict[str, str]) -> dict[str, Any]:  # fmt: skip
        a = self.args
        return {
            "key": key, "shift": shift, "setting": asdict(row), "seed": seed, "lr": lr,
            "head_lr": a.head_lr, "steps": a.steps, "batch_size": a.batch_size,
            "image_size": a.image_size, "threads": a.threads, "folders": folders,
            "work": str(self.work), "out": str(self.work / "rows" / f"{key.replace('/', '_')}.json"),
            "score_folders": {"test": folders[f"test-{shift}"], "source_val": folders["photo-val"]},
        }  # fmt: skip

    def run_all(self, specs: list[dict[str, Any]], into: str) -> None:
        """Run the specs not yet in ``data[into]``, ``--jobs`` at a time; save after each."""
        todo = [s for s in specs if s["key"] not in self.data[into]]
        running: dict[int, tuple[subprocess.Popen[bytes], dict[str, Any], dict[str, Any]]] = {}
        (self.work / "rows").mkdir(parents=True, exist_ok=True)
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        while todo or running:
            limit = self.args.max_runs
            while (
                todo and len(running) < self.args.jobs and (limit is None or self.started < limit)
            ):
                spec = todo.pop(0)
                path = self.work / "rows" / f"{spec['key'].replace('/', '_')}.spec.json"
                path.write_text(json.dumps(spec))
                Path(spec["out"]).unlink(missing_ok=True)
                log = (self.work / "logs" / f"{spec['key'].replace('/', '_')}.log").open("wb")
                proc = subprocess.Popen([sys.executable, "-m", "bench.accuracy_job", str(path)],
                                        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
                log.close()
                info = {"started_at": now(), "t0": time.perf_counter(), "load_at_start": os.getloadavg()[0]}  # fmt: skip
                running[proc.pid] = (proc, spec, info)
                self.started += 1
                print(f"[{self.started}] start {spec['key']} (lr {spec['lr']:g})", file=sys.stderr, flush=True)  # fmt: skip
            if not running:
                return
            pid, status = os.wait()
            if pid not in running:
                continue
            proc, spec, info = running.pop(pid)
            proc.returncode = os.waitstatus_to_exitcode(status)
            self.collect(proc.returncode, spec, info, into)

    def collect(self, rc: int, spec: dict[str, Any], info: dict[str, Any], into: str) -> None:
        wall = round(time.perf_counter() - info.pop("t0"), 1)
        log = self.work / "logs" / f"{spec['key'].replace('/', '_')}.log"
        out = Path(spec["out"])
        if rc != 0 or not out.exists():
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            self.data["failures"].append({"key": spec["key"], "rc": rc, "finished_at": now(),
                                          "wall_seconds": wall, "log": str(log), "tail": tail,
                                          "code": self.code})  # fmt: skip
            print(f"      FAILED {spec['key']} (rc {rc}): see {log}", file=sys.stderr, flush=True)
        else:
            row = json.loads(out.read_text())
            row.update(info, finished_at=now(), wall_seconds=wall, lr=spec["lr"],
                       head_lr=spec["head_lr"], batch_size=spec["batch_size"],
                       image_size=spec["image_size"], code=self.code)  # fmt: skip
            self.data[into][spec["key"]] = row
            sc = row["scores"]
            print(f"      done {spec['key']}: test {sc['test']['accuracy']:.1%}, source-val "
                  f"{sc['source_val']['accuracy']:.1%}, density {row['density']:.4%}, {wall:.0f}s",
                  file=sys.stderr, flush=True)  # fmt: skip
        self.data["study_seconds"] = round(sum(r["wall_seconds"] for k in ("runs", "selection_runs")
                                               for r in self.data[k].values()), 1)  # fmt: skip
        self.result.save()

    def choose_lr(self, folders: dict[str, str]) -> float | None:
        """The tower lr with the best mean source-validation accuracy of source-only FT."""
        a = self.args
        row = Setting("source-only-ft", "source-only FT", "source-only", 0.0)
        specs = [self.spec(f"select/lr-{lr:g}/s{seed}", a.shifts[0], row, seed, lr, folders)
                 for seed in a.selection_seeds for lr in a.lr_grid]  # fmt: skip
        self.run_all(specs, "selection_runs")
        runs = self.data["selection_runs"]
        means = {}
        for lr in a.lr_grid:
            got = [runs[k]["scores"]["source_val"]["accuracy"] for k in
                   (f"select/lr-{lr:g}/s{seed}" for seed in a.selection_seeds) if k in runs]  # fmt: skip
            if len(got) < len(a.selection_seeds):
                return None
            means[lr] = sum(got) / len(got)
        best = max(a.lr_grid, key=lambda lr: (means[lr], -lr))  # ties: the smaller lr
        self.data["selection"] = {
            "rule": "image-tower lr with the highest mean source-validation accuracy of "
                    "source-only FT over the selection seeds (ties: the smaller lr)",
            "source_val_accuracy": {f"{lr:g}": means[lr] for lr in a.lr_grid}, "lr": best,
        }  # fmt: skip
        self.result.save()
        return best

    def grid(self, lr: float, folders: dict[str, str]) -> list[dict[str, Any]]:
        """Seed-major, so that a partial study has every row at its first seeds."""
        a = self.args
        specs = []
        for seed in range(max(a.core_seeds, a.other_seeds)):
            for shift in a.shifts:
                for row in self.rows:
                    if seed < (a.core_seeds if row.core else a.other_seeds):
                        key = f"{shift}/{row.key}/s{seed}"
                        specs.append(self.spec(key, shift, row, seed, lr * row.lr_mult, folders))
        return specs


def run(args: argparse.Namespace, result: Result) -> None:
    from bench.accuracy_report import report

    if args.quick:
        apply_quick(args)
    args.out = result.path
    args.work = args.work.resolve()
    plot = args.plot or result.path.with_suffix(".png")
    if args.report_only:
        result.write = False  # redraw only: the result file stays as it was
        report(result.data, plot)
        return
    study = Study(args, result)
    study.check_provenance()
    folders = study.prepare()
    study.teacher(folders)
    lr = study.choose_lr(folders)
    if lr is None:
        print("the lr selection is not finished (--max-runs); rerun to continue", file=sys.stderr)
    else:
        print(f"image-tower lr {lr:g}, chosen on source validation images", file=sys.stderr)
        study.run_all(study.grid(lr, folders), "runs")
    result["finished_runs"] = len(result.data["runs"])
    report(result.data, plot)
