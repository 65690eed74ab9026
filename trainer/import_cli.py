"""``deltaclip adapters import-finetune``, plugged into the ``adapters`` group by entry point.

``adapters_store`` owns the ``deltaclip adapters`` group but may not import the trainer, so it
hands the group to every ``deltaclip.adapter_commands`` entry point; :func:`register` is the
trainer's. :func:`run_import` does the work (build, write, check, register, compare on data) and
returns the report; :func:`cmd_import` prints it.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any, cast

import torch

from adapters_store.config import StoreSettings
from adapters_store.format.codec import write_adapter
from adapters_store.registry import Registry
from adapters_store.serving_base import ServingBase

from .config import RESIDUAL_DTYPES
from .errors import CheckpointRefused
from .evaluate import folder_data, predictions
from .execution import resolve_device
from .export import default_output, store_written
from .import_finetune import Imported, ImportRequest, build_import


def add_import_arguments(p: argparse.ArgumentParser) -> None:
    """``import-finetune``'s flags."""
    p.add_argument("checkpoint", type=Path, help="dense fine-tune: .safetensors or .pt/.pth")
    p.add_argument("--task", required=True, help="task name in the catalog")
    names = p.add_mutually_exclusive_group(required=True)
    names.add_argument("--classes", help="class names in logit order, comma-separated")
    names.add_argument("--classes-file", type=Path, help="class names, one per line")
    p.add_argument(
        "--density",
        type=float,
        required=True,
        help="fraction of the tower's weights to keep, e.g. 0.005 for 0.5 %%",
    )
    p.add_argument(
        "--head",
        type=Path,
        help="head file: the adapter head's tensors or one [C, D] 'weight' "
        "(default: the base's zero-shot head from its class embeddings)",
    )
    p.add_argument("--prompt-template", default="a photo of a {name}.", help="zero-shot prompts")
    p.add_argument("--residual-dtype", choices=RESIDUAL_DTYPES, default="float32")
    p.add_argument(
        "--block-size",
        type=int,
        default=1,
        help="keep weights in blocks of B consecutive elements (1, 2, 4, 8, 16; default 1)",
    )
    p.add_argument("--source-domain", default="", help="catalogued source domain")
    p.add_argument("--target-domain", default="", help="catalogued target domain")
    p.add_argument(
        "--eval-data", type=Path, help="labelled folder (CLASS/*.jpg): imported vs dense accuracy"
    )
    p.add_argument("--batch-size", type=int, default=64, help="evaluation batch size")
    p.add_argument("--output", "-o", type=Path, help="adapter file (default under HOME/adapters)")
    p.add_argument("--no-register", action="store_true", help="only write the adapter file")
    p.add_argument("--alias", help="alias to point at the registered version")
    p.add_argument("--created-at", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    g = p.add_argument_group("store and base (default: DELTACLIP_* environment)")
    g.add_argument("--home", type=Path, help="data folder (DELTACLIP_HOME)")
    g.add_argument("--database-url", help="catalog URL (DELTACLIP_DATABASE_URL)")
    g.add_argument("--base-model", help="the fine-tune's base architecture (DELTACLIP_BASE_MODEL)")
    g.add_argument("--base-pretrained", help="its base weights (DELTACLIP_BASE_PRETRAINED)")
    g.add_argument("--device", help="device for --eval-data (DELTACLIP_DEVICE)")
    g.add_argument("--workers", type=int, help="data-loading processes for --eval-data")


def class_names_of(args: argparse.Namespace) -> list[str]:
    """The class names from ``--classes`` or ``--classes-file`` (blank lines skipped)."""
    if args.classes_file is not None:
        try:
            text = Path(args.classes_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointRefused(f"class names file {args.classes_file}: {exc}") from None
        return [line.strip() for line in text.splitlines() if line.strip()]
    return [n.strip() for n in str(args.classes).split(",")]


@torch.no_grad()
def compare_on_folder(
    imported: Imported,
    data_dir: Path,
    device: torch.device,
    batch_size: int,
    workers: int | None,
) -> dict[str, Any]:
    """Accuracy of the imported adapter and of the dense fine-tune (same head) on a folder.

    Both answer through the base with its tower replaced (dense: the checkpoint's tower;
    imported: the adapter's merged tower) and the adapter's head, as ``deltaclip eval`` and the
    server run an adapter.
    """
    dense_net, sparse_net = copy.deepcopy(imported.net), copy.deepcopy(imported.net)
    dense_net.load_state_dict(imported.dense, strict=False)
    sparse_net.load_state_dict(imported.served, strict=False)
    head = imported.head.to(device).eval()
    nets = {"dense": dense_net.to(device).eval(), "imported": sparse_net.to(device).eval()}
    data = folder_data(
        data_dir,
        imported.adapter.meta.class_names,
        imported.net,
        None,
        batch_size,
        workers,
    )

    def heads(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(cast(Any, net).encode_image(x).float()) for name, net in nets.items()}

    preds, labels = predictions(data.loader, heads, device)
    return {
        "data": str(data_dir),
        "images": int(labels.numel()),
        "skipped_images": data.skipped,
        "dense_accuracy": float((preds["dense"] == labels).float().mean()),
        "imported_accuracy": float((preds["imported"] == labels).float().mean()),
        "agreement": float((preds["dense"] == preds["imported"]).float().mean()),
    }


def run_import(args: argparse.Namespace) -> dict[str, Any]:
    """Import the checkpoint as the flags say; the report as a JSON-able dict."""
    overrides = {
        k: getattr(args, k)
        for k in ("home", "database_url", "base_model", "base_pretrained")
        if getattr(args, k) is not None
    }
    settings = StoreSettings(**overrides)
    if not 0 < args.density <= settings.max_density:
        raise CheckpointRefused(
            f"--density must be in (0, {settings.max_density}] (the store's limit), "
            f"got {args.density}"
        )
    if not args.no_register:  # fail now, before the base is built, if the catalog is unusable
        Registry.from_settings(settings).close()
    request = ImportRequest(
        checkpoint=args.checkpoint,
        task=args.task,
        class_names=class_names_of(args),
        density=args.density,
        head_file=args.head,
        template=args.prompt_template,
        residual_dtype=args.residual_dtype,
        block_size=args.block_size,
        source_domain=args.source_domain,
        target_domain=args.target_domain,
        created_at=args.created_at,
    )
    net, base = ServingBase.build(settings.base_model, settings.base_pretrained)
    imported = build_import(request, net, base.signature)
    out = args.output or default_output(settings, args.task, imported.adapter.meta.created_at)
    write_adapter(imported.adapter, out)
    report: dict[str, Any] = {"task": args.task, "adapter_path": str(out), **imported.report}
    if args.eval_data is not None:  # before registering: a bad folder leaves the catalog alone
        device = resolve_device(args.device, settings)
        report["eval"] = compare_on_folder(
            imported, args.eval_data, device, args.batch_size, args.workers
        )
    registration = store_written(out, base, settings, args.alias, not args.no_register)
    if registration is not None:
        report.update(version=registration.record.version, digest=registration.record.digest)
    return report


def cmd_import(args: argparse.Namespace) -> int:
    """Run ``import-finetune`` and print its report (JSON with ``--json``); the exit status."""
    report = run_import(args)
    (print_json if args.json else print_report)(report)
    return 0


def print_json(report: dict[str, Any]) -> None:
    """The report as indented JSON with sorted keys (``--json``)."""
    print(json.dumps(report, indent=2, sort_keys=True))


def print_report(report: dict[str, Any]) -> None:
    """The report for people: one row per changed tensor, the overall row, file, catalog, data."""
    print(f"{'tensor':<56} {'changed':>9} {'kept':>9} {'kept ‖ΔW‖':>10}")
    for key, t in report["tensors"].items():
        print(f"{key:<56} {t['changed']:>9} {t['kept']:>9} {t['kept_norm']:>10.4f}")
    print(
        f"{'overall':<56} {report['changed']:>9} {report['kept']:>9} {report['kept_norm']:>10.4f}"
    )
    if report["ignored_outside_tower"]:
        print(
            "ignored (outside the image tower, an adapter cannot carry them): "
            + ", ".join(report["ignored_outside_tower"])
        )
    print(
        f"wrote {report['adapter_path']}: {report['nnz']} weights kept ({report['density']:.4%}), "
        f"{report['head']} head"
    )
    if "version" in report:
        print(f"registered: {report['task']} v{report['version']} ({report['digest']})")
    if "eval" in report:
        e = report["eval"]
        print(
            f"on {e['data']} ({e['images']} images): imported {e['imported_accuracy']:.2%}, "
            f"dense {e['dense_accuracy']:.2%}, same answer on {e['agreement']:.2%}"
        )


def register_adapter_commands(adapters: Any) -> None:
    """Entry point of the ``deltaclip.adapter_commands`` group: adds ``import-finetune``."""
    p = adapters.add_parser(
        "import-finetune",
        help="turn a dense fine-tune of the base into a sparse adapter",
        description="Keep the largest |W - W0| of a dense fine-tuned image tower (a .safetensors "
        "or weights-only .pt state dict of the same base) at the given density, add a head (a "
        "head file, or the base's zero-shot head), write a v1 adapter and register it. Reports "
        "the kept relative Frobenius norm per tensor and overall.",
    )
    add_import_arguments(p)
    p.set_defaults(func=cmd_import)
