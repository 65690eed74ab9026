"""The one harness every benchmark question runs in: arguments, machine, timing, results.

A question module (``bench/<question>.py``) declares its own options and fills sections of a
:class:`Result`; everything around the measurement lives here, once, so that two questions never
time, wait, describe the machine or write JSON in two different ways:

* :func:`add_common` — the options every question shares (``--out``, ``--merge``, ``--quick``, ...);
* :func:`machine` — CPU model, cores, threads and library versions, recorded with every result;
* :func:`timeit` / :class:`Blocks` — wall-clock timing (CUDA-synchronised when asked) and the
  "median of repetition medians, p99 over all samples" summary the docs quote;
* :func:`wait_for_quiet` — the wait for a low load average before each measurement block, because
  the CPU machines these figures come from are shared;
* :class:`Result` — one JSON schema for every question (header fields in :data:`HEADER`, then the
  question's sections), partial saves that survive a timeout, and ``--merge`` across runs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters_store.basenames import EFFLITE0
from adapters_store.bases import BaseSignature, build_base, signature_of

SCHEMA = "deltaclip-bench/1"
# Fields every result file has, whatever the question (its sections come next to them).
HEADER = (
    "schema",
    "question",
    "command",
    "machine",
    "device",
    "base",
    "quick",
    "reps",
    "sections",
    "wall_s",
    "wall_s_by_run",
)
DENSITIES = (0.0005, 0.001, 0.005, 0.01)  # the RST-like densities every swap/storage table uses


# ------------------------------------------------------------------------------ arguments


def csv_list(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    """An argparse ``type`` for comma-separated values (``--tasks 1,4,16``)."""
    return lambda text: [kind(x) for x in text.split(",") if x]


def add_common(
    p: argparse.ArgumentParser,
    *,
    sections: list[str] | None = None,
    base: str | None = None,
    reps: int = 3,
) -> None:
    """The options every question shares; ``sections``/``base`` only where the question has them."""
    g = p.add_argument_group("harness")
    g.add_argument(
        "--out", type=Path, help="result JSON (default: $TMPDIR/deltaclip-bench/<question>.json)"
    )
    g.add_argument("--merge", action="store_true", help="keep the other sections already in --out")
    g.add_argument("--quick", action="store_true", help="fewest repetitions (smoke run)")
    g.add_argument("--reps", type=int, default=reps, help="repetitions of each timing block")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    g.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    g.add_argument(
        "--max-load", type=float, default=0.7, help="wait for a 1-min load average below this"
    )
    g.add_argument(
        "--max-wait-s", type=float, default=1800.0, help="longest wait for it (0: never wait)"
    )
    if base is not None:
        g.add_argument(
            "--base",
            default=base,
            help=f"base MODEL[/PRETRAINED] (default {base}; seeded random weights unless named)",
        )
    if sections is not None:
        g.add_argument(
            "--sections",
            type=csv_list(str),
            default=sections,
            help=f"parts to run, comma-separated (default: {','.join(sections)})",
        )


def base_spec(text: str) -> tuple[str, str]:
    """``MODEL[/PRETRAINED]`` → ``(model, pretrained)``: the offline EfficientNet base keeps its
    ImageNet weights, anything else defaults to the seeded random init (timing and sizes do not
    depend on the weights' values, and nothing is downloaded)."""
    model, _, pretrained = text.partition("/")
    return model, pretrained or (EFFLITE0[1] if model == EFFLITE0[0] else "random")


def load_base(spec: str) -> tuple[nn.Module, BaseSignature]:
    """The base model and its signature, from a ``--base`` value."""
    model, pretrained = base_spec(spec)
    net = build_base(model, pretrained)
    return net, signature_of(net, model, pretrained)


def fake_record(task: str, digest: str | None = None) -> Any:
    """A stand-in for a catalog record: what ``Engine.prepare`` reads (task, version, digest)."""
    return type("Record", (), {"task": task, "version": 1, "digest": digest or f"digest-{task}"})()


def jpeg_bytes() -> bytes:
    """The request image of every HTTP measurement: a seeded 320×240 JPEG (quality 90)."""
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    arr = (torch.rand(240, 320, 3, generator=rng) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """A Markdown table (then a blank line), as the docs quote the results."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()


# ------------------------------------------------------------------------------ machine


def cpu_model() -> str:
    """The CPU's model name: figures from two VMs of the same size differ by their caches."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What a figure was measured on; recorded in every result file."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for package in ("open_clip_torch", "peft"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


# ------------------------------------------------------------------------------ timing


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
    """Wall-clock seconds of ``repeat`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    return [time_once(fn, sync) for _ in range(repeat)]


def median(values: list[float]) -> float:
    return statistics.median(values)


def p(values: list[float], q: float) -> float:
    """The ``q`` quantile by nearest rank (no interpolation: a reported p99 is a real sample)."""
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def wait_for_quiet(max_load: float, max_wait_s: float, poll_s: float = 10.0) -> dict[str, Any]:
    """Wait until the 1-minute load average is below ``max_load`` (or ``max_wait_s`` passed), and
    say what it was: on a shared machine that is the first thing to read next to a figure."""
    start = time.monotonic()
    while True:
        load = os.getloadavg()[0]
        waited = time.monotonic() - start
        if load < max_load or waited >= max_wait_s:
            return {"load1": round(load, 2), "waited_s": round(waited, 1), "quiet": load < max_load}
        print(f"  load average {load:.2f} ≥ {max_load}: waiting", flush=True)
        time.sleep(max(0.1, min(poll_s, max_wait_s - waited)))


class Blocks:
    """Samples per named measurement over repetitions: p50 = median of the repetition medians,
    p99 over all samples pooled (so one noisy repetition cannot move the p50)."""

    def __init__(self, sync: bool) -> None:
        self.sync = sync
        self.samples: dict[str, list[float]] = {}
        self.rep_medians: dict[str, list[float]] = {}
        self.loads: list[dict[str, Any]] = []

    def add(self, name: str, times: list[float]) -> None:
        self.samples.setdefault(name, []).extend(times)
        self.rep_medians.setdefault(name, []).append(median(times))

    def time(self, name: str, fn: Callable[[], Any], repeat: int, warmup: int = 2) -> None:
        self.add(name, timeit(fn, max(3, repeat), warmup=warmup, sync=self.sync))

    def time_pair(
        self, names: tuple[str, str], fns: tuple[Callable[[], Any], Callable[[], Any]], repeat: int
    ) -> None:
        """Two measurements interleaved call by call, so a change of machine load hits both."""
        for fn in fns:
            fn()
        times: tuple[list[float], list[float]] = ([], [])
        for _ in range(max(3, repeat)):
            for out, fn in zip(times, fns, strict=True):
                out.append(time_once(fn, self.sync))
        for name, ts in zip(names, times, strict=True):
            self.add(name, ts)

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


# ------------------------------------------------------------------------------ results


def default_out(question: str) -> Path:
    return Path(tempfile.gettempdir()) / "deltaclip-bench" / f"{question}.json"


class Result:
    """One question's result file: the header of :data:`HEADER`, then its sections.

    With ``--merge`` the sections already in ``--out`` are kept and this run's wall time is
    appended to ``wall_s_by_run`` (a file from before that list existed counts as one run)."""

    def __init__(self, question: str, args: argparse.Namespace) -> None:
        self.path: Path = args.out or default_out(question)
        self.started = time.perf_counter()
        self.previous: dict[str, Any] = (
            json.loads(self.path.read_text()) if args.merge and self.path.exists() else {}
        )
        self.sections = list(getattr(args, "sections", None) or ["all"])
        self.write = True  # False: nothing is written (a question that only reads its file)
        self.data: dict[str, Any] = {
            **self.previous,
            "schema": SCHEMA,
            "question": question,
            "command": " ".join([Path(sys.executable).name, "-m", "bench", *sys.argv[1:]]),
            "machine": machine(),
            "device": args.device,
            "base": getattr(args, "base", None),
            "quick": args.quick,
            "reps": args.reps,
            "sections": self.sections,
        }

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value

    def save(self) -> None:
        """Write what there is so far (atomically), so that a run cut short keeps its sections."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".part")
        tmp.write_text(json.dumps(self.data, indent=1, ensure_ascii=False) + "\n")
        os.replace(tmp, self.path)

    def finish(self) -> None:
        if not self.write:
            return
        prev = self.previous
        runs = prev.get("wall_s_by_run") or (
            [{"sections": "all", "wall_s": prev["wall_s"], "command": prev.get("command")}]
            if "wall_s" in prev
            else []
        )
        run = {
            "sections": self.sections,
            "wall_s": time.perf_counter() - self.started,
            "command": self.data["command"],
        }
        self.data["wall_s_by_run"] = [*runs, run]
        self.data["wall_s"] = sum(r["wall_s"] for r in self.data["wall_s_by_run"])
        self.save()
        print(f"wrote {self.path} in {run['wall_s']:.0f}s", flush=True)
