"""The batcher's planner: per round, which task groups run patched (swap) and which run mixed.

The patched path (group by adapter, patch it in, one forward per group) is bit-identical to the
task's merged model and best for large single-task groups. The mixed path (:mod:`server.mixed`)
runs the untouched base once over rows of many tasks and adds each task's sparse correction on
its rows: no swap and full batches, at the price of float rounding (docs/API.md) and a
correction that costs in proportion to the task's changed weights and rows.

For each drained round :meth:`Planner.split` compares, per group, what it would add to the
round's time in each path (:class:`CostModel`, measured at start-up by :func:`measure_costs` or
configured with ``DELTACLIP_MIX_COSTS``) and moves the groups that are cheaper mixed into one
pseudo-group (:data:`MIXED`), scheduled fairly like any other group and run in mixed forwards
of up to ``max_batch`` images. Fewer than two such groups: nothing is mixed (one group alone
gains nothing from it). A job without a mix spec (the request asked for ``exact``, or its
adapter has a parameter the mixed path cannot correct) always runs patched; deterministic mode
has no planner at all.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal

import torch
from prometheus_client import CollectorRegistry, Counter

from adapters_store.synthetic import random_adapter
from adapters_store.transforms import adapter_image_size

from .corrections import Correction
from .engine import Engine
from .mixed import Part
from .work import Job, hand_back

log = logging.getLogger("deltaclip.server")

MIXED = ("mixed",)  # the pseudo-group key of a round's mixed jobs
Path = Literal["patched", "mixed"]


@dataclass(frozen=True)
class MixSpec:
    """What a job needs to ride in a mixed forward: its correction (None: base rows, e.g.
    zero-shot) and its head (features → probabilities on the CPU)."""

    correction: Correction | None
    head: Callable[[torch.Tensor], torch.Tensor]

    @property
    def nnz(self) -> int:
        return self.correction.nnz if self.correction is not None else 0

    @property
    def sites(self) -> int:
        return len(self.correction.sites) if self.correction is not None else 0


@dataclass(frozen=True)
class CostModel:
    """Seconds: ``forward_s + image_s·n`` per forward of n images; ``swap_weight_s`` per changed
    weight for a patch + restore; ``site_s`` per corrected module and ``weight_row_s`` per
    changed weight and row in a mixed forward."""

    forward_s: float
    image_s: float
    swap_weight_s: float
    site_s: float
    weight_row_s: float

    def patched(self, n: int, nnz: int, patched_now: bool, max_batch: int) -> float:
        swap = 0.0 if patched_now else self.swap_weight_s * nnz
        return self.forward_s * math.ceil(n / max_batch) + self.image_s * n + swap

    def mixed(self, n: int, spec: MixSpec, max_batch: int) -> float:
        share = self.forward_s * n / max_batch + self.image_s * n
        return share + self.site_s * spec.sites + self.weight_row_s * spec.nnz * n


def rows_counter(registry: CollectorRegistry) -> Counter:
    return Counter(
        "deltaclip_rows_total",
        "Images answered, by the path that served them (patched: swap; mixed: corrections)",
        ["path"],
        registry=registry,
    )


class Planner:
    def __init__(
        self,
        cost: CostModel,
        max_batch: int,
        run_mixed: Callable[[list[Part], torch.Tensor], torch.Tensor],
        always: bool = False,
    ) -> None:
        self.cost = cost
        self.max_batch = max_batch
        self.run_mixed = run_mixed
        self.always = always  # mix every mixable group (benchmarks: the mixed path alone)

    def split(self, groups: dict[Hashable, deque[Job]], current: Hashable) -> None:
        """Move the groups that are cheaper mixed into ``groups[MIXED]`` (oldest job first).
        A group's jobs without a mix spec (``exact``) stay in the group, patched."""
        chosen = []
        for key, jobs in groups.items():
            mixable = [j for j in jobs if j.mix is not None]
            if not mixable:
                continue
            spec = mixable[0].mix
            n = sum(j.images.shape[0] for j in mixable)
            mixed = self.cost.mixed(n, spec, self.max_batch)
            patched = self.cost.patched(n, spec.nnz, key == current, self.max_batch)
            if self.always or mixed < patched:
                chosen.append(key)
        if len(chosen) < 2:
            return
        pooled = []
        for key in chosen:
            pooled += [j for j in groups[key] if j.mix is not None]
            groups[key] = deque(j for j in groups[key] if j.mix is None)
            if not groups[key]:
                del groups[key]
        groups[MIXED] = deque(sorted(pooled, key=lambda j: j.enqueued))

    def run(self, chunk: list[Job], patched: Callable[[list[Job]], None]) -> None:
        """One mixed forward for the chunk; a chunk of one task runs patched instead (exact at
        no extra cost), and if the mixed forward fails, each job is retried alone, patched.
        Images of different sizes (adapters trained at other sizes) run in one forward per size."""
        by_size: dict[tuple[int, ...], list[Job]] = {}
        for job in chunk:
            by_size.setdefault(tuple(job.images.shape[1:]), []).append(job)
        if len(by_size) > 1:
            for part in by_size.values():
                self.run(part, patched)
            return
        if len({job.key for job in chunk}) < 2:
            patched(chunk)
            return
        try:
            images = torch.cat([job.images for job in chunk])
            parts = [(job.mix.correction, job.images.shape[0]) for job in chunk]
            features = self.run_mixed(parts, images)
            answers, start = [], 0
            for job in chunk:
                n = job.images.shape[0]
                answers.append(job.mix.head(features[start : start + n]))
                start += n
        except Exception:
            log.exception("a mixed forward failed; its jobs are retried one by one, patched")
            for job in chunk:
                patched([job])
            return
        for job, answer in zip(chunk, answers, strict=True):
            job.path = "mixed"
            hand_back(job.loop, job.future, answer)


def measure_costs(engine: Engine, max_batch: int, reps: int = 2) -> CostModel:
    """The cost model of this engine on its device, from a few timed forwards, a patch + restore
    and two mixed forwards of a synthetic 0.5 % adapter (at start-up, before the worker runs)."""
    size = adapter_image_size({}, engine.net)
    b = max(2, min(max_batch, 4))
    x1, xb = torch.zeros(1, 3, size, size), torch.zeros(b, 3, size, size)

    def timed_once(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        return time.perf_counter() - start

    def timed(fn: Callable[[], object]) -> float:
        fn()
        return statistics.median(timed_once(fn) for _ in range(reps))

    one, full = timed(lambda: engine.features(x1)), timed(lambda: engine.features(xb))
    image_s = max(0.0, (full - one) / (b - 1))
    adapter = random_adapter(engine.net, engine.signature, "calibration", density=0.005)
    record = SimpleNamespace(task="calibration", version=0, digest="calibration")
    probe = engine.prepare(record, adapter)
    patcher = engine.patcher

    def patch_restore() -> None:
        patcher.patch(probe.residual)
        patcher.restore(probe.residual)

    swap = timed(patch_restore)
    cost = CostModel(max(0.0, one - image_s), image_s, swap / max(1, probe.residual.nnz), 0, 0)
    if probe.correction is None:
        return cost
    corr = probe.correction

    def extra(parts: list[Part]) -> float:
        """What the corrections add to the plain forward: the median difference of the two
        timed back to back (so that drift of a shared machine hits both alike)."""
        plain, mixed = (lambda: engine.features(xb)), (lambda: engine.run_mixed(parts, xb))
        mixed()
        return statistics.median(timed_once(mixed) - timed_once(plain) for _ in range(3 * reps))

    with_one, with_all = extra([(corr, 1), (None, b - 1)]), extra([(corr, b)])
    per_row = max(0.0, (with_all - with_one) / (b - 1))
    fixed = max(0.0, with_one - per_row)
    return CostModel(
        cost.forward_s,
        image_s,
        cost.swap_weight_s,
        fixed / max(1, len(corr.sites)),
        per_row / max(1, corr.nnz),
    )
