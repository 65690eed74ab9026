"""``deltaclip eval``: a registered task (as served) or the zero-shot base on a labelled folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .config import DEFAULT_TEMPLATE
from .store_flags import add_store_flags, store_settings


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``deltaclip eval``'s flags (the folder, which adapter or ``--zero-shot``, output)."""
    p.add_argument("--data", required=True, type=Path, help="labelled folder (CLASS/*.jpg)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", help="a registered task")
    which.add_argument("--zero-shot", action="store_true", help="the base's text head instead")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--version", type=int)
    sel.add_argument("--alias")
    p.add_argument("--confusion", type=Path, help="write the confusion matrix as a PNG here")
    p.add_argument("--prompt-template", default=DEFAULT_TEMPLATE, help="zero-shot prompts")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, help="default: the adapter's training size")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_store_flags(p)


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate an adapter as served, or the base zero-shot; the report (with the PNG path)."""
    from .evaluate import evaluate_adapter, evaluate_zero_shot
    from .execution import resolve_device
    from .plot import confusion_png

    settings = store_settings(args)
    device = resolve_device(args.device, settings)
    if args.zero_shot:
        result = evaluate_zero_shot(
            settings.base_model,
            settings.base_pretrained,
            args.data,
            template=args.prompt_template,
            device=device,
            batch_size=args.batch_size,
            num_workers=args.workers,
            image_size=args.image_size,
        )
        title = f"zero-shot {settings.base_model}/{settings.base_pretrained}"
    else:
        result = evaluate_adapter(
            settings,
            args.task,
            args.data,
            version=args.version,
            alias=args.alias,
            device=device,
            batch_size=args.batch_size,
            num_workers=args.workers,
            image_size=args.image_size,
        )
        title = f"{result['task']} v{result['version']}"
    if args.confusion:
        import torch

        names = list(result["per_class_accuracy"])
        title += f" on {Path(args.data).name}: accuracy {result['accuracy']:.2%}"
        confusion_png(torch.tensor(result["confusion"]), names, args.confusion, title)
        result["confusion_png"] = str(args.confusion)
    return result


def cmd_eval(args: argparse.Namespace) -> int:
    """Run ``deltaclip eval`` and print the report (JSON with ``--json``); the exit status."""
    result = run_eval(args)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    who = (
        f"zero-shot {result['base_model']}/{result['base_pretrained']}"
        if args.zero_shot
        else f"{result['task']} v{result['version']} ({result['digest'][:16]})"
    )
    print(f"{who} on {result['data']}: {result['images']} images, {len(result['support'])} classes")
    print(
        f"accuracy: {result['accuracy']:.2%} (mean per-class {result['mean_class_accuracy']:.2%})"
    )
    if args.zero_shot:
        print(f"chance level: {result['chance_accuracy']:.2%}")
    print("per-class accuracy:")
    for name, acc in result["per_class_accuracy"].items():
        shown = f"{acc:.2%}" if acc is not None else "-"
        print(f"  {name:<32} {shown:>8}  ({result['support'][name]} images)")
    if "confusion_png" in result:
        print(f"confusion matrix: {result['confusion_png']}")
    return 0
