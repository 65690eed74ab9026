"""Residual sparse training: after every optimiser step, weights that barely moved go back to base.

``W ← W0`` wherever ``|W − W0| ≤ τ``, over every parameter of the image tower (weights, biases,
norm affines, embeddings, projection). Buffers are never touched and neither are the optimiser's
momentum buffers, so a weight can still escape the threshold by accumulating momentum. Our
``max_density`` budget then keeps only the ``⌊d × eligible⌋`` largest ``|W − W0|`` over the
whole tower (a global top-k; ties go to the earlier parameter and position, deterministically).

Block-structured RST (``block_size = B > 1``): a block is ``B`` consecutive elements of a
parameter's flattened tensor (the last block of a parameter whose size is not a multiple of ``B``
holds only the elements that exist). A block resets to ``W0`` when *every* ``|W − W0|`` in it is
``≤ τ``; the budget keeps the ``⌊d × eligible / B⌋`` blocks with the largest L2 norm of
``W − W0`` (same tie rule), so the weights an adapter stores, ``B`` per block, stay
``≤ d × eligible``. Counts are then stored weights, ``B`` per changed block: what the adapter's
``nnz`` will say. ``B = 1`` is the paper's RST, computed exactly as before.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def frozen_copy(params: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """``W0``: detached copies of the tower's parameters, on their devices."""
    return {k: p.detach().clone() for k, p in params.items()}


def _blocks(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """``flat`` as ``[n_blocks, B]`` rows, a tail block padded with zeros (which never count as
    moved, nor add to a block's norm)."""
    pad = -flat.numel() % block_size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block_size)


def _expand(block_mask: torch.Tensor, block_size: int, shape: torch.Size) -> torch.Tensor:
    """A per-block mask as a per-element mask of a parameter of ``shape``."""
    numel = shape.numel()
    return block_mask.repeat_interleave(block_size)[:numel].view(shape)


@torch.no_grad()
def threshold_reset(
    params: Mapping[str, nn.Parameter],
    base: Mapping[str, torch.Tensor],
    tau: float,
    block_size: int = 1,
) -> int:
    """Reset every weight (every block, when ``block_size > 1``) with ``|W − W0| ≤ τ`` throughout to
    ``W0``; return how many weights still differ (``B`` per block that does)."""
    counts = []
    for key, p in params.items():
        w0 = base[key]
        moved = (p - w0).abs() > tau
        if block_size > 1:
            kept = _blocks(moved.reshape(-1), block_size).any(1)
            moved = _expand(kept, block_size, p.shape)
            counts.append(kept.sum() * block_size)
        else:
            counts.append(moved.sum())
        p.copy_(torch.where(moved, p, w0))
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
    total = sum(int(i.numel()) for i in positions)
    if total <= max_changed:
        return total
    drops = _outside_top_k(positions, [m.float() for m in magnitudes], max_changed)
    for key, drop in zip(keys, drops, strict=True):
        if drop.numel():
            p, w0 = params[key].view(-1), base[key].reshape(-1)
            p[drop] = w0[drop]
    return max_changed


def _outside_top_k(
    ids: list[torch.Tensor], scores: list[torch.Tensor], k: int
) -> list[torch.Tensor]:
    """Per parameter, its ``ids`` outside the global top ``k`` of ``scores`` (a stable sort: ties
    go to the earlier parameter and id)."""
    flat = torch.cat([s.to(scores[0].device) for s in scores])
    order = torch.argsort(flat, descending=True, stable=True)
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[order[:k]] = True
    out, start = [], 0
    for idx in ids:
        out.append(idx[~keep[start : start + idx.numel()].to(idx.device)])
        start += idx.numel()
    return out


@torch.no_grad()
def enforce_block_budget(
    params: Mapping[str, nn.Parameter],
    base: Mapping[str, torch.Tensor],
    max_blocks: int,
    block_size: int,
) -> int:
    """Keep only the ``max_blocks`` blocks with the largest L2 norm of ``W − W0`` across all
    ``params`` (ties: earlier parameter and block first); return the weights kept, ``B`` per block.

    Norms are compared squared, in float64, so tiny float32 differences neither underflow nor tie.
    """
    keys = list(params)
    ids, norms = [], []
    for key in keys:
        sq = _blocks((params[key] - base[key]).double().reshape(-1), block_size).pow(2).sum(1)
        idx = sq.nonzero().squeeze(1)
        ids.append(idx)
        norms.append(sq[idx])
    total = sum(int(i.numel()) for i in ids)
    if total <= max_blocks:
        return total * block_size
    for key, drop in zip(keys, _outside_top_k(ids, norms, max_blocks), strict=True):
        if drop.numel():
            p, w0 = params[key], base[key]
            dropped = torch.zeros(-(-p.numel() // block_size), dtype=torch.bool, device=p.device)
            dropped[drop] = True
            p.copy_(torch.where(_expand(dropped, block_size, p.shape), w0, p))
    return max_blocks * block_size


@torch.no_grad()
def count_changed(
    params: Mapping[str, nn.Parameter], base: Mapping[str, torch.Tensor], block_size: int = 1
) -> int:
    """How many weights differ from the base, counted exactly (after a resume or a snap); with
    blocks, ``B`` for every block holding a difference."""
    if block_size == 1:
        return sum(int((p != base[k]).sum()) for k, p in params.items())
    return block_size * sum(
        int(_blocks((p != base[k]).reshape(-1), block_size).any(1).sum()) for k, p in params.items()
    )


class ResidualSparsity:
    """RST over one tower: the frozen base copy, the threshold and the optional density budget.

    Args:
        params: the tower's parameters by ``state_dict`` key (``adapters_store.tower_parameters``).
        tau: the reset threshold (``≥ 0``; 0 resets only weights that did not move at all).
        max_density: at most this fraction of ``eligible`` weights may differ from the base.
        block_size: ``B``; 1 is the paper's RST, above 1 weights change in aligned blocks of
            ``B`` consecutive flat elements (module docstring).
        budget_at_end: apply the budget once, when training is over (:meth:`finalize`), instead
            of after every step; the threshold reset still runs after every step.
    """

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        tau: float,
        max_density: float | None = None,
        block_size: int = 1,
        budget_at_end: bool = False,
    ) -> None:
        self.params = dict(params)
        self.budget_at_end = budget_at_end
        self.base = frozen_copy(self.params)
        self.tau = tau
        self.block_size = block_size
        self.eligible = sum(p.numel() for p in self.params.values())
        self.max_changed = (
            int(max_density * self.eligible) if max_density is not None else self.eligible
        )
        self.nnz = 0

    def apply(self) -> int:
        """Call after every optimiser step; returns (and remembers) the number of changed weights
        (stored weights, ``B`` per changed block, when ``block_size > 1``)."""
        b = self.block_size
        nnz = threshold_reset(self.params, self.base, self.tau, b)
        self.nnz = nnz if self.budget_at_end else self._within_budget(nnz)
        return self.nnz

    def _within_budget(self, nnz: int) -> int:
        b = self.block_size
        if nnz <= self.max_changed:
            return nnz
        if b == 1:
            return enforce_budget(self.params, self.base, self.max_changed)
        return enforce_block_budget(self.params, self.base, self.max_changed // b, b)

    def finalize(self) -> bool:
        """At the end of training: apply a budget deferred to the end; whether weights changed."""
        if not self.budget_at_end or self.nnz <= self.max_changed:
            return False
        self.nnz = self._within_budget(self.nnz)
        return True

    @property
    def density(self) -> float:
        """Changed weights as a fraction of the eligible ones."""
        return self.nnz / self.eligible if self.eligible else 0.0

    def recount(self) -> int:
        """Count the changed weights again after the tower was set from outside."""
        self.nnz = count_changed(self.params, self.base, self.block_size)
        return self.nnz
