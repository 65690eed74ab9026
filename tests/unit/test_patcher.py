"""The fused patcher: exact patch/restore, bit-identical to the merged model, in every dtype."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

from adapters_store.adapter import merge_state
from adapters_store.bases import BaseSignature, base_fingerprint, tower_parameters
from adapters_store.synthetic import random_adapter
from server.patcher import FlatPatcher


@pytest.fixture
def model(tiny: tuple[nn.Module, BaseSignature]) -> nn.Module:
    return copy.deepcopy(tiny[0])


def test_parameters_become_views_of_one_flat_buffer(model: nn.Module) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    patcher = FlatPatcher(model.visual)
    assert list(patcher.flat) == [torch.float32]
    buf = patcher.flat[torch.float32]
    assert buf.numel() == sum(p.numel() for p in model.visual.parameters())
    for p in model.visual.parameters():
        assert p.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_thousands_of_cycles_leave_the_base_bit_identical(model: nn.Module, tiny) -> None:  # type: ignore[no-untyped-def]
    sig = tiny[1]
    patcher = FlatPatcher(model.visual)
    adapters = [
        patcher.prepare(random_adapter(tiny[0], sig, f"t{i}", density=0.02, seed=i))
        for i in range(12)
    ]
    rng = random.Random(0)
    for _ in range(3000):
        a = rng.choice(adapters)
        patcher.patch(a)
        assert not patcher.is_pristine()
        patcher.restore(a)
    assert patcher.is_pristine()
    assert base_fingerprint(model) == sig.fingerprint


def test_patched_forward_equals_merged_model_bit_for_bit(model: nn.Module, tiny) -> None:  # type: ignore[no-untyped-def]
    net, sig = tiny
    patcher = FlatPatcher(model.visual)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for seed in range(4):
        adapter = random_adapter(net, sig, "t", density=0.05, seed=seed)
        merged = copy.deepcopy(net)
        merged.load_state_dict(merge_state(net.state_dict(), adapter))
        prepared = patcher.prepare(adapter)
        patcher.patch(prepared)
        with torch.no_grad():
            got, want = model.encode_image(x), merged.encode_image(x)
        patcher.restore(prepared)
        assert torch.equal(got, want)
        assert not torch.equal(want, net.encode_image(x).detach())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_serving_is_exact_and_restores(
    model: nn.Module, tiny, dtype: torch.dtype
) -> None:  # type: ignore[no-untyped-def]
    net, sig = tiny
    model.visual.to(dtype)
    base_state = {k: p.detach().clone() for k, p in tower_parameters(model).items()}
    patcher = FlatPatcher(model.visual)
    adapter = random_adapter(net, sig, "t", density=0.05, seed=1)
    prepared = patcher.prepare(adapter)
    patcher.patch(prepared)
    want = merge_state(base_state, adapter)  # the definition, in the serving dtype
    for key, param in tower_parameters(model).items():
        assert param.dtype == dtype
        assert torch.equal(param.detach(), want[key]), key
    for _ in range(500):
        patcher.restore(prepared)
        patcher.patch(prepared)
    patcher.restore(prepared)
    assert patcher.is_pristine()
    assert all(torch.equal(p.detach(), base_state[k]) for k, p in tower_parameters(model).items())


def test_prepare_reads_the_pristine_copy_not_live_weights(model: nn.Module, tiny) -> None:  # type: ignore[no-untyped-def]
    net, sig = tiny
    patcher = FlatPatcher(model.visual)
    a = random_adapter(net, sig, "a", density=0.1, seed=1)
    b = random_adapter(net, sig, "b", density=0.1, seed=2)
    pa = patcher.prepare(a)
    patcher.patch(pa)
    pb = patcher.prepare(b)  # prepared while a is live
    patcher.restore(pa)
    patcher.patch(pb)
    want = merge_state({k: p.detach() for k, p in tower_parameters(net).items()}, b)
    assert all(torch.equal(p.detach(), want[k]) for k, p in tower_parameters(model).items())
    patcher.restore(pb)
    assert patcher.is_pristine()


def test_prepared_memory_is_counted(model: nn.Module, tiny) -> None:  # type: ignore[no-untyped-def]
    patcher = FlatPatcher(model.visual)
    prepared = patcher.prepare(random_adapter(tiny[0], tiny[1], "t", density=0.01, seed=0))
    # int64 index + float32 task value + float32 original per changed weight
    assert prepared.nbytes == prepared.nnz * (8 + 4 + 4)
