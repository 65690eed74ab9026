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
import sys
import tempfile
from pathlib import Path

from bench.harness import Result, add_common, csv_list


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p, reps=1)
    p.set_defaults(threads=1, merge=True)  # one thread per run; --jobs runs side by side
    s = p.add_argument_group("study")
    s.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "deltaclip-study",
        help="data, adapters, run folders and logs (default: $TMPDIR/deltaclip-study)",
    )
    s.add_argument("--jobs", type=int, default=2, help="runs at a time (one process each)")
    s.add_argument("--report-only", action="store_true", help="tables and plots from --out only")
    s.add_argument("--plot", type=Path, help="accuracy-vs-bytes PNG (default: next to --out)")
    s.add_argument(
        "--allow-dirty",
        action="store_true",
        help="run from a modified tree (rows say so; never for a reported study)",
    )
    s.add_argument("--max-runs", type=int, help="stop after this many runs (the rest on resume)")
    s.add_argument("--rows", type=csv_list(str), help="only these setting keys")
    d = p.add_argument_group("protocol (fixed in advance; the result file records it)")
    d.add_argument("--shifts", type=csv_list(str), default=["sketch", "negative", "faded"])
    d.add_argument("--per-class", type=int, default=50, help="source and target images per class")
    d.add_argument("--test-per-class", type=int, default=100, help="held-out target images")
    d.add_argument(
        "--source-val-per-class",
        type=int,
        default=50,
        help="labelled source images held out from training (for choices)",
    )
    d.add_argument("--data-seed", type=int, default=0)
    d.add_argument("--steps", type=int, default=60, help="optimiser steps of every run")
    d.add_argument("--batch-size", type=int, default=16, help="per domain")
    d.add_argument("--image-size", type=int, default=128)
    d.add_argument(
        "--head-lr",
        type=float,
        default=3e-3,
        help="task-head lr (the product's EfficientNet default, 3e-6 × 1000)",
    )
    d.add_argument(
        "--lr-grid",
        type=csv_list(float),
        default=[1e-4, 3e-4, 1e-3, 3e-3],
        help="image-tower lrs tried on the source validation images",
    )
    d.add_argument("--selection-seeds", type=csv_list(int), default=[0, 1])
    d.add_argument("--core-seeds", type=int, default=5)
    d.add_argument("--other-seeds", type=int, default=3)
    d.add_argument("--budgets", type=csv_list(float), default=[0.005, 0.0025, 0.001, 0.0005])
    d.add_argument("--block-budget", type=float, default=0.005)
    d.add_argument(
        "--budget-tau",
        type=float,
        default=3e-5,
        help="τ under the budget runs (small, so that the budget is what binds)",
    )


def apply_quick(args: argparse.Namespace) -> None:
    """A smoke run of the whole pipeline: tiny data, few steps, two shifts, few seeds."""
    args.shifts = args.shifts[:2]
    args.per_class, args.test_per_class, args.source_val_per_class = 4, 4, 2
    args.steps, args.batch_size, args.image_size = 3, 4, 32
    args.lr_grid, args.selection_seeds = args.lr_grid[-2:], [0]
    args.core_seeds, args.other_seeds = 2, 1


def run(args: argparse.Namespace, result: Result) -> None:
    from bench.accuracy_report import report
    from bench.accuracy_runner import Study

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
