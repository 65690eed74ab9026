"""Residual sparse training: after every optimiser step, weights that barely moved go back to base.

``W ← W0`` wherever ``|W − W0| ≤ τ``, over every parameter of the image tower (weights, biases,
norm affines, embeddings, projection). Buffers are never touched and neither are the optimiser's
momentum buffers, so a weight can still escape the threshold by accumulating momentum. Our
``max_density`` budget then keeps only the ``⌊d × eligible⌋`` largest ``|W − W0|`` over the
whole tower (a global top-k; ties go to the earlier parameter and position, deterministically).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def frozen_copy(params: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """``W0``: detached copies of the tower's parameters, on their devices."""
    return {k: p.detach().clone() for k, p in params.items()}


@torch.no_grad()
def threshold_reset(
    params: Mapping[str, nn.Parameter], base: Mapping[str, torch.Tensor], tau: float
) -> int:
    """Reset every weight with ``|W − W0| ≤ τ`` to ``W0``; return how many weights still differ."""
    counts = []
    for key, p in params.items():
        w0 = base[key]
        moved = (p - w0).abs() > tau
        p.copy_(torch.where(moved, p, w0))
        counts.append(moved.sum())
    return int(torch.stack(counts).sum()) if counts else 0  # one device sync, not one per tensor


@torch.no_grad()
def enforce_budget(
    params: Mapping[str, nn.Parameter], base: Mapping[str, torch.Tensor], max_changed: int
) -> int:
    """Keep only the ``max_changed`` largest ``|W − W0|`` across all ``params``; return the count.

    Only changed positions are gathered and sorted (about ``max_changed`` of them once training
    has reached the budget), never the whole tower.
    """
    keys = list(params)
    positions, magnitudes = [], []
    for key in keys:
        diff = (params[key] - base[key]).abs().reshape(-1)
        idx = diff.nonzero().squeeze(1)
        positions.append(idx)
        magnitudes.append(diff[idx])
    counts = [int(i.numel()) for i in positions]
    total = sum(counts)
    if total <= max_changed:
        return total
    flat = torch.cat([m.float().to(magnitudes[0].device) for m in magnitudes])
    order = torch.argsort(flat, descending=True, stable=True)
    keep = torch.zeros(total, dtype=torch.bool, device=flat.device)
    keep[order[:max_changed]] = True
    start = 0
    for key, idx, count in zip(keys, positions, counts, strict=True):
        drop = idx[~keep[start : start + count].to(idx.device)]
        start += count
        if drop.numel():
            p, w0 = params[key].view(-1), base[key].reshape(-1)
            p[drop] = w0[drop]
    return max_changed


@torch.no_grad()
def count_changed(params: Mapping[str, nn.Parameter], base: Mapping[str, torch.Tensor]) -> int:
    """How many weights differ from the base, counted exactly (after a resume or a snap)."""
    return sum(int((p != base[k]).sum()) for k, p in params.items())


class ResidualSparsity:
    """RST over one tower: the frozen base copy, the threshold and the optional density budget.

    Args:
        params: the tower's parameters by ``state_dict`` key (``adapters_store.tower_parameters``).
        tau: the reset threshold (``≥ 0``; 0 resets only weights that did not move at all).
        max_density: at most this fraction of ``eligible`` weights may differ from the base.
    """

    def __init__(
        self, params: Mapping[str, nn.Parameter], tau: float, max_density: float | None = None
    ) -> None:
        self.params = dict(params)
        self.base = frozen_copy(self.params)
        self.tau = tau
        self.eligible = sum(p.numel() for p in self.params.values())
        self.max_changed = (
            int(max_density * self.eligible) if max_density is not None else self.eligible
        )
        self.nnz = 0

    def apply(self) -> int:
        """Call after every optimiser step; returns (and remembers) the number of changed weights."""
        nnz = threshold_reset(self.params, self.base, self.tau)
        if nnz > self.max_changed:
            nnz = enforce_budget(self.params, self.base, self.max_changed)
        self.nnz = nnz
        return nnz

    @property
    def density(self) -> float:
        """Changed weights as a fraction of the eligible ones."""
        return self.nnz / self.eligible if self.eligible else 0.0

    def recount(self) -> int:
        """Count the changed weights again after the tower was set from outside."""
        self.nnz = count_changed(self.params, self.base)
        return self.nnz
