"""The fused patcher: exact patch/restore, bit-identical to the merged model, in every dtype."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

from adapters_store.adapter import Adapter, AdapterInfo, build_adapter, merge_state
from adapters_store.bases import BaseSignature, base_fingerprint, tower_parameters
from adapters_store.head import TaskHead
from adapters_store.synthetic import random_adapter
from server.patcher import ALIGN_BYTES, FlatPatcher


@pytest.fixture
def model(tiny: tuple[nn.Module, BaseSignature]) -> nn.Module:
    return copy.deepcopy(tiny[0])


def test_parameters_become_views_of_one_flat_buffer(model: nn.Module) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    patcher = FlatPatcher(model.visual)
    assert list(patcher.flat) == [torch.float32]
    buf = patcher.flat[torch.float32]
    params = list(model.visual.parameters())
    assert sum(p.numel() for p in params) <= buf.numel() < sum(p.numel() + 16 for p in params)
    assert buf.data_ptr() % ALIGN_BYTES == 0 and buf.numel() * 4 % ALIGN_BYTES == 0
    for p in params:
        assert p.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
        assert p.data_ptr() % ALIGN_BYTES == 0, "every parameter starts on a cache line"
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


# ------------------------------------------------------------------------- block adapters


class _OddTower(nn.Module):
    """Parameters whose sizes are not multiples of any block size: every block form has tails."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Linear(7, 5)  # 35 + 5
        self.b = nn.Linear(5, 13)  # 65 + 13
        self.c = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x))).sum(-1, keepdim=True) * self.c


def _odd_adapter(tower: nn.Module, block_size: int, seed: int) -> Adapter:
    """A block (or unstructured) adapter over ``_OddTower`` that changes each parameter's tail."""
    g = torch.Generator().manual_seed(seed)
    base = {f"visual.{k}": p.detach().clone() for k, p in tower.named_parameters()}
    task = {}
    for key, w in base.items():
        changed = torch.rand(w.shape, generator=g) < 0.3
        changed.view(-1)[-1] = True
        task[key] = torch.where(changed, w * (1 + 0.05 * torch.randn(w.shape, generator=g)), w)
    head = TaskHead(4, 2).state_dict()
    return build_adapter(
        base,
        task,
        AdapterInfo(
            task="odd",
            base_model="odd",
            base_pretrained="x",
            base_fingerprint="0" * 64,
            class_names=["a", "b"],
        ),
        head_state=head,
        block_size=block_size,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_tails_patch_only_their_parameter(dtype: torch.dtype) -> None:
    tower = _OddTower().to(dtype)
    pristine = {f"visual.{k}": p.detach().clone() for k, p in tower.named_parameters()}
    patcher = FlatPatcher(tower)
    for block_size in (1, 2, 4, 8, 16):
        adapter = _odd_adapter(_OddTower(), block_size, seed=block_size)
        assert adapter.block_size == block_size
        prepared = patcher.prepare(adapter)
        assert bool(prepared.block_rows) == (block_size > 1), "blocks move as whole items"
        patcher.patch(prepared)
        want = merge_state(pristine, adapter)
        for key, p in tower.named_parameters():
            assert torch.equal(p.detach(), want[f"visual.{key}"]), (block_size, key)
        gaps = patcher.flat[dtype].clone()
        for _, start, numel in patcher.offsets.values():
            gaps[start : start + numel] = 0
        assert not bool(gaps.any()), "a tail block wrote past its parameter into the gap"
        patcher.restore(prepared)
        assert patcher.is_pristine()


@pytest.mark.parametrize("numpy_blocks", [True, False], ids=["numpy", "index_copy"])
def test_thousands_of_mixed_block_and_unstructured_cycles_are_exact(
    model: nn.Module, tiny, numpy_blocks: bool
) -> None:  # type: ignore[no-untyped-def]
    net, sig = tiny
    patcher = FlatPatcher(model.visual)
    patcher.numpy_blocks = numpy_blocks  # False: the int64-row index_copy_ that CUDA uses
    adapters = [
        random_adapter(net, sig, f"t{i}", density=0.03, seed=i, block_size=b)
        for i, b in enumerate([1, 2, 4, 8, 16, 16, 4, 1])
    ]
    prepared = [patcher.prepare(a) for a in adapters]
    base_state = {k: p.detach().clone() for k, p in tower_parameters(net).items()}
    merged = [merge_state(base_state, a) for a in adapters]
    rng = random.Random(1)
    for cycle in range(3000):
        i = rng.randrange(len(adapters))
        patcher.patch(prepared[i])
        if cycle % 250 == 0:  # the live weights are the adapter's merge, bit for bit
            for key, p in tower_parameters(model).items():
                assert torch.equal(_bits(p.detach()), _bits(merged[i][key])), (i, key)
        patcher.restore(prepared[i])
    assert patcher.is_pristine()
    assert base_fingerprint(model) == sig.fingerprint


@pytest.mark.parametrize("block_size", [4, 16])
def test_block_adapter_forward_equals_merged_model_bit_for_bit(
    model: nn.Module, tiny, block_size: int
) -> None:  # type: ignore[no-untyped-def]
    net, sig = tiny
    patcher = FlatPatcher(model.visual)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    adapter = random_adapter(net, sig, "t", density=0.05, seed=7, block_size=block_size)
    merged = copy.deepcopy(net)
    merged.load_state_dict(merge_state(net.state_dict(), adapter))
    prepared = patcher.prepare(adapter)
    patcher.patch(prepared)
    with torch.no_grad():
        got, want = model.encode_image(x), merged.encode_image(x)
    patcher.restore(prepared)
    assert torch.equal(got, want)
    assert prepared.nnz == adapter.meta.nnz
    # one int64 row id + two 64-byte (B=16) or 16-byte (B=4) items per block
    assert prepared.nbytes == prepared.nnz // block_size * (8 + 2 * 4 * block_size)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """float32 as its raw bits: -0.0 and 0.0 differ, as they do in memory."""
    return t.view(torch.int32)
