"""HTTP throughput and latency with many tasks (issue: alternatives benchmark, item 3).

    .venv/bin/python bench/http_load.py [--device cpu|cuda] [--arch ViT-B-32] [--quick] \
        [--out docs/bench/http_load.json]

1. HTTP grid: real ``deltaclip serve`` processes (``python -m adapters_store.cli serve``) on
   loopback, a catalog of ``max(N)`` synthetic adapters, closed-loop clients (httpx AsyncClient,
   ``--clients`` in flight) sending one 320×240 JPEG per request, a fixed number of requests per
   cell. Cells: N distinct tasks × popularity (uniform, Zipf s=1) × prepared-adapter cache
   (large: every task fits; small: room for 4, so most requests past N=4 load cold). The upper
   bound "one merged model" is the same server with every request for one task (N=1): it patches
   once and then runs full batches with no swaps and no grouping, through the same HTTP stack,
   decoding and batcher, so the ratio isolates what serving many tasks costs.
2. PEFT LoRA with mixed ``adapter_names`` batches, in process (no HTTP): the same tower with N LoRA
   adapters on the MLP Linear layers (rank matched to the residual's changed weights), batches of
   ``--max-batch`` requests drawn from the same popularity, one forward per batch with per-sample
   adapter names; against deltaclip's engine on the same batches (grouped by task, one swap and
   one forward per group, as the batcher does under a full queue) and the plain base tower (the
   merged-model bound).

The default architecture on CPU is ViT-B-32 with a seeded random init: the same 87.8 M-weight
image tower as ViT-B-16 (so adapters, swaps, cache bytes and cold loads are ViT-B-16-sized) at a
quarter of ViT-B-16's compute, so the grid fits in minutes on 2 cores; on CUDA it is ViT-B-16.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import io
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alternatives import LORA_TARGETS, lora_params_per_rank, lora_rank_for, wait_for_quiet
from common import finish_run, machine, median, p, time_once

from adapters_store.adapter import Adapter, AdapterMeta, Residual, utc_now_iso
from adapters_store.bases import build_base, signature_of, tower_parameters
from adapters_store.format.codec import encode_adapter
from adapters_store.head import HEAD_TYPE, TaskHead

ROOT = Path(__file__).resolve().parent.parent
CLASSES = [f"class {i}" for i in range(5)]


# ------------------------------------------------------------------------------ adapters


def fast_adapter(
    base: dict[str, torch.Tensor], sig: Any, task: str, density: float, seed: int
) -> Adapter:
    """A valid v1 adapter with about ``density`` of the tower's weights changed at random
    positions, perturbed like ``adapters_store.synthetic`` (a few % of each weight). Sampling
    positions per parameter instead of drawing a full random mask keeps 256 adapters of an
    88 M-weight tower to about a second each."""
    g = torch.Generator().manual_seed(seed)
    residual = {}
    eligible = 0
    for key, w in sorted(base.items()):
        flat = w.reshape(-1)
        eligible += flat.numel()
        k = int(torch.poisson(torch.tensor(density * flat.numel()), generator=g))
        if k == 0:
            continue
        idx = torch.randint(flat.numel(), (k,), generator=g).unique()
        noise = torch.randn(idx.numel(), generator=g) * 0.02
        wv = flat[idx]
        delta = torch.where(wv != 0, wv.abs() * noise, noise * 1e-3)
        keep = delta != 0
        if keep.any():
            residual[key] = Residual(idx[keep].to(torch.int32), delta[keep].contiguous())
    nnz = sum(r.nnz for r in residual.values())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = TaskHead(sig.embed_dim, len(CLASSES)).state_dict()
        emb = nn.functional.normalize(torch.randn(len(CLASSES), sig.embed_dim), dim=1)
    meta = AdapterMeta(
        task=task, base_model=sig.model, base_pretrained=sig.pretrained,
        base_fingerprint=sig.fingerprint, class_names=list(CLASSES),
        head={"type": HEAD_TYPE, "dim": sig.embed_dim, "num_classes": len(CLASSES)},
        residual_dtype="float32", nnz=nnz, eligible_params=eligible, density=nnz / eligible,
        source_domain="synthetic-source", target_domain="synthetic-target", method="synthetic",
        train_config={"generator": "bench/http_load.py", "density": density, "seed": seed},
        created_at=utc_now_iso(),
    )  # fmt: skip
    return Adapter(meta=meta, residual=residual, head=dict(head), class_embeddings=emb)


def build_store(home: Path, net: nn.Module, sig: Any, n: int, density: float) -> dict[str, Any]:
    """Register ``n`` adapters ``t0..t{n-1}`` into a fresh SQLite catalog + blob folder."""
    from adapters_store.catalog import upgrade
    from adapters_store.config import StoreSettings
    from adapters_store.registry import Registry

    url = f"sqlite:///{home}/catalog.db"
    upgrade(url)
    reg = Registry.from_settings(StoreSettings(home=home, database_url=url))
    base = {k: v.detach().cpu() for k, v in tower_parameters(net).items()}
    t = time.perf_counter()
    nnz, size = [], []
    for i in range(n):
        a = fast_adapter(base, sig, f"t{i}", density, seed=1000 + i)
        rec = reg.register(encode_adapter(a), sig).record
        nnz.append(rec.nnz)
        size.append(rec.size_bytes)
    reg.close()
    return {
        "adapters": n, "density": density, "nnz_mean": sum(nnz) / n,
        "file_bytes_mean": sum(size) / n, "build_s": time.perf_counter() - t,
    }  # fmt: skip


# ------------------------------------------------------------------------------ load generation


def jpeg_bytes() -> bytes:
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    arr = (torch.rand(240, 320, 3, generator=rng) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def popularity(n: int, kind: str) -> list[float]:
    if kind == "uniform":
        return [1.0] * n
    return [1.0 / (i + 1) for i in range(n)]  # Zipf, s = 1


def task_sequence(n: int, kind: str, count: int, seed: int) -> list[int]:
    return random.Random(seed).choices(range(n), weights=popularity(n, kind), k=count)


async def closed_loop(client: Any, tasks: list[int], clients: int, jpeg: bytes) -> dict[str, Any]:
    it: Iterator[int] = iter(tasks)
    lat: list[float] = []
    errors: list[int] = []

    async def worker() -> None:
        for t in it:
            start = time.perf_counter()
            r = await client.post(
                f"/predict?task=t{t}&top_k=1", content=jpeg, headers={"content-type": "image/jpeg"}
            )
            lat.append(time.perf_counter() - start)
            if r.status_code != 200:
                errors.append(r.status_code)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    return {
        "requests": len(tasks), "rps": len(tasks) / wall, "p50_ms": median(lat) * 1e3,
        "p99_ms": p(lat, 0.99) * 1e3, "errors": len(errors), "error_codes": sorted(set(errors)),
        "latencies_ms": [round(x * 1e3, 2) for x in lat],
    }  # fmt: skip


def scrape(text: str) -> dict[str, float]:
    """A few counters from the Prometheus text of /metrics."""
    out = {}
    for name in ("deltaclip_cache_misses_total", "deltaclip_cache_evictions_total",
                 "deltaclip_batch_images_sum", "deltaclip_batch_images_count"):  # fmt: skip
        m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(home: Path, args: argparse.Namespace, cache_bytes: int) -> Iterator[str]:
    import httpx

    port = free_port()
    env = {**os.environ, "DELTACLIP_HOME": str(home), "DELTACLIP_BASE_MODEL": args.arch,
           "DELTACLIP_BASE_PRETRAINED": "random", "DELTACLIP_DEVICE": args.device,
           "DELTACLIP_PORT": str(port), "DELTACLIP_CACHE_BYTES": str(cache_bytes),
           "DELTACLIP_MAX_BATCH": str(args.max_batch), "DELTACLIP_QUEUE_SIZE": "1024"}  # fmt: skip
    env.pop("DELTACLIP_DATABASE_URL", None)
    log = open(home / f"server-{port}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "adapters_store.cli", "serve", "--log-level", "warning"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        with httpx.Client(base_url=url, timeout=10) as c:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited: {(home / f'server-{port}.log').read_text()[-2000:]}")  # fmt: skip
                with contextlib.suppress(httpx.TransportError):
                    if c.get("/readyz").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError("server not ready after 300 s")
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


async def run_server_grid(
    url: str, cells: list[tuple[int, str]], args: argparse.Namespace, cache: str, jpeg: bytes
) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    results: dict[str, list[dict[str, Any]]] = {}
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        # warm-up: JIT, allocator, thread pools; for the large cache every task of the grid is
        # loaded once, so the large-cache cells measure warm serving
        warm = list(range(max(n for n, _ in cells))) if cache == "large" else [0] * args.clients
        await closed_loop(client, [*warm, *([0] * args.clients)], args.clients, jpeg)
        for rep in range(args.reps):
            load = wait_for_quiet(args.max_load, args.max_wait_s)
            print(f"  {cache} cache, rep {rep + 1}/{args.reps} (load {load['load1']})", flush=True)
            for n, kind in cells:
                seq = task_sequence(
                    n, kind, args.requests, seed=1000 * rep + 2 * n + (kind == "zipf")
                )
                warmup = task_sequence(n, kind, args.clients, seed=rep + 7)
                await closed_loop(client, warmup, args.clients, jpeg)
                before = scrape((await client.get("/metrics")).text)
                res = await closed_loop(client, seq, args.clients, jpeg)
                after = scrape((await client.get("/metrics")).text)
                d = {k: after[k] - before[k] for k in after}
                res.update({
                    "cold_loads": d["deltaclip_cache_misses_total"],
                    "evictions": d["deltaclip_cache_evictions_total"],
                    "mean_batch": d["deltaclip_batch_images_sum"] / max(1.0, d["deltaclip_batch_images_count"]),
                    "load": load,
                })  # fmt: skip
                results.setdefault(f"{n}/{kind}", []).append(res)
                print(f"    N={n:<3} {kind:<7} {res['rps']:6.1f} req/s  p50 {res['p50_ms']:7.0f} ms  "
                      f"p99 {res['p99_ms']:7.0f} ms  cold {res['cold_loads']:.0f}  batch {res['mean_batch']:.1f}  "
                      f"errors {res['errors']}", flush=True)  # fmt: skip
        base = (await client.get("/base")).json()
    return {"cells": results, "base_after": base}


def summarise(cells: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per cell: medians over repetitions, p99 over all requests, ratio to N=1 per repetition."""
    single = cells.get("1/uniform")
    rows = []
    for key, reps in cells.items():
        n, kind = key.split("/")
        lat = [x for r in reps for x in r["latencies_ms"]]
        row = {
            "n": int(n), "popularity": kind, "rps": median([r["rps"] for r in reps]),
            "rep_rps": [r["rps"] for r in reps], "p50_ms": median(lat), "p99_ms": p(lat, 0.99),
            "cold_loads_per_rep": median([r["cold_loads"] for r in reps]),
            "mean_batch": median([r["mean_batch"] for r in reps]),
            "errors": sum(r["errors"] for r in reps), "requests_per_rep": reps[0]["requests"],
        }  # fmt: skip
        if single:
            row["vs_single"] = median(
                [r["rps"] / s["rps"] for r, s in zip(reps, single, strict=True)]
            )
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ in-process PEFT


def bench_inprocess(
    net: nn.Module, sig: Any, args: argparse.Namespace, density: float
) -> dict[str, Any]:
    """deltaclip grouped batches vs PEFT mixed ``adapter_names`` batches vs the plain tower."""
    from peft import LoraConfig, get_peft_model

    from server.engine import Engine

    device, sync = args.device, args.device.startswith("cuda")
    n_max = max(args.peft_tasks)
    base_visual = copy.deepcopy(net.visual).eval()
    base = {k: v.detach().cpu() for k, v in tower_parameters(net).items()}
    adapters = [fast_adapter(base, sig, f"t{i}", density, seed=1000 + i) for i in range(n_max)]
    per_rank = lora_params_per_rank(base_visual)
    r = lora_rank_for(int(sum(a.meta.nnz for a in adapters) / n_max), per_rank)
    # deltaclip engine with every adapter prepared
    engine = Engine(net, sig, device, "float32")
    record = type("Record", (), {"version": 1})
    prepared = []
    for i, a in enumerate(adapters):
        rec = record()
        rec.task, rec.digest = f"t{i}", f"d{i}"
        prepared.append(engine.prepare(rec, a))
    # PEFT: n_max LoRA adapters on a copy of the tower
    cfg = LoraConfig(r=r, lora_alpha=r, target_modules=LORA_TARGETS, init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pm = get_peft_model(copy.deepcopy(base_visual), cfg, adapter_name="t0")
        for i in range(1, n_max):
            pm.add_adapter(f"t{i}", cfg)
    with torch.no_grad():
        for name, param in pm.named_parameters():
            if ".lora_B." in name:
                param.mul_(0.02)
    pm = pm.to(device).eval()
    plain = base_visual.to(device)
    x = torch.randn(args.max_batch, 3, 224, 224, device=device)

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
        names = [f"t{i % min(4, n_max)}" for i in range(args.max_batch)]
        mixed = pm(x, adapter_names=names)
        pm.set_adapter("t1" if n_max > 1 else "t0")
        ref = pm(x[1:2])
        mixed_err = float((mixed[1] - ref[0]).abs().max())
        pm.set_adapter("t0")

    methods = {"deltaclip": deltaclip_batch, "peft_mixed": peft_batch, "merged": plain_batch}
    for fn in methods.values():  # warm-up
        fn(task_sequence(min(16, n_max), "uniform", args.max_batch, 0))
    times: dict[tuple[int, str, str], list[float]] = {}
    cells = [(1, "uniform")] + [
        (n, k) for n in args.peft_tasks if n > 1 for k in ("uniform", "zipf")
    ]
    loads = []
    for rep in range(args.reps):
        loads.append(wait_for_quiet(args.max_load, args.max_wait_s))
        print(f"  in-process rep {rep + 1}/{args.reps} (load {loads[-1]['load1']})", flush=True)
        for fn in methods.values():  # the first forward after an idle wait is slow: not timed
            fn(task_sequence(min(16, n_max), "uniform", args.max_batch, rep))
        for n, kind in cells:
            seq = task_sequence(n, kind, args.max_batch * args.peft_batches, seed=rep * 31 + n)
            batches = [seq[i : i + args.max_batch] for i in range(0, len(seq), args.max_batch)]
            for name, fn in methods.items():
                total = sum(time_once(lambda b=b, fn=fn: fn(b), sync) for b in batches)
                times.setdefault((n, kind, name), []).append(len(seq) / total)
    engine.restore_base()
    assert engine.patcher.is_pristine()
    rows = []
    for n, kind in cells:
        row: dict[str, Any] = {"n": n, "popularity": kind}
        for name in methods:
            row[f"{name}_img_s"] = median(times[(n, kind, name)])
        for name in ("deltaclip", "peft_mixed"):
            row[f"{name}_vs_merged"] = median([a / b for a, b in zip(times[(n, kind, name)], times[(n, kind, "merged")], strict=True)])  # fmt: skip
        rows.append(row)
        print("   ", json.dumps(row), flush=True)
    return {
        "rows": rows, "lora_rank": r, "lora_params": r * per_rank, "nnz_mean": sum(a.meta.nnz for a in adapters) / n_max,
        "batch": args.max_batch, "batches_per_cell": args.peft_batches, "mixed_batch_max_abs_error": mixed_err,
        "loads": loads,
    }  # fmt: skip


# ------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--arch", help="open_clip architecture (default ViT-B-32 on CPU, ViT-B-16 on CUDA)"
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tasks", default="1,4,16,30,64,256", help="N values of the HTTP grid")
    ap.add_argument("--peft-tasks", default="1,4,16,64,256", help="N values in process")
    ap.add_argument("--density", type=float, default=0.005)
    ap.add_argument("--requests", type=int, help="requests per cell and repetition")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--peft-batches", type=int, help="batches per in-process cell and repetition")
    ap.add_argument("--small-cache-adapters", type=int, default=4)
    ap.add_argument("--caches", default="large,small", help="which cache sizes to run")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--max-load", type=float, default=0.7)
    ap.add_argument("--max-wait-s", type=float, default=1800.0)
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--home", type=Path, help="reuse this store folder (built if empty)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "http_load.json")
    ap.add_argument("--merge", action="store_true", help="keep the other sections already in --out")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    args.arch = args.arch or ("ViT-B-16" if cuda else "ViT-B-32")
    args.tasks = [int(x) for x in args.tasks.split(",")]
    args.peft_tasks = [int(x) for x in args.peft_tasks.split(",")]
    if args.quick:
        args.tasks = [n for n in args.tasks if n <= 16]
        args.peft_tasks = [n for n in args.peft_tasks if n <= 16]
        args.reps = min(args.reps, 2)
    args.requests = args.requests or (32 if args.quick else (1000 if cuda else 64))
    args.peft_batches = args.peft_batches or (2 if args.quick else (20 if cuda else 3))
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    from peft import __version__ as peft_version

    previous = json.loads(args.out.read_text()) if args.merge and args.out.exists() else {}
    out: dict[str, Any] = {
        **previous,
        "machine": {**machine(), "threads": torch.get_num_threads(), "peft": peft_version},
        "device": args.device, "arch": args.arch, "quick": args.quick, "reps": args.reps,
        "clients": args.clients, "max_batch": args.max_batch, "density": args.density,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }  # fmt: skip
    net = build_base(args.arch, "random")
    sig = signature_of(net, args.arch, "random")
    out["tower_weights"] = sum(v.numel() for v in tower_parameters(net).values())
    if not args.skip_http:
        tmp = None
        home = args.home
        if home is None:
            tmp = tempfile.TemporaryDirectory(prefix="deltaclip-http-")
            home = Path(tmp.name)
        home.mkdir(parents=True, exist_ok=True)
        n_max = max(args.tasks)
        if not (home / "catalog.db").exists():
            out["store"] = build_store(home, net, sig, n_max, args.density)
            print(f"store: {json.dumps(out['store'])}", flush=True)
        else:
            out["store"] = json.loads((home / "store.json").read_text())
        (home / "store.json").write_text(json.dumps(out["store"]))
        per_adapter = 16 * out["store"]["nnz_mean"] + 8192  # prepared: int64 index + 2 float32s
        caches = {
            "large": int(per_adapter * n_max * 2) + (64 << 20),
            "small": int(per_adapter * (args.small_cache_adapters + 0.5)),
        }
        out["cache_bytes"] = caches
        jpeg = jpeg_bytes()
        out["http"] = {}
        for cache, nbytes in caches.items():
            if cache not in args.caches.split(","):
                continue
            cells = [(1, "uniform")] + [
                (n, k) for n in args.tasks if n > 1 for k in ("uniform", "zipf")
            ]
            if cache == "small":
                cells = [(1, "uniform")] + [
                    (n, k) for n, k in cells if n > args.small_cache_adapters
                ]
            with server(home, args, nbytes) as url:
                res = asyncio.run(run_server_grid(url, cells, args, cache, jpeg))
            out["http"][cache] = {"rows": summarise(res["cells"]), "raw": res["cells"], "base_after": res["base_after"]}  # fmt: skip
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=1))
        if tmp is not None:
            tmp.cleanup()
    if not args.skip_peft:
        out["inprocess"] = bench_inprocess(net, sig, args, args.density)
    finish_run(out, previous, t_start, args.out)


if __name__ == "__main__":
    main()
