"""Serving benchmarks of issue #4, as ratios measured in one run on one machine.

    .venv/bin/python bench/serving.py [--device cpu|cuda] [--quick] [--out results.json]
        [--sections swap,cold,throughput,http] [--clients 32,128,480]

1. swap: fused patch+restore of a 0.5 %-density adapter on ViT-B-16 vs a batch-1 forward of the
   image tower (and the per-tensor Python loop it replaces), at several densities: in isolation
   (the same adapter patched and restored in a loop, cache-warm) and between forward passes (as
   serving does it, after the forward has streamed the tower through the caches);
2. cold load: store → prepared (read, SHA-256 verify, decode, validate, prepare);
3. throughput: the real batcher + engine, closed-loop clients, all requests on one task vs spread
   uniformly over 30 tasks, same batching settings, at several numbers of requests in flight;
4. HTTP: /predict batch-1 latency of a real `deltaclip serve` process vs the in-process forward.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, p, time_once, timeit, vit_b16

from adapters_store.format.codec import encode_adapter
from adapters_store.synthetic import random_adapter


def _fused_swap(patcher: Any, prepared: Any) -> None:
    patcher.patch(prepared)
    patcher.restore(prepared)


def _per_tensor(
    engine: Any, adapter: Any
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(flat view of the parameter, indices, delta, saved originals) per changed parameter."""
    params = dict(engine.visual.named_parameters())
    out = []
    for key, res in adapter.residual.items():
        flat = params[key.removeprefix("visual.")].detach().view(-1)
        idx = res.indices.to(device=engine.device, dtype=torch.int64)
        out.append((flat, idx, res.values.to(engine.device), flat[idx].clone()))
    return out


def _loop_swap(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """The per-tensor Python loop deltaclip replaces: index_add the delta, index_copy back."""
    for flat, idx, delta, _ in parts:
        flat.index_add_(0, idx, delta)
    for flat, idx, _, saved in parts:
        flat.index_copy_(0, idx, saved)


def _swap_between_forwards(
    engine: Any, prepared: Any, x: torch.Tensor, repeat: int, sync: bool
) -> list[float]:
    """Patch + restore as serving does them: each after a forward pass has streamed the whole
    tower through the caches (the isolated loop above re-writes the same, cache-warm lines)."""
    out = []
    for _ in range(repeat + 1):
        engine.features(x)
        t = time_once(lambda: engine.patcher.patch(prepared), sync)
        engine.features(x)
        t += time_once(lambda: engine.patcher.restore(prepared), sync)
        out.append(t)
    return out[1:]


def bench_swap(net: Any, sig: Any, device: str, repeat: int) -> dict[str, Any]:
    from server.engine import Engine

    engine = Engine(net, sig, device, "float32")
    sync = device.startswith("cuda")
    x = torch.randn(1, 3, 224, 224)
    forward = timeit(lambda: engine.features(x), repeat=max(5, repeat // 10), sync=sync)
    rows = []
    for density in (0.0005, 0.001, 0.005, 0.01):
        adapter = random_adapter(net, sig, "bench", density=density, seed=1)
        prepared = engine.patcher.prepare(adapter)
        t_fused = timeit(partial(_fused_swap, engine.patcher, prepared), repeat, sync=sync)
        t_loop = timeit(
            partial(_loop_swap, _per_tensor(engine, adapter)), max(10, repeat // 4), sync=sync
        )
        t_ctx = _swap_between_forwards(engine, prepared, x, max(5, repeat // 15), sync)
        rows.append({
            "density": density, "nnz": prepared.nnz,
            "fused_p50_ms": median(t_fused) * 1e3, "fused_p99_ms": p(t_fused, 0.99) * 1e3,
            "loop_p50_ms": median(t_loop) * 1e3,
            "fused_vs_forward": median(t_fused) / median(forward), "loop_vs_forward": median(t_loop) / median(forward),
            "in_context_p50_ms": median(t_ctx) * 1e3, "in_context_p99_ms": p(t_ctx, 0.99) * 1e3,
            "in_context_vs_forward": median(t_ctx) / median(forward),
        })  # fmt: skip
    assert engine.patcher.is_pristine()
    return {"forward_b1_ms": median(forward) * 1e3, "rows": rows}


def bench_cold_load(net: Any, sig: Any, device: str, repeat: int) -> dict[str, Any]:
    from adapters_store.catalog import upgrade
    from adapters_store.config import StoreSettings
    from adapters_store.registry import Registry
    from server.engine import Engine

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/c.db"
        upgrade(url)
        reg = Registry.from_settings(StoreSettings(home=Path(tmp), database_url=url))
        record = reg.register(
            encode_adapter(random_adapter(net, sig, "cold", density=0.005, seed=2)), sig
        ).record
        engine = Engine(net, sig, device, "float32")
        times = timeit(lambda: engine.prepare(record, reg.load(record, sig)), repeat)
        reg.close()
    return {
        "nnz": record.nnz,
        "bytes": record.size_bytes,
        "p50_ms": median(times) * 1e3,
        "p99_ms": p(times, 0.99) * 1e3,
    }


async def _closed_loop(
    batcher: Any, engine: Any, prepared: list[Any], n: int, clients: int
) -> float:
    """Images per second between completions ``clients/2`` and ``n - clients``: every client has
    work throughout (no drain), and the first half-round is skipped (ramp-up). Needs n ≥ 2×."""
    images = torch.randn(1, 3, 224, 224)
    rng = random.Random(0)
    order = [rng.choice(prepared) for _ in range(n)]
    it = iter(order)
    done: list[float] = []

    async def client() -> None:
        for adapter in it:
            job = batcher.submit(adapter.digest, lambda x, a=adapter: engine.run(a, x), images)
            await job.future
            done.append(time.perf_counter())

    await asyncio.gather(*(client() for _ in range(clients)))
    lo, hi = clients // 2, n - clients
    return (hi - lo) / (done[hi] - done[lo])


def bench_throughput(
    net: Any, sig: Any, device: str, max_batch: int, clients: list[int], quick: bool
) -> dict[str, Any]:
    """1 task vs 30 uniformly spread tasks, the real batcher and engine, closed-loop clients.

    With ``clients`` requests in flight over 30 tasks a round holds ~clients/30 per task, so
    the client counts go from ~1 per task (32) to a full batch per task (30 × max_batch)."""
    from server.batcher import Batcher
    from server.engine import Engine
    from server.metrics import Metrics

    engine = Engine(net, sig, device, "float32")
    adapters = [engine.prepare(type("R", (), {"task": f"t{i}", "version": 1, "digest": f"d{i}"})(),
                               random_adapter(net, sig, f"t{i}", density=0.005, seed=i)) for i in range(30)]  # fmt: skip

    async def run(which: list[Any], c: int, n: int) -> tuple[float, float]:
        metrics = Metrics()
        batcher = Batcher(max_batch, 0.002, 4096, metrics,
                          lambda: engine.current.digest if engine.current else None)  # fmt: skip
        batcher.start()
        rate = await _closed_loop(batcher, engine, which, n, c)
        batcher.stop()
        hist = metrics.batch_size
        mean_batch = _hist_mean(hist)
        return rate, mean_batch

    rows = []
    for c in clients:
        n = max(2 * c, 96 if quick else 160)
        reps = []
        for _ in range(1 if quick else (3 if c < 100 else 2)):  # alternate to cancel drift
            one, b1 = asyncio.run(run(adapters[:1], c, n))
            thirty, b30 = asyncio.run(run(adapters, c, n))
            reps.append((one, thirty, b1, b30))
        row = {"clients": c, "requests": n, "reps": len(reps),
               "one_task_ips": median([r[0] for r in reps]), "thirty_tasks_ips": median([r[1] for r in reps]),
               "ratio": median([r[1] / r[0] for r in reps]),
               "mean_batch_one": median([r[2] for r in reps]), "mean_batch_thirty": median([r[3] for r in reps])}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    engine.restore_base()
    assert engine.patcher.is_pristine()
    return {"max_batch": max_batch, "max_wait_ms": 2, "rows": rows}


def _hist_mean(hist: Any) -> float:
    total = count = 0.0
    for metric in hist.collect():
        for sample in metric.samples:
            if sample.name.endswith("_sum"):
                total = sample.value
            elif sample.name.endswith("_count"):
                count = sample.value
    return total / count if count else 0.0


def bench_http(net: Any, sig: Any, repeat: int) -> dict[str, Any]:
    """Batch-1 ``/predict`` through a real ``deltaclip serve`` process against the same work in
    process (decode, transform, patched forward, head), the two calls alternated one by one so
    that drift of a shared machine hits both alike; the ratio is the median of the pairs'."""
    import httpx
    from PIL import Image

    from server.engine import Engine

    rng = torch.Generator().manual_seed(0)
    arr = (torch.rand(240, 320, 3, generator=rng) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    adapter = random_adapter(net, sig, "http", density=0.005, seed=3)
    engine = Engine(net, sig, "cpu", "float32")
    prepared = engine.prepare(
        type("R", (), {"task": "http", "version": 1, "digest": "d"})(), adapter
    )
    tf = engine.transform_for()

    def local() -> None:
        engine.run(prepared, tf(Image.open(io.BytesIO(jpeg)))[None])

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "DELTACLIP_HOME": tmp, "DELTACLIP_BASE_MODEL": "ViT-B-16",
               "DELTACLIP_BASE_PRETRAINED": "random", "DELTACLIP_ADMIN_TOKEN": "bench", "DELTACLIP_PORT": "8765"}  # fmt: skip
        subprocess.run(
            [sys.executable, "-m", "adapters_store.cli", "db", "upgrade"],
            env=env,
            check=True,
            capture_output=True,
        )
        server = subprocess.Popen([sys.executable, "-m", "adapters_store.cli", "serve"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            with httpx.Client(base_url="http://127.0.0.1:8765", timeout=60) as c:
                for _ in range(600):
                    try:
                        if c.get("/readyz").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    time.sleep(0.2)
                r = c.post("/admin/adapters", files={"file": ("a", encode_adapter(adapter))},
                           headers={"Authorization": "Bearer bench"})  # fmt: skip
                r.raise_for_status()

                def call() -> None:
                    c.post(
                        "/predict?task=http", content=jpeg, headers={"content-type": "image/jpeg"}
                    ).raise_for_status()

                for _ in range(3):
                    call()
                    local()
                http, inproc = [], []
                for _ in range(repeat):
                    http += timeit(call, 1, warmup=0)
                    inproc += timeit(local, 1, warmup=0)
        finally:
            server.terminate()
            server.wait(30)
    return {"http_p50_ms": median(http) * 1e3, "http_p99_ms": p(http, 0.99) * 1e3,
            "inprocess_p50_ms": median(inproc) * 1e3, "inprocess_p99_ms": p(inproc, 0.99) * 1e3,
            "ratio": median([h / i for h, i in zip(http, inproc, strict=True)]),
            "ratio_of_medians": median(http) / median(inproc)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--clients", default="32,128,480", help="closed-loop clients per cell")
    ap.add_argument("--sections", default="swap,cold,throughput,http")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--merge", action="store_true", help="keep the other sections already in --out")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    net, sig = vit_b16()
    q = args.quick
    previous = json.loads(args.out.read_text()) if args.merge and args.out.exists() else {}
    out: dict[str, Any] = {**previous, "machine": machine(), "device": args.device}
    sections = set(args.sections.split(","))
    if "swap" in sections:
        out["swap"] = bench_swap(net, sig, args.device, repeat=40 if q else 300)
        print(json.dumps(out["swap"], indent=1), flush=True)
    if "cold" in sections:
        out["cold_load"] = bench_cold_load(net, sig, args.device, repeat=5 if q else 30)
        print(json.dumps(out["cold_load"], indent=1), flush=True)
    if "throughput" in sections:
        clients = [int(c) for c in args.clients.split(",")]
        out["throughput"] = bench_throughput(net, sig, args.device, 16, clients, q)
    if "http" in sections and not args.skip_http and args.device == "cpu":
        out["http"] = bench_http(net, sig, repeat=10 if q else 40)
        print(json.dumps(out["http"], indent=1), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
