"""One epoch of a run: its steps with a progress bar, then its record, evaluation and checkpoint.

An epoch is ``iters_per_epoch`` steps, counted from the session's step, so a run resumed in the
middle of an epoch finishes that epoch (with the loss sums saved in the checkpoint) rather than
starting a new one.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from tqdm import tqdm

from .distributed import assert_replicas_identical
from .run_state import Run


def run_epoch(run: Run, batches: Iterator[Any], on_step: Callable[[int], None] | None) -> None:
    """Train to the end of the current epoch, then log, evaluate and checkpoint it.

    Every rank steps and checks that its tower equals the others'; only rank 0 evaluates,
    records, logs and checkpoints. Target accuracy is measured every ``eval_every`` epochs and
    after the last one.

    Args:
        batches: the run's endless paired batches (one iterator for the whole run, so that the
            stream does not restart at epoch boundaries).
        on_step: called with the step count after every step (tests use it to interrupt a run).
    """
    session, cfg, options = run.session, run.cfg, run.plan.options
    iters = cfg.iters_per_epoch
    epoch = session.step // iters
    run.started = time.perf_counter()
    bar = tqdm(
        total=iters,
        initial=session.step % iters,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        disable=None if options.progress is None else not options.progress,
        dynamic_ncols=True,
    )
    with bar:
        while True:
            step_terms = _add_step(run, session.train_step(*next(batches)))
            bar.set_postfix(
                loss=f"{step_terms['total']:.4f}",
                density=f"{session.rst.density:.4%}",
                refresh=False,
            )
            bar.update(1)
            if options.checkpoint_every and session.step % options.checkpoint_every == 0:
                run.checkpoint()
            if on_step is not None:
                on_step(session.step)
            if session.step % iters == 0:
                break
    record = _epoch_record(run, epoch)
    # The epoch's last step as it entered the loss: λ(t) and each weighted term (a user sees the
    # teacher's terms at their final weight, which the epoch's mean understates while λ ramps).
    record["last_step"] = {k: v for k, v in step_terms.items() if k == "ramp" or k.startswith("w_")}
    assert_replicas_identical(run.plan.ranks, session.tower, f"after epoch {epoch + 1}")
    if not run.plan.ranks.is_main:
        run.sums = {}
        return
    final = session.step >= cfg.total_steps
    if final or (options.eval_every and (epoch + 1) % options.eval_every == 0):
        run.last_eval = session.evaluate(run.test_loader, run.plan.class_names)
        record["target_accuracy"] = run.last_eval["accuracy"]
        record["target_teacher_accuracy"] = run.last_eval["teacher_accuracy"]
    record["seconds"] = round(run.elapsed + time.perf_counter() - run.started, 3)
    run.elapsed = 0.0
    run.history.append(record)
    run.log.append(record)
    if options.progress is not False:
        tqdm.write(epoch_line(record), file=sys.stderr)
    run.sums = {}
    run.started = time.perf_counter()
    run.checkpoint()


def _add_step(run: Run, terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """Add one step's loss terms to the epoch's sums; the terms as floats (one device copy)."""
    values = torch.stack([v.double() for v in terms.values()]).tolist()
    step_terms = dict(zip(terms, values, strict=True))
    for k, v in step_terms.items():
        run.sums[k] = run.sums.get(k, 0.0) + v
    run.sums["_steps"] = run.sums.get("_steps", 0.0) + 1
    return step_terms


def _epoch_record(run: Run, epoch: int) -> dict[str, Any]:
    """The epoch's mean losses, sparsity and learning rates (the ``train_log.jsonl`` line)."""
    session = run.session
    n = run.sums.pop("_steps")
    tower_lr, head_lr = session.lrs
    return {
        "epoch": epoch + 1,
        "step": session.step,
        "losses": {k: v / n for k, v in sorted(run.sums.items())},
        "nnz": session.rst.nnz,
        "eligible": session.rst.eligible,
        "density": session.rst.density,
        "lr": tower_lr,
        "head_lr": head_lr,
    }


def epoch_line(record: dict[str, Any]) -> str:
    """The one line printed after each epoch (on stderr, between progress bars)."""
    acc = record.get("target_accuracy")
    return (
        f"epoch {record['epoch']}: loss {record['losses'].get('total', float('nan')):.4f}, "
        f"density {record['density']:.4%} ({record['nnz']} of {record['eligible']})"
        + (f", target accuracy {acc:.2%}" if acc is not None else "")
        + f", {record['seconds']:.1f}s"
    )
