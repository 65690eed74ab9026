"""Block adapters against unstructured ones: switch cost as served and cold load, by block size.

Used by ``python -m bench swap --sections blocks,cold_blocks --block-sizes 1,4,16``: for every
block size ``B`` and density, two synthetic adapters of the ``--base`` tower (``B = 1`` is the
unstructured residual; above 1 whole blocks of ``B`` consecutive weights change) are alternated,
so every timed call is a real task switch.

* ``blocks`` — patch + restore *between forwards* (each after a batch-1 forward has streamed the
  tower through the caches, as the serving worker does it) and in isolation (cache-warm), as a
  share of one batch-1 forward measured in the same repetition;
* ``cold_blocks`` — store → prepared (read, SHA-256 verify, decode, validate, prepare) per
  ``B`` and density, through the real registry on a fresh SQLite catalog.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from adapters_store.format.codec import encode_adapter
from adapters_store.serving_base import ServingBase
from adapters_store.synthetic import random_adapter
from adapters_store.transforms import native_size
from bench.harness import Blocks, median, p, print_table, time_once, timeit, wait_for_quiet


def served_cycles(
    engine: Any, preps: Sequence[Any], x: torch.Tensor, n: int, sync: bool
) -> list[float]:
    """``n`` patch + restore times as serving pays them: each after a forward pass has streamed
    the whole tower through the caches (an isolated loop re-writes the same, cache-warm lines).
    ``preps`` alternate, so every patch is a real switch; the first, warm-up cycle is dropped."""
    patcher, out = engine.patcher, []
    for i in range(n + 1):
        prep = preps[i % len(preps)]
        engine.features(x)
        t = time_once(partial(patcher.patch, prep), sync)
        engine.features(x)
        t += time_once(partial(patcher.restore, prep), sync)
        out.append(t)
    return out[1:]


def _adapters(
    net: Any, sig: Any, args: argparse.Namespace, per: int = 2
) -> dict[tuple[int, float], list[Any]]:
    """``per`` synthetic adapters for every block size and density (seeded: equal across runs)."""
    return {
        (b, d): [
            random_adapter(
                net, sig, f"b{b}t{i}", density=d, seed=1000 * b + 10 * i + j, block_size=b
            )
            for i in range(1, per + 1)
        ]
        for b in args.block_sizes
        for j, d in enumerate(args.densities)
    }


def block_swap(net: Any, sig: Any, args: argparse.Namespace) -> dict[str, Any]:
    from server.engine import Engine

    engine = Engine(net, sig, args.device, "float32")
    patcher, sync = engine.patcher, args.device.startswith("cuda")
    prepared = {
        k: [patcher.prepare(a) for a in ads] for k, ads in _adapters(net, sig, args).items()
    }
    x = torch.randn(1, 3, native_size(net), native_size(net), device=args.device)
    blocks = Blocks(sync=sync)

    def alternate(preps: list[Any]) -> Callable[[], None]:
        state = [0]

        def cycle() -> None:
            state[0] ^= 1
            patcher.patch(preps[state[0]])
            patcher.restore(preps[state[0]])

        return cycle

    for rep in range(args.reps):
        blocks.loads.append(wait_for_quiet(args.max_load, args.max_wait_s))
        print(f"blocks rep {rep + 1}/{args.reps} (load {blocks.loads[-1]['load1']})", flush=True)
        blocks.time("forward_b1", lambda: engine.features(x), args.served)
        for (b, d), preps in prepared.items():
            blocks.time(f"isolated@{b}@{d}", alternate(preps), args.repeat)
            blocks.add(
                f"between_forwards@{b}@{d}", served_cycles(engine, preps, x, args.served, sync)
            )
        assert patcher.is_pristine(), "the patcher must leave the base bit-identical"
    rows = []
    for (b, d), preps in prepared.items():
        rows.append(
            {
                "block_size": b,
                "density": d,
                "nnz": preps[0].nnz,
                "prepared_bytes": preps[0].nbytes,
                "between_forwards": blocks.summary(f"between_forwards@{b}@{d}", "forward_b1"),
                "isolated": blocks.summary(f"isolated@{b}@{d}", "forward_b1"),
            }
        )
    print_table(
        [
            "B",
            "density",
            "changed weights",
            "as served p50 ms",
            "% of forward",
            "isolated p50 ms",
            "% of forward",
        ],
        [
            [
                str(r["block_size"]),
                f"{r['density']:.2%}",
                f"{r['nnz']:,}",
                f"{r['between_forwards']['p50_ms']:.2f}",
                f"{100 * r['between_forwards']['vs_forward_b1']:.2f}",
                f"{r['isolated']['p50_ms']:.3f}",
                f"{100 * r['isolated']['vs_forward_b1']:.3f}",
            ]
            for r in rows
        ],
    )
    return {
        "forward_b1": blocks.summary("forward_b1"),
        "rows": rows,
        "loads": blocks.loads,
        "served_samples": args.served,
        "isolated_samples": args.repeat,
        "definition": "one task switch = restore the previous adapter + patch the next, "
        "alternating two adapters of the same block size and density",
    }


def block_cold_load(net: Any, sig: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Store → prepared per block size and density, through the real registry (fresh SQLite)."""
    from adapters_store.catalog import upgrade
    from adapters_store.config import StoreSettings
    from adapters_store.registry import Registry
    from server.engine import Engine

    rows = []
    base = ServingBase.of(net, sig)
    engine = Engine(net, sig, args.device, "float32")
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/c.db"
        upgrade(url)
        reg = Registry.from_settings(StoreSettings(home=Path(tmp), database_url=url))
        for (b, d), ads in _adapters(net, sig, args, per=1).items():
            record = reg.register(encode_adapter(ads[0]), base).record
            times = timeit(lambda r=record: engine.prepare(r, reg.load(r, base)), args.served)
            rows.append(
                {
                    "block_size": b,
                    "density": d,
                    "nnz": record.nnz,
                    "bytes": record.size_bytes,
                    "p50_ms": median(times) * 1e3,
                    "p99_ms": p(times, 0.99) * 1e3,
                }
            )
            print(rows[-1], flush=True)
        reg.close()
    return {"rows": rows, "samples": args.served}
