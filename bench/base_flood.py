"""Question "base_flood": does a flood of ``GET /base`` slow down predictions?

    python -m bench base_flood [--flood 40] [--samples 200] [--base deltaclip-efflite0]

``/base`` needs no token, so it must be cheap: it serves the last check of the live weights from
memory (the worker re-checks between rounds at most every ``BASE_CHECK_S``). A real
``deltaclip serve`` process on the default base with one registered adapter answers batch-1
``/predict`` calls, one at a time, alternated sample by sample between two conditions: alone,
and with ``--flood`` concurrent ``GET /base`` calls fired at the same moment as the prediction.
The figure is the ratio of the prediction's median latency with the flood to without (target
≤ 1.5×; issue 24). The client shares the machine with the server, as a flood would.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from adapters_store.basenames import EFFLITE0
from bench.harness import (
    Result,
    add_common,
    base_spec,
    jpeg_bytes,
    load_base,
    median,
    p,
    wait_for_quiet,
)
from bench.servers import build_store, server


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser, base=EFFLITE0[0], reps=1)
    parser.add_argument("--flood", type=int, default=40, help="concurrent GET /base per sample")
    parser.add_argument("--samples", type=int, default=200, help="predictions per condition")
    parser.add_argument("--warmup", type=int, default=20, help="untimed predictions first")


def run(args: argparse.Namespace, result: Result) -> None:
    samples = 20 if args.quick else args.samples
    result.data.update(flood=args.flood, samples=samples)
    net, sig = load_base(args.base)
    with tempfile.TemporaryDirectory(prefix="deltaclip-base-flood-") as tmp:
        home = Path(tmp)
        result["store"] = build_store(home, net, sig, 1, density=0.005)
        del net
        with server(home, base_spec(args.base), args.device, max_batch=16) as url:
            result["load"] = wait_for_quiet(args.max_load, args.max_wait_s)
            result["base_flood"] = asyncio.run(measure(url, args.flood, samples, args.warmup))
    out = result["base_flood"]
    print(
        f"prediction p50 alone {out['alone_p50_ms']:.1f} ms, with {args.flood} concurrent "
        f"/base {out['flood_p50_ms']:.1f} ms: {out['ratio_p50']:.2f}x "
        f"(a burst of /base answered in {out['burst_p50_ms']:.1f} ms)",
        flush=True,
    )


async def measure(url: str, flood: int, samples: int, warmup: int) -> dict[str, Any]:
    import httpx

    jpeg = jpeg_bytes()
    flooder = Flooder(url, flood)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:

            async def predict() -> float:
                start = time.perf_counter()
                r = await client.post(
                    "/predict?task=t0&top_k=1",
                    content=jpeg,
                    headers={"content-type": "image/jpeg"},
                )
                assert r.status_code == 200, r.text
                return time.perf_counter() - start

            for _ in range(warmup):
                await predict()
            flooder.burst()
            flooder.wait()
            alone: list[float] = []
            flooded: list[float] = []
            bursts: list[float] = []
            for _ in range(samples):  # alternated, so a change of machine load hits both alike
                alone.append(await predict())
                flooder.burst()  # the flood's requests go out as the prediction does
                flooded.append(await predict())
                bursts.append(flooder.wait())
    finally:
        flooder.close()
    return {
        "alone_p50_ms": median(alone) * 1e3,
        "alone_p99_ms": p(alone, 0.99) * 1e3,
        "flood_p50_ms": median(flooded) * 1e3,
        "flood_p99_ms": p(flooded, 0.99) * 1e3,
        "ratio_p50": median(flooded) / median(alone),
        "burst_p50_ms": median(bursts) * 1e3,
        "base_calls": flood * samples,
        "target_ratio": 1.5,
    }


class Flooder:
    """A separate process holding ``n`` keep-alive connections to the server; each
    :meth:`burst` sends one ``GET /base`` on every connection at once and :meth:`wait` returns
    when all were answered 200 (raw sockets: the flood costs the client as little as possible,
    and none of it runs in the measuring process)."""

    def __init__(self, url: str, n: int) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        host, port = url.removeprefix("http://").split(":")
        self.proc = ctx.Process(target=_flood_main, args=(child, host, int(port), n), daemon=True)
        self.proc.start()
        assert self.conn.recv() == "ready"

    def burst(self) -> None:
        self.conn.send("go")

    def wait(self) -> float:
        answer = self.conn.recv()
        assert isinstance(answer, float), answer  # an error message otherwise
        return answer

    def close(self) -> None:
        self.conn.send("stop")
        self.proc.join(30)


def _flood_main(conn: Any, host: str, port: int, n: int) -> None:
    asyncio.run(_flood(conn, host, port, n))


async def _flood(conn: Any, host: str, port: int, n: int) -> None:
    request = f"GET /base HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    streams = [await asyncio.open_connection(host, port) for _ in range(n)]

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 "):
            raise RuntimeError(head[:100].decode(errors="replace"))
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)

    loop = asyncio.get_running_loop()
    conn.send("ready")
    while True:
        message = await loop.run_in_executor(None, conn.recv)
        if message == "stop":
            break
        start = time.perf_counter()
        try:
            await asyncio.gather(*(one(r, w) for r, w in streams))
        except Exception as exc:  # reported to the measuring process, which fails
            conn.send(f"{type(exc).__name__}: {exc}")
            break
        conn.send(time.perf_counter() - start)
    for _, writer in streams:
        writer.close()
