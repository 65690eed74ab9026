"""Real ``deltaclip serve`` processes and their load, for the HTTP question.

* :func:`fast_adapter` / :func:`build_store` — many valid v1 adapters, registered into a fresh
  SQLite catalog through the real registry;
* :func:`server` — a ``deltaclip serve`` process on a free loopback port, up until ``/readyz``;
* :func:`closed_loop` — closed-loop clients (``httpx.AsyncClient``) posting one JPEG per request;
* :func:`scrape` — the counters read from ``/metrics`` before and after a cell.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters_store.adapter import Adapter, AdapterMeta, Residual, utc_now_iso
from adapters_store.bases import tower_parameters
from adapters_store.format.codec import encode_adapter
from adapters_store.head import HEAD_TYPE, TaskHead
from adapters_store.serving_base import ServingBase
from bench.harness import median, p, time_once

CLASSES = [f"class {i}" for i in range(5)]
ADMIN_TOKEN = "bench-admin-token"  # the benchmark servers' token (loopback only)
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


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
        task=task,
        base_model=sig.model,
        base_pretrained=sig.pretrained,
        base_fingerprint=sig.fingerprint,
        class_names=list(CLASSES),
        head={"type": HEAD_TYPE, "dim": sig.embed_dim, "num_classes": len(CLASSES)},
        residual_dtype="float32",
        nnz=nnz,
        eligible_params=eligible,
        density=nnz / eligible,
        source_domain="synthetic-source",
        target_domain="synthetic-target",
        method="synthetic",
        train_config={"generator": "bench/servers.py", "density": density, "seed": seed},
        created_at=utc_now_iso(),
    )
    return Adapter(meta=meta, residual=residual, head=dict(head), class_embeddings=emb)


def tower_state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in tower_parameters(net).items()}


def register(home: Path, base: Any, adapters: Iterator[Adapter]) -> list[Any]:
    """Register adapters into the SQLite catalog + blob folder under ``home`` (created if new)."""
    from adapters_store.catalog import upgrade
    from adapters_store.config import StoreSettings
    from adapters_store.registry import Registry

    url = f"sqlite:///{home}/catalog.db"
    upgrade(url)
    reg = Registry.from_settings(StoreSettings(home=home, database_url=url))
    try:
        return [reg.register(encode_adapter(a), base).record for a in adapters]
    finally:
        reg.close()


def build_store(home: Path, net: nn.Module, sig: Any, n: int, density: float) -> dict[str, Any]:
    """Register ``n`` adapters ``t0..t{n-1}`` into a fresh SQLite catalog + blob folder."""
    base = tower_state(net)
    t = time.perf_counter()
    records = register(
        home,
        ServingBase.of(net, sig),
        (fast_adapter(base, sig, f"t{i}", density, seed=1000 + i) for i in range(n)),
    )
    return {
        "adapters": n,
        "density": density,
        "nnz_mean": sum(r.nnz for r in records) / n,
        "file_bytes_mean": sum(r.size_bytes for r in records) / n,
        "build_s": time.perf_counter() - t,
    }


def popularity(n: int, kind: str) -> list[float]:
    if kind == "uniform":
        return [1.0] * n
    return [1.0 / (i + 1) for i in range(n)]  # Zipf, s = 1


def task_sequence(n: int, kind: str, count: int, seed: int) -> list[int]:
    return random.Random(seed).choices(range(n), weights=popularity(n, kind), k=count)


Cell = tuple[int, str]  # (number of tasks, popularity)
Times = dict[tuple[int, str, str], list[float]]  # (n, popularity, method) -> images/s per rep


def full_queue(
    methods: dict[str, Callable[[list[int]], Any]],
    cells: list[Cell],
    *,
    batch: int,
    batches: int,
    reps: int,
    sync: bool,
    wait: Callable[[], dict[str, Any]],
    warm_tasks: int,
    label: str = "rep",
) -> tuple[Times, list[dict[str, Any]]]:
    """A full queue in process: per repetition (after ``wait()`` for a quiet machine) and cell,
    ``batches`` batches of ``batch`` tasks drawn by the cell's popularity, each method timed on
    the same batches, interleaved. Returns images/s per (n, popularity, method) and repetition,
    and the load each repetition started at."""
    times: Times = {}
    loads = []
    for rep in range(reps):
        loads.append(wait())
        print(f"  {label} {rep + 1}/{reps} (load {loads[-1]['load1']})", flush=True)
        for fn in methods.values():  # the first forward after an idle wait is slow: not timed
            fn(task_sequence(warm_tasks, "uniform", batch, rep))
        for n, kind in cells:
            seq = task_sequence(n, kind, batch * batches, seed=rep * 31 + n)
            chunks = [seq[i : i + batch] for i in range(0, len(seq), batch)]
            for name, fn in methods.items():
                total = sum((time_once(partial(fn, c), sync) for c in chunks), 0.0)
                times.setdefault((n, kind, name), []).append(len(seq) / total)
    return times, loads


async def closed_loop(client: Any, tasks: list[int], clients: int, jpeg: bytes) -> dict[str, Any]:
    """``clients`` workers each posting the next request of ``tasks`` as soon as the last answered."""
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
        "requests": len(tasks),
        "rps": len(tasks) / wall,
        "p50_ms": median(lat) * 1e3,
        "p99_ms": p(lat, 0.99) * 1e3,
        "errors": len(errors),
        "error_codes": sorted(set(errors)),
        "latencies_ms": [round(x * 1e3, 2) for x in lat],
    }


def scrape(text: str) -> dict[str, float]:
    """A few counters from the Prometheus text of /metrics."""
    out = {}
    for name in (
        "deltaclip_cache_misses_total",
        "deltaclip_cache_evictions_total",
        "deltaclip_batch_images_sum",
        "deltaclip_batch_images_count",
    ):
        m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    for path in ("patched", "mixed"):
        m = re.search(rf'^deltaclip_rows_total{{path="{path}"}} ([0-9.e+-]+)$', text, re.M)
        out[f"rows_{path}"] = float(m.group(1)) if m else 0.0
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(
    home: Path,
    base: tuple[str, str],
    device: str,
    max_batch: int,
    cache_bytes: int | None = None,
    batch_mode: str = "patched",
) -> Iterator[str]:
    """A ``deltaclip serve`` process over the store in ``home``; yields its URL once ready."""
    import httpx

    port = free_port()
    env = {
        **os.environ,
        "DELTACLIP_HOME": str(home),
        "DELTACLIP_BASE_MODEL": base[0],
        "DELTACLIP_BASE_PRETRAINED": base[1],
        "DELTACLIP_DEVICE": device,
        "DELTACLIP_PORT": str(port),
        "DELTACLIP_MAX_BATCH": str(max_batch),
        "DELTACLIP_QUEUE_SIZE": "1024",
        "DELTACLIP_ADMIN_TOKEN": ADMIN_TOKEN,
        "DELTACLIP_BATCH_MODE": batch_mode,
    }
    if cache_bytes is not None:
        env["DELTACLIP_CACHE_BYTES"] = str(cache_bytes)
    env.pop("DELTACLIP_DATABASE_URL", None)
    log_path = home / f"server-{port}.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "adapters_store.cli", "serve", "--log-level", "warning"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        with httpx.Client(base_url=url, timeout=10) as c:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited: {log_path.read_text()[-2000:]}")
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
