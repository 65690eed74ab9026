"""The training run: data, base, session, epochs with progress and a JSON log, resume, the adapter.

:func:`train` is the whole of ``deltaclip train``: it checks everything it can before spending
compute (folders and classes, task name, the catalog schema, a stale checkpoint), trains, writes
a verified v1 adapter and registers it. Every ``checkpoint_every`` steps and at the end of each
epoch it checkpoints, and ``resume`` continues to the very same adapter bytes as a run that never
stopped.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from adapters_store.adapter import utc_now_iso
from adapters_store.bases import build_base, signature_of
from adapters_store.config import StoreSettings
from adapters_store.format.codec import write_adapter
from adapters_store.names import check_name
from adapters_store.registry import Registration, Registry

from .checkpoint import check_compatible, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import RunOptions, TrainConfig
from .data import ImageDataset, class_order, labelled, scan_domain
from .distributed import assert_replicas_identical, barrier, from_environment, rank_device, shutdown
from .errors import TrainError
from .export import check_written, default_output, register, snap, verified_adapter
from .loaders import default_workers, eval_loader, paired_loader
from .model import logit_scale_of, text_embeddings, tower_kind
from .runtime import deterministic, resolve_device, seed_everything, thread_budget
from .session import Session
from .transforms import (
    TwoViews,
    eval_transform,
    image_size_of,
    normalisation_of,
    strong_transform,
    train_transform,
)


@dataclass
class TrainResult:
    """What a run produced; on ranks other than 0 of a ``torchrun`` job only ``config`` is set."""

    adapter_path: Path | None
    metrics: dict[str, Any]
    config: TrainConfig
    log_path: Path | None
    registration: Registration | None = None


def _domain_label(path: str, given: str) -> str:
    """The catalogued domain name: as given, else the folder name made a valid name."""
    name = given or "".join(c if c.isalnum() or c in "._-" else "_" for c in Path(path).name)
    return check_name(name.strip("._-") or "domain", "domain")


class _Log:
    """``train_log.jsonl``: one JSON object per finished epoch, rewritten from history on resume."""

    def __init__(self, path: Path, history: list[dict[str, Any]]) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in history))

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


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
    options = options or RunOptions()
    settings = settings or StoreSettings()
    check_name(config.task, "task")
    config.validate()
    config = replace(
        config,
        source=str(Path(config.source).resolve()),
        target=str(Path(config.target).resolve()),
        source_domain=_domain_label(config.source, config.source_domain),
        target_domain=_domain_label(config.target, config.target_domain),
    )
    source, target = scan_domain(config.source), scan_domain(config.target)
    class_names = class_order(source, target)
    if options.register:  # fail now, not after hours of training, if the catalog is unusable
        Registry.from_settings(settings).close()
    ranks = from_environment()
    device = rank_device(ranks, resolve_device(options.device, settings))
    if not ranks.is_main:  # one voice per job: rank 0 logs, checkpoints, evaluates and writes
        options = replace(options, progress=False)
    workers = default_workers() if options.num_workers is None else options.num_workers
    run_dir = options.run_dir or settings.home / "runs" / config.task
    ckpt_path = run_dir / "checkpoint.pt"
    if ckpt_path.exists() and not (options.resume or options.restart):
        raise TrainError(
            f"{ckpt_path} holds an unfinished run: pass --resume to continue it "
            "or --restart to start over"
        )
    saved = load_checkpoint(ckpt_path) if options.resume and ckpt_path.exists() else None

    with deterministic(), thread_budget(device, workers, options.threads):
        seed_everything(config.seed)
        net = build_base(config.base_model, config.base_pretrained)
        signature = signature_of(net, config.base_model, config.base_pretrained)
        cfg = config.resolve(tower_kind(net), image_size_of(net))
        if cfg.amp and device.type != "cuda":
            raise TrainError("mixed precision (--amp) is only supported on CUDA devices")
        net = net.to(device)
        emb = text_embeddings(net, cfg.base_model, class_names, cfg.prompt_template)
        session = Session(cfg, net, emb, logit_scale_of(net), device)
        history: list[dict[str, Any]] = []
        sums: dict[str, float] = {}
        elapsed = 0.0
        if saved is not None:
            check_compatible(
                saved["config"], cfg.to_dict(), saved["fingerprint"], signature.fingerprint
            )
            session.load_state(saved["session"])
            set_rng_state(saved["rng"])
            history, sums, elapsed = saved["history"], saved["sums"], float(saved["elapsed"])
        if ranks.enabled:
            session.distribute(device)
        log = _Log(run_dir / "train_log.jsonl", history)

        size, resize = int(cfg.require(cfg.image_size, "image_size")), cfg.train_resize
        mean, std = normalisation_of(net)
        weak = train_transform(size, resize, mean, std)
        target_tf = (
            TwoViews(weak, strong_transform(size, resize, mean, std)) if cfg.fixmatch else weak
        )
        src_samples, tgt_samples = labelled(source, class_names), labelled(target, class_names)
        pin = device.type == "cuda"
        loader = paired_loader(
            ImageDataset(src_samples, weak),
            ImageDataset(tgt_samples, target_tf),
            cfg.batch_size,
            cfg.seed
            if not ranks.enabled
            else cfg.seed + 1_000_003 * ranks.rank,  # a shard per rank
            session.step,
            workers,
            pin,
        )
        test_loader = eval_loader(
            ImageDataset(tgt_samples, eval_transform(size, mean, std)),
            max(cfg.batch_size, 64),
            workers,
            pin,
        )

        def checkpoint() -> None:
            if not ranks.is_main:
                return
            save_checkpoint(ckpt_path, {
                "config": cfg.to_dict(), "fingerprint": signature.fingerprint,
                "session": session.state(), "rng": rng_state(), "history": history,
                "sums": sums, "elapsed": elapsed + time.perf_counter() - started,
            })  # fmt: skip

        batches = iter(loader)
        last_eval: dict[str, Any] | None = None
        iters = cfg.iters_per_epoch
        while session.step < cfg.total_steps:
            epoch = session.step // iters
            started = time.perf_counter()
            bar = tqdm(
                total=iters,
                initial=session.step % iters,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                disable=None if options.progress is None else not options.progress,
                dynamic_ncols=True,
            )
            with bar:
                while True:
                    terms = session.train_step(*next(batches))
                    values = torch.stack([v.double() for v in terms.values()]).tolist()  # one copy
                    step_terms = dict(zip(terms, values, strict=True))
                    for k, v in step_terms.items():
                        sums[k] = sums.get(k, 0.0) + v
                    sums["_steps"] = sums.get("_steps", 0.0) + 1
                    bar.set_postfix(
                        loss=f"{step_terms['total']:.4f}",
                        density=f"{session.rst.density:.4%}",
                        refresh=False,
                    )
                    bar.update(1)
                    if options.checkpoint_every and session.step % options.checkpoint_every == 0:
                        checkpoint()
                    if on_step is not None:
                        on_step(session.step)
                    if session.step % iters == 0:
                        break
            n = sums.pop("_steps")
            tower_lr, head_lr = session.lrs
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "step": session.step,
                "losses": {k: v / n for k, v in sorted(sums.items())},
                "nnz": session.rst.nnz,
                "eligible": session.rst.eligible,
                "density": session.rst.density,
                "lr": tower_lr,
                "head_lr": head_lr,
            }
            final = session.step >= cfg.total_steps
            assert_replicas_identical(ranks, session.tower, f"after epoch {epoch + 1}")
            if not ranks.is_main:
                sums, started = {}, time.perf_counter()
                continue
            if final or (options.eval_every and (epoch + 1) % options.eval_every == 0):
                last_eval = session.evaluate(test_loader, class_names)
                record["target_accuracy"] = last_eval["accuracy"]
                record["target_teacher_accuracy"] = last_eval["teacher_accuracy"]
            record["seconds"] = round(elapsed + time.perf_counter() - started, 3)
            elapsed = 0.0
            history.append(record)
            log.append(record)
            if options.progress is not False:
                tqdm.write(_epoch_line(record), file=sys.stderr)
            sums = {}
            started = time.perf_counter()
            checkpoint()
        del batches
        if not ranks.is_main:
            barrier(ranks)  # rank 0 writes and registers the adapter
            shutdown(ranks)
            return TrainResult(None, {}, cfg, None)

        served, snapped = snap(session.base_state(), session.tower_state(), cfg.residual_dtype)
        if snapped:  # report, and store, exactly what the adapter will serve
            session.set_tower(served)
            last_eval = None
        if last_eval is None:  # resumed after the last epoch had finished, or snapped
            last_eval = session.evaluate(test_loader, class_names)
        metrics = {
            "target_accuracy": last_eval["accuracy"],
            "target_mean_class_accuracy": last_eval["mean_class_accuracy"],
            "target_teacher_accuracy": last_eval["teacher_accuracy"],
            "target_per_class_accuracy": last_eval["per_class_accuracy"],
            "target_images": len(tgt_samples),
            "source_images": len(src_samples),
            "skipped_images": {"source": len(source.skipped), "target": len(target.skipped)},
            "steps": session.step,
            "nnz": session.rst.nnz,
            "density": session.rst.density,
            "snapped_weights": snapped,
        }
        train_config = {
            **cfg.to_dict(),
            "device": device.type,
            "software": {p: version(p) for p in ("deltaclip", "torch", "open_clip_torch")},
        }
        created_at = options.created_at or utc_now_iso()
        adapter = verified_adapter(
            session.base_state(),
            session.tower_state(),
            signature=signature,
            residual_dtype=cfg.residual_dtype,
            task=cfg.task,
            class_names=class_names,
            head_state=session.head_state(),
            class_embeddings=emb.cpu(),
            source_domain=cfg.source_domain,
            target_domain=cfg.target_domain,
            method=cfg.method_name,
            train_config=train_config,
            metrics=metrics,
            created_at=created_at,
        )
    try:
        return _write_and_register(
            adapter, signature, settings, options, cfg, metrics, log.path, ckpt_path
        )
    finally:
        barrier(ranks)
        shutdown(ranks)


def _write_and_register(
    adapter: Any,
    signature: Any,
    settings: StoreSettings,
    options: RunOptions,
    cfg: TrainConfig,
    metrics: dict[str, Any],
    log_path: Path,
    ckpt_path: Path,
) -> TrainResult:
    out = options.output or default_output(settings, cfg.task, adapter.meta.created_at)
    write_adapter(adapter, out)
    if not options.keep_checkpoint:  # the run is over: its result is on disk
        ckpt_path.unlink(missing_ok=True)
    data = check_written(out, signature, settings)
    registration = None
    if options.register:
        try:
            registration = register(data, signature, settings, options.alias)
        except Exception as exc:
            raise TrainError(
                f"wrote {out} but could not register it ({exc}); "
                f"register it later with `deltaclip adapters register {out}`"
            ) from exc
    return TrainResult(out, metrics, cfg, log_path, registration)


def _epoch_line(record: dict[str, Any]) -> str:
    acc = record.get("target_accuracy")
    return (
        f"epoch {record['epoch']}: loss {record['losses'].get('total', float('nan')):.4f}, "
        f"density {record['density']:.4%} ({record['nnz']} of {record['eligible']})"
        + (f", target accuracy {acc:.2%}" if acc is not None else "")
        + f", {record['seconds']:.1f}s"
    )
