"""``deltaclip predict --task T PATH...``: classify image files and folders with a task's adapter.

In process (the default), the task's adapter is merged into its base from the local catalog as
``deltaclip eval`` does (:func:`trainer.evaluate.load_task_model`) and images get the transform
the server applies (``adapters_store.transforms``); with ``--server URL`` every image is sent to
that server's ``/predict`` through :mod:`deltaclip_client`. Either way the task's version is
resolved once, so every row names the same one, and the output has one row per image (path,
task, version, top-k labels and scores); an image that cannot be read, or that the server
refuses, gets a row with its error instead of stopping the run.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from adapters_store.config import StoreSettings

from .data import IMAGE_EXTENSIONS
from .errors import TrainError

OUTPUT_SUFFIXES = (".csv", ".jsonl")


@dataclass
class Row:
    """One image's answer, or the reason it has none (``error``)."""

    path: str
    task: str
    version: int
    labels: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "task": self.task,
            "version": self.version,
            "predictions": [{"label": n, "score": s} for n, s in self.labels],
            "error": self.error,
        }

    def as_csv(self, top_k: int) -> list[Any]:
        cells: list[Any] = [self.path, self.task, self.version]
        for i in range(top_k):
            cells += self.labels[i] if i < len(self.labels) else ("", "")
        return [*cells, self.error or ""]


def image_files(paths: Sequence[Path]) -> list[Path]:
    """Files as given (a missing one gets an error row), folders searched recursively for
    images by extension, each folder's files in sorted order.

    Raises:
        TrainError: nothing to classify (only folders without images).
    """
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(
                f
                for f in path.rglob("*")
                if f.suffix.lower() in IMAGE_EXTENSIONS
                and f.is_file()
                and not f.name.startswith(".")
            )
        else:
            files.append(path)
    if not files:
        raise TrainError(
            f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under "
            + ", ".join(str(p) for p in paths)
        )
    return files


def top(probs: Sequence[float], names: Sequence[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` best labels, rounded as the server rounds its scores."""
    best = sorted(range(len(names)), key=lambda i: -probs[i])[:k]
    return [(names[i], round(float(probs[i]), 6)) for i in best]


def local_rows(args: argparse.Namespace, settings: StoreSettings) -> Iterator[Row]:
    """Rows from the task's adapter merged into its base here (batches of ``--batch-size``)."""
    import torch

    from adapters_store.transforms import adapter_image_size, eval_transform_for

    from .data import load_rgb
    from .evaluate import load_task_model
    from .execution import resolve_device

    model = load_task_model(
        settings, args.task, args.version, args.alias, resolve_device(args.device, settings)
    )
    meta, record, device = model.adapter.meta, model.record, next(model.net.parameters()).device
    transform = eval_transform_for(model.net, adapter_image_size(meta.train_config, model.net))
    files = args.files
    for start in range(0, len(files), args.batch_size):
        chunk = files[start : start + args.batch_size]
        rows: list[Row] = []
        tensors = []
        for path in chunk:
            rows.append(Row(str(path), record.task, record.version))
            try:
                tensors.append(transform(load_rgb(path)))
            except Exception as exc:  # any decoder failure is this file's, not the run's
                rows[-1].error = f"unreadable image: {type(exc).__name__}: {exc}"
        if tensors:
            with torch.inference_mode():
                probs = model.logits(torch.stack(tensors).to(device)).softmax(-1).cpu()
            answered = iter(probs.tolist())
            for row in rows:
                if row.error is None:
                    row.labels = top(next(answered), meta.class_names, args.top_k)
        yield from rows


def remote_rows(args: argparse.Namespace) -> Iterator[Row]:
    """Rows from the server at ``--server``, one request per image."""
    from deltaclip_client import ApiError, Client
    from deltaclip_client.command import tell_retry

    with Client(args.server, on_retry=tell_retry) as client:
        version = client.resolve(args.task, args.version, args.alias)
        for path in args.files:
            row = Row(str(path), args.task, version)
            try:
                answer = client.predict(
                    args.task, path.read_bytes(), version=version, top_k=args.top_k
                )
                row.labels = [(x.label, x.score) for x in answer.predictions[0]]
            except OSError as exc:
                row.error = f"unreadable file: {exc.strerror or exc}"
            except ApiError as exc:  # refused: this image's problem (the task resolved above)
                row.error = f"refused by the server: {exc.code}: {exc.message}"
            yield row


def writer(out: Path | None, top_k: int, stream: IO[str]) -> Callable[[Row], None]:
    """How a row is written: CSV or JSON lines by ``out``'s suffix, else a line for people."""
    if out is None:
        return lambda r: print(
            f"{r.path}\t"
            + (f"error: {r.error}" if r.error else ", ".join(f"{n} {s:.4f}" for n, s in r.labels)),
            file=stream,
        )
    if out.suffix == ".jsonl":
        return lambda r: print(json.dumps(r.as_json()), file=stream, flush=True)
    table = csv.writer(stream)
    ranks = [f"{what}_{i}" for i in range(1, top_k + 1) for what in ("label", "score")]
    table.writerow(["path", "task", "version", *ranks, "error"])
    return lambda r: table.writerow(r.as_csv(top_k))


def cmd_predict(args: argparse.Namespace) -> int:
    """Run ``deltaclip predict``; exits 1 when any image has an error row (all rows written)."""
    from tqdm import tqdm

    from deltaclip_client import ClientError

    if args.out is not None and args.out.suffix not in OUTPUT_SUFFIXES:
        raise TrainError(f"--out {args.out}: give a .csv or a .jsonl file")
    if args.top_k < 1 or args.batch_size < 1:
        raise TrainError("--top-k and --batch-size must be 1 or more")
    args.files = image_files(args.paths)
    overrides = {"home": args.home, "database_url": args.database_url}
    settings = StoreSettings(**{k: v for k, v in overrides.items() if v is not None})
    failed = 0
    stream = args.out.open("w", newline="", encoding="utf-8") if args.out else sys.stdout
    try:
        write = writer(args.out, args.top_k, stream)
        rows = remote_rows(args) if args.server else local_rows(args, settings)
        for row in tqdm(
            rows,
            total=len(args.files),
            unit="img",
            desc=f"predict {args.task}",
            disable=True if args.no_progress else None,
        ):
            write(row)
            failed += row.error is not None
    except ClientError as exc:
        raise TrainError(f"--server {args.server}: {exc}") from None
    finally:
        if args.out:
            stream.close()
    where = f" to {args.out}" if args.out else ""
    print(
        f"{len(args.files) - failed} of {len(args.files)} images classified{where}"
        + (f"; {failed} with an error row" if failed else ""),
        file=sys.stderr,
    )
    return 1 if failed else 0


def add_predict_parser(subparsers: Any) -> None:
    """Add ``deltaclip predict`` (registered with ``train`` and ``eval``)."""
    p = subparsers.add_parser(
        "predict",
        help="classify image files and folders with a task's adapter (CSV/JSON lines)",
        description="Classify images (files, or folders searched recursively by extension) with "
        "a task's adapter, in process from the local catalog or with --server through a running "
        "server. One row per image; an unreadable or refused image gets an error row, and the "
        "exit status is then 1.",
    )
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files or folders")
    p.add_argument("--task", required=True)
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--version", type=int)
    sel.add_argument("--alias")
    p.add_argument("--server", metavar="URL", help="ask this server instead of running here")
    p.add_argument(
        "--out", type=Path, help="write rows to FILE.csv or FILE.jsonl (default: stdout)"
    )
    p.add_argument("--top-k", type=int, default=5, help="labels per image")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (local)")
    p.add_argument("--device", help="cpu, cuda, ... (local; DELTACLIP_DEVICE)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--home", type=Path, help="data folder (DELTACLIP_HOME) of the local catalog")
    p.add_argument("--database-url", help="local catalog URL (DELTACLIP_DATABASE_URL)")
    p.set_defaults(func=cmd_predict)
