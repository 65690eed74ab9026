"""What each ``deltaclip`` command of this package does: catalog, base and adapter commands.

The flags and the dispatch are in :mod:`adapters_store.cli`; each handler here takes the parsed
arguments and returns the exit status, raising :class:`CLIError` (or a store error) on failure.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


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
    _print_json(
        {
            "model": sig.model,
            "pretrained": sig.pretrained,
            "fingerprint": sig.fingerprint,
            "embed_dim": sig.embed_dim,
            "parameters": {"total": total, "image_tower": tower, "other": total - tower},
        }
    )
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


def _aliases_text(r: Any) -> str:
    parts = [
        alias if share == 100 else f"{alias}({share:g}%)" for alias, share in r.alias_shares.items()
    ]
    return ",".join(parts) or "-"


def _table(records: Sequence[Any]) -> None:
    print(
        f"{'TASK':<28} {'VER':>4} {'DENSITY':>9} {'BYTES':>10}  {'ALIASES':<22} "
        f"{'REQUESTS':>9} {'IMAGES':>9} {'ERRORS':>7}  {'LAST SERVED':<20} DIGEST"
    )
    for r in records:
        print(
            f"{r.task:<28} {r.version:>4} {r.density:>9.4%} {r.size_bytes:>10}  "
            f"{_aliases_text(r):<22} {r.requests:>9} {r.images:>9} {r.errors:>7}  "
            f"{(r.last_served_at or 'never')[:19]:<20} {r.digest[:16]}"
        )


def cmd_adapters_list(args: argparse.Namespace) -> int:
    reg = _registry(args)
    page = reg.list(
        task=args.task,
        base=args.base,
        domain=args.domain,
        sort=args.sort,
        unused_since=args.unused_since,
        limit=args.limit,
        offset=args.offset,
    )
    if args.json:
        items = [r.summary() for r in page.items]
        _print_json(
            {"total": page.total, "limit": page.limit, "offset": page.offset, "items": items}
        )
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
    from .splits import parse_split

    reg = _registry(args)
    if args.remove:
        reg.remove_alias(args.task, args.alias)
        print(f"removed alias {args.alias} of {args.task}")
    elif args.weights is not None:
        shares = reg.set_split(args.task, args.alias, parse_split(args.weights))
        total = sum(sh.weight for sh in shares)
        split = ", ".join(f"v{sh.version} {100 * sh.weight / total:g}%" for sh in shares)
        print(f"{args.task}@{args.alias} -> {split}")
    else:
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
    meta = {
        "task": rec.task,
        "version": str(rec.version),
        "digest": rec.digest,
        "base_fingerprint": rec.base_fingerprint,
        "class_names": json.dumps(rec.class_names),
    }
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
