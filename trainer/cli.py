"""``deltaclip train``, plugged in through the ``deltaclip.commands`` group.

``register(subparsers)`` adds ``train``, ``eval`` (:mod:`trainer.eval_cli`) and ``predict``; :func:`main` runs ``train`` from a list of arguments
and returns its metrics, so tests (and notebooks) can drive a run as the CLI does. Failures are
raised as ``ValueError``/``OSError``/``StoreError`` subclasses, which ``deltaclip``'s ``main``
prints as one-line messages.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adapters_store.config import StoreSettings

from .config import METHODS, RESIDUAL_DTYPES, RunOptions, TrainConfig
from .eval_cli import add_eval_arguments, cmd_eval
from .loss_report import loss_terms_line
from .push import push_adapter, push_token
from .store_flags import add_store_flags, store_settings

_DEFAULTS = TrainConfig(source="", target="", task="")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``deltaclip train``'s flags, with :class:`TrainConfig`'s defaults (never two values)."""
    d = _DEFAULTS
    p.add_argument("--source", required=True, help="labelled source domain folder (CLASS/*.jpg)")
    p.add_argument("--target", required=True, help="target domain folder (labels: evaluation only)")
    p.add_argument("--task", required=True, help="task name in the catalog, e.g. art2clipart")
    p.add_argument("--source-domain", default="", help="catalogued name (default: folder name)")
    p.add_argument("--target-domain", default="", help="catalogued name (default: folder name)")
    m = p.add_argument_group("method")
    m.add_argument("--method", choices=METHODS, default=d.method)
    m.add_argument("--fixmatch", action="store_true", help="add FixMatch on weak/strong views")
    m.add_argument("--fixmatch-weight", type=float, default=d.fixmatch_weight, help="λ_fm")
    m.add_argument("--fixmatch-threshold", type=float, default=d.fixmatch_threshold, help="τ_fm")
    m.add_argument("--lambda1", type=float, default=d.lambda1)
    m.add_argument("--lambda2", type=float, default=d.lambda2)
    m.add_argument("--lambda3", type=float, default=d.lambda3)
    m.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    m.add_argument(
        "--ramp-iters",
        type=int,
        help="T of the target terms' ramp λ(t) (default: the run's steps, epochs × iters)",
    )
    m.add_argument(
        "--adabn",
        action="store_true",
        help="source-only control: target batches pass through the head in train mode "
        "(its BatchNorm statistics adapt), with no target loss",
    )
    m.add_argument("--prompt-template", default=d.prompt_template, help="with {name}")
    r = p.add_argument_group("residual sparse training")
    r.add_argument(
        "--tau",
        type=float,
        help="reset threshold (default 1e-6 ViT, 3e-6 EfficientNet, 1e-5 ResNet)",
    )
    r.add_argument(
        "--max-density", type=float, help="keep at most this fraction of weights changed"
    )
    r.add_argument(
        "--block-size",
        type=int,
        default=d.block_size,
        help="change weights in blocks of B consecutive elements (1, 2, 4, 8, 16; default 1)",
    )
    r.add_argument(
        "--budget-at-end",
        action="store_true",
        help="apply --max-density once after the last step instead of after every step",
    )
    r.add_argument("--residual-dtype", choices=RESIDUAL_DTYPES, default=d.residual_dtype)
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=d.epochs)
    o.add_argument("--iters", type=int, default=d.iters_per_epoch, help="iterations per epoch")
    o.add_argument("--batch-size", type=int, default=d.batch_size, help="per domain")
    o.add_argument(
        "--lr", type=float, help="image-tower lr (default 3e-6 ViT/EfficientNet, 3e-7 ResNet)"
    )
    o.add_argument(
        "--head-lr-mult", type=float, help="head lr / tower lr (default 1000; 1e4 ResNet)"
    )
    o.add_argument("--image-size", type=int, help="crop size (default: the base's, e.g. 224)")
    o.add_argument("--seed", type=int, default=d.seed)
    o.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA only)")
    out = p.add_argument_group("run and output")
    out.add_argument("--output", "-o", type=Path, help="adapter file (default under HOME/adapters)")
    out.add_argument(
        "--run-dir", type=Path, help="checkpoint and JSON log (default HOME/runs/TASK)"
    )
    again = out.add_mutually_exclusive_group()
    again.add_argument(
        "--resume", action="store_true", help="continue from the run's checkpoint, if it has one"
    )
    again.add_argument(
        "--restart", action="store_true", help="discard an unfinished run's checkpoint"
    )
    out.add_argument(
        "--checkpoint-every", type=int, default=0, help="also checkpoint every N steps"
    )
    out.add_argument("--keep-checkpoint", action="store_true")
    out.add_argument("--eval-every", type=int, default=1, help="epochs between target evaluations")
    where = out.add_mutually_exclusive_group()
    where.add_argument("--no-register", action="store_true", help="only write the adapter file")
    where.add_argument(
        "--push",
        metavar="URL",
        help="register on this server (its admin API) instead of the local catalog",
    )
    out.add_argument(
        "--token-file",
        type=Path,
        help="--push's admin token file (default: $DELTACLIP_ADMIN_TOKEN)",
    )
    out.add_argument("--alias", help="alias to point at the registered version")
    out.add_argument("--created-at", help=argparse.SUPPRESS)
    out.add_argument("--no-progress", action="store_true", help="no progress bars or epoch lines")
    out.add_argument("--json", action="store_true", help="print the result as JSON")
    add_store_flags(p)


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, RunOptions, StoreSettings]:
    """Typed settings from flags: what shapes the weights, how the run executes, the store."""
    settings = store_settings(args)
    cfg = TrainConfig(
        source=str(args.source),
        target=str(args.target),
        task=args.task,
        source_domain=args.source_domain,
        target_domain=args.target_domain,
        base_model=settings.base_model,
        base_pretrained=settings.base_pretrained,
        method=args.method,
        fixmatch=args.fixmatch,
        tau=args.tau,
        max_density=args.max_density,
        block_size=args.block_size,
        epochs=args.epochs,
        iters_per_epoch=args.iters,
        batch_size=args.batch_size,
        lr=args.lr,
        head_lr_mult=args.head_lr_mult,
        label_smoothing=args.label_smoothing,
        ramp_iters=args.ramp_iters,
        adabn=args.adabn,
        budget_at_end=args.budget_at_end,
        lambda1=args.lambda1,
        lambda2=args.lambda2,
        lambda3=args.lambda3,
        fixmatch_weight=args.fixmatch_weight,
        fixmatch_threshold=args.fixmatch_threshold,
        image_size=args.image_size,
        prompt_template=args.prompt_template,
        seed=args.seed,
        residual_dtype=args.residual_dtype,
        amp=args.amp,
    )
    cfg.validate()
    options = RunOptions(
        output=args.output,
        run_dir=args.run_dir,
        resume=args.resume,
        restart=args.restart,
        register=not (args.no_register or args.push),
        alias=args.alias,
        num_workers=args.workers,
        threads=args.threads,
        device=args.device,
        progress=False if args.no_progress else None,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoint=args.keep_checkpoint,
        created_at=args.created_at,
    )
    return cfg, options, settings


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``train`` from parsed arguments; the result as a JSON-able dict."""
    from .pipeline import train

    cfg, options, settings = config_from_args(args)
    token = (
        push_token(args.push, args.token_file) if args.push else None
    )  # before, not after, a run
    result = train(cfg, options, settings)
    if result.adapter_path is None:  # a rank other than 0 of a torchrun job: rank 0 reports
        return {}
    reg = result.registration
    version, digest = (reg.record.version, reg.record.digest) if reg else (None, None)
    if args.push and token:
        pushed = push_adapter(result.adapter_path, args.push, token, args.alias)
        version, digest = pushed.version, pushed.digest
    return {
        "task": cfg.task,
        "adapter_path": str(result.adapter_path),
        "log_path": str(result.log_path),
        "server": args.push,
        "version": version,
        "digest": digest,
        "method": result.config.method_name,
        **result.metrics,
    }


def cmd_train(args: argparse.Namespace) -> int:
    """Run ``deltaclip train`` and print its outcome (JSON with ``--json``); the exit status."""
    out = run_train(args)
    if not out:
        return 0
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
        return 0
    print(f"wrote {out['adapter_path']}: {out['nnz']} weights changed ({out['density']:.4%})")
    if out["version"] is not None:
        where = f" on {out['server']}" if out["server"] else ""
        print(f"registered{where}: {out['task']} v{out['version']} ({out['digest']})")
    print(
        f"target accuracy {out['target_accuracy']:.2%} "
        f"(text head {out['target_teacher_accuracy']:.2%}); log: {out['log_path']}"
    )
    if out.get("loss_terms_last_step"):
        print(loss_terms_line(out["loss_terms_last_step"]))
    return 0


def register(subparsers: Any) -> None:
    """Entry point of the ``deltaclip.commands`` group: adds ``train``, ``eval`` and ``predict``."""
    p = subparsers.add_parser(
        "train",
        help="train a task with CMKD + RST and register its adapter",
        description="Adapt the base's image tower from a labelled source folder to an unlabelled "
        "target folder (CMKD + RST, optionally FixMatch) and write a sparse v1 adapter.",
    )
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)
    p = subparsers.add_parser(
        "eval",
        help="accuracy of a registered task (or zero-shot base) on a labelled folder",
        description="Evaluate a registered adapter as it is served (base + merged residual + "
        "task head), or with --zero-shot the base's text head. Prints accuracy and per-class "
        "accuracy; --confusion writes a confusion-matrix PNG.",
    )
    add_eval_arguments(p)
    p.set_defaults(func=cmd_eval)
    from .predict import add_predict_parser

    add_predict_parser(subparsers)


def build_train_parser() -> argparse.ArgumentParser:
    """A standalone parser for ``train``'s flags, for :func:`main` (no subcommand to pick)."""
    p = argparse.ArgumentParser(prog="deltaclip train", description="CMKD + RST training")
    add_train_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``deltaclip train`` as a function: parse ``argv``, train, return the metrics dict."""
    return run_train(build_train_parser().parse_args(argv))
