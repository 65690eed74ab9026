"""``deltaclip`` command line: catalog, base and adapter commands.

Other packages' commands plug in by entry point (``deltaclip.commands``: ``train``, ``serve``...;
``deltaclip.adapter_commands``: ``adapters import-finetune``), so this one never imports them.
Every failure prints ``deltaclip: error: <what went wrong>`` and exits non-zero (1 for errors
in the operation, 2 for bad usage).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from .errors import InvalidAdapter, StoreError

Handler = Callable[[argparse.Namespace], int]


class CLIError(Exception):
    """A user-facing failure with a message and no traceback."""


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _settings(args: argparse.Namespace) -> Any:
    from .config import StoreSettings

    overrides = {
        k: v
        for k, v in {
            "home": getattr(args, "home", None),
            "database_url": getattr(args, "database_url", None),
            "base_model": getattr(args, "base_model", None),
            "base_pretrained": getattr(args, "base_pretrained", None),
            "device": getattr(args, "device", None),
        }.items()
        if v is not None
    }
    return StoreSettings(**overrides)


def _registry(args: argparse.Namespace, settings: Any = None) -> Any:
    from .registry import Registry

    return Registry.from_settings(settings or _settings(args))


def _base(args: argparse.Namespace, settings: Any = None) -> tuple[Any, Any]:
    from .serving_base import ServingBase  # built once: the network and its ServingBase

    s = settings or _settings(args)
    return ServingBase.build(s.base_model, s.base_pretrained)


# ---------------------------------------------------------------------------------------- db


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from .catalog import current_revision, make_engines, upgrade

    url = _settings(args).resolved_database_url
    upgrade(url, args.revision)
    engine, _ = make_engines(url)
    print(f"catalog at revision {current_revision(engine)}")
    engine.dispose()
    return 0


def cmd_db_current(args: argparse.Namespace) -> int:
    from .catalog import current_revision, head_revision, make_engines

    engine, _ = make_engines(_settings(args).resolved_database_url)
    current = current_revision(engine)
    engine.dispose()
    _print_json(
        {"current": current, "head": head_revision(), "up_to_date": current == head_revision()}
    )
    return 0


# ---------------------------------------------------------------------------------------- base


def cmd_base_info(args: argparse.Namespace) -> int:
    from .bases import tower_parameters

    net, base = _base(args)
    sig = base.signature
    total = sum(p.numel() for p in net.parameters())
    tower = sum(p.numel() for p in tower_parameters(net).values())
    _print_json({
        "model": sig.model,
        "pretrained": sig.pretrained,
        "fingerprint": sig.fingerprint,
        "embed_dim": sig.embed_dim,
        "parameters": {"total": total, "image_tower": tower, "other": total - tower},
    })  # fmt: skip
    return 0


def cmd_base_labels(args: argparse.Namespace) -> int:
    """What the default base's WordNet text side makes of each label (no model is built)."""
    from .zeroshot import label_mappings

    labels = [part.strip() for arg in args.labels for part in arg.split(",") if part.strip()]
    mappings = label_mappings(labels)  # UnmappedLabel names every label that maps nowhere
    if args.json:
        _print_json([m.as_dict() for m in mappings])
        return 0
    for m in mappings:
        print(f"{m.label}: {m.rule} {m.lemma!r}, {m.sense}, ImageNet classes under {m.via!r}:")
        print(f"    {', '.join(m.class_names)}")
    return 0


def cmd_base_list(args: argparse.Namespace) -> int:
    from .bases import list_models

    for name in list_models():
        print(name)
    return 0


# ---------------------------------------------------------------------------------------- adapters


def _table(records: Sequence[Any]) -> None:
    header = (
        f"{'TASK':<28} {'VER':>4} {'DENSITY':>9} {'NNZ':>10} {'BYTES':>10}  {'ALIASES':<16} DIGEST"
    )
    print(header)
    for r in records:
        print(
            f"{r.task:<28} {r.version:>4} {r.density:>9.4%} {r.nnz:>10} {r.size_bytes:>10}  "
            f"{','.join(r.aliases) or '-':<16} {r.digest[:16]}"
        )


def cmd_adapters_list(args: argparse.Namespace) -> int:
    reg = _registry(args)
    page = reg.list(
        task=args.task, base=args.base, domain=args.domain, limit=args.limit, offset=args.offset
    )
    if args.json:
        _print_json({"total": page.total, "limit": page.limit, "offset": page.offset,
                     "items": [r.summary() for r in page.items]})  # fmt: skip
    else:
        _table(page.items)
        print(f"({len(page.items)} of {page.total})")
    return 0


def cmd_adapters_show(args: argparse.Namespace) -> int:
    rec = _registry(args).resolve(args.task, args.version, args.alias)
    if args.json:
        _print_json(rec.to_dict())
        return 0
    for key, value in rec.to_dict().items():
        if key == "param_counts":
            print("param_counts:")
            for name, n in value.items():
                print(f"  {name}: {n}")
        else:
            print(f"{key}: {json.dumps(value) if isinstance(value, dict | list) else value}")
    return 0


def cmd_adapters_register(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise CLIError(f"{path}: no such file")
    settings = _settings(args)
    reg = _registry(args, settings)
    _, base = _base(args, settings)  # the weights too: base + residual must merge finite
    result = reg.register(path.read_bytes(), base, alias=args.alias)
    rec = result.record
    what = "registered" if result.created else "already registered"
    if args.json:
        _print_json({"created": result.created, **rec.summary()})
    else:
        print(f"{what}: {rec.task} v{rec.version} ({rec.digest})")
    return 0


def cmd_adapters_delete(args: argparse.Namespace) -> int:
    rec = _registry(args).delete(args.task, args.version)
    print(
        f"deleted {rec.task} v{rec.version} ({rec.digest}); `deltaclip adapters gc` frees its blob"
    )
    return 0


def cmd_adapters_alias(args: argparse.Namespace) -> int:
    reg = _registry(args)
    if args.remove:
        reg.remove_alias(args.task, args.alias)
        print(f"removed alias {args.alias} of {args.task}")
    else:
        if args.version is None:
            raise CLIError("give --version N (or --remove)")
        reg.set_alias(args.task, args.alias, args.version)
        print(f"{args.task}@{args.alias} -> v{args.version}")
    return 0


def cmd_adapters_export(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from .bases import build_base, signature_of

    reg = _registry(args)
    rec = reg.resolve(args.task, args.version, args.alias)
    net = build_base(rec.base_model, rec.base_pretrained)
    sig = signature_of(net, rec.base_model, rec.base_pretrained)
    state = reg.merged_state(rec, net, sig)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"task": rec.task, "version": str(rec.version), "digest": rec.digest,
            "base_fingerprint": rec.base_fingerprint, "class_names": json.dumps(rec.class_names)}  # fmt: skip
    save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata=meta)
    print(f"wrote merged model of {rec.task} v{rec.version} to {out}")
    return 0


def cmd_adapters_gc(args: argparse.Namespace) -> int:
    removed = _registry(args).gc(grace_seconds=args.grace)
    print(f"removed {len(removed)} unreferenced blob(s)")
    return 0


def cmd_adapters_fsck(args: argparse.Namespace) -> int:
    report = _registry(args).fsck(repair=args.repair, grace_seconds=args.grace)
    if args.json:
        _print_json({**report.__dict__, "clean": report.clean})
    else:
        for task, version, digest in report.dangling_rows:
            print(f"dangling row: {task} v{version} -> {digest} (blob missing or corrupted)")
        for digest in report.orphan_blobs:
            print(f"orphan blob: {digest}")
        for path in report.temp_files:
            print(f"temporary file: {path}")
        for line in report.repaired:
            print(f"repaired: {line}")
        print(
            "clean"
            if report.clean
            else "problems found" + ("" if args.repair else " (run with --repair)")
        )
    return 0 if report.clean or args.repair else 1


# ---------------------------------------------------------------------------------------- parser


def _store_flags(p: argparse.ArgumentParser, base: bool = False) -> None:
    g = p.add_argument_group("store (default: DELTACLIP_* environment)")
    g.add_argument("--home", type=Path, help="data folder (DELTACLIP_HOME, default ~/.deltaclip)")
    g.add_argument(
        "--database-url", help="catalog URL (DELTACLIP_DATABASE_URL; default SQLite under home)"
    )
    if base:
        g.add_argument("--base-model", help="open_clip architecture (DELTACLIP_BASE_MODEL)")
        g.add_argument(
            "--base-pretrained",
            help="weights: tag, local file or 'random' (DELTACLIP_BASE_PRETRAINED)",
        )


def _select_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("task")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--version", type=int)
    sel.add_argument("--alias")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltaclip", description="Many domain-adapted CLIP towers, one base model."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = sub.add_parser("db", help="catalog database").add_subparsers(
        dest="db_command", required=True
    )
    p = db.add_parser("upgrade", help="migrate the catalog to the newest schema")
    p.add_argument("--revision", default="head")
    _store_flags(p)
    p.set_defaults(func=cmd_db_upgrade)
    p = db.add_parser("current", help="the catalog's schema revision")
    _store_flags(p)
    p.set_defaults(func=cmd_db_current)

    base = sub.add_parser("base", help="base models").add_subparsers(
        dest="base_command", required=True
    )
    p = base.add_parser("info", help="model, pretrained, parameter counts and fingerprint as JSON")
    _store_flags(p, base=True)
    p.set_defaults(func=cmd_base_info)
    p = base.add_parser(
        "labels",
        help="which ImageNet classes the default base's WordNet text side reads into each label",
    )
    p.add_argument("labels", nargs="+", help="labels (separate arguments or comma-separated)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_base_labels)
    p = base.add_parser("list", help="known architectures")
    p.set_defaults(func=cmd_base_list)

    ad = sub.add_parser("adapters", help="the adapter catalog").add_subparsers(
        dest="adapters_command", required=True
    )
    p = ad.add_parser("list", help="list adapters")
    p.add_argument("--task")
    p.add_argument("--base", help="base model name or fingerprint")
    p.add_argument("--domain", help="source or target domain")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--json", action="store_true")
    _store_flags(p)
    p.set_defaults(func=cmd_adapters_list)
    p = ad.add_parser("show", help="one adapter's metadata and per-parameter change counts")
    _select_flags(p)
    p.add_argument("--json", action="store_true")
    _store_flags(p)
    p.set_defaults(func=cmd_adapters_show)
    p = ad.add_parser("register", help="validate and register an adapter file")
    p.add_argument("file")
    p.add_argument("--alias")
    p.add_argument("--json", action="store_true")
    _store_flags(p, base=True)
    p.set_defaults(func=cmd_adapters_register)
    p = ad.add_parser("delete", help="delete one version (hard delete)")
    p.add_argument("task")
    p.add_argument("--version", type=int, required=True)
    _store_flags(p)
    p.set_defaults(func=cmd_adapters_delete)
    p = ad.add_parser("alias", help="point an alias at a version, or remove it")
    p.add_argument("task")
    p.add_argument("alias")
    p.add_argument("--version", type=int)
    p.add_argument("--remove", action="store_true")
    _store_flags(p)
    p.set_defaults(func=cmd_adapters_alias)
    p = ad.add_parser("export", help="write the merged (dense) task model as safetensors")
    _select_flags(p)
    p.add_argument("--output", "-o", required=True)
    _store_flags(p)
    p.set_defaults(func=cmd_adapters_export)
    p = ad.add_parser("gc", help="delete blobs no catalog row references")
    p.add_argument(
        "--grace", type=float, default=3600.0, help="keep blobs younger than this many seconds"
    )
    _store_flags(p)
    p.set_defaults(func=cmd_adapters_gc)
    p = ad.add_parser("fsck", help="check catalog against blobs (dangling rows, orphan blobs)")
    p.add_argument("--repair", action="store_true")
    p.add_argument(
        "--grace",
        type=float,
        default=3600.0,
        help="repair keeps orphan blobs younger than this (s)",
    )
    p.add_argument("--json", action="store_true")
    _store_flags(p)
    p.set_defaults(func=cmd_adapters_fsck)

    for group, parent in (("deltaclip.adapter_commands", ad), ("deltaclip.commands", sub)):
        for ep in entry_points(group=group):
            ep.load()(parent)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except InvalidAdapter as exc:
        print(f"deltaclip: error: invalid adapter: {exc}", file=sys.stderr)
    except (StoreError, CLIError, ValueError, OSError) as exc:
        print(f"deltaclip: error: {exc}", file=sys.stderr)
    except SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        print(f"deltaclip: error: catalog database: {detail}", file=sys.stderr)
    except KeyboardInterrupt:
        print("deltaclip: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
