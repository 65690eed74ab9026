"""Shared helpers for the benchmarks: seeded ViT-B-16 base, adapters, timing."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters_store.bases import BaseSignature, signature_of


def vit_b16() -> tuple[nn.Module, BaseSignature]:
    """ViT-B-16 with a seeded random init: the real architecture and sizes, no download."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    return net, signature_of(net, "ViT-B-16", "random")


def time_once(fn: Callable[[], Any], sync: bool = False) -> float:
    """Wall-clock seconds of one call (bracketed by ``cuda.synchronize()`` when ``sync``)."""
    if sync:
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def timeit(fn: Callable[[], Any], repeat: int, warmup: int = 2, sync: bool = False) -> list[float]:
    """Wall-clock seconds of ``repeat`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    return [time_once(fn, sync) for _ in range(repeat)]


def finish_run(
    out: dict[str, Any], previous: dict[str, Any], t_start: float, path: Path, **fields: Any
) -> None:
    """Append this run's wall time to ``wall_s_by_run`` (kept across ``--merge`` runs; a result
    from before that list existed counts as one run), total it and write ``out`` to ``path``."""
    runs = previous.get("wall_s_by_run") or (
        [{**{k: "all" for k in fields}, "wall_s": previous["wall_s"], "command": previous.get("command")}]
        if "wall_s" in previous
        else []
    )  # fmt: skip
    run = {**fields, "wall_s": time.perf_counter() - t_start, "command": out["command"]}
    out["wall_s_by_run"] = [*runs, run]
    out["wall_s"] = sum(r["wall_s"] for r in out["wall_s_by_run"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path} in {out['wall_s']:.0f}s", flush=True)


def p(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def median(values: list[float]) -> float:
    return statistics.median(values)


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    return {
        "cpu": _cpu_model(),
        "cores": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
