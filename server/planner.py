"""The batcher's planner: per round, which task groups run patched (swap) and which run mixed.

The patched path (group by adapter, patch it in, one forward per group) is bit-identical to the
task's merged model and best for large single-task groups. The mixed path (:mod:`server.mixed`)
runs the untouched base once over rows of many tasks and adds each task's sparse correction on
its rows: no swap and full batches, at the price of float rounding (docs/API.md) and a
correction that costs in proportion to the task's changed weights and rows.

For each drained round :meth:`Planner.split` prices the round (:class:`server.costs.CostModel`,
measured at start-up by :func:`measure_costs` or configured with ``DELTACLIP_MIX_COSTS``):
forwards at their batch sizes, swaps and corrections. It moves the groups whose mixing makes the
round cheapest into one pseudo-group (:data:`MIXED`), scheduled fairly like any other group and
run in mixed forwards of up to ``max_batch`` images. Fewer than two such groups: nothing is
mixed (one group alone gains nothing from it). A job without a mix spec (the request asked for
``exact``, or its adapter has a parameter the mixed path cannot correct) always runs patched;
deterministic mode has no planner at all.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace
from typing import Literal

import torch
from prometheus_client import CollectorRegistry, Counter

from adapters_store.synthetic import random_adapter
from adapters_store.transforms import adapter_image_size

from .corrections import Correction
from .costs import CostModel, batch_sizes
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
        A group's jobs without a mix spec (``exact``) stay in the group, patched.

        The choice is per round: the groups are ranked by what mixing saves per row (their
        patched forwards and swap against their correction), and of the plans "mix the first k"
        the cheapest whole round wins: the mixed rows' forwards at their joint batch size, the
        corrections, and the other groups' patched forwards and swaps."""
        candidates = []
        for key, jobs in groups.items():
            mixable = [j for j in jobs if j.mix is not None]
            if mixable:
                kept = sum(j.images.shape[0] for j in jobs if j.mix is None)
                candidates.append((key, mixable, kept))
        if self.always:
            chosen = [key for key, _, _ in candidates]
        else:
            chosen = self._cheapest(candidates, current)
        if len(chosen) < 2:
            return
        pooled = []
        for key in chosen:
            pooled += [j for j in groups[key] if j.mix is not None]
            groups[key] = deque(j for j in groups[key] if j.mix is None)
            if not groups[key]:
                del groups[key]
        groups[MIXED] = deque(sorted(pooled, key=lambda j: j.enqueued))

    def _cheapest(
        self, candidates: list[tuple[Hashable, list[Job], int]], current: Hashable
    ) -> list[Hashable]:
        cost, b = self.cost, self.max_batch
        ranked = []
        for key, mixable, kept in candidates:
            n = sum(j.images.shape[0] for j in mixable)
            spec = mixable[0].mix
            assert spec is not None
            # What running these rows patched costs. A group that keeps exact jobs is patched
            # anyway: mixing its other rows saves only their share of its forwards.
            if kept:
                patched = cost.forwards(n + kept, b) - cost.forwards(kept, b)
            else:
                swap = 0.0 if key == current else cost.swap(spec.nnz)
                patched = cost.forwards(n, b) + swap
            corrected = cost.correction(spec.sites, spec.nnz, n)
            ranked.append(((patched - corrected) / n, key, n, patched, corrected))
        ranked.sort(key=lambda r: -r[0])
        best_k, best = 0, sum(r[3] for r in ranked)
        rows, corrections, patched_rest = 0, 0.0, best
        for k, (_, _, n, patched, corrected) in enumerate(ranked, start=1):
            rows, corrections = rows + n, corrections + corrected
            patched_rest -= patched
            total = cost.forwards(rows, b) + corrections + patched_rest
            if k >= 2 and total < best:
                best_k, best = k, total
        return [r[1] for r in ranked[:best_k]]

    def run(
        self,
        chunk: list[Job],
        patched: Callable[[list[Job]], None],
        observe: Callable[[int], None] = lambda n: None,
    ) -> None:
        """One mixed forward for the chunk (its image count passed to ``observe``); a chunk of
        one task runs patched instead (exact at no extra cost), and if the mixed forward fails,
        each job is retried alone, patched. Images of different sizes (adapters trained at other
        sizes) run in one forward per size."""
        by_size: dict[tuple[int, ...], list[Job]] = {}
        for job in chunk:
            by_size.setdefault(tuple(job.images.shape[1:]), []).append(job)
        if len(by_size) > 1:
            for part in by_size.values():
                self.run(part, patched, observe)
            return
        if len({job.key for job in chunk}) < 2:
            patched(chunk)
            return
        try:
            images = torch.cat([job.images for job in chunk])
            observe(images.shape[0])
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
    """The cost model of this engine on its device: forwards at :func:`batch_sizes`, a patch +
    restore and mixed forwards of a synthetic 0.5 % adapter (at start-up, before the worker
    runs). Each timing is a median; the forwards are timed size by size in turns so that drift
    of a shared machine hits every size alike."""
    size = adapter_image_size({}, engine.net)
    sizes = batch_sizes(max_batch)
    inputs = {n: torch.zeros(n, 3, size, size) for n in sizes}

    def timed_once(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        return time.perf_counter() - start

    for n in sizes:  # warm-up: allocator, kernels picked per shape
        engine.features(inputs[n])
    samples: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(reps):
        for n in sizes:
            samples[n].append(timed_once(partial(engine.features, inputs[n])))
    batch_s = {n: statistics.median(v) for n, v in samples.items()}

    adapter = random_adapter(engine.net, engine.signature, "calibration", density=0.005)
    record = SimpleNamespace(task="calibration", version=0, digest="calibration")
    probe = engine.prepare(record, adapter)
    patcher = engine.patcher

    def patch_restore() -> None:
        patcher.patch(probe.residual)
        patcher.restore(probe.residual)

    patch_restore()
    swap = statistics.median(timed_once(patch_restore) for _ in range(reps))
    swap_weight_s = swap / max(1, probe.residual.nnz)
    if probe.correction is None:
        return CostModel(swap_weight_s=swap_weight_s, batch_s=batch_s)
    corr = probe.correction
    b = max(2, min(max_batch, 4))
    xb = torch.zeros(b, 3, size, size)

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
        swap_weight_s=swap_weight_s,
        site_s=fixed / max(1, len(corr.sites)),
        weight_row_s=per_row / max(1, corr.nnz),
        batch_s=batch_s,
    )
