"""The swap question's exactness section: does the base come back bit for bit after many swaps?

For bfloat16 and float16 (a fresh ``Engine`` each), ``--cycles`` patch/restore cycles over the
given adapters with deltaclip's copy-restore, subtract-to-restore (in the serving dtype, and
upcast to float32) and PEFT LoRA merge/unmerge (``--lora-cycles``): max |W - W0|, how many
weights drifted, the first cycle that drifted, and whether the base fingerprint (docs/FORMAT.md)
still matches. Not a timing: it runs on one thread, so that on a shared machine the cycles do not
wait on a busy core.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import time
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from adapters_store.adapter import Adapter
from adapters_store.bases import base_fingerprint
from bench.harness import load_base
from bench.inplace import SubtractSwap
from bench.lora import build_peft, lora_params_per_rank, lora_rank_for

DTYPES = ("bfloat16", "float16")


def exactness(base: str, adapters: list[Adapter], args: argparse.Namespace) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    for dtype_name in DTYPES:
        rows.extend(_exactness_in(base, dtype_name, adapters, args))
        gc.collect()
    torch.set_num_threads(threads)
    return {"rows": rows, "adapter_densities": [a.meta.density for a in adapters]}


def _checkpoints(cycles: int) -> list[int]:
    return sorted({1, 10, 100, 1000, cycles} & set(range(1, cycles + 1)))


def _max_abs(
    flat: dict[torch.dtype, torch.Tensor], ref: dict[torch.dtype, torch.Tensor]
) -> tuple[float, int]:
    worst, count = 0.0, 0
    for d, buf in flat.items():
        diff = (buf.float() - ref[d].float()).abs()
        worst = max(worst, float(diff.max()))
        count += int((buf != ref[d]).sum())
    return worst, count


def _row(dtype: str, method: str, cycles: int, adapters: int, **fields: Any) -> dict[str, Any]:
    row = {"dtype": dtype, "method": method, "cycles": cycles, "adapters": adapters, **fields}
    print(json.dumps(row), flush=True)
    return row


def _exactness_in(
    base: str, dtype_name: str, adapters: list[Adapter], args: argparse.Namespace
) -> list[dict[str, Any]]:
    from server.engine import Engine

    cycles, points = args.cycles, _checkpoints(args.cycles)
    net, sig = load_base(base)
    base_visual = copy.deepcopy(cast(nn.Module, net.visual))
    engine = Engine(net, sig, args.device, dtype_name)
    patcher = engine.patcher
    flat0 = {d: b.clone() for d, b in patcher.flat.items()}
    preps = [patcher.prepare(a) for a in adapters]
    subs_dtype = [SubtractSwap(patcher, a, upcast=False) for a in adapters]
    subs_up = [SubtractSwap(patcher, a, upcast=True) for a in adapters]
    methods: dict[str, tuple[Callable[[int], None], Callable[[int], None]]] = {
        "deltaclip copy-restore": (
            lambda k: patcher.patch(preps[k]),
            lambda k: patcher.restore(preps[k]),
        ),
        "subtract, in serving dtype": (
            lambda k: subs_dtype[k].patch(),
            lambda k: subs_dtype[k].restore(),
        ),
        "subtract, float32 upcast": (lambda k: subs_up[k].patch(), lambda k: subs_up[k].restore()),
    }
    rows: list[dict[str, Any]] = []
    for name, (patch, restore) in methods.items():
        for d, buf in patcher.flat.items():
            buf.copy_(flat0[d])
        curve, first = {}, None
        checks = set(points) | set(range(1, 11))  # first drift: looked for at these cycles
        t0 = time.perf_counter()
        for c in range(1, cycles + 1):
            k = (c - 1) % len(preps)
            patch(k)
            restore(k)
            if first is None and c in checks:
                for d, idx in preps[k].indices.items():
                    if not torch.equal(patcher.flat[d][idx], flat0[d][idx]):
                        first = c
            if c in points:
                curve[c] = _max_abs(patcher.flat, flat0)[0]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        worst, drifted = _max_abs(patcher.flat, flat0)
        fp_ok = base_fingerprint(engine.net) == engine.serving_fingerprint
        # the task weights the drifted base now yields for adapter 0, against the definition
        patch(0)
        task_err = max(
            float((patcher.flat[d][idx].float() - preps[0].task_values[d].float()).abs().max())
            for d, idx in preps[0].indices.items()
        )
        restore(0)
        rows.append(
            _row(
                dtype_name,
                name,
                cycles,
                len(preps),
                max_abs_drift=worst,
                drifted_weights=drifted,
                first_drift_cycle=first,
                drift_by_cycle=curve,
                fingerprint_matches=fp_ok,
                task_weights_max_abs_error=task_err,
                seconds=elapsed,
            )
        )
    for d, buf in patcher.flat.items():
        buf.copy_(flat0[d])
    assert patcher.is_pristine()
    if args.lora_cycles:
        r = lora_rank_for(preps[0].nnz, lora_params_per_rank(base_visual))
        rows.append(_lora_drift(base_visual, r, engine.dtype, dtype_name, args))
    return rows


def _lora_drift(
    base_visual: nn.Module, r: int, dtype: torch.dtype, dtype_name: str, args: argparse.Namespace
) -> dict[str, Any]:
    """PEFT LoRA served merged (no per-forward cost): merge_adapter / unmerge_adapter cycles.
    Merge/unmerge touches only the LoRA layers' base weights: those are compared."""
    pm = build_peft(base_visual, {r: [f"r{r}a", f"r{r}b"]}, args.device, dtype)
    live = {
        n: m.base_layer.weight
        for n, m in pm.named_modules()
        if hasattr(m, "base_layer") and isinstance(m.base_layer, nn.Linear)
    }
    weights0 = {n: w.detach().clone() for n, w in live.items()}
    fp0 = base_fingerprint(pm)

    def drift() -> float:
        return max(float((live[n].float() - w.float()).abs().max()) for n, w in weights0.items())

    cycles = args.lora_cycles
    points = _checkpoints(cycles)
    checks = set(points) | set(range(1, 11))
    curve, first = {}, None
    t0 = time.perf_counter()
    with torch.inference_mode():
        for c in range(1, cycles + 1):
            pm.base_model.merge_adapter([f"r{r}{'ab'[(c - 1) % 2]}"])
            pm.base_model.unmerge_adapter()
            if c in checks:
                worst = drift()
                if first is None and worst > 0:
                    first = c
                if c in points:
                    curve[c] = worst
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    drifted = sum(int((live[n] != w).sum()) for n, w in weights0.items())
    return _row(
        dtype_name,
        f"PEFT LoRA merge/unmerge (r={r})",
        cycles,
        2,
        max_abs_drift=drift(),
        drifted_weights=drifted,
        first_drift_cycle=first,
        drift_by_cycle=curve,
        fingerprint_matches=base_fingerprint(pm) == fp0,
        task_weights_max_abs_error=None,
        seconds=elapsed,
    )
