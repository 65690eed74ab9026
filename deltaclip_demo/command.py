"""``deltaclip demo``: real images, offline, from nothing to a running server in a few minutes.

1. prepare Fashion-MNIST as a source domain and shifted target domains (``deltaclip_demo.data``);
2. train one CMKD + RST adapter per target with the offline ImageNet-pretrained base and register
   it in the embedded catalog (alias ``production``);
3. start ``deltaclip serve`` as its own process, send held-out target images to ``/predict`` for
   each task and print what came back and the accuracy;
4. leave the server running, with the catalog page URL and a ``curl`` line to copy.

The trainer never imports the server: the demo talks to it over HTTP with ``deltaclip_client``,
like any client.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters_store.basenames import EFFLITE0

if TYPE_CHECKING:
    from adapters_store.config import StoreSettings
    from deltaclip_client import Client

# The command line loads this module to list commands: everything heavy is imported on use.
BATCH = 16


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError("no free port on 127.0.0.1")


def _start_server(
    settings: StoreSettings, port: int, token: str, log: Path
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "DELTACLIP_HOME": str(settings.home),
        "DELTACLIP_BASE_MODEL": EFFLITE0[0],
        "DELTACLIP_BASE_PRETRAINED": EFFLITE0[1],
        "DELTACLIP_ADMIN_TOKEN": token,
    }
    if settings.database_url:
        env["DELTACLIP_DATABASE_URL"] = settings.database_url
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "adapters_store.cli", "serve", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_ready(
    client: Client, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120
) -> None:
    from deltaclip_client import ClientError

    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        try:
            client.wait_ready(timeout=1.0)
            return
        except ClientError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the server did not become ready within {timeout:.0f}s; see {log}"
                ) from None
    raise RuntimeError(f"the server exited (status {proc.returncode}); see {log}")


def _labelled_classes(folder: Path) -> list[str]:
    return sorted({label for _, label in _labelled_images(folder)})


def _labelled_images(folder: Path) -> list[tuple[Path, str]]:
    from trainer.data import IMAGE_EXTENSIONS, prompt_name

    return [
        (p, prompt_name(cls.name))
        for cls in sorted(folder.iterdir())
        if cls.is_dir()
        for p in sorted(cls.iterdir())
        if p.suffix.lower() in IMAGE_EXTENSIONS
    ]


def check_zero_shot(client: Client, folder: Path) -> float:
    """The base's zero-shot accuracy on ``folder`` (``/predict/zero-shot`` over its class names,
    no adapter): what CMKD's teacher knows before any training."""
    from tqdm import tqdm

    images = _labelled_images(folder)
    labels = _labelled_classes(folder)
    correct = 0
    for start in tqdm(
        range(0, len(images), BATCH), desc="      /predict/zero-shot", unit="req", leave=False
    ):
        chunk = images[start : start + BATCH]
        answer = client.zero_shot(labels, *(p for p, _ in chunk), top_k=1)
        correct += sum(
            preds[0].label == label
            for (_, label), preds in zip(chunk, answer.predictions, strict=True)
        )
    return correct / len(images)


def check_task(client: Client, task: str, folder: Path) -> dict[str, Any]:
    """Send every image of ``folder`` to the server's ``/predict`` for ``task`` and score the
    answers (batches of ``BATCH`` images per request)."""
    from tqdm import tqdm

    from deltaclip_client import Label

    images = _labelled_images(folder)
    correct, answered_by = 0, ""
    examples: list[tuple[str, str, list[Label]]] = []
    for start in tqdm(
        range(0, len(images), BATCH), desc=f"      /predict {task}", unit="req", leave=False
    ):
        chunk = images[start : start + BATCH]
        answer = client.predict(task, *(p for p, _ in chunk), top_k=3)
        answered_by = f"v{answer.version} ({answer.digest[:12]}…)"
        for (path, label), preds in zip(chunk, answer.predictions, strict=True):
            correct += preds[0].label == label
            if len(examples) < 3:
                examples.append((path.parent.name + "/" + path.name, label, preds))
    return {
        "accuracy": correct / len(images),
        "images": len(images),
        "examples": examples,
        "adapter": answered_by,
    }


def run_demo(args: argparse.Namespace) -> int:
    """Prepare the domains, train and register one adapter per shift, serve them and ask."""
    from adapters_store.catalog import upgrade
    from adapters_store.config import StoreSettings

    from .data import prepare_domains

    settings = StoreSettings(
        **{k: v for k, v in {"home": args.home, "database_url": args.database_url}.items() if v}
    )
    home = settings.home
    started = time.monotonic()
    print(f"deltaclip demo — data, catalog and logs under {home}")
    print("[1/5] preparing real-image domains")
    folders, origin = prepare_domains(
        home / "demo-data",
        args.shifts,
        source_per_class=args.images_per_class,
        target_per_class=args.images_per_class,
        test_per_class=args.test_per_class,
    )
    print(f"      images: {origin}")
    print(
        f"      source 'photo' ({sum(1 for _ in folders['photo'].rglob('*.png'))} images); targets: "
        + ", ".join(f"'{s}'" for s in args.shifts)
    )
    print(f"[2/5] catalog: {settings.resolved_database_url}")
    upgrade(settings.resolved_database_url)
    print(
        f"[3/5] training {len(args.shifts)} adapters (CMKD + RST) on base {EFFLITE0[0]}/{EFFLITE0[1]}:"
    )
    print(
        "      an EfficientNet-Lite0 tower with real ImageNet weights; CMKD's teacher is its ImageNet"
    )
    print(
        "      classifier read through WordNet (`deltaclip base labels` shows how; docs/METHOD.md §8)"
    )
    from trainer import main as train_main
    from trainer.loss_report import loss_terms_line

    trained: dict[str, dict[str, Any]] = {}
    for shift in args.shifts:
        task = f"photo2{shift}"
        argv = [
            "--source",
            str(folders["photo"]),
            "--target",
            str(folders[shift]),
            "--task",
            task,
            "--base-model",
            EFFLITE0[0],
            "--base-pretrained",
            EFFLITE0[1],
            "--home",
            str(home),
            "--image-size",
            str(args.image_size),
            "--epochs",
            "1",
            "--iters",
            str(args.steps),
            "--batch-size",
            str(BATCH),
            "--lr",
            str(args.lr),
            "--head-lr-mult",
            str(args.head_lr_mult),
            "--block-size",
            str(args.block_size),
            "--max-density",
            str(args.max_density),
            "--alias",
            "production",
            "--restart",
        ]
        if settings.database_url:
            argv += ["--database-url", settings.database_url]
        print(f"      {task}: {args.steps} steps")
        metrics = train_main(argv)
        trained[task] = metrics
        print(
            f"      {task} v{metrics['version']}: {metrics['nnz']:,} weights changed "
            f"({metrics['density']:.4%} of the tower), target accuracy {metrics['target_accuracy']:.1%} "
            f"(teacher {metrics['target_teacher_accuracy']:.1%})"
        )
        if metrics.get("loss_terms_last_step"):  # the teacher at work: its terms, as weighted
            print(f"      {loss_terms_line(metrics['loss_terms_last_step'])}")

    port = _free_port(args.port)
    url = f"http://127.0.0.1:{port}"
    token = os.environ.get("DELTACLIP_ADMIN_TOKEN") or secrets.token_urlsafe(16)
    log = home / "demo-server.log"
    print(f"[4/5] starting the server: deltaclip serve --port {port} (log: {log})")
    from deltaclip_client import Client

    proc = _start_server(settings, port, token, log)
    client = Client(url, token=token, timeout=120)
    try:
        _wait_ready(client, proc, log)
        print(
            f"[5/5] asking the server about held-out target images ({args.test_per_class} per class):"
        )
        chance = 1 / len(_labelled_classes(folders["photo"]))
        print(f"      the base alone, zero-shot (its text side, no adapter; chance {chance:.0%}):")
        for task in trained:
            shift = task.removeprefix("photo2")
            zero_shot = check_zero_shot(client, folders[f"test-{shift}"])
            print(f"      {shift:<10} zero-shot accuracy {zero_shot:.1%}")
        print("      each task's adapter:")
        for task in trained:
            shift = task.removeprefix("photo2")
            result = check_task(client, task, folders[f"test-{shift}"])
            print(
                f"      {task} {result['adapter']}: accuracy {result['accuracy']:.1%} on {result['images']} images"
            )
            for name, label, preds in result["examples"]:
                top = ", ".join(f"{p.label} {p.score:.2f}" for p in preds)
                print(f"        {name:<28} true: {label:<12} answer: {top}")
        print(f"done in {time.monotonic() - started:.0f}s.")
        print(f"\nThe server is running at {url}")
        print(f"  catalog page:  {url}/catalog")
        print(f"  API docs:      {url}/docs")
        example = next(iter(_labelled_images(folders[f"test-{args.shifts[0]}"])))[0]
        ask = f"{url}/predict?task=photo2{args.shifts[0]}&top_k=3"
        print(f'  try:  curl -F file=@{example} "{ask}"')
        print(f'   or:  curl --data-binary @{example} "{ask}"')
        print(f"   or:  deltaclip predict --task photo2{args.shifts[0]} --server {url} {example}")
        print(f"  admin token for /admin/*: {token}")
        if args.no_wait:
            return 0
        print("Press Ctrl-C to stop it.")
        proc.wait()
        return 0
    except KeyboardInterrupt:
        print("\nstopping the server")
        return 0
    finally:
        client.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def register(sub: Any) -> None:
    """Entry point of the ``deltaclip.commands`` group: adds ``deltaclip demo``."""
    p = sub.add_parser(
        "demo", help="train adapters on real images offline, serve them, and ask the server"
    )
    p.add_argument(
        "--shifts",
        nargs="+",
        default=["sketch", "negative", "faded"],
        choices=["sketch", "negative", "faded"],
    )
    p.add_argument("--images-per-class", type=int, default=60, help="per domain, for training")
    p.add_argument(
        "--test-per-class", type=int, default=20, help="held-out target images sent to the server"
    )
    p.add_argument("--steps", type=int, default=60, help="training steps per task")
    p.add_argument(
        "--image-size",
        type=int,
        default=128,
        help="training size (the teacher needs >= 128 px of the 28 px images to see much)",
    )
    p.add_argument("--lr", type=float, default=3e-5, help="image-tower learning rate")
    p.add_argument("--head-lr-mult", type=float, default=100.0)
    p.add_argument(
        "--max-density",
        type=float,
        default=0.005,
        help="RST budget: at most this fraction of the tower's weights changed (default 0.5 %%)",
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=1,
        help="RST in blocks of B consecutive weights (1, 2, 4, 8, 16; default 1)",
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--no-wait", action="store_true", help="stop the server and exit after the checks"
    )
    p.add_argument("--home", type=Path, help="data folder (DELTACLIP_HOME, default ~/.deltaclip)")
    p.add_argument("--database-url", help="catalog URL (DELTACLIP_DATABASE_URL)")
    p.set_defaults(func=run_demo)
