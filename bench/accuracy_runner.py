"""The accuracy study's runs: provenance, data, the teacher, one process per run, the lr choice.

:class:`Study` owns the result file's contents while the study runs: it refuses a file of other
settings or from another commit, starts ``bench/accuracy_job.py`` processes ``--jobs`` at a time,
adds each finished row's provenance and saves after every run (bench/accuracy.py says why).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.accuracy_rows import Setting, settings
from bench.harness import Result

ROOT = Path(__file__).resolve().parents[1]


def study_config(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that decides the numbers; runs are only reused under an equal config."""
    keys = (
        "shifts",
        "per_class",
        "test_per_class",
        "source_val_per_class",
        "data_seed",
        "steps",
        "batch_size",
        "image_size",
        "head_lr",
        "lr_grid",
        "selection_seeds",
        "core_seeds",
        "other_seeds",
        "budgets",
        "block_budget",
        "budget_tau",
        "quick",
    )
    return {"base": "deltaclip-efflite0/imagenet", **{k: getattr(args, k) for k in keys}}


def git(*argv: str) -> str:
    return subprocess.run(
        ["git", *argv], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout


def code_state() -> dict[str, Any]:
    """The commit, and every path of the whole tree that differs from it (bench/ included)."""
    modified = [line[3:] for line in git("status", "--porcelain").splitlines()]
    return {
        "commit": git("rev-parse", "HEAD").strip(),
        "dirty": bool(modified),
        "modified": modified,
    }


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
            sys.exit(
                f"{self.args.out} holds a study of other settings; use another --out\n"
                f"  theirs: {self.data.get('config')}\n  ours:   {config}"
            )
        if self.code["dirty"] and not self.args.allow_dirty:
            sys.exit(
                "the tree differs from its commit ("
                + ", ".join(self.code["modified"][:5])
                + "); commit first, or run from a clean worktree (--allow-dirty only to try)"
            )
        commits = {r["code"]["commit"] for r in self.data.get("runs", {}).values()}
        if commits - {self.code["commit"]}:
            sys.exit(
                f"{self.args.out} holds runs from commit(s) {sorted(commits)}; this is "
                f"{self.code['commit']}: resume from that commit (git worktree add)"
            )
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
        root = (
            self.work
            / "data"
            / (f"pc{a.per_class}-t{a.test_per_class}-v{a.source_val_per_class}-s{a.data_seed}")
        )
        print(f"preparing Fashion-MNIST domains under {root}", file=sys.stderr, flush=True)
        folders, origin = prepare_domains(
            root,
            a.shifts,
            source_per_class=a.per_class,
            target_per_class=a.per_class,
            test_per_class=a.test_per_class,
            seed=a.data_seed,
            source_val_per_class=a.source_val_per_class,
        )
        self.data["images"] = origin
        return {k: str(v) for k, v in folders.items()}

    def teacher(self, folders: dict[str, str]) -> None:
        """The base's zero-shot answer (CMKD's teacher, untrained), per image; never a choice."""
        from adapters_store.zeroshot import DEFAULT_TEMPLATE
        from bench.accuracy_job import digits
        from trainer.evaluate import evaluate_zero_shot

        teacher = self.data.setdefault("teacher", {})
        for name in [f"test-{s}" for s in self.args.shifts] + ["photo-val"]:
            if name not in teacher:
                out = evaluate_zero_shot(
                    *self.data["config"]["base"].split("/"),
                    folders[name],
                    template=DEFAULT_TEMPLATE,
                    num_workers=0,
                    image_size=self.args.image_size,
                    keep_predictions=True,
                )
                teacher[name] = {
                    "accuracy": out["accuracy"],
                    "images": out["images"],
                    "predictions": digits(out["predictions"]),
                    "labels": digits(out["labels"]),
                }
                self.result.save()

    def spec(
        self, key: str, shift: str, row: Setting, seed: int, lr: float, folders: dict[str, str]
    ) -> dict[str, Any]:
        a = self.args
        return {
            "key": key,
            "shift": shift,
            "setting": asdict(row),
            "seed": seed,
            "lr": lr,
            "head_lr": a.head_lr,
            "steps": a.steps,
            "batch_size": a.batch_size,
            "image_size": a.image_size,
            "threads": a.threads,
            "folders": folders,
            "work": str(self.work),
            "out": str(self.work / "rows" / f"{key.replace('/', '_')}.json"),
            "score_folders": {"test": folders[f"test-{shift}"], "source_val": folders["photo-val"]},
        }

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
                proc = subprocess.Popen(
                    [sys.executable, "-m", "bench.accuracy_job", str(path)],
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
                log.close()
                info = {
                    "started_at": now(),
                    "t0": time.perf_counter(),
                    "load_at_start": os.getloadavg()[0],
                }
                running[proc.pid] = (proc, spec, info)
                self.started += 1
                print(
                    f"[{self.started}] start {spec['key']} (lr {spec['lr']:g})",
                    file=sys.stderr,
                    flush=True,
                )
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
            self.data["failures"].append(
                {
                    "key": spec["key"],
                    "rc": rc,
                    "finished_at": now(),
                    "wall_seconds": wall,
                    "log": str(log),
                    "tail": tail,
                    "code": self.code,
                }
            )
            print(f"      FAILED {spec['key']} (rc {rc}): see {log}", file=sys.stderr, flush=True)
        else:
            row = json.loads(out.read_text())
            row.update(
                info,
                finished_at=now(),
                wall_seconds=wall,
                lr=spec["lr"],
                head_lr=spec["head_lr"],
                batch_size=spec["batch_size"],
                image_size=spec["image_size"],
                code=self.code,
            )
            self.data[into][spec["key"]] = row
            sc = row["scores"]
            print(
                f"      done {spec['key']}: test {sc['test']['accuracy']:.1%}, source-val "
                f"{sc['source_val']['accuracy']:.1%}, density {row['density']:.4%}, {wall:.0f}s",
                file=sys.stderr,
                flush=True,
            )
        self.data["study_seconds"] = round(
            sum(
                r["wall_seconds"] for k in ("runs", "selection_runs") for r in self.data[k].values()
            ),
            1,
        )
        self.result.save()

    def choose_lr(self, folders: dict[str, str]) -> float | None:
        """The tower lr with the best mean source-validation accuracy of source-only FT."""
        a = self.args
        row = Setting("source-only-ft", "source-only FT", "source-only", 0.0)
        specs = [
            self.spec(f"select/lr-{lr:g}/s{seed}", a.shifts[0], row, seed, lr, folders)
            for seed in a.selection_seeds
            for lr in a.lr_grid
        ]
        self.run_all(specs, "selection_runs")
        runs = self.data["selection_runs"]
        means = {}
        for lr in a.lr_grid:
            got = [
                runs[k]["scores"]["source_val"]["accuracy"]
                for k in (f"select/lr-{lr:g}/s{seed}" for seed in a.selection_seeds)
                if k in runs
            ]
            if len(got) < len(a.selection_seeds):
                return None
            means[lr] = sum(got) / len(got)
        best = max(a.lr_grid, key=lambda lr: (means[lr], -lr))  # ties: the smaller lr
        self.data["selection"] = {
            "rule": "image-tower lr with the highest mean source-validation accuracy of "
            "source-only FT over the selection seeds (ties: the smaller lr)",
            "source_val_accuracy": {f"{lr:g}": means[lr] for lr in a.lr_grid},
            "lr": best,
        }
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
