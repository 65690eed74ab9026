"""``deltaclip`` command line: the flags of the catalog, base and adapter commands and the
dispatch (what each command does is in :mod:`adapters_store.commands`).

Other packages' commands plug in by entry point (``deltaclip.commands``: ``train``, ``serve``...;
``deltaclip.adapter_commands``: ``adapters import-finetune``), so this one never imports them.
Every failure prints ``deltaclip: error: <what went wrong>`` and exits non-zero (1 for errors
in the operation, 2 for bad usage).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from . import commands
from .errors import InvalidAdapter, StoreError
from .usage import SORTS, parse_age

Handler = Callable[[argparse.Namespace], int]


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


def _age(text: str) -> float:
    try:
        return parse_age(text)
    except StoreError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
    p.set_defaults(func=commands.cmd_db_upgrade)
    p = db.add_parser("current", help="the catalog's schema revision")
    _store_flags(p)
    p.set_defaults(func=commands.cmd_db_current)

    base = sub.add_parser("base", help="base models").add_subparsers(
        dest="base_command", required=True
    )
    p = base.add_parser("info", help="model, pretrained, parameter counts and fingerprint as JSON")
    _store_flags(p, base=True)
    p.set_defaults(func=commands.cmd_base_info)
    p = base.add_parser(
        "labels",
        help="which ImageNet classes the default base's WordNet text side reads into each label",
    )
    p.add_argument("labels", nargs="+", help="labels (separate arguments or comma-separated)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=commands.cmd_base_labels)
    p = base.add_parser("list", help="known architectures")
    p.set_defaults(func=commands.cmd_base_list)

    ad = sub.add_parser("adapters", help="the adapter catalog").add_subparsers(
        dest="adapters_command", required=True
    )
    p = ad.add_parser("list", help="list adapters")
    p.add_argument("--task")
    p.add_argument("--base", help="base model name or fingerprint")
    p.add_argument("--domain", help="source or target domain")
    p.add_argument(
        "--sort",
        choices=list(SORTS),
        default="task",
        help="task (name, newest first) or most requests / images / errors / last served first",
    )
    p.add_argument(
        "--unused-since",
        type=_age,
        metavar="AGE",
        help="only versions not served for AGE (e.g. 30d; units s m h d w) or never",
    )
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--json", action="store_true")
    _store_flags(p)
    p.set_defaults(func=commands.cmd_adapters_list)
    p = ad.add_parser("show", help="one adapter's metadata and per-parameter change counts")
    _select_flags(p)
    p.add_argument("--json", action="store_true")
    _store_flags(p)
    p.set_defaults(func=commands.cmd_adapters_show)
    p = ad.add_parser("register", help="validate and register an adapter file")
    p.add_argument("file")
    p.add_argument("--alias")
    p.add_argument("--json", action="store_true")
    _store_flags(p, base=True)
    p.set_defaults(func=commands.cmd_adapters_register)
    p = ad.add_parser("delete", help="delete one version (hard delete)")
    p.add_argument("task")
    p.add_argument("--version", type=int, required=True)
    _store_flags(p)
    p.set_defaults(func=commands.cmd_adapters_delete)
    p = ad.add_parser(
        "alias", help="point an alias at a version, split it over several, or remove it"
    )
    p.add_argument("task")
    p.add_argument("alias")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--version", type=int)
    target.add_argument(
        "--weights",
        metavar="V=W,...",
        help="a traffic split, e.g. 3=90,4=10: each client key sticks to one version",
    )
    target.add_argument("--remove", action="store_true")
    _store_flags(p)
    p.set_defaults(func=commands.cmd_adapters_alias)
    p = ad.add_parser("export", help="write the merged (dense) task model as safetensors")
    _select_flags(p)
    p.add_argument("--output", "-o", required=True)
    _store_flags(p)
    p.set_defaults(func=commands.cmd_adapters_export)
    p = ad.add_parser("gc", help="delete blobs no catalog row references")
    p.add_argument(
        "--grace", type=float, default=3600.0, help="keep blobs younger than this many seconds"
    )
    _store_flags(p)
    p.set_defaults(func=commands.cmd_adapters_gc)
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
    p.set_defaults(func=commands.cmd_adapters_fsck)

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
    except (StoreError, commands.CLIError, ValueError, OSError) as exc:
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
