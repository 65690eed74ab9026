"""Finishing a run: the weights the adapter will serve, their evaluation, the file, the catalog.

The adapter stores ``W0 + residual``; :func:`finish` snaps the trained tower to exactly those
weights first (``export.snap``) and reports the metrics of what will be served, never of weights
that only existed in training. :func:`write_and_register` writes the file before anything can
refuse it, so a finished run's result is never lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from adapters_store.adapter import Adapter, AdapterInfo, utc_now_iso
from adapters_store.format.codec import write_adapter
from adapters_store.format.servable import StateWeights
from adapters_store.registry import Registration
from adapters_store.serving_base import ServingBase

from .config import TrainConfig
from .export import default_output, snap, store_written, verified_adapter
from .loss_report import loss_summary
from .run_state import Run

# Versions recorded in the adapter's train_config, to tell how a stored adapter was made.
RECORDED_PACKAGES = ("deltaclip", "torch", "open_clip_torch")


@dataclass
class TrainResult:
    """What a run produced; on ranks other than 0 of a ``torchrun`` job only ``config`` is set."""

    adapter_path: Path | None
    metrics: dict[str, Any]
    config: TrainConfig
    log_path: Path | None
    registration: Registration | None = None


def finish(run: Run) -> tuple[Adapter, dict[str, Any]]:
    """Snap the tower to its served weights, evaluate them, and build the verified adapter.

    The final epoch's evaluation is reused when snapping changed no weight; a resumed run whose
    last epoch had already finished, or a snapped tower, is evaluated again.

    Returns:
        The adapter (checked to merge back to the evaluated tower exactly) and the run's metrics.

    Raises:
        ExactnessError: the adapter would not reproduce the evaluated tower.
    """
    session, cfg, plan = run.session, run.cfg, run.plan
    if session.rst.finalize():  # a budget deferred to the end: what is served is pruned
        run.last_eval = None
    served, snapped = snap(session.base_state(), session.tower_state(), cfg.residual_dtype)
    if snapped:  # report, and store, exactly what the adapter will serve
        session.set_tower(served)
        run.last_eval = None
    if run.last_eval is None:
        run.last_eval = session.evaluate(run.test_loader, plan.class_names)
    last_eval = run.last_eval
    metrics = {
        "target_accuracy": last_eval["accuracy"],
        "target_mean_class_accuracy": last_eval["mean_class_accuracy"],
        "target_teacher_accuracy": last_eval["teacher_accuracy"],
        "target_per_class_accuracy": last_eval["per_class_accuracy"],
        "target_images": run.target_images,
        "source_images": run.source_images,
        "skipped_images": {"source": len(plan.source.skipped), "target": len(plan.target.skipped)},
        "steps": session.step,
        "nnz": session.rst.nnz,
        "density": session.rst.density,
        "snapped_weights": snapped,
        **loss_summary(run.history),
    }
    train_config = {
        **cfg.to_dict(),
        "device": plan.device.type,
        "software": {p: version(p) for p in RECORDED_PACKAGES},
    }
    sig = run.signature
    info = AdapterInfo(
        task=cfg.task,
        base_model=sig.model,
        base_pretrained=sig.pretrained,
        base_fingerprint=sig.fingerprint,
        class_names=plan.class_names,
        source_domain=cfg.source_domain,
        target_domain=cfg.target_domain,
        method=cfg.method_name,
        train_config=train_config,
        metrics=metrics,
        created_at=plan.options.created_at or utc_now_iso(),
    )
    adapter = verified_adapter(
        session.base_state(),
        session.tower_state(),
        info,
        head_state=session.head_state(),
        class_embeddings=run.class_embeddings.cpu(),
        residual_dtype=cfg.residual_dtype,
        block_size=cfg.block_size,
    )
    return adapter, metrics


def write_and_register(run: Run, adapter: Adapter, metrics: dict[str, Any]) -> TrainResult:
    """Write the adapter, drop the checkpoint, check the file as the store will, register it.

    Raises:
        TrainError: the store would refuse the written file, or registering it failed (the
            message says how to register the file later).
    """
    plan, cfg = run.plan, run.cfg
    options, settings = plan.options, plan.settings
    out = options.output or default_output(settings, cfg.task, adapter.meta.created_at)
    write_adapter(adapter, out)
    if not options.keep_checkpoint:  # the run is over: its result is on disk
        plan.ckpt_path.unlink(missing_ok=True)
    # The base as trained from (W0), with its weights: the store's every rule applies here too.
    base = ServingBase(run.signature, StateWeights(run.session.base_state()))
    registration = store_written(out, base, settings, options.alias, options.register)
    return TrainResult(out, metrics, cfg, run.log.path, registration)
