"""The planner in the batcher: which groups of a round run mixed, what each job is answered with
and by which path, and what happens when a mixed forward fails or the adapters a queued batch
holds are replaced, evicted or deleted meanwhile. A real engine on the tiny base; the worker is
held with a blocking call (events, no sleeps) so that a round holds exactly the jobs a test
queued."""

from __future__ import annotations

import asyncio
import copy
import gc
import json
import threading
from collections import deque
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from adapters_store.bases import BaseSignature
from adapters_store.synthetic import random_adapter
from server.batcher import Batcher
from server.costs import CostModel
from server.engine import Engine, PreparedAdapter
from server.metrics import Metrics
from server.planner import MIXED, MixSpec, Planner, measure_costs
from server.work import Job
from tests.unit.test_mixed import TOL, rel

FREE_MIX = CostModel(forward_s=1.0, image_s=0.1, swap_weight_s=1e-6, site_s=0, weight_row_s=0)


def job(key: object, n: int, spec: MixSpec | None, t: float) -> Job:
    return Job(key, lambda x: x, torch.zeros(n, 1), None, None, None, mix=spec, enqueued=t)  # type: ignore[arg-type]


def spec(nnz: int = 0, sites: int = 0) -> MixSpec:
    """A mix spec whose correction has ``nnz`` changed weights over ``sites`` modules (None:
    base rows, no correction)."""
    corr = SimpleNamespace(nnz=nnz, sites=[None] * sites) if nnz else None
    return MixSpec(corr, lambda f: f)  # type: ignore[arg-type]


# GPU-like: a batch of 16 costs twice one image. CPU-like: batching saves nothing.
BATCHING = CostModel(swap_weight_s=1e-6, site_s=0.01, batch_s={1: 1.0, 16: 2.0})
NO_BATCHING = CostModel(swap_weight_s=1e-6, site_s=0.01, batch_s={1: 1.0, 16: 16.0})


def singles(n: int) -> dict[object, deque[Job]]:
    return {f"t{i}": deque([job(f"t{i}", 1, spec(1000, 10), i)]) for i in range(n)}


def test_small_groups_of_many_tasks_mix_and_a_full_group_of_one_task_stays_patched() -> None:
    planner = Planner(BATCHING, 16, lambda parts, x: x)
    groups = {
        "a": deque([job("a", 1, spec(1000, 10), 3), job("a", 1, None, 5)]),
        "b": deque([job("b", 1, spec(1000, 10), 2)]),
        "c": deque([job("c", 1, spec(1000, 10), 1)]),
        "big": deque([job("big", 16, spec(1000, 10), 0)]),  # a full batch: no forward to save
        "exact": deque([job("exact", 1, None, 4)]),  # asked for the patched path
    }
    planner.split(groups, current=None)
    # a's mixable row rides along with its exact job's patched forward for less than a
    # correction costs, so only b and c (a forward each, patched) are mixed.
    assert set(groups) == {MIXED, "a", "big", "exact"}
    assert [j.enqueued for j in groups["a"]] == [3, 5]
    assert [j.enqueued for j in groups[MIXED]] == [1, 2]  # oldest first


def test_whether_many_single_rows_mix_follows_what_batching_saves() -> None:
    """Sixteen tasks with one image each: mixed where a batch of 16 costs about one image
    (a forward each saved), patched where it costs 16 (the corrections would be pure cost)."""
    mixing = singles(16)
    Planner(BATCHING, 16, lambda parts, x: x).split(mixing, current=None)
    assert list(mixing) == [MIXED] and len(mixing[MIXED]) == 16
    patched = singles(16)
    Planner(NO_BATCHING, 16, lambda parts, x: x).split(patched, current=None)
    assert MIXED not in patched and len(patched) == 16


def test_the_round_mixes_as_many_groups_as_lower_its_cost() -> None:
    """Cheap tasks mix; a task whose correction costs more than its own patched forward and
    swap (a dense adapter: 10^6 changed weights) stays patched, as does the patched-now task
    whose group fills a forward."""
    cost = CostModel(swap_weight_s=1e-7, site_s=0.01, weight_row_s=2e-6, batch_s={1: 1.0, 16: 2.0})
    groups = singles(4)
    groups["dense"] = deque([job("dense", 1, spec(1_000_000, 10), 9)])
    groups["current"] = deque([job("current", 16, spec(1000, 10), 8)])
    Planner(cost, 16, lambda parts, x: x).split(groups, current="current")
    assert set(groups) == {MIXED, "dense", "current"}
    assert sorted(j.key for j in groups[MIXED]) == ["t0", "t1", "t2", "t3"]


def test_one_mixable_group_alone_is_not_mixed() -> None:
    planner = Planner(FREE_MIX, 16, lambda parts, x: x)
    groups = {"a": deque([job("a", 1, spec(), 0)]), "b": deque([job("b", 1, None, 1)])}
    planner.split(groups, current=None)
    assert set(groups) == {"a", "b"}


def test_a_chunk_of_two_image_sizes_runs_one_mixed_forward_per_size() -> None:
    """Adapters trained at different image sizes cannot share a forward: one per size, each
    mixed when it holds two tasks, patched when it holds one."""
    shapes: list[tuple[int, ...]] = []

    def run_mixed(parts, images):  # type: ignore[no-untyped-def]
        shapes.append(tuple(images.shape))
        return images.flatten(1)[:, :2]

    patched: list[list[Job]] = []
    loop = asyncio.new_event_loop()  # answers are handed to it (not run: nobody awaits them)
    spec = MixSpec(None, lambda f: f)
    jobs = [
        Job(k, lambda x: x, torch.zeros(1, 3, s, s), loop.create_future(), loop, None, mix=spec)  # type: ignore[arg-type]
        for k, s in [("a", 8), ("b", 16), ("c", 8), ("d", 32)]
    ]
    planner = Planner(FREE_MIX, 16, run_mixed, always=True)
    planner.run(jobs, patched.append)
    assert sorted(shapes) == [(2, 3, 8, 8)]
    assert sorted(j.key for chunk in patched for j in chunk) == ["b", "d"]
    assert [j.path for j in jobs] == ["mixed", "patched", "mixed", "patched"]
    loop.close()


@pytest.fixture
def engine(tiny: tuple[nn.Module, BaseSignature]) -> Engine:
    return Engine(copy.deepcopy(tiny[0]), tiny[1], "cpu", "float32")


def make(engine: Engine, tiny, task: str, seed: int, block: int = 1) -> PreparedAdapter:  # type: ignore[no-untyped-def]
    adapter = random_adapter(*tiny, task, density=0.05, seed=seed, block_size=block)
    return engine.prepare(SimpleNamespace(task=task, version=seed, digest=f"{task}{seed}"), adapter)


def mix_of(engine: Engine, p: PreparedAdapter) -> MixSpec:
    assert p.correction is not None
    return MixSpec(p.correction, partial(engine.head_probs, p))


def run_round(
    engine: Engine, submit, planner: Planner | None = None, metrics: Metrics | None = None
):  # type: ignore[no-untyped-def]
    """Hold the worker, queue what ``submit(batcher)`` queues, release: one round."""
    planner = planner or Planner(FREE_MIX, 16, engine.run_mixed, always=True)
    b = Batcher(16, 0.01, 64, metrics or Metrics(), lambda: None, planner=planner)
    started, release = threading.Event(), threading.Event()

    async def main():  # type: ignore[no-untyped-def]
        b.start()
        hold = asyncio.ensure_future(b.call(lambda: (started.set(), release.wait(10)), 10))
        assert await asyncio.to_thread(started.wait, 10)
        jobs = submit(b)
        release.set()
        await hold
        await asyncio.gather(*(j.future for j in jobs))
        return jobs

    try:
        return asyncio.run(main())
    finally:
        b.stop()


def test_a_round_of_many_tasks_is_answered_mixed_each_row_as_if_alone(engine, tiny) -> None:  # type: ignore[no-untyped-def]
    a, b, c = (
        make(engine, tiny, "a", 1),
        make(engine, tiny, "b", 2, block=16),
        make(engine, tiny, "c", 3),
    )
    emb = torch.nn.functional.normalize(torch.randn(4, tiny[1].embed_dim), dim=1)
    x = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    plan = [("a", a, x[0:2]), ("zs", None, x[2:3]), ("b", b, x[3:4]), ("a", a, x[4:5]),
            ("c", c, x[5:6]), ("c-exact", c, x[6:7])]  # fmt: skip

    def submit(batcher: Batcher) -> list[Job]:
        jobs = []
        for key, who, images in plan:
            if who is None:
                fn = partial(engine.run_zero_shot, emb)
                mix: MixSpec | None = MixSpec(None, partial(engine.zero_shot_probs, emb))
            else:
                fn, mix = (
                    partial(engine.run, who),
                    (None if key == "c-exact" else mix_of(engine, who)),
                )
            jobs.append(batcher.submit(key, fn, images, mix=mix))
        return jobs

    metrics = Metrics()
    jobs = run_round(engine, submit, metrics=metrics)
    assert [j.path for j in jobs] == ["mixed"] * 5 + ["patched"]
    # both forwards counted in the batch-size histogram: 6 rows mixed, 1 patched
    forwards = metrics.registry.get_sample_value("deltaclip_batch_images_count")
    assert (forwards, metrics.registry.get_sample_value("deltaclip_batch_images_sum")) == (2, 7)
    for j, (key, who, images) in zip(jobs, plan, strict=True):
        alone = engine.run(who, images) if who is not None else engine.run_zero_shot(emb, images)
        assert rel(j.future.result(), alone) <= TOL, key
    engine.restore_base()
    assert engine.patcher.is_pristine()


def test_a_failing_mixed_forward_retries_each_job_patched(engine, tiny) -> None:  # type: ignore[no-untyped-def]
    a, b = make(engine, tiny, "a", 1), make(engine, tiny, "b", 2)
    x = torch.randn(2, 3, 32, 32)

    def broken(parts, images):  # type: ignore[no-untyped-def]
        raise RuntimeError("injected")

    planner = Planner(FREE_MIX, 16, broken, always=True)
    jobs = run_round(engine, lambda bt: [bt.submit(p.digest, partial(engine.run, p), x[i : i + 1],
                     mix=mix_of(engine, p)) for i, p in enumerate([a, b])], planner)  # fmt: skip
    assert [j.path for j in jobs] == ["patched", "patched"]
    for j, p, i in zip(jobs, [a, b], range(2), strict=True):
        assert torch.equal(j.future.result(), engine.run(p, x[i : i + 1]))


def test_a_queued_batch_keeps_the_adapters_it_holds_when_they_are_replaced_or_evicted(
    engine, tiny
) -> None:  # type: ignore[no-untyped-def]
    """A new version of a task, an alias moved to it and the old version evicted (all its
    references dropped but the jobs') while both versions' jobs wait in one round: each job is
    answered with the version it resolved to."""
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    old, other = make(engine, tiny, "t", 1), make(engine, tiny, "u", 2)
    want_old = engine.run(old, x[0:1])
    cache = {"t": old, "u": other}  # what a cache and an alias would point at

    def submit(batcher: Batcher) -> list[Job]:
        first = cache["t"]
        jobs = [
            batcher.submit(
                first.digest, partial(engine.run, first), x[0:1], mix=mix_of(engine, first)
            )
        ]
        cache["t"] = make(engine, tiny, "t", 7)  # a new version; the alias moves to it
        new = cache["t"]
        jobs.append(
            batcher.submit(new.digest, partial(engine.run, new), x[1:2], mix=mix_of(engine, new))
        )
        jobs.append(
            batcher.submit(
                other.digest, partial(engine.run, other), x[2:3], mix=mix_of(engine, other)
            )
        )
        return jobs

    del old
    jobs = run_round(engine, submit)
    gc.collect()
    assert [j.path for j in jobs] == ["mixed"] * 3
    assert rel(jobs[0].future.result(), want_old) <= TOL
    assert rel(jobs[1].future.result(), engine.run(cache["t"], x[1:2])) <= TOL
    assert rel(jobs[2].future.result(), engine.run(other, x[2:3])) <= TOL
    assert rel(jobs[0].future.result(), jobs[1].future.result()) > 100 * TOL  # versions differ


def test_the_cost_model_is_measured_without_leaving_anything_patched(
    engine,
) -> None:  # type: ignore[no-untyped-def]
    cost = measure_costs(engine, 8, reps=1)
    assert list(cost.batch_s) == [1, 2, 4, 8]  # forwards timed at each size
    values = [*cost.batch_s.values(), cost.swap_weight_s, cost.site_s, cost.weight_row_s]
    assert all(v >= 0 and v < 10 for v in values) and cost.batch_s[8] > 0
    assert engine.patcher.is_pristine() and engine.current is None
    assert CostModel.parse(json.loads(json.dumps(cost.as_config()))) == cost  # pinnable as is
