"""Question "http": serving over HTTP and in process, with one task and with many.

    python -m bench http [--sections latency,throughput,grid,peft] [--base ViT-B-32] [--quick]

Sections:

* ``latency`` — batch-1 ``/predict`` through a real ``deltaclip serve`` process against the same
  work in process (decode, transform, patched forward, head), the two calls alternated one by one
  (``--pairs``) so that drift of a shared machine hits both alike; the ratio is the median of the
  pairs' ratios (key ``http_vs_inprocess``);
* ``throughput`` — in process, the real batcher + engine, closed-loop clients, 1 task against 30
  uniformly spread tasks at each of ``--in-flight`` requests in flight (bench/inprocess.py);
* ``grid`` — real ``deltaclip serve`` processes on loopback over a catalog of ``max(--tasks)``
  synthetic adapters, ``--clients`` closed-loop clients sending one 320×240 JPEG per request,
  ``--requests`` per cell. Cells: N distinct tasks × popularity (uniform, Zipf s=1) × prepared-
  adapter cache (large: every task fits; small: room for ``--small-cache-adapters``). N=1 is the
  "one merged model" bound: it patches once, then runs full batches through the same HTTP stack,
  decoding and batcher, so the ratio isolates what serving many tasks costs (key ``http``).
  With ``--modes`` one server per ``DELTACLIP_BATCH_MODE`` runs at once (idle but for its
  turn) and every cell is measured on each in turn with the same requests, at each of
  ``--clients`` (``--requests`` scaled by clients/16); key ``modes``, with the share of rows each
  cell served mixed;
* ``peft`` — PEFT LoRA mixed ``adapter_names`` batches against deltaclip's grouped batches and the
  plain tower, in process (key ``inprocess``; bench/inprocess.py).

The default base on CPU is ViT-B-32 with a seeded random init: the same 87.8 M-weight image tower
as ViT-B-16 (adapters, swaps, cache bytes and cold loads are ViT-B-16-sized) at a quarter of its
compute, so the grid fits in minutes on 2 cores; on CUDA it is ViT-B-16.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import tempfile
from pathlib import Path
from typing import Any

from adapters_store.bases import tower_parameters
from adapters_store.serving_base import ServingBase
from adapters_store.synthetic import random_adapter
from bench.harness import (
    Result,
    add_common,
    base_spec,
    csv_list,
    fake_record,
    jpeg_bytes,
    load_base,
    median,
    p,
    time_once,
    wait_for_quiet,
)
from bench.inprocess import peft_mixed, throughput
from bench.servers import (
    ADMIN,
    build_store,
    closed_loop,
    register,
    scrape,
    server,
    task_sequence,
)

SECTIONS = ["latency", "throughput", "grid", "peft"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p, sections=SECTIONS, base="")
    p.add_argument("--pairs", type=int, default=40, help="latency: HTTP/in-process call pairs")
    p.add_argument(
        "--in-flight",
        type=csv_list(int),
        default=[32, 128, 480],
        help="throughput: requests in flight",
    )
    p.add_argument(
        "--tasks", type=csv_list(int), default=[1, 4, 16, 30, 64, 256], help="grid: N values"
    )
    p.add_argument(
        "--peft-tasks", type=csv_list(int), default=[1, 4, 16, 64, 256], help="peft: N values"
    )
    p.add_argument("--density", type=float, default=0.005)
    p.add_argument(
        "--requests",
        type=int,
        help="grid: requests per cell and repetition at 16 in flight (scaled with --clients)",
    )
    p.add_argument(
        "--clients",
        type=csv_list(int),
        default=[16],
        help="grid: closed-loop clients (requests in flight), one grid per value",
    )
    p.add_argument(
        "--modes",
        type=csv_list(str),
        default=["patched"],
        help="grid: the servers' DELTACLIP_BATCH_MODE values (patched, mixed, auto), "
        "one server each",
    )
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--peft-batches", type=int, help="peft: batches per cell and repetition")
    p.add_argument("--small-cache-adapters", type=int, default=4)
    p.add_argument(
        "--caches", type=csv_list(str), default=["large", "small"], help="grid: cache sizes"
    )
    p.add_argument("--home", type=Path, help="grid: reuse this store folder (built if empty)")


def run(args: argparse.Namespace, result: Result) -> None:
    cuda = args.device.startswith("cuda")
    args.base = args.base or ("ViT-B-16" if cuda else "ViT-B-32")
    if args.quick:
        args.tasks = [n for n in args.tasks if n <= 16]
        args.peft_tasks = [n for n in args.peft_tasks if n <= 16]
        args.reps, args.pairs = min(args.reps, 2), min(args.pairs, 10)
    args.requests = args.requests or (32 if args.quick else (1000 if cuda else 64))
    args.peft_batches = args.peft_batches or (2 if args.quick else (20 if cuda else 3))
    result.data.update(
        base=args.base,
        arch=args.base,
        clients=args.clients[0],
        clients_grid=args.clients,
        modes=args.modes,
        max_batch=args.max_batch,
        density=args.density,
    )
    net, sig = load_base(args.base)
    result["tower_weights"] = sum(v.numel() for v in tower_parameters(net).values())
    if "latency" in args.sections:
        result["http_vs_inprocess"] = latency(net, sig, args)
        result.save()
    if "throughput" in args.sections:
        result["throughput"] = throughput(net, sig, args)
        result.save()
    if "grid" in args.sections:
        with tempfile.TemporaryDirectory(prefix="deltaclip-http-") as tmp:
            grid(net, sig, args, args.home or Path(tmp), result)
    if "peft" in args.sections:
        result["inprocess"] = peft_mixed(net, sig, args)


def latency(net: Any, sig: Any, args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    from PIL import Image

    from server.engine import Engine

    jpeg = jpeg_bytes()
    adapter = random_adapter(net, sig, "http", density=0.005, seed=3)
    engine = Engine(net, sig, args.device, "float32")
    prepared = engine.prepare(fake_record("http", "d"), adapter)
    tf = engine.transform_for()

    def local() -> None:
        engine.run(prepared, tf(Image.open(io.BytesIO(jpeg)))[None])

    with tempfile.TemporaryDirectory() as tmp:
        register(Path(tmp), ServingBase.of(net, sig), iter([adapter]))
        with (
            server(Path(tmp), base_spec(args.base), args.device, args.max_batch) as url,
            httpx.Client(base_url=url, timeout=60) as c,
        ):

            def call() -> None:
                c.post(
                    "/predict?task=http", content=jpeg, headers={"content-type": "image/jpeg"}
                ).raise_for_status()

            for _ in range(3):
                call()
                local()
            wait_for_quiet(args.max_load, args.max_wait_s)
            http, inproc = [], []
            for _ in range(args.pairs):
                http.append(time_once(call))
                inproc.append(time_once(local))
    engine.restore_base()
    return {
        "http_p50_ms": median(http) * 1e3,
        "http_p99_ms": p(http, 0.99) * 1e3,
        "inprocess_p50_ms": median(inproc) * 1e3,
        "inprocess_p99_ms": p(inproc, 0.99) * 1e3,
        "ratio": median([h / i for h, i in zip(http, inproc, strict=True)]),
        "ratio_of_medians": median(http) / median(inproc),
        "pairs": args.pairs,
    }


def grid(net: Any, sig: Any, args: argparse.Namespace, home: Path, result: Result) -> None:
    home.mkdir(parents=True, exist_ok=True)
    n_max = max(args.tasks)
    if not (home / "catalog.db").exists():
        result["store"] = build_store(home, net, sig, n_max, args.density)
        print(f"store: {json.dumps(result['store'])}", flush=True)
    else:
        result["store"] = json.loads((home / "store.json").read_text())
    (home / "store.json").write_text(json.dumps(result["store"]))
    per_adapter = 16 * result["store"]["nnz_mean"] + 8192  # prepared: int64 index + 2 float32s
    caches = {
        "large": int(per_adapter * n_max * 2) + (64 << 20),
        "small": int(per_adapter * (args.small_cache_adapters + 0.5)),
    }
    result["cache_bytes"] = caches
    result["http"], result["modes"] = {}, []
    jpeg = jpeg_bytes()
    for cache in (c for c in caches if c in args.caches):
        cells = [(1, "uniform")] + [
            (n, k) for n in args.tasks if n > 1 for k in ("uniform", "zipf")
        ]
        if cache == "small":
            cells = [(n, k) for n, k in cells if n == 1 or n > args.small_cache_adapters]
        with contextlib.ExitStack() as stack:  # every mode's server up at once, measured in turns
            urls = {
                mode: stack.enter_context(
                    server(
                        home, base_spec(args.base), args.device, args.max_batch, caches[cache], mode
                    )
                )
                for mode in args.modes
            }
            for clients in args.clients:
                by_mode = asyncio.run(_server_grid(urls, cells, args, cache, jpeg, clients))
                for mode, res in by_mode.items():
                    entry = {
                        "rows": summarise(res["cells"]),
                        "raw": res["cells"],
                        "base_after": res["base_after"],
                    }
                    if mode == "patched" and clients == args.clients[0]:
                        result["http"][cache] = entry  # the grouped grid of earlier runs
                    result["modes"].append(
                        {"cache": cache, "mode": mode, "clients": clients, **entry}
                    )
                result.save()


async def _server_grid(
    urls: dict[str, str],
    cells: list[tuple[int, str]],
    args: argparse.Namespace,
    cache: str,
    jpeg: bytes,
    clients: int,
) -> dict[str, dict[str, Any]]:
    """Each cell measured on every server in turn (the same request sequence), so that the
    drift of a shared machine hits the modes of a cell alike."""
    import httpx

    requests = args.requests * max(1, clients // 16)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {mode: {} for mode in urls}
    async with contextlib.AsyncExitStack() as stack:
        http = {
            mode: await stack.enter_async_context(
                httpx.AsyncClient(base_url=url, timeout=300, limits=limits)
            )
            for mode, url in urls.items()
        }
        # warm-up: JIT, allocator, thread pools; for the large cache every task of the grid is
        # loaded once, so the large-cache cells measure warm serving
        warm = list(range(max(n for n, _ in cells))) if cache == "large" else [0] * clients
        for client in http.values():
            await closed_loop(client, [*warm, *([0] * clients)], clients, jpeg)
        for rep in range(args.reps):
            load = wait_for_quiet(args.max_load, args.max_wait_s)
            where = f"{cache} cache, {clients} in flight, rep {rep + 1}/{args.reps}"
            print(f"  {where} (load {load['load1']})", flush=True)
            for n, kind in cells:
                seq = task_sequence(n, kind, requests, seed=1000 * rep + 2 * n + (kind == "zipf"))
                prime = task_sequence(n, kind, clients, seed=rep + 7)
                for mode, client in http.items():
                    res = await _cell(client, prime, seq, clients, jpeg)
                    res["load"] = load
                    results[mode].setdefault(f"{n}/{kind}", []).append(res)
                    print(f"    {mode:<7} N={n:<3} {kind:<7} {_cell_line(res)}", flush=True)
        # A check now (GET /base would serve the last periodic one).
        bases = {
            mode: (await client.post("/admin/base/check", headers=ADMIN)).json()
            for mode, client in http.items()
        }
    return {mode: {"cells": results[mode], "base_after": bases[mode]} for mode in urls}


async def _cell(
    client: Any, prime: list[int], seq: list[int], clients: int, jpeg: bytes
) -> dict[str, Any]:
    """One cell on one server: ``prime`` to fill the pipeline, then ``seq`` measured, with the
    server's counters read before and after."""
    await closed_loop(client, prime, clients, jpeg)
    before = scrape((await client.get("/metrics")).text)
    res = await closed_loop(client, seq, clients, jpeg)
    after = scrape((await client.get("/metrics")).text)
    d = {k: after[k] - before[k] for k in after}
    forwards = max(1.0, d["deltaclip_batch_images_count"])
    rows = max(1.0, d["rows_mixed"] + d["rows_patched"])
    res.update(
        cold_loads=d["deltaclip_cache_misses_total"],
        evictions=d["deltaclip_cache_evictions_total"],
        mean_batch=d["deltaclip_batch_images_sum"] / forwards,
        mixed_share=d["rows_mixed"] / rows,
    )
    return res


def _cell_line(res: dict[str, Any]) -> str:
    return (
        f"{res['rps']:6.1f} req/s  p50 {res['p50_ms']:7.0f} ms  p99 {res['p99_ms']:7.0f} ms  "
        f"cold {res['cold_loads']:.0f}  batch {res['mean_batch']:.1f}  "
        f"mixed {res['mixed_share']:.0%}  errors {res['errors']}"
    )


def summarise(cells: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per cell: medians over repetitions, p99 over all requests, ratio to N=1 per repetition."""
    single = cells.get("1/uniform")
    rows = []
    for key, reps in cells.items():
        n, kind = key.split("/")
        lat = [x for r in reps for x in r["latencies_ms"]]
        row = {
            "n": int(n),
            "popularity": kind,
            "rps": median([r["rps"] for r in reps]),
            "rep_rps": [r["rps"] for r in reps],
            "p50_ms": median(lat),
            "p99_ms": p(lat, 0.99),
            "cold_loads_per_rep": median([r["cold_loads"] for r in reps]),
            "mean_batch": median([r["mean_batch"] for r in reps]),
            "mixed_share": median([r.get("mixed_share", 0.0) for r in reps]),
            "errors": sum(r["errors"] for r in reps),
            "requests_per_rep": reps[0]["requests"],
        }
        if single:
            row["vs_single"] = median(
                [r["rps"] / s["rps"] for r, s in zip(reps, single, strict=True)]
            )
        rows.append(row)
    return rows
