"""The training run: data, base, session, epochs with progress and a JSON log, resume, the adapter.

:func:`train` is the whole of ``deltaclip train``: it checks everything it can before spending
compute (folders and classes, task name, the catalog schema, a stale checkpoint), trains, writes
a verified v1 adapter and registers it. Every ``checkpoint_every`` steps and at the end of each
epoch it checkpoints, and ``resume`` continues to the very same adapter bytes as a run that never
stopped.

The stages live in their own modules: ``trainer.run_start`` (checks, model, data, resume),
``trainer.epoch`` (the steps of one epoch and its record), ``trainer.finish`` (served weights,
evaluation, the adapter file and its registration); ``trainer.run_state`` holds the state they share.
"""

from __future__ import annotations

from collections.abc import Callable

from adapters_store.config import StoreSettings

from .config import RunOptions, TrainConfig
from .distributed import barrier, shutdown
from .epoch import run_epoch
from .execution import deterministic, thread_budget
from .finish import TrainResult, finish, write_and_register
from .run_start import plan_run, start_run

__all__ = ["TrainResult", "train"]


def train(
    config: TrainConfig,
    options: RunOptions | None = None,
    settings: StoreSettings | None = None,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train one task and write (and by default register) its adapter.

    Args:
        on_step: called with the step count after every step (tests use it to interrupt a run).

    Raises:
        DataError, TrainError: bad folders or settings, found before any training is done.
        StoreError: the catalog cannot take the adapter (e.g. its schema is out of date).
    """
    plan = plan_run(config, options or RunOptions(), settings or StoreSettings())
    ranks = plan.ranks
    with deterministic(), thread_budget(plan.device, plan.workers, plan.options.threads):
        run = start_run(plan)
        batches = iter(run.loader)
        while run.session.step < run.cfg.total_steps:
            run_epoch(run, batches, on_step)
        del batches  # stop the loader processes before the final evaluation starts its own
        if not ranks.is_main:
            barrier(ranks)  # rank 0 writes and registers the adapter
            shutdown(ranks)
            return TrainResult(None, {}, run.cfg, None)
        adapter, metrics = finish(run)
    try:
        return write_and_register(run, adapter, metrics)
    finally:
        barrier(ranks)
        shutdown(ranks)
