"""Residual sparse training: the reset after each step, buffers and momentum, the density budget."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adapters_store.adapter import AdapterInfo, build_adapter
from adapters_store.bases import tower_parameters
from adapters_store.head import TaskHead
from trainer.errors import CheckpointRefused
from trainer.import_finetune import keep_largest
from trainer.rst import ResidualSparsity, enforce_block_budget, enforce_budget, threshold_reset


def _tiny_step(
    net: nn.Module, tau: float, max_density: float | None, lr: float = 1e-4
) -> tuple[ResidualSparsity, dict[str, torch.Tensor], torch.optim.Optimizer]:
    """One SGD (momentum) step of the tiny tower on a fixed batch, then RST."""
    torch.manual_seed(0)
    params = tower_parameters(net)
    rst = ResidualSparsity(params, tau, max_density)
    opt = torch.optim.SGD(params.values(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(4, 3, 32, 32)
    net.visual(x).pow(2).sum().backward()
    opt.step()
    before = {k: p.detach().clone() for k, p in params.items()}
    rst.apply()
    return rst, before, opt


def test_every_changed_weight_moved_more_than_tau(tiny) -> None:  # type: ignore[no-untyped-def]
    net = copy.deepcopy(tiny[0])
    tau = 1e-6
    rst, before, _ = _tiny_step(net, tau, None)
    changed_total = 0
    for key, p in rst.params.items():
        w0 = rst.base[key]
        changed = p != w0
        changed_total += int(changed.sum())
        assert bool(((p - w0).abs()[changed] > tau).all()), key
        # Weights that moved more than tau keep their stepped value, the others are exactly W0.
        moved = (before[key] - w0).abs() > tau
        assert torch.equal(p, torch.where(moved, before[key], w0)), key
    assert changed_total == rst.nnz > 0
    assert rst.nnz < rst.eligible  # the step moved some weights by less than tau: they reset


def test_reset_covers_every_tower_parameter_and_no_buffer(tiny) -> None:  # type: ignore[no-untyped-def]
    net = copy.deepcopy(tiny[0])
    params = tower_parameters(net)
    assert {"visual.class_embedding", "visual.positional_embedding", "visual.proj"} <= set(params)
    rst = ResidualSparsity(params, tau=1.0)
    buffers_before = {k: b.clone() for k, b in net.named_buffers()}
    with torch.no_grad():
        for p in params.values():
            p.add_(0.5)  # every parameter moves by less than tau
    assert rst.apply() == 0
    assert all(torch.equal(p, rst.base[k]) for k, p in params.items())
    assert all(torch.equal(b, buffers_before[k]) for k, b in net.named_buffers())


def test_buffers_and_momentum_are_left_alone() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    params = dict(net.named_parameters())
    rst = ResidualSparsity(params, tau=10.0)  # everything resets
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(8, 4)).sum().backward()  # training mode: running stats change too
    opt.step()
    running = net[1].running_mean.clone()
    momentum = {id(p): opt.state[p]["momentum_buffer"].clone() for p in net.parameters()}
    assert rst.apply() == 0
    assert torch.equal(net[1].running_mean, running) and running.abs().sum() > 0
    for p in net.parameters():
        assert torch.equal(opt.state[p]["momentum_buffer"], momentum[id(p)])


def test_budget_caps_density_over_the_whole_tower(tiny) -> None:  # type: ignore[no-untyped-def]
    net = copy.deepcopy(tiny[0])
    free, _, _ = _tiny_step(copy.deepcopy(tiny[0]), 0.0, None)
    d = 0.01
    rst, _, _ = _tiny_step(net, 0.0, d)
    assert free.nnz > d * free.eligible  # the budget really bites
    assert rst.nnz <= d * rst.eligible
    assert rst.nnz == int(d * rst.eligible) == rst.recount()


def test_budget_keeps_the_largest_changes_across_parameters() -> None:
    base = {"a": torch.zeros(5), "b": torch.zeros(2, 2)}
    params = {
        "a": nn.Parameter(torch.tensor([0.1, -0.5, 0.0, 0.3, 0.2])),
        "b": nn.Parameter(torch.tensor([[0.05, -0.4], [0.0, 0.25]])),
    }
    kept = enforce_budget(params, base, 3)
    assert kept == 3
    assert torch.equal(params["a"].detach(), torch.tensor([0.0, -0.5, 0.0, 0.3, 0.0]))
    assert torch.equal(params["b"].detach(), torch.tensor([[0.0, -0.4], [0.0, 0.0]]))


def test_budget_breaks_ties_by_position_deterministically() -> None:
    base = {"a": torch.zeros(4)}
    params = {"a": nn.Parameter(torch.tensor([0.2, 0.2, -0.2, 0.2]))}
    enforce_budget(params, base, 2)
    assert torch.equal(params["a"].detach(), torch.tensor([0.2, 0.2, 0.0, 0.0]))


def test_threshold_is_on_the_absolute_change_from_the_base() -> None:
    base = {"w": torch.tensor([1.0, -1.0, 0.5, 0.0])}
    w = nn.Parameter(torch.tensor([1.0 + 2e-6, -1.0 - 2e-6, 0.5 + 5e-7, -5e-6]))
    assert threshold_reset({"w": w}, base, 1e-6) == 3
    assert torch.equal(w.detach(), torch.tensor([1.0 + 2e-6, -1.0 - 2e-6, 0.5, -5e-6]))


# ------------------------------------------------------------------------ block-structured RST


def test_a_block_resets_only_when_every_weight_in_it_stayed_within_tau() -> None:
    base = {"w": torch.zeros(10)}  # blocks of 4: [0:4], [4:8], tail [8:10]
    w = nn.Parameter(torch.tensor([0.0, 5e-7, 2e-6, 0.0, 5e-7, -5e-7, 0.0, 1e-7, 0.0, -3e-6]))
    assert threshold_reset({"w": w}, base, 1e-6, block_size=4) == 8  # two blocks of 4 stored
    want = torch.tensor([0.0, 5e-7, 2e-6, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -3e-6])
    assert torch.equal(w.detach(), want), "block 0 and the tail keep every weight, block 1 resets"


def test_block_budget_keeps_the_blocks_with_the_largest_norm() -> None:
    base = {"a": torch.zeros(8), "b": torch.zeros(6)}  # b: one full block and a tail of 2
    params = {
        "a": nn.Parameter(torch.tensor([0.3, 0.0, 0.0, 0.0, 0.2, 0.2, 0.2, 0.2])),  # 0.3, 0.4
        "b": nn.Parameter(torch.tensor([0.1, 0.1, 0.1, 0.0, 0.5, 0.0])),  # ≈0.17, tail 0.5
    }
    kept = enforce_block_budget(params, base, max_blocks=2, block_size=4)
    assert kept == 8
    assert torch.equal(params["a"].detach(), torch.tensor([0.0] * 4 + [0.2] * 4))
    assert torch.equal(params["b"].detach(), torch.tensor([0.0] * 4 + [0.5, 0.0]))


def test_block_budget_breaks_ties_by_position() -> None:
    base = {"a": torch.zeros(8)}
    params = {"a": nn.Parameter(torch.tensor([0.0, 0.2, 0.0, 0.0, 0.0, 0.0, -0.2, 0.0]))}
    enforce_block_budget(params, base, max_blocks=1, block_size=4)
    assert torch.equal(params["a"].detach(), torch.tensor([0.0, 0.2] + [0.0] * 6))


@pytest.mark.parametrize("block_size", [4, 16])
def test_block_rst_step_changes_whole_blocks_within_the_budget(tiny, block_size: int) -> None:  # type: ignore[no-untyped-def]
    d = 0.01
    torch.manual_seed(0)
    net = copy.deepcopy(tiny[0])
    params = tower_parameters(net)
    rst = ResidualSparsity(params, 0.0, d, block_size=block_size)
    opt = torch.optim.SGD(params.values(), lr=1e-4, momentum=0.9)
    net.visual(torch.randn(4, 3, 32, 32)).pow(2).sum().backward()
    opt.step()
    before = {k: p.detach().clone() for k, p in params.items()}
    nnz = rst.apply()
    assert nnz == rst.recount() == int(d * rst.eligible) // block_size * block_size
    for key, p in params.items():
        w0, flat = rst.base[key].reshape(-1), p.detach().reshape(-1)
        pad = -flat.numel() % block_size
        differs = torch.cat([flat != w0, torch.zeros(pad, dtype=torch.bool)]).view(-1, block_size)
        kept = differs.any(1).repeat_interleave(block_size)[: flat.numel()]
        # a kept block keeps every trained weight; everything else is exactly W0
        assert torch.equal(flat[kept], before[key].reshape(-1)[kept]), key
        assert torch.equal(flat[~kept], w0[~kept]), key
    # the adapter of this tower stores exactly these blocks: nnz agrees with the trainer's count
    state = {k: p.detach().clone() for k, p in params.items()}
    adapter = build_adapter(
        rst.base,
        state,
        AdapterInfo(
            task="b",
            base_model="m",
            base_pretrained="p",
            base_fingerprint="a" * 64,
            class_names=["x"],
        ),
        head_state=TaskHead(8, 1).state_dict(),
        block_size=block_size,
    )
    assert adapter.meta.nnz == nnz and adapter.block_size == block_size


def test_block_size_one_is_the_papers_rst(tiny) -> None:  # type: ignore[no-untyped-def]
    one, _, _ = _tiny_step(copy.deepcopy(tiny[0]), 1e-6, 0.01)
    torch.manual_seed(0)
    net = copy.deepcopy(tiny[0])
    params = tower_parameters(net)
    rst = ResidualSparsity(params, 1e-6, 0.01, block_size=1)
    opt = torch.optim.SGD(params.values(), lr=1e-4, momentum=0.9, nesterov=True, weight_decay=5e-4)
    net.visual(torch.randn(4, 3, 32, 32)).pow(2).sum().backward()
    opt.step()
    assert rst.apply() == one.nnz
    assert all(torch.equal(p, one.params[k]) for k, p in params.items())


def test_import_finetune_keeps_whole_blocks_within_the_density() -> None:
    base = {"visual.w": torch.zeros(42)}  # ten blocks of 4 and a tail of 2
    tuned = {"visual.w": torch.arange(42.0).flip(0) / 100}  # the largest weights come first
    kept = keep_largest(base, tuned, 0.25, block_size=4)["visual.w"]  # 10 weights: 2 blocks
    assert torch.equal(kept[:8], tuned["visual.w"][:8]) and not kept[8:].any()
    with pytest.raises(CheckpointRefused, match="block size 3"):
        keep_largest(base, tuned, 0.25, block_size=3)


def test_a_budget_at_the_end_leaves_training_free_then_keeps_the_largest_changes() -> None:
    start = torch.zeros(6)
    params = {"a": nn.Parameter(start.clone())}
    rst = ResidualSparsity(params, tau=0.05, max_density=0.5, budget_at_end=True)
    with torch.no_grad():
        params["a"].copy_(torch.tensor([0.3, -0.2, 0.01, 0.5, 0.1, -0.4]))
    assert rst.apply() == 5  # the threshold reset runs (0.01 goes back), the budget does not
    assert torch.equal(params["a"].detach(), torch.tensor([0.3, -0.2, 0.0, 0.5, 0.1, -0.4]))
    assert rst.finalize() is True  # now the 3 largest of the 5 are kept
    assert torch.equal(params["a"].detach(), torch.tensor([0.3, 0.0, 0.0, 0.5, 0.0, -0.4]))
    assert rst.nnz == 3 == rst.recount() and rst.finalize() is False
    throughout = ResidualSparsity({"a": nn.Parameter(start.clone())}, 0.05, 0.5)
    assert throughout.finalize() is False  # nothing deferred: the budget already held each step
