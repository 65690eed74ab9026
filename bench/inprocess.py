"""The HTTP question's in-process parts: no HTTP stack, the serving engine driven directly.

* :func:`throughput` — the real batcher and engine, closed-loop clients, all requests on one task
  against spread uniformly over 30 tasks, same batching settings, at several numbers of requests
  in flight (the 1-task and 30-task runs alternated, so machine drift hits both alike);
* :func:`peft_mixed` — deltaclip's grouped batches against PEFT LoRA's mixed ``adapter_names``
  batches (one forward per batch) and the plain tower (the merged-model bound), on the same task
  sequences as the HTTP grid.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import random
import time
from functools import partial
from typing import Any, cast

import torch
from torch import nn

from adapters_store.synthetic import random_adapter
from adapters_store.transforms import native_size
from bench.harness import fake_record, median, wait_for_quiet
from bench.lora import build_peft, lora_params_per_rank, lora_rank_for
from bench.servers import fast_adapter, full_queue, task_sequence, tower_state


async def _closed_loop(
    batcher: Any, engine: Any, prepared: list[Any], n: int, clients: int, size: int
) -> float:
    """Images per second between completions ``clients/2`` and ``n - clients``: every client has
    work throughout (no drain), and the first half-round is skipped (ramp-up). Needs n ≥ 2×."""
    images = torch.randn(1, 3, size, size)
    rng = random.Random(0)
    it = iter([rng.choice(prepared) for _ in range(n)])
    done: list[float] = []

    async def client() -> None:
        for adapter in it:
            job = batcher.submit(adapter.digest, lambda x, a=adapter: engine.run(a, x), images)
            await job.future
            done.append(time.perf_counter())

    await asyncio.gather(*(client() for _ in range(clients)))
    lo, hi = clients // 2, n - clients
    return (hi - lo) / (done[hi] - done[lo])


def _hist_mean(hist: Any) -> float:
    total = count = 0.0
    for metric in hist.collect():
        for sample in metric.samples:
            if sample.name.endswith("_sum"):
                total = sample.value
            elif sample.name.endswith("_count"):
                count = sample.value
    return total / count if count else 0.0


def throughput(net: nn.Module, sig: Any, args: argparse.Namespace) -> dict[str, Any]:
    """1 task vs 30 uniformly spread tasks. With ``c`` requests in flight over 30 tasks a round
    holds ~c/30 per task, so ``--in-flight`` goes from ~1 per task (32) to a full batch per task
    (30 × max_batch)."""
    from server.batcher import Batcher
    from server.engine import Engine
    from server.metrics import Metrics

    engine = Engine(net, sig, args.device, "float32")
    size = native_size(net)
    adapters = [
        engine.prepare(
            fake_record(f"t{i}", f"d{i}"), random_adapter(net, sig, f"t{i}", density=0.005, seed=i)
        )
        for i in range(30)
    ]

    async def run(which: list[Any], c: int, n: int) -> tuple[float, float]:
        metrics = Metrics()
        batcher = Batcher(
            args.max_batch,
            0.002,
            4096,
            metrics,
            lambda: engine.current.digest if engine.current else None,
        )
        batcher.start()
        rate = await _closed_loop(batcher, engine, which, n, c, size)
        batcher.stop()
        return rate, _hist_mean(metrics.batch_size)

    rows = []
    for c in args.in_flight:
        n = max(2 * c, 96 if args.quick else 160)
        reps = []
        for _ in range(1 if args.quick else (3 if c < 100 else 2)):  # alternate to cancel drift
            wait_for_quiet(args.max_load, args.max_wait_s)
            one, b1 = asyncio.run(run(adapters[:1], c, n))
            thirty, b30 = asyncio.run(run(adapters, c, n))
            reps.append((one, thirty, b1, b30))
        row = {
            "clients": c,
            "requests": n,
            "reps": len(reps),
            "one_task_ips": median([r[0] for r in reps]),
            "thirty_tasks_ips": median([r[1] for r in reps]),
            "ratio": median([r[1] / r[0] for r in reps]),
            "mean_batch_one": median([r[2] for r in reps]),
            "mean_batch_thirty": median([r[3] for r in reps]),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    engine.restore_base()
    assert engine.patcher.is_pristine()
    return {"max_batch": args.max_batch, "max_wait_ms": 2, "rows": rows}


def peft_mixed(net: nn.Module, sig: Any, args: argparse.Namespace) -> dict[str, Any]:
    """deltaclip grouped batches vs PEFT mixed ``adapter_names`` batches vs the plain tower."""
    from server.engine import Engine

    device, sync = args.device, args.device.startswith("cuda")
    n_max = max(args.peft_tasks)
    base_visual = copy.deepcopy(cast(nn.Module, net.visual)).eval()
    base = tower_state(net)
    adapters = [fast_adapter(base, sig, f"t{i}", args.density, seed=1000 + i) for i in range(n_max)]
    per_rank = lora_params_per_rank(base_visual)
    r = lora_rank_for(int(sum(a.meta.nnz for a in adapters) / n_max), per_rank)
    engine = Engine(net, sig, device, "float32")
    prepared = [engine.prepare(fake_record(f"t{i}", f"d{i}"), a) for i, a in enumerate(adapters)]
    pm = build_peft(base_visual, {r: [f"t{i}" for i in range(n_max)]}, device, torch.float32)
    plain = base_visual.to(device)
    size = native_size(net)
    x = torch.randn(args.max_batch, 3, size, size, device=device)

    @torch.inference_mode()
    def deltaclip_batch(tasks: list[int]) -> None:
        groups: dict[int, list[int]] = {}
        for pos, t in enumerate(tasks):
            groups.setdefault(t, []).append(pos)
        current = engine.current.task if engine.current is not None else None
        for t in sorted(groups, key=lambda t: f"t{t}" != current):
            engine.run(prepared[t], x[groups[t]])

    @torch.inference_mode()
    def peft_batch(tasks: list[int]) -> None:
        pm(x, adapter_names=[f"t{t}" for t in tasks])

    @torch.inference_mode()
    def plain_batch(tasks: list[int]) -> None:
        plain(x)

    # correctness of the mixed batch: sample i must equal the single-adapter forward
    with torch.inference_mode():
        mixed = pm(x, adapter_names=[f"t{i % min(4, n_max)}" for i in range(args.max_batch)])
        pm.set_adapter("t1" if n_max > 1 else "t0")
        mixed_err = float((mixed[1] - pm(x[1:2])[0]).abs().max())
        pm.set_adapter("t0")

    methods = {"deltaclip": deltaclip_batch, "peft_mixed": peft_batch, "merged": plain_batch}
    for fn in methods.values():  # warm-up
        fn(task_sequence(min(16, n_max), "uniform", args.max_batch, 0))
    cells = [(1, "uniform")]
    cells += [(n, k) for n in args.peft_tasks if n > 1 for k in ("uniform", "zipf")]
    times, loads = full_queue(
        methods,
        cells,
        batch=args.max_batch,
        batches=args.peft_batches,
        reps=args.reps,
        sync=sync,
        wait=partial(wait_for_quiet, args.max_load, args.max_wait_s),
        warm_tasks=min(16, n_max),
        label="in-process rep",
    )
    engine.restore_base()
    assert engine.patcher.is_pristine()
    rows = []
    for n, kind in cells:
        row: dict[str, Any] = {"n": n, "popularity": kind}
        for name in methods:
            row[f"{name}_img_s"] = median(times[(n, kind, name)])
        for name in ("deltaclip", "peft_mixed"):
            row[f"{name}_vs_merged"] = median(
                [
                    a / b
                    for a, b in zip(times[(n, kind, name)], times[(n, kind, "merged")], strict=True)
                ]
            )
        rows.append(row)
        print("   ", json.dumps(row), flush=True)
    return {
        "rows": rows,
        "lora_rank": r,
        "lora_params": r * per_rank,
        "nnz_mean": sum(a.meta.nnz for a in adapters) / n_max,
        "batch": args.max_batch,
        "batches_per_cell": args.peft_batches,
        "mixed_batch_max_abs_error": mixed_err,
        "loads": loads,
    }
