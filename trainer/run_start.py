"""Starting a run: every cheap check first, then the model, the session, the data and a resume.

:func:`plan_run` finds what would make the run fail later (bad folders or names, an unusable
catalog, a checkpoint that was neither resumed nor discarded) before any compute is spent.
:func:`start_run` then builds the base, the session (model, optimiser, RST) and the loaders,
and restores a checkpoint. Its random draws come in a fixed order (the seed, the base, the task
head's initialisation, then a resumed run's saved RNG states), which is what makes two runs with
one seed, or a run and its resumption, reach the same adapter bytes.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from adapters_store.bases import build_base, signature_of
from adapters_store.config import StoreSettings
from adapters_store.names import check_name
from adapters_store.registry import Registry
from adapters_store.zeroshot import class_embeddings, label_mappings, uses_wordnet

from .checkpoint import check_compatible, load_checkpoint, set_rng_state
from .config import RunOptions, TrainConfig
from .data import ImageDataset, class_order, labelled, scan_domain
from .distributed import from_environment, rank_device
from .errors import TrainError
from .execution import resolve_device, seed_everything
from .loaders import default_workers, eval_loader, paired_loader
from .model import logit_scale_of, tower_kind
from .run_state import Plan, Run, TrainLog
from .step import Session
from .transforms import (
    TwoViews,
    eval_transform,
    image_size_of,
    normalisation_of,
    strong_transform,
    train_transform,
)

# Mixed into the sampler seed per rank, so each rank of a torchrun job draws its own shard.
RANK_SEED_STRIDE = 1_000_003


def domain_label(path: str, given: str) -> str:
    """The catalogued domain name: as given, else the folder name made a valid name."""
    name = given or "".join(c if c.isalnum() or c in "._-" else "_" for c in Path(path).name)
    return check_name(name.strip("._-") or "domain", "domain")


def plan_run(config: TrainConfig, options: RunOptions, settings: StoreSettings) -> Plan:
    """Check a run's inputs and read its checkpoint, before any model is built.

    Under ``torchrun`` this also joins the process group, so every rank fails or proceeds alike.

    Raises:
        DataError, TrainError: bad folders, names or settings; a checkpoint in the run folder
            with neither ``resume`` nor ``restart``; an unreadable checkpoint.
        StoreError: the catalog is unusable (checked only when the adapter is to be registered).
    """
    check_name(config.task, "task")
    config.validate()
    config = replace(
        config,
        source=str(Path(config.source).resolve()),
        target=str(Path(config.target).resolve()),
        source_domain=domain_label(config.source, config.source_domain),
        target_domain=domain_label(config.target, config.target_domain),
    )
    source, target = scan_domain(config.source), scan_domain(config.target)
    class_names = class_order(source, target)
    if uses_wordnet(config.base_model, config.base_pretrained):
        label_mappings(class_names)  # UnmappedLabel names every class the teacher cannot place
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
    return Plan(
        config=config,
        options=options,
        settings=settings,
        source=source,
        target=target,
        class_names=class_names,
        ranks=ranks,
        device=device,
        workers=workers,
        ckpt_path=ckpt_path,
        log_path=run_dir / "train_log.jsonl",
        saved=saved,
    )


def start_run(plan: Plan) -> Run:
    """Build the base, the session and the loaders, and restore the checkpoint if resuming.

    Call inside ``runtime.deterministic()`` and ``runtime.thread_budget()``: the seed is set
    here and every kernel from here on must be repeatable.

    Raises:
        TrainError: ``--amp`` off CUDA; a checkpoint made under other settings or base weights.
    """
    device = plan.device
    seed_everything(plan.config.seed)
    net = build_base(plan.config.base_model, plan.config.base_pretrained)
    signature = signature_of(net, plan.config.base_model, plan.config.base_pretrained)
    cfg = plan.config.resolve(tower_kind(net), image_size_of(net))
    if plan.saved is not None and plan.config.ramp_iters is None:
        # T is the run's as it started: a resume that changes --epochs keeps the ramp it had
        cfg = replace(cfg, ramp_iters=int(plan.saved["config"]["ramp_iters"]))
    if cfg.amp and device.type != "cuda":
        raise TrainError("mixed precision (--amp) is only supported on CUDA devices")
    net = net.to(device)
    emb = class_embeddings(
        net, cfg.base_model, cfg.base_pretrained, plan.class_names, cfg.prompt_template
    )
    session = Session(cfg, net, emb, logit_scale_of(net), device)
    history: list[dict[str, Any]] = []
    sums: dict[str, float] = {}
    elapsed = 0.0
    if plan.saved is not None:
        saved = plan.saved
        check_compatible(
            saved["config"], cfg.to_dict(), saved["fingerprint"], signature.fingerprint
        )
        session.load_state(saved["session"])
        set_rng_state(saved["rng"])
        history, sums, elapsed = saved["history"], saved["sums"], float(saved["elapsed"])
    if plan.ranks.enabled:
        session.distribute(device)
    log = TrainLog(plan.log_path, history)
    src_samples = labelled(plan.source, plan.class_names)
    tgt_samples = labelled(plan.target, plan.class_names)
    loader, test_loader = _loaders(plan, cfg, net, src_samples, tgt_samples, session.step)
    return Run(
        plan=plan,
        cfg=cfg,
        signature=signature,
        session=session,
        class_embeddings=emb,
        loader=loader,
        test_loader=test_loader,
        source_images=len(src_samples),
        target_images=len(tgt_samples),
        log=log,
        history=history,
        sums=sums,
        elapsed=elapsed,
    )


def _loaders(
    plan: Plan,
    cfg: TrainConfig,
    net: nn.Module,
    src_samples: list[tuple[Path, int]],
    tgt_samples: list[tuple[Path, int]],
    start_step: int,
) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """The endless paired training batches from ``start_step`` on, and the target test loader.

    Target images get a weak and a strong view under FixMatch; evaluation uses the plain
    centre-crop transform of the base's normalisation.
    """
    size, resize = int(cfg.require(cfg.image_size, "image_size")), cfg.train_resize
    mean, std = normalisation_of(net)
    weak = train_transform(size, resize, mean, std)
    target_tf = TwoViews(weak, strong_transform(size, resize, mean, std)) if cfg.fixmatch else weak
    ranks, pin = plan.ranks, plan.device.type == "cuda"
    loader = paired_loader(
        ImageDataset(src_samples, weak),
        ImageDataset(tgt_samples, target_tf),
        cfg.batch_size,
        cfg.seed if not ranks.enabled else cfg.seed + RANK_SEED_STRIDE * ranks.rank,
        start_step,
        plan.workers,
        pin,
    )
    test_loader = eval_loader(
        ImageDataset(tgt_samples, eval_transform(size, mean, std)),
        max(cfg.batch_size, 64),
        plan.workers,
        pin,
    )
    return loader, test_loader
