"""The engine's switch is exception-safe, and the base check tells the truth without repairing
silently: faults are injected at the exact step (partway through a patch or a restore) into a
real engine on the tiny base."""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from adapters_store.bases import BaseSignature
from adapters_store.synthetic import random_adapter
from server.baseproof import BaseCheck
from server.engine import Engine, PreparedAdapter
from server.metrics import Metrics
from server.patcher import PreparedResidual

IMAGES = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class Injected(RuntimeError):
    pass


@pytest.fixture
def engine(tiny: tuple[nn.Module, BaseSignature]) -> Engine:
    net, sig = tiny
    return Engine(copy.deepcopy(net), sig, "cpu", "float32")


def prepared(
    engine: Engine, tiny: tuple[nn.Module, BaseSignature], task: str, seed: int
) -> PreparedAdapter:
    net, sig = tiny
    adapter = random_adapter(net, sig, task, density=0.05, seed=seed)
    record = SimpleNamespace(task=task, version=1, digest=f"{task}-digest")
    return engine.prepare(record, adapter)


def fail_partway(engine: Engine, method: str) -> None:
    """Make the patcher's ``method`` ("patch" or "restore") write half its values, then raise."""

    def half_then_raise(res: PreparedResidual) -> None:
        values = res.task_values if method == "patch" else res.original_values
        for dtype, idx in res.indices.items():
            half = idx.numel() // 2
            engine.patcher.flat[dtype].index_copy_(0, idx[:half], values[dtype][:half])
        raise Injected(f"{method} failed partway")

    setattr(engine.patcher, method, half_then_raise)


def test_a_patch_failing_partway_leaves_the_exact_base_and_no_adapter_recorded(
    engine, tiny
) -> None:  # type: ignore[no-untyped-def]
    a, b = prepared(engine, tiny, "a", 1), prepared(engine, tiny, "b", 2)
    expected_a = engine.run(a, IMAGES)
    fail_partway(engine, "patch")
    with pytest.raises(Injected):
        engine.run(b, IMAGES)  # A is restored, then B's patch fails half-written
    assert engine.current is None
    assert engine.patcher.is_pristine()
    assert engine.verify()
    assert engine.failed_switches == 1
    del engine.patcher.patch  # the fault is gone
    # The case: the next request for A must patch A afresh, not run A's head on the base
    # plus half of B.
    assert torch.equal(engine.run(a, IMAGES), expected_a)
    assert engine.current is a and engine.verify()


def test_a_restore_failing_partway_leaves_the_exact_base_and_no_adapter_recorded(
    engine, tiny
) -> None:  # type: ignore[no-untyped-def]
    a, b = prepared(engine, tiny, "a", 1), prepared(engine, tiny, "b", 2)
    engine.run(a, IMAGES)
    fail_partway(engine, "restore")
    with pytest.raises(Injected):
        engine.run(b, IMAGES)
    assert engine.current is None and engine.patcher.is_pristine()
    del engine.patcher.restore
    fresh = Engine(copy.deepcopy(tiny[0]), tiny[1], "cpu", "float32")
    expected_b = fresh.run(prepared(fresh, tiny, "b", 2), IMAGES)
    assert torch.equal(engine.run(b, IMAGES), expected_b)


def test_a_failed_reset_is_retried_by_the_next_switch(engine, tiny) -> None:  # type: ignore[no-untyped-def]
    a, b = prepared(engine, tiny, "a", 1), prepared(engine, tiny, "b", 2)
    engine.run(a, IMAGES)
    fail_partway(engine, "patch")

    def broken_reset() -> None:
        raise Injected("reset failed")

    engine.patcher.reset = broken_reset  # type: ignore[method-assign]
    with pytest.raises(Injected):
        engine.run(b, IMAGES)
    assert engine.current is None and not engine.verify()  # the record admits it is unsure
    del engine.patcher.reset, engine.patcher.patch
    engine.run(a, IMAGES)  # the switch resets first, then patches
    assert engine.current is a and engine.verify()
    engine.restore_base()
    assert engine.patcher.is_pristine()


def test_the_check_verifies_before_restoring_and_hashes_the_restored_base(engine, tiny) -> None:  # type: ignore[no-untyped-def]
    check = BaseCheck(engine, Metrics(), interval_s=3600)
    a = prepared(engine, tiny, "a", 1)
    engine.run(a, IMAGES)
    proof = check.run()
    assert proof.consistent and proof.unchanged and proof.exact
    assert proof.live_fingerprint == engine.serving_fingerprint
    assert check.mismatches == 0 and engine.current is None
    assert not check.due()  # the next one waits for the interval


@pytest.mark.parametrize("fault", ["patch never written", "patch half written", "stray write"])
def test_the_check_reports_a_mismatch_logs_and_counts_it(engine, tiny, fault, caplog) -> None:  # type: ignore[no-untyped-def]
    metrics = Metrics()
    check = BaseCheck(engine, metrics, interval_s=3600)
    a = prepared(engine, tiny, "a", 1)
    if fault == "stray write":
        engine.run(a, IMAGES)
        engine.patcher.flat[torch.float32][7] += 1.0
    else:  # the record says A, the weights say otherwise (the old, unsafe switch's state)
        if fault == "patch half written":
            idx = a.residual.indices[torch.float32]
            half = idx.numel() // 2
            engine.patcher.flat[torch.float32].index_copy_(
                0, idx[:half], a.residual.task_values[torch.float32][:half]
            )
        engine.current = a
    with caplog.at_level(logging.ERROR, logger="deltaclip.server"):
        proof = check.run()
    assert not proof.consistent and not proof.exact
    assert check.mismatches == 1
    assert "differ from the record" in caplog.text
    exposition = metrics.registry.get_sample_value("deltaclip_base_mismatches_total")
    assert exposition == 1.0
    # Reported, then reset as a whole (not patched over): the weights are the base again.
    assert engine.current is None and engine.patcher.is_pristine()
    assert proof.live_fingerprint == engine.serving_fingerprint
