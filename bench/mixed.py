"""Question "mixed": mixed-task batches (server/mixed.py) against grouped swaps and PEFT LoRA.

    python -m bench mixed [--sections correction,inprocess] [--base ViT-B-16] [--quick]

Sections:

* ``correction`` — what one task's correction adds to a batch-1 forward: the tower alone against
  the mixed forward with that task's correction on its one row, alternated call by call, per
  density (``--densities``) and form (unstructured, ``B = 16`` blocks); also the correction
  form's bytes per changed weight (key ``correction``);
* ``inprocess`` — a full queue in process: batches of ``--max-batch`` requests whose tasks are
  drawn uniformly or by Zipf popularity over N tasks (``--tasks``), run by the merged-model bound
  (the plain tower: one forward per batch), *grouped* (today's patched path: one swap and one
  forward per task group, current task first), *mixed* (one forward, every row's correction),
  *planner* (the server's planner with the cost model it measures at start-up) and, with
  ``--peft``, PEFT LoRA mixed ``adapter_names`` batches at the rank whose parameter count matches
  the adapters' changed weights. Images/s (heads included for deltaclip) and the ratio to the
  merged model, median of ``--reps`` repetitions with the methods interleaved (key ``inprocess``).
"""

from __future__ import annotations

import argparse
import copy
import json
from collections import deque
from functools import partial
from typing import Any, cast

import torch
from torch import nn

from adapters_store.synthetic import random_adapter
from adapters_store.transforms import native_size
from bench.harness import (
    Result,
    add_common,
    csv_list,
    fake_record,
    load_base,
    median,
    time_once,
    wait_for_quiet,
)
from bench.servers import fast_adapter, full_queue, tower_state

SECTIONS = ["correction", "inprocess"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p, sections=SECTIONS, base="ViT-B-16")
    p.add_argument("--densities", type=csv_list(float), default=[0.0005, 0.001, 0.005])
    p.add_argument("--tasks", type=csv_list(int), default=[1, 4, 16, 30, 64, 256])
    p.add_argument("--density", type=float, default=0.005, help="inprocess: adapters' density")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=3, help="inprocess: batches per cell and rep")
    p.add_argument("--peft", action="store_true", help="inprocess: add PEFT LoRA mixed batches")


def correction(net: nn.Module, sig: Any, args: argparse.Namespace) -> dict[str, Any]:
    from server.engine import Engine

    engine = Engine(net, sig, args.device, "float32")
    size = native_size(net)
    x = torch.randn(1, 3, size, size, device=args.device)
    sync = args.device.startswith("cuda")
    rows = []
    for density in args.densities:
        for block in (1, 16):
            adapter = random_adapter(net, sig, "c", density=density, seed=1, block_size=block)
            prepared = engine.prepare(fake_record("c"), adapter)
            corr = prepared.correction
            assert corr is not None
            plain = partial(engine.features, x)
            mixed = partial(engine.run_mixed, [(corr, 1)], x)
            load = wait_for_quiet(args.max_load, args.max_wait_s)
            plain(), mixed()
            pairs = [(time_once(plain, sync), time_once(mixed, sync)) for _ in range(5 * args.reps)]
            row = {
                "density": density,
                "block": block,
                "nnz": corr.nnz,
                "bytes_per_weight": round(corr.bytes_per_weight, 2),
                "forward_ms": round(median([a for a, _ in pairs]) * 1e3, 2),
                "mixed_ms": round(median([b for _, b in pairs]) * 1e3, 2),
                "extra_share": round(median([b / a - 1 for a, b in pairs]), 4),
                "load": load,
            }
            print("   ", json.dumps(row), flush=True)
            rows.append(row)
    assert engine.patcher.is_pristine()
    return {"rows": rows}


def inprocess(net: nn.Module, sig: Any, args: argparse.Namespace) -> dict[str, Any]:
    from server.engine import Engine
    from server.planner import MIXED, MixSpec, Planner, measure_costs
    from server.work import Job

    device, sync, b = args.device, args.device.startswith("cuda"), args.max_batch
    n_max = max(args.tasks)
    base_visual = copy.deepcopy(cast(nn.Module, net.visual)).eval()
    base = tower_state(net)
    adapters = [fast_adapter(base, sig, f"t{i}", args.density, seed=1000 + i) for i in range(n_max)]
    engine = Engine(net, sig, device, "float32")
    prepared = [engine.prepare(fake_record(f"t{i}", f"d{i}"), a) for i, a in enumerate(adapters)]
    calibration_load = wait_for_quiet(args.max_load, args.max_wait_s)  # as the server would start
    cost = measure_costs(engine, b)
    planner = Planner(cost, b, engine.run_mixed)
    size = native_size(net)
    x = torch.randn(b, 3, size, size, device=device)
    plain = base_visual.to(device)

    def groups_of(tasks: list[int]) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = {}
        for pos, t in enumerate(tasks):
            groups.setdefault(t, []).append(pos)
        return groups

    @torch.inference_mode()
    def grouped(tasks: list[int]) -> None:
        current = engine.current.task if engine.current is not None else None
        groups = groups_of(tasks)
        for t in sorted(groups, key=lambda t: f"t{t}" != current):
            engine.run(prepared[t], x[groups[t]])

    @torch.inference_mode()
    def mixed(tasks: list[int]) -> None:
        features = engine.run_mixed([(prepared[t].correction, 1) for t in tasks], x)
        for row, t in enumerate(tasks):
            engine.head_probs(prepared[t], features[row : row + 1])

    @torch.inference_mode()
    def planned(tasks: list[int]) -> None:
        jobs: dict[Any, deque[Job]] = {}
        for row, t in enumerate(tasks):
            p = prepared[t]
            spec = MixSpec(p.correction, partial(engine.head_probs, p))
            job = Job(t, partial(engine.run, p), x[row : row + 1], None, None, None, mix=spec)  # type: ignore[arg-type]
            jobs.setdefault(t, deque()).append(job)
        current = next((t for t in jobs if prepared[t] is engine.current), None)
        planner.split(jobs, current)
        for key, queue in jobs.items():
            rows = torch.cat([j.images for j in queue])
            if key == MIXED:
                features = engine.run_mixed([(j.mix.correction, 1) for j in queue], rows)
                for row, j in enumerate(queue):
                    j.mix.head(features[row : row + 1])
            else:
                engine.run(prepared[cast(int, key)], rows)

    @torch.inference_mode()
    def merged(tasks: list[int]) -> None:
        plain(x)

    methods = {"merged": merged, "grouped": grouped, "mixed": mixed, "planner": planned}
    extra: dict[str, Any] = {}
    if args.peft:
        from bench.lora import build_peft, lora_params_per_rank, lora_rank_for

        per_rank = lora_params_per_rank(base_visual)
        r = lora_rank_for(int(sum(a.meta.nnz for a in adapters) / n_max), per_rank)
        pm = build_peft(
            copy.deepcopy(base_visual), {r: [f"t{i}" for i in range(n_max)]}, device, torch.float32
        )
        methods["peft_mixed"] = torch.inference_mode()(
            lambda tasks: pm(x, adapter_names=[f"t{t}" for t in tasks])
        )
        extra = {"lora_rank": r, "lora_params": r * per_rank}
    cells = [(1, "uniform")] + [(n, k) for n in args.tasks if n > 1 for k in ("uniform", "zipf")]
    times, loads = full_queue(
        methods,
        cells,
        batch=b,
        batches=args.batches,
        reps=args.reps,
        sync=sync,
        wait=partial(wait_for_quiet, args.max_load, args.max_wait_s),
        warm_tasks=min(4, n_max),
    )
    engine.restore_base()
    assert engine.patcher.is_pristine()
    rows = []
    for n, kind in cells:
        row: dict[str, Any] = {"n": n, "popularity": kind}
        for name in methods:
            row[f"{name}_img_s"] = round(median(times[(n, kind, name)]), 2)
            ratios = [
                a / m
                for a, m in zip(times[(n, kind, name)], times[(n, kind, "merged")], strict=True)
            ]
            row[f"{name}_vs_merged"] = round(median(ratios), 3)
        rows.append(row)
        print("   ", json.dumps(row), flush=True)
    return {
        "rows": rows,
        "density": args.density,
        "batch": b,
        "batches_per_cell": args.batches,
        "cost_model": vars(cost),
        "cost_model_load": calibration_load,
        "loads": loads,
        **extra,
    }


def run(args: argparse.Namespace, result: Result) -> None:
    net, sig = load_base(args.base)
    if "correction" in args.sections:
        result["correction"] = correction(copy.deepcopy(net), sig, args)
        result.save()
    if "inprocess" in args.sections:
        result["inprocess"] = inprocess(net, sig, args)
        result.save()
