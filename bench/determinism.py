"""What the deterministic mode (``DELTACLIP_DETERMINISTIC``) costs, and what it buys.

The real batcher and engine on one task, ``--clients`` single-image requests in flight (closed
loop), once with dynamic batch shapes (the default) and once with every forward pass padded to
``max_batch`` images (deterministic). With few requests in flight the padded passes compute mostly
zeros, so the cost is largest there; with a full batch waiting it vanishes. Each row also says
whether one image's probabilities came out bit-identical alone and inside a batch of others.

    python -m bench determinism [--base deltaclip-efflite0] [--clients 1,4,16,64] [--device cuda]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import torch

from adapters_store.synthetic import random_adapter
from adapters_store.transforms import native_size
from bench.harness import (
    add_common,
    csv_list,
    fake_record,
    load_base,
    median,
    print_table,
    wait_for_quiet,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p, base="deltaclip-efflite0", reps=3)
    p.add_argument(
        "--clients", type=csv_list(int), default=[1, 4, 16, 64], help="requests in flight"
    )
    p.add_argument("--max-batch", type=int, default=16, help="the server's max_batch")
    p.add_argument("--requests", type=int, default=256, help="requests per measurement")


async def _images_per_second(
    batcher: Any, run: Any, image: torch.Tensor, clients: int, n: int
) -> float:
    """``n`` single-image requests from ``clients`` closed-loop clients; completions per second
    over the middle of the run (the first and last ``clients`` completions left out)."""
    left = iter(range(n))
    finished: list[float] = []

    async def one_client() -> None:
        for _ in left:
            await batcher.submit("task", run, image).future
            finished.append(time.perf_counter())

    await asyncio.gather(*(one_client() for _ in range(clients)))
    first, last = clients, n - clients - 1
    return (last - first) / (finished[last] - finished[first])


def _identical_alone_and_batched(batcher: Any, run: Any, images: torch.Tensor) -> bool:
    """Whether the first image's tower output is bit-identical alone and with four others (the
    tower's features: near-uniform probabilities of a random head would hide rounding)."""

    async def both() -> bool:
        alone = await batcher.submit("task", run, images[:1]).future
        batched = await batcher.submit("task", run, images).future
        return bool(torch.equal(alone[0], batched[0]))

    return asyncio.run(both())


def run(args: argparse.Namespace, result: Any) -> None:
    from server.batcher import Batcher
    from server.engine import Engine
    from server.metrics import Metrics

    net, sig = load_base(args.base)
    engine = Engine(net, sig, args.device, "float32")
    size = native_size(net)
    prepared = engine.prepare(fake_record("task"), random_adapter(net, sig, "task", density=0.005))

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = engine.run(prepared, x)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        return out

    def features(x: torch.Tensor) -> torch.Tensor:
        engine.run(prepared, x[:1])  # patched
        return engine.features(x)

    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    probe = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(1))
    reps = 1 if args.quick else args.reps
    n = 64 if args.quick else args.requests
    rows = []
    for clients in args.clients:
        rates: dict[str, list[float]] = {"dynamic": [], "deterministic": []}
        identical: dict[str, bool] = {}
        for _ in range(reps):  # the two modes alternate, so machine drift hits both alike
            for mode, fixed in (("dynamic", None), ("deterministic", args.max_batch)):
                wait_for_quiet(args.max_load, args.max_wait_s)
                batcher = Batcher(args.max_batch, 0.002, 4096, Metrics(), lambda: "task", fixed)
                batcher.start()
                try:
                    loop_n = max(n, 3 * clients)
                    rates[mode].append(
                        asyncio.run(_images_per_second(batcher, forward, image, clients, loop_n))
                    )
                    identical[mode] = _identical_alone_and_batched(batcher, features, probe)
                finally:
                    batcher.stop()
        dyn, det = median(rates["dynamic"]), median(rates["deterministic"])
        row = {
            "clients": clients,
            "dynamic_ips": dyn,
            "deterministic_ips": det,
            "cost": 1 - det / dyn,
            "identical_dynamic": identical["dynamic"],
            "identical_deterministic": identical["deterministic"],
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    engine.restore_base()
    result["determinism"] = {"max_batch": args.max_batch, "max_wait_ms": 2, "rows": rows}
    print_table(
        ["in flight", "dynamic img/s", "deterministic img/s", "cost", "bit-identical (dyn / det)"],
        [
            [
                str(r["clients"]),
                f"{r['dynamic_ips']:.1f}",
                f"{r['deterministic_ips']:.1f}",
                f"{r['cost']:.0%}",
                f"{r['identical_dynamic']} / {r['identical_deterministic']}",
            ]
            for r in rows
        ],
    )
