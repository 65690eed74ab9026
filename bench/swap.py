"""Question "swap": what switching the served task costs, against the alternatives.

    python -m bench swap [--sections swap,cold,exactness] [--methods ...] [--alternate 2]

Sections:

* ``swap`` — one task switch, at each of ``--densities``, on the ``--base`` image tower (seeded
  random ViT-B-16 by default: the real architecture and sizes, no download), timed by method:
  deltaclip's fused patch+restore (and the same prepared data written with ``index_put_``,
  ``scatter_`` or numpy: ``candidates``), the per-tensor Python loop it replaced (``loop``),
  subtract-to-restore (``subtract``), the first three again on one thread (``one_thread``),
  deltaclip's switch *between forward passes* as serving does it (``between_forwards``: each
  forward has streamed the tower through the caches first), a dense task copy loaded with
  ``load_state_dict`` from memory and from a safetensors file (``dense``), and PEFT LoRA at a
  matched parameter count (``peft``: ``set_adapter``, both hotswaps, merge/unmerge, and the
  extra forward cost of an unmerged LoRA). ``--alternate 2`` alternates two adapters per density,
  so every timed call is a real switch; ``--alternate 1`` patches and restores the same adapter
  (cache-warm, "in isolation"). Cells: p50 (median of the per-repetition medians) and p99 (all
  samples) in ms, and as a share of one batch-1 forward (``vs_forward_b1``).
* ``cold`` — store → prepared for a 0.5 % adapter: read, SHA-256 verify, decode, validate, prepare.
* ``exactness`` — base drift after ``--cycles`` patch/restore cycles in bfloat16 and float16
  (bench/exactness.py).
* ``blocks``, ``cold_blocks`` — block adapters (``--block-sizes``, 1 = unstructured) at each
  density: patch + restore as served between forwards and in isolation, and cold load
  (bench/swap_blocks.py).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from adapters_store.adapter import Adapter
from adapters_store.format.codec import encode_adapter
from adapters_store.synthetic import random_adapter
from adapters_store.transforms import native_size
from bench.exactness import exactness
from bench.harness import (
    DENSITIES,
    Blocks,
    Result,
    add_common,
    csv_list,
    load_base,
    median,
    p,
    timeit,
    wait_for_quiet,
)
from bench.inplace import SubtractSwap, loop_swap, per_tensor
from bench.lora import lora_params_per_rank, lora_rank_for
from bench.swap_alternatives import Alternatives, alternate
from bench.swap_blocks import block_cold_load, block_swap, served_cycles

METHODS = [
    "deltaclip",
    "candidates",
    "loop",
    "subtract",
    "one_thread",
    "between_forwards",
    "dense",
    "peft",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p, sections=["swap", "cold", "exactness", "blocks", "cold_blocks"], base="ViT-B-16")
    p.add_argument(
        "--methods",
        type=csv_list(str),
        default=METHODS,
        help=f"swap methods (default: {','.join(METHODS)})",
    )
    p.add_argument("--densities", type=csv_list(float), default=list(DENSITIES))
    p.add_argument(
        "--alternate", type=int, choices=(1, 2), default=2, help="adapters alternated per density"
    )
    p.add_argument(
        "--repeat", type=int, default=100, help="timed switches per block (fast methods)"
    )
    p.add_argument("--cycles", type=int, default=1000, help="swap cycles for exactness")
    p.add_argument("--lora-cycles", type=int, default=200, help="LoRA merge/unmerge cycles")
    p.add_argument(
        "--block-sizes",
        type=csv_list(int),
        default=[1, 4, 16],
        help="blocks sections: B (1 = unstructured)",
    )
    p.add_argument(
        "--served",
        type=int,
        default=9,
        help="blocks sections: switches between forwards, cold loads",
    )


def run(args: argparse.Namespace, result: Result) -> None:
    if args.quick:
        args.reps, args.repeat = min(args.reps, 2), min(args.repeat, 40)
        args.cycles, args.lora_cycles = min(args.cycles, 40), min(args.lora_cycles, 10)
        args.served = min(args.served, 3)
    net, sig = load_base(args.base)
    for section, measure in (("blocks", block_swap), ("cold_blocks", block_cold_load)):
        if section in args.sections:  # block adapters by B (bench/swap_blocks.py)
            result[section] = measure(net, sig, args)
            result.save()
    if not {"swap", "cold", "exactness"} & set(args.sections):
        return
    base_visual = copy.deepcopy(cast(nn.Module, net.visual)).eval()
    adapters = {
        d: [random_adapter(net, sig, f"t{i}", density=d, seed=10 * i + j) for i in (1, 2)]
        for j, d in enumerate(args.densities)
    }
    if "swap" in args.sections:
        used = {d: ads[: args.alternate] for d, ads in adapters.items()}
        result["swap"] = swap(net, sig, base_visual, used, args)
        result.save()
    if "cold" in args.sections:
        result["cold_load"] = cold_load(net, sig, args)
        result.save()
    if "exactness" in args.sections:
        largest = sorted(args.densities)[-2:]  # 0.5 % and 1 % by default
        result["exactness"] = exactness(args.base, [a for d in largest for a in adapters[d]], args)


def swap(
    net: Any,
    sig: Any,
    base_visual: Any,
    adapters: dict[float, list[Adapter]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    from server.engine import Engine

    device, methods = args.device, set(args.methods)
    engine = Engine(net, sig, device, "float32")
    patcher = engine.patcher
    blocks = Blocks(sync=device.startswith("cuda"))
    r = args.repeat
    n = {"fast": r, "mid": max(3, 3 * r // 10), "slow": max(3, r // 20), "between": max(3, r // 15)}
    per_rank = lora_params_per_rank(base_visual)
    ranks = {d: lora_rank_for(ads[0].meta.nnz, per_rank) for d, ads in adapters.items()}
    prepared = {d: [patcher.prepare(a) for a in ads] for d, ads in adapters.items()}
    loops = {d: [per_tensor(engine, a) for a in ads] for d, ads in adapters.items()}
    # subtract-to-restore drifts (even in float32): it runs on a same-size copy of the buffers
    scratch = {dt: b.clone() for dt, b in patcher.flat.items()}
    subtract = {
        d: [SubtractSwap(patcher, a, upcast=False, flat=scratch) for a in ads]
        for d, ads in adapters.items()
    }
    x = torch.randn(1, 3, native_size(net), native_size(net), device=device)

    def fused(prep: Any) -> Callable[[], None]:
        def cycle() -> None:
            patcher.patch(prep)
            patcher.restore(prep)

        return cycle

    def fused_with(op: str, prep: Any) -> Callable[[], None]:
        """deltaclip's prepared data written with another exact scatter than ``index_copy_``."""

        def write(values: dict[torch.dtype, torch.Tensor]) -> None:
            for dtype, idx in prep.indices.items():
                if op == "index_put_":
                    patcher.flat[dtype].index_put_((idx,), values[dtype])
                elif op == "numpy":  # CPU, float32: numpy's fancy assignment (a plain C loop)
                    patcher.flat[dtype].numpy()[idx.numpy()] = values[dtype].numpy()
                else:
                    patcher.flat[dtype].scatter_(0, idx, values[dtype])

        def cycle() -> None:
            write(prep.task_values)
            write(prep.original_values)

        return cycle

    ops = ["index_put_", "scatter_", *(["numpy"] if device == "cpu" else [])]
    timed_inplace: dict[str, Callable[[float], list[Callable[[], Any]]]] = {
        "deltaclip": lambda d: [fused(pr) for pr in prepared[d]],
        "loop": lambda d: [partial(loop_swap, parts) for parts in loops[d]],
        "subtract": lambda d: [s.cycle for s in subtract[d]],
    }
    alts = Alternatives(base_visual, adapters, ranks, args) if methods & {"dense", "peft"} else None
    for rep in range(args.reps):
        blocks.loads.append(wait_for_quiet(args.max_load, args.max_wait_s))
        print(f"swap rep {rep + 1}/{args.reps} (load {blocks.loads[-1]['load1']})", flush=True)
        blocks.time("forward_b1", lambda: engine.features(x), n["slow"])
        for d in args.densities:
            for name, fns in timed_inplace.items():
                if name in methods:
                    blocks.time(
                        f"{name}@{d}", alternate(fns(d)), n["mid" if name == "loop" else "fast"]
                    )
            if "candidates" in methods:
                for op in ops:
                    blocks.time(
                        f"deltaclip_{op}@{d}",
                        alternate([fused_with(op, pr) for pr in prepared[d]]),
                        n["fast"],
                    )
            if "one_thread" in methods:
                # short scatters pay for a 2-thread region when the other core is busy (a shared
                # machine), which a serial loop of small ops avoids
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                for name, fns in timed_inplace.items():
                    blocks.time(
                        f"{name}_1t@{d}", alternate(fns(d)), n["mid" if name == "loop" else "fast"]
                    )
                torch.set_num_threads(threads)
            if "between_forwards" in methods:
                blocks.add(
                    f"between_forwards@{d}",
                    served_cycles(engine, prepared[d], x, n["between"], blocks.sync),
                )
        if alts is not None:
            alts.time(blocks, engine, x, n, methods)
        assert patcher.is_pristine(), "deltaclip's patcher must leave the base bit-identical"
    if alts is not None:
        alts.close()
    rows = []
    for d in args.densities:
        r = ranks[d]
        row: dict[str, Any] = {
            "density": d,
            "nnz": prepared[d][0].nnz,
            "lora_rank": r,
            "lora_params": r * per_rank,
        }
        for key in [k for k in blocks.samples if k.endswith((f"@{d}", f"@r{r}")) or "@" not in k]:
            method = key.split("@")[0]
            if method == "forward_b1_pair":
                row["forward_b1_paired"] = blocks.summary(key)
            elif method == "lora_forward_b1":
                row[method] = blocks.summary(key, f"forward_b1_pair@r{r}")
            elif method != "forward_b1":
                row[method] = blocks.summary(key, "forward_b1")
        rows.append(row)
    return {
        "forward_b1": blocks.summary("forward_b1"),
        "rows": rows,
        "loads": blocks.loads,
        "alternate": args.alternate,
        "lora_params_per_rank": per_rank,
        "definition": "one task switch: in-place methods restore the previous task and patch the "
        "next (one patch+restore cycle); dense: one load_state_dict of the next task's full state; "
        "PEFT set_adapter / hotswap: one call; PEFT merged: unmerge + merge",
    }


def cold_load(net: Any, sig: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Store → prepared for a 0.5 % adapter, through the real registry on a fresh SQLite catalog."""
    from adapters_store.catalog import upgrade
    from adapters_store.config import StoreSettings
    from adapters_store.registry import Registry
    from adapters_store.serving_base import ServingBase
    from server.engine import Engine

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/c.db"
        upgrade(url)
        reg = Registry.from_settings(StoreSettings(home=Path(tmp), database_url=url))
        adapter = random_adapter(net, sig, "cold", density=0.005, seed=2)
        base = ServingBase.of(net, sig)
        record = reg.register(encode_adapter(adapter), base).record
        engine = Engine(net, sig, args.device, "float32")
        times = timeit(
            lambda: engine.prepare(record, reg.load(record, base)), max(3, 3 * args.repeat // 10)
        )
        reg.close()
    engine.restore_base()
    return {
        "nnz": record.nnz,
        "bytes": record.size_bytes,
        "p50_ms": median(times) * 1e3,
        "p99_ms": p(times, 0.99) * 1e3,
    }
