"""deltaclip side by side with what users would pick instead (issue: alternatives benchmark).

    .venv/bin/python bench/alternatives.py [--device cpu|cuda] [--quick] [--out docs/bench/alternatives.json]

All on the seeded random ViT-B-16 image tower (bench/common.py: the real architecture and sizes,
86.2 M weights) with synthetic RST-like residuals (adapters_store.synthetic), in one process:

1. swap: the cost of switching the served task, at 0.05 / 0.1 / 0.5 / 1 % changed weights, for
   deltaclip's fused patch+restore, the per-tensor Python loop (bench/serving.py), subtract-to-
   restore (add the residual, subtract it again, on the same flat buffer), a dense task copy
   loaded with ``load_state_dict`` (from memory and from a safetensors file), and PEFT LoRA on the
   MLP Linear layers at a matched parameter count (``set_adapter``, ``hotswap_adapter`` from a
   saved adapter and ``hotswap_adapter_from_state_dict`` in memory, and merge/unmerge), plus the
   extra forward cost an unmerged LoRA pays; p50 / p99 and as a ratio to a batch-1 forward.
2. exactness: base drift after 1,000 patch/restore cycles in bfloat16 and float16 for subtract-
   to-restore (in the serving dtype, and upcast to float32) and LoRA merge/unmerge, against
   deltaclip's copy-restore: max |W - W0|, drifted weights, and whether the fingerprint matches.
3. memory: resident bytes per prepared adapter (``PreparedAdapter.nbytes`` and measured RSS growth
   over 50 prepared copies), adapters per GiB, against a dense copy per task and a LoRA adapter.
4. storage: bytes per task in format v1 against the reference implementation's format (a pickle
   of ``torch.sparse_coo_tensor`` residuals, ~20 bytes per changed weight of a 2-D weight).

Timings: ``torch.set_num_threads`` (2 on the CPU machine), warm-up, every measurement block
repeated ``--reps`` times (3) with the alternatives interleaved inside each repetition; reported
p50 is the median of the per-repetition medians, p99 is over all samples pooled. Before each
block the script waits (up to ``--max-wait-s``) for the 1-minute load average to fall below
``--max-load`` and records it.
"""

from __future__ import annotations

import argparse
import copy
import gc
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish_run, machine, median, p, timeit, vit_b16
from serving import _loop_swap, _per_tensor

from adapters_store.adapter import Adapter, merge_state
from adapters_store.bases import base_fingerprint
from adapters_store.format.codec import encode_adapter
from adapters_store.synthetic import random_adapter

DENSITIES = (0.0005, 0.001, 0.005, 0.01)
LORA_TARGETS = ["c_fc", "c_proj"]
ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------ shared helpers


def wait_for_quiet(max_load: float, max_wait_s: float, poll_s: float = 10.0) -> dict[str, Any]:
    """Wait until the 1-minute load average is below ``max_load`` (or ``max_wait_s`` passed)."""
    start = time.monotonic()
    while True:
        load = os.getloadavg()[0]
        waited = time.monotonic() - start
        if load < max_load or waited >= max_wait_s:
            return {"load1": round(load, 2), "waited_s": round(waited, 1), "quiet": load < max_load}
        print(f"  load average {load:.2f} ≥ {max_load}: waiting", flush=True)
        time.sleep(max(0.1, min(poll_s, max_wait_s - waited)))


class Blocks:
    """Samples per named measurement over repetitions: p50 = median of repetition medians,
    p99 over all samples pooled."""

    def __init__(self, sync: bool) -> None:
        self.sync = sync
        self.samples: dict[str, list[float]] = {}
        self.rep_medians: dict[str, list[float]] = {}
        self.loads: list[dict[str, Any]] = []

    def time(self, name: str, fn: Callable[[], Any], repeat: int, warmup: int = 2) -> None:
        times = timeit(fn, max(3, repeat), warmup=warmup, sync=self.sync)
        self.samples.setdefault(name, []).extend(times)
        self.rep_medians.setdefault(name, []).append(median(times))

    def time_pair(
        self, names: tuple[str, str], fns: tuple[Callable[[], Any], Callable[[], Any]], repeat: int
    ) -> None:
        """Two measurements interleaved call by call, so a change of machine load hits both."""
        for fn in fns:
            fn()
        times: tuple[list[float], list[float]] = ([], [])
        for _ in range(max(3, repeat)):
            for out, fn in zip(times, fns, strict=True):
                out.extend(timeit(fn, 1, warmup=0, sync=self.sync))
        for name, ts in zip(names, times, strict=True):
            self.samples.setdefault(name, []).extend(ts)
            self.rep_medians.setdefault(name, []).append(median(ts))

    def p50(self, name: str) -> float:
        return median(self.rep_medians[name])

    def summary(self, name: str, forward: str | None = None) -> dict[str, Any]:
        out = {
            "p50_ms": self.p50(name) * 1e3,
            "p99_ms": p(self.samples[name], 0.99) * 1e3,
            "rep_p50_ms": [m * 1e3 for m in self.rep_medians[name]],
            "samples": len(self.samples[name]),
        }
        if forward is not None:
            out["vs_forward_b1"] = self.p50(name) / self.p50(forward)
            out["p99_vs_forward_b1"] = p(self.samples[name], 0.99) / self.p50(forward)
        return out


def fake_record(task: str) -> Any:
    return type("Record", (), {"task": task, "version": 1, "digest": f"digest-{task}"})()


def lora_linears(tower: nn.Module) -> dict[str, nn.Linear]:
    return {
        name: m
        for name, m in tower.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS
    }


def lora_params_per_rank(tower: nn.Module) -> int:
    """LoRA parameters per unit of rank on the targeted Linear layers: sum of (in + out)."""
    return sum(m.in_features + m.out_features for m in lora_linears(tower).values())


def lora_rank_for(nnz: int, per_rank: int) -> int:
    """The rank whose LoRA parameter count is nearest to ``nnz`` changed weights (at least 1)."""
    return max(1, round(nnz / per_rank))


def flat_residual(
    patcher: Any, adapter: Adapter
) -> dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]]:
    """Global indices and float32 deltas per flat buffer, in the order ``FlatPatcher.prepare`` uses."""
    idx: dict[torch.dtype, list[torch.Tensor]] = {}
    delta: dict[torch.dtype, list[torch.Tensor]] = {}
    for key, res in sorted(adapter.residual.items()):
        dtype, start, _ = patcher.offsets[key]
        idx.setdefault(dtype, []).append(res.indices.to(torch.int64) + start)
        delta.setdefault(dtype, []).append(res.values.float())
    return {
        d: (torch.cat(idx[d]).to(patcher.device), torch.cat(delta[d]).to(patcher.device))
        for d in idx
    }


class SubtractSwap:
    """Subtract-to-restore on deltaclip's own flat buffers (so only the restore rule differs):
    patch adds the residual, restore subtracts it. ``upcast``: each step computed in float32 and
    rounded once to the serving dtype (the patch then equals the format's task weights exactly);
    otherwise ``index_add_`` of the residual rounded to the serving dtype."""

    def __init__(
        self,
        patcher: Any,
        adapter: Adapter,
        upcast: bool,
        flat: dict[torch.dtype, torch.Tensor] | None = None,
    ) -> None:
        self.flat = patcher.flat if flat is None else flat
        self.upcast = upcast
        self.parts = []
        for dtype, (idx, delta) in flat_residual(patcher, adapter).items():
            self.parts.append((dtype, idx, delta, delta.to(dtype), (-delta).to(dtype)))

    def patch(self) -> None:
        for dtype, idx, delta, plus, _ in self.parts:
            if self.upcast:
                buf = self.flat[dtype]
                buf.index_copy_(0, idx, (buf[idx].float() + delta).to(dtype))
            else:
                self.flat[dtype].index_add_(0, idx, plus)

    def restore(self) -> None:
        for dtype, idx, delta, _, minus in self.parts:
            if self.upcast:
                buf = self.flat[dtype]
                buf.index_copy_(0, idx, (buf[idx].float() - delta).to(dtype))
            else:
                self.flat[dtype].index_add_(0, idx, minus)

    def cycle(self) -> None:
        self.patch()
        self.restore()


def build_peft(base_visual: nn.Module, ranks: list[int], device: str, dtype: torch.dtype) -> Any:
    """A PeftModel over a copy of the tower with two LoRA adapters (``r{r}a``, ``r{r}b``) per rank
    on the MLP Linear layers. Weights are random (``init_lora_weights=False``) with B scaled so
    that B·A is a few percent of |W|, like the sparse residuals."""
    from peft import LoraConfig, get_peft_model

    tower = copy.deepcopy(base_visual).to(device, dtype)
    pm: Any = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for r in sorted(set(ranks)):
            cfg = LoraConfig(
                r=r, lora_alpha=r, target_modules=LORA_TARGETS, init_lora_weights=False
            )
            for suffix in "ab":
                name = f"r{r}{suffix}"
                if pm is None:
                    pm = get_peft_model(tower, cfg, adapter_name=name)
                else:
                    pm.add_adapter(name, cfg)
    with torch.no_grad():
        for pname, param in pm.named_parameters():
            if ".lora_B." in pname:
                param.mul_(0.02)
    return pm.to(device, dtype).eval()


def lora_state(pm: Any, name: str, as_name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s LoRA tensors, keyed as if they belonged to adapter ``as_name``."""
    return {
        k.replace(f".{name}.", f".{as_name}."): v.detach().clone()
        for k, v in pm.state_dict().items()
        if ".lora_" in k and f".{name}." in k
    }


def sync_if(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------ 1. swap cost


@dataclass
class SwapSetup:
    engine: Any
    base_visual: nn.Module
    adapters: dict[float, list[Adapter]]
    ranks: dict[float, int]
    per_rank: int


def bench_swap(setup: SwapSetup, args: argparse.Namespace) -> dict[str, Any]:
    from peft.utils.hotswap import hotswap_adapter, hotswap_adapter_from_state_dict
    from safetensors.torch import load_file, save_file

    device, q = args.device, args.quick
    sync = device.startswith("cuda")
    engine, patcher = setup.engine, setup.engine.patcher
    blocks = Blocks(sync)
    n = {
        "fast": 40 if q else 100,
        "mid": 15 if q else 30,
        "slow": 3 if q else 5,
        "file": 3 if q else 4,
    }

    # deltaclip, the per-tensor loop and subtract-to-restore, per density (two adapters each,
    # alternated, so each timed call is one task switch: restore the old, patch the new)
    prepared = {d: [patcher.prepare(a) for a in ads] for d, ads in setup.adapters.items()}
    loops = {d: [_per_tensor(engine, a) for a in ads] for d, ads in setup.adapters.items()}
    # subtract-to-restore drifts (even in float32): it runs on a same-size copy of the buffers
    scratch = {d: b.clone() for d, b in patcher.flat.items()}
    subtract = {d: [SubtractSwap(patcher, a, upcast=False, flat=scratch) for a in ads] for d, ads in setup.adapters.items()}  # fmt: skip

    def alternate(fns: list[Callable[[], Any]]) -> Callable[[], None]:
        state = [0]

        def step() -> None:
            state[0] ^= 1
            fns[state[0]]()

        return step

    def fused(prep: Any) -> Callable[[], None]:
        return lambda: (patcher.patch(prep), patcher.restore(prep))

    def fused_with(op: str, prep: Any) -> Callable[[], None]:
        """deltaclip's prepared data written with another exact scatter than ``index_copy_``
        (candidates for the patcher on CPU): ``index_put_``, ``scatter_`` or numpy assignment."""

        def write(values: dict[torch.dtype, torch.Tensor]) -> None:
            for dtype, idx in prep.indices.items():
                if op == "index_put_":
                    patcher.flat[dtype].index_put_((idx,), values[dtype])
                elif op == "numpy":  # CPU, float32: numpy's fancy assignment (a plain C loop)
                    patcher.flat[dtype].numpy()[idx.numpy()] = values[dtype].numpy()
                else:
                    patcher.flat[dtype].scatter_(0, idx, values[dtype])

        return lambda: (write(prep.task_values), write(prep.original_values))

    # dense task copies: one tower, two merged task states (the same for every density: a dense
    # copy costs the same whatever changed), in memory and as safetensors files
    dense = copy.deepcopy(setup.base_visual).to(device)
    base_state = {f"visual.{k}": v.detach().cpu() for k, v in dense.state_dict().items()}
    mid = setup.adapters[0.005]
    dense_states = [
        {k.removeprefix("visual."): v.contiguous() for k, v in merge_state(base_state, a).items()}
        for a in mid
    ]
    tmp = tempfile.TemporaryDirectory()
    files = []
    for i, st in enumerate(dense_states):
        path = Path(tmp.name) / f"task{i}.safetensors"
        save_file(st, str(path))
        files.append(path)

    # PEFT LoRA at matched ranks
    ranks = sorted(set(setup.ranks.values()))
    pm = build_peft(setup.base_visual, ranks, device, torch.float32)
    saved = {}
    for r in ranks:
        pm.save_pretrained(tmp.name, selected_adapters=[f"r{r}a", f"r{r}b"])
        saved[r] = [Path(tmp.name) / f"r{r}a", Path(tmp.name) / f"r{r}b"]
    states = {r: [lora_state(pm, f"r{r}a", f"r{r}a"), lora_state(pm, f"r{r}b", f"r{r}a")] for r in ranks}  # fmt: skip
    configs = {r: pm.peft_config[f"r{r}a"] for r in ranks}

    x = torch.randn(1, 3, 224, 224, device=device)

    def lora_forward() -> None:
        with torch.inference_mode():
            pm(x)

    for rep in range(args.reps):
        blocks.loads.append(wait_for_quiet(args.max_load, args.max_wait_s))
        print(f"swap rep {rep + 1}/{args.reps} (load {blocks.loads[-1]['load1']})", flush=True)
        blocks.time("forward_b1", lambda: engine.features(x), n["slow"])
        for d in DENSITIES:
            blocks.time(f"deltaclip@{d}", alternate([fused(pr) for pr in prepared[d]]), n["fast"])
            for op in ("index_put_", "scatter_", *(["numpy"] if device == "cpu" else [])):
                blocks.time(f"deltaclip_{op}@{d}", alternate([fused_with(op, pr) for pr in prepared[d]]), n["fast"])  # fmt: skip
            blocks.time(f"loop@{d}", alternate([lambda parts=parts: _loop_swap(parts) for parts in loops[d]]), n["mid"])  # fmt: skip
            blocks.time(f"subtract@{d}", alternate([s.cycle for s in subtract[d]]), n["fast"])
            # the same three single-threaded: short scatters pay for a 2-thread region when the
            # other core is busy (a shared machine), which a serial loop of small ops avoids
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            blocks.time(
                f"deltaclip_1t@{d}", alternate([fused(pr) for pr in prepared[d]]), n["fast"]
            )
            blocks.time(f"loop_1t@{d}", alternate([lambda parts=parts: _loop_swap(parts) for parts in loops[d]]), n["mid"])  # fmt: skip
            blocks.time(f"subtract_1t@{d}", alternate([s.cycle for s in subtract[d]]), n["fast"])
            torch.set_num_threads(threads)
        blocks.time("dense_load_state_dict", alternate([lambda st=st: dense.load_state_dict(st) for st in dense_states]), n["slow"])  # fmt: skip
        blocks.time("dense_reload_file", alternate([lambda f=f: dense.load_state_dict(load_file(str(f))) for f in files]), n["file"])  # fmt: skip
        for r in ranks:
            a, b = f"r{r}a", f"r{r}b"
            pm.set_adapter(a)
            blocks.time_pair((f"forward_b1_pair@r{r}", f"lora_forward_b1@r{r}"), (lambda: engine.features(x), lora_forward), n["slow"])  # fmt: skip
            blocks.time(f"peft_set_adapter@r{r}", alternate([lambda t=t: pm.set_adapter(t) for t in (a, b)]), n["fast"])  # fmt: skip
            pm.set_adapter(a)
            blocks.time(
                f"peft_hotswap_state_dict@r{r}",
                alternate([lambda st=st, a=a, r=r: hotswap_adapter_from_state_dict(pm, st, a, configs[r]) for st in states[r]]),
                n["mid"],
            )  # fmt: skip
            blocks.time(
                f"peft_hotswap_file@r{r}",
                alternate([lambda f=f, a=a: hotswap_adapter(pm, str(f), a, torch_device=device) for f in saved[r]]),
                n["mid"],
            )  # fmt: skip
            hotswap_adapter_from_state_dict(pm, states[r][0], a, configs[r])

            def merge_switch(target: str) -> None:
                pm.base_model.unmerge_adapter()
                pm.base_model.merge_adapter([target])

            pm.base_model.merge_adapter([a])
            blocks.time(f"peft_merge_unmerge@r{r}", alternate([lambda t=t: merge_switch(t) for t in (a, b)]), n["slow"])  # fmt: skip
            pm.base_model.unmerge_adapter()
        assert patcher.is_pristine(), "deltaclip's patcher must leave the base bit-identical"
    tmp.cleanup()
    del scratch

    rows = []
    for d in DENSITIES:
        nnz = prepared[d][0].nnz
        r = setup.ranks[d]
        rows.append({
            "density": d, "nnz": nnz, "lora_rank": r, "lora_params": r * setup.per_rank,
            "deltaclip": blocks.summary(f"deltaclip@{d}", "forward_b1"),
            "loop": blocks.summary(f"loop@{d}", "forward_b1"),
            "subtract": blocks.summary(f"subtract@{d}", "forward_b1"),
            "deltaclip_1t": blocks.summary(f"deltaclip_1t@{d}", "forward_b1"),
            "deltaclip_index_put_": blocks.summary(f"deltaclip_index_put_@{d}", "forward_b1"),
            "deltaclip_scatter_": blocks.summary(f"deltaclip_scatter_@{d}", "forward_b1"),
            **({"deltaclip_numpy": blocks.summary(f"deltaclip_numpy@{d}", "forward_b1")} if device == "cpu" else {}),
            "loop_1t": blocks.summary(f"loop_1t@{d}", "forward_b1"),
            "subtract_1t": blocks.summary(f"subtract_1t@{d}", "forward_b1"),
            "dense_load_state_dict": blocks.summary("dense_load_state_dict", "forward_b1"),
            "dense_reload_file": blocks.summary("dense_reload_file", "forward_b1"),
            "peft_set_adapter": blocks.summary(f"peft_set_adapter@r{r}", "forward_b1"),
            "peft_hotswap_file": blocks.summary(f"peft_hotswap_file@r{r}", "forward_b1"),
            "peft_hotswap_state_dict": blocks.summary(f"peft_hotswap_state_dict@r{r}", "forward_b1"),
            "peft_merge_unmerge": blocks.summary(f"peft_merge_unmerge@r{r}", "forward_b1"),
            "lora_forward_b1": blocks.summary(f"lora_forward_b1@r{r}", f"forward_b1_pair@r{r}"),
            "forward_b1_paired": blocks.summary(f"forward_b1_pair@r{r}"),
        })  # fmt: skip
    return {
        "forward_b1": blocks.summary("forward_b1"),
        "rows": rows,
        "loads": blocks.loads,
        "lora_targets": LORA_TARGETS,
        "lora_params_per_rank": setup.per_rank,
        "definition": "one task switch: in-place methods restore the previous task and patch the "
        "next (one patch+restore cycle); dense: one load_state_dict of the next task's full state; "
        "PEFT set_adapter / hotswap: one call; PEFT merged: unmerge + merge",
    }


# ------------------------------------------------------------------------------ 2. exactness


def _max_abs(
    flat: dict[torch.dtype, torch.Tensor], ref: dict[torch.dtype, torch.Tensor]
) -> tuple[float, int]:
    worst, count = 0.0, 0
    for d, buf in flat.items():
        diff = (buf.float() - ref[d].float()).abs()
        worst = max(worst, float(diff.max()))
        count += int((buf != ref[d]).sum())
    return worst, count


def bench_exactness(adapters: list[Adapter], args: argparse.Namespace) -> dict[str, Any]:
    # Not a timing: one thread, so that on a shared machine the cycles do not wait on a busy core
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    for dtype_name in ("bfloat16", "float16"):
        rows.extend(_exactness_in(dtype_name, adapters, args))
        gc.collect()
    torch.set_num_threads(threads)
    return {"rows": rows, "adapter_densities": [a.meta.density for a in adapters]}


def _exactness_in(
    dtype_name: str, adapters: list[Adapter], args: argparse.Namespace
) -> list[dict[str, Any]]:
    from server.engine import Engine

    device = args.device
    cycles, lora_cycles = args.cycles, args.lora_cycles
    checkpoints = sorted({1, 10, 100, 1000, cycles} & set(range(1, cycles + 1)))
    rows: list[dict[str, Any]] = []
    net, sig = vit_b16()
    base_visual = copy.deepcopy(net.visual)
    engine = Engine(net, sig, device, dtype_name)
    patcher = engine.patcher
    flat0 = {d: b.clone() for d, b in patcher.flat.items()}
    preps = [patcher.prepare(a) for a in adapters]
    subs_dtype = [SubtractSwap(patcher, a, upcast=False) for a in adapters]
    subs_up = [SubtractSwap(patcher, a, upcast=True) for a in adapters]
    methods: dict[str, tuple[Callable[[int], None], Callable[[int], None]]] = {
        "deltaclip copy-restore": (lambda k: patcher.patch(preps[k]), lambda k: patcher.restore(preps[k])),
        "subtract, in serving dtype": (lambda k: subs_dtype[k].patch(), lambda k: subs_dtype[k].restore()),
        "subtract, float32 upcast": (lambda k: subs_up[k].patch(), lambda k: subs_up[k].restore()),
    }  # fmt: skip
    for name, (patch, restore) in methods.items():
        for d, buf in patcher.flat.items():
            buf.copy_(flat0[d])
        curve, first = {}, None
        checks = set(checkpoints) | set(range(1, 11))  # first drift: looked for at these cycles
        t0 = time.perf_counter()
        for c in range(1, cycles + 1):
            k = (c - 1) % len(preps)
            patch(k)
            restore(k)
            if first is None and c in checks:
                for d, idx in preps[k].indices.items():
                    if not torch.equal(patcher.flat[d][idx], flat0[d][idx]):
                        first = c
            if c in checkpoints:
                curve[c] = _max_abs(patcher.flat, flat0)[0]
        sync_if(device)
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
        rows.append({
            "dtype": dtype_name, "method": name, "cycles": cycles, "adapters": len(preps),
            "max_abs_drift": worst, "drifted_weights": drifted, "first_drift_cycle": first,
            "drift_by_cycle": curve, "fingerprint_matches": fp_ok,
            "task_weights_max_abs_error": task_err, "seconds": elapsed,
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    for d, buf in patcher.flat.items():
        buf.copy_(flat0[d])
    assert patcher.is_pristine()
    # PEFT LoRA served merged (no per-forward cost): merge_adapter / unmerge_adapter cycles
    if lora_cycles:
        per_rank = lora_params_per_rank(base_visual)
        r = lora_rank_for(preps[0].nnz, per_rank)
        dt = engine.dtype
        pm = build_peft(base_visual, [r], device, dt)
        # merge/unmerge touches only the LoRA layers' base weights: compare those
        live = {n: m.base_layer.weight for n, m in pm.named_modules() if hasattr(m, "base_layer") and isinstance(m.base_layer, nn.Linear)}  # fmt: skip
        weights0 = {n: w.detach().clone() for n, w in live.items()}
        fp0 = base_fingerprint(pm)

        def lora_drift() -> float:
            return max(
                float((live[n].float() - w.float()).abs().max()) for n, w in weights0.items()
            )

        curve, first = {}, None
        lc_points = sorted({1, 10, 100, 1000, lora_cycles} & set(range(1, lora_cycles + 1)))
        checks = set(lc_points) | set(range(1, 11))
        t0 = time.perf_counter()
        with torch.inference_mode():
            for c in range(1, lora_cycles + 1):
                pm.base_model.merge_adapter([f"r{r}{'ab'[(c - 1) % 2]}"])
                pm.base_model.unmerge_adapter()
                if c in checks:
                    worst = lora_drift()
                    if first is None and worst > 0:
                        first = c
                    if c in lc_points:
                        curve[c] = worst
        sync_if(device)
        elapsed = time.perf_counter() - t0
        worst = lora_drift()
        drifted = sum(int((live[n] != w).sum()) for n, w in weights0.items())
        rows.append({
            "dtype": dtype_name, "method": f"PEFT LoRA merge/unmerge (r={r})", "cycles": lora_cycles,
            "adapters": 2, "max_abs_drift": worst, "drifted_weights": drifted,
            "first_drift_cycle": first, "drift_by_cycle": curve,
            "fingerprint_matches": base_fingerprint(pm) == fp0,
            "task_weights_max_abs_error": None, "seconds": elapsed,
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        del pm
    return rows


# ------------------------------------------------------------------------------ 3. memory


def _trim() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc), so that RSS growth
    measures new allocations rather than reuse of memory freed by earlier sections."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def _rss() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover - psutil is a dependency of the bench environment
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_memory(setup: SwapSetup, args: argparse.Namespace) -> dict[str, Any]:
    engine = setup.engine
    cuda = args.device.startswith("cuda")
    copies = 10 if args.quick else 50
    tower_numel = sum(p.numel() for p in engine.visual.parameters())
    dense_bytes = tower_numel * 4
    gib = 1 << 30
    held: list[Any] = []
    rows = []
    for d in DENSITIES:
        adapter = setup.adapters[d][0]
        one = engine.prepare(fake_record("mem"), adapter)
        _trim()
        before = torch.cuda.memory_allocated() if cuda else _rss()
        batch = [engine.prepare(fake_record(f"mem{i}"), adapter) for i in range(copies)]
        _trim()
        after = torch.cuda.memory_allocated() if cuda else _rss()
        held.extend(batch)
        head = one.nbytes - one.residual.nbytes
        lora = setup.ranks[d] * setup.per_rank * 4
        rows.append({
            "density": d, "nnz": one.residual.nnz, "prepared_bytes": one.nbytes,
            "residual_bytes": one.residual.nbytes, "head_bytes": head,
            "bytes_per_changed_weight": one.residual.nbytes / one.residual.nnz,
            "measured_bytes_per_adapter": (after - before) / copies, "measured_over": copies,
            "measured_with": "torch.cuda.memory_allocated" if cuda else "RSS (psutil)",
            "adapters_per_gib": gib / one.nbytes, "dense_bytes": dense_bytes,
            "dense_per_gib": gib / dense_bytes, "lora_rank": setup.ranks[d], "lora_bytes": lora,
            "lora_per_gib": gib / lora,
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    del held
    gc.collect()
    return {"tower_weights": tower_numel, "dtype": "float32", "rows": rows}


# ------------------------------------------------------------------------------ 4. storage


def reference_bytes(
    base: dict[str, torch.Tensor], adapter: Adapter, two_d_only: bool
) -> tuple[int, int]:
    """Bytes of the reference format (``torch.save`` of a dict of ``torch.sparse_coo_tensor``
    residuals, float32 values, int64 COO indices) and the changed weights it holds."""
    state, nnz = {}, 0
    for key, res in sorted(adapter.residual.items()):
        shape = base[key].shape
        if two_d_only and len(shape) != 2:
            continue
        coords = torch.stack(torch.unravel_index(res.indices.to(torch.int64), shape))
        state[key] = torch.sparse_coo_tensor(coords, res.values.float(), shape).coalesce()
        nnz += res.nnz
    buf = io.BytesIO()
    torch.save(state, buf)
    return len(buf.getvalue()), nnz


def v1_residual_bytes(adapter: Adapter, two_d: set[str] | None) -> int:
    """Format v1 file bytes of the adapter without its head and text embeddings (residual only)."""
    keep = {k: r for k, r in adapter.residual.items() if two_d is None or k in two_d}
    bare = Adapter(meta=adapter.meta, residual=keep, head=adapter.head, class_embeddings=None)
    head = sum(t.numel() * t.element_size() for t in adapter.head.values())
    return len(encode_adapter(bare)) - head


def bench_storage(setup: SwapSetup) -> dict[str, Any]:
    base = {f"visual.{k}": v.detach().cpu() for k, v in setup.base_visual.named_parameters()}
    two_d = {k for k, v in base.items() if v.dim() == 2}
    rows = []
    for d in DENSITIES:
        a = setup.adapters[d][0]
        ref_all, nnz_all = reference_bytes(base, a, two_d_only=False)
        ref_2d, nnz_2d = reference_bytes(base, a, two_d_only=True)
        v1_all = v1_residual_bytes(a, None)
        v1_2d = v1_residual_bytes(a, two_d)
        rows.append({
            "density": d, "nnz": nnz_all, "nnz_2d": nnz_2d, "v1_file_bytes": len(encode_adapter(a)),
            "v1_residual_bytes": v1_all, "v1_per_weight": v1_all / nnz_all,
            "v1_2d_bytes": v1_2d, "v1_2d_per_weight": v1_2d / nnz_2d,
            "reference_bytes": ref_all, "reference_per_weight": ref_all / nnz_all,
            "reference_2d_bytes": ref_2d, "reference_2d_per_weight": ref_2d / nnz_2d,
            "dense_bytes": sum(v.numel() * 4 for v in base.values()),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows}


# ------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="few repetitions and cycles (smoke run)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each timing block")
    ap.add_argument("--cycles", type=int, default=1000, help="swap cycles for exactness")
    ap.add_argument("--lora-cycles", type=int, default=200, help="LoRA merge/unmerge cycles")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--max-load", type=float, default=0.7)
    ap.add_argument("--max-wait-s", type=float, default=1800.0)
    ap.add_argument("--sections", default="swap,exactness,memory,storage")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "alternatives.json")
    ap.add_argument("--merge", action="store_true", help="keep the other sections already in --out")
    args = ap.parse_args()
    if args.quick:
        args.reps = min(args.reps, 2)
        args.cycles = min(args.cycles, 40)
        args.lora_cycles = min(args.lora_cycles, 10)
    torch.set_num_threads(args.threads)
    sections = set(args.sections.split(","))
    t_start = time.perf_counter()

    from peft import __version__ as peft_version

    from server.engine import Engine

    previous = json.loads(args.out.read_text()) if args.merge and args.out.exists() else {}
    out: dict[str, Any] = {
        **previous,
        "machine": {**machine(), "threads": torch.get_num_threads(), "peft": peft_version},
        "device": args.device, "quick": args.quick, "reps": args.reps,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }  # fmt: skip
    net, sig = vit_b16()
    base_visual = copy.deepcopy(net.visual).eval()
    per_rank = lora_params_per_rank(base_visual)
    t = time.perf_counter()
    adapters = {
        d: [random_adapter(net, sig, f"t{i}", density=d, seed=10 * i + j) for i in (1, 2)]
        for j, d in enumerate(DENSITIES)
    }
    print(f"adapters generated in {time.perf_counter() - t:.0f}s", flush=True)
    engine = Engine(net, sig, args.device, "float32")
    ranks = {d: lora_rank_for(ads[0].meta.nnz, per_rank) for d, ads in adapters.items()}
    setup = SwapSetup(engine, base_visual, adapters, ranks, per_rank)
    if "swap" in sections:
        out["swap"] = bench_swap(setup, args)
        print(json.dumps(out["swap"]["rows"], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save = lambda: args.out.write_text(json.dumps(out, indent=1))  # noqa: E731 - partial results survive a timeout
    save()
    if "memory" in sections:
        out["memory"] = bench_memory(setup, args)
    if "storage" in sections:
        out["storage"] = bench_storage(setup)
    save()
    if "exactness" in sections:
        del engine, setup
        gc.collect()
        out["exactness"] = bench_exactness([*adapters[0.005], *adapters[0.01]], args)
    finish_run(out, previous, t_start, args.out, sections=sorted(sections))


if __name__ == "__main__":
    main()
