"""The prepared correction form of an adapter: its residual as sparse linear maps on activations.

The mixed-task path (:mod:`server.mixed`) never writes the live weights: it runs the base over a
batch whose rows belong to several tasks and adds, on each task's rows, what that task's changed
weights contribute. Every changed parameter enters the forward pass linearly, so the contribution
is the same operation with the weight ``W`` replaced by the *effective* delta

    ΔW = W_task − W_base,   W_task = (W_base.float() + value).to(serving dtype)

(docs/FORMAT.md §7), computed once per adapter from the pristine base and kept in float32. Two
shapes of delta cover every supported tensor:

* :class:`MatrixDelta`: the delta of a weight that mixes features (Linear and attention
  projections, convolutions of any kernel size and groups, ViT's output projection) as a CSR
  matrix. Only changed weights are stored: a 4-byte column + 4-byte value each. A dense ``ΔW``
  is never built. Two layouts:

  - *full* (Linear, attention, ViT's projection, 1×1 convolutions, when the changes touch
    at least 1/8 of the output features): the CSR spans the weight's whole shape
    ``[out, in]`` (one 4-byte row pointer per output feature), so the correction is one sparse
    product read straight from the activation and written straight into it
    (:func:`server.apply.linear`) — no gather of input features, no scatter of outputs (a
    scatter along the feature dimension costs ~10 ns per element on CPU, more than the product);
  - *compact* (other convolutions, and matrices whose changes touch few output features,
    e.g. low-density blocks): ``[|V|, |U| × taps]`` over the output features ``V`` and input
    channels ``U`` it touches (``taps`` = kernel positions), plus 4 bytes per touched row and
    channel, so that only the channels read are unfolded into patches.
* :class:`VectorDelta`: a delta added elementwise (biases, LayerNorm/BatchNorm affine, class and
  positional embeddings): a 4-byte position and a 4-byte value per changed weight.

Block adapters are read through their positions (every position of each block; the ``-0.0``
padding drops out because its effective delta is exactly 0), so both forms land here alike.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch


class NotMixable(Exception):
    """An adapter (or a call) the mixed path cannot serve exactly; the patched path serves it."""


@dataclass(frozen=True)
class MatrixDelta:
    out_idx: torch.Tensor  # int32 [|V|]: output features (rows of W) with a change
    in_idx: torch.Tensor  # int32 [|U|]: input features (channels) read by a change
    csr: torch.Tensor  # float32 sparse CSR [|V|, |U| * taps], int32 indices
    taps: int
    full: bool = False  # out_idx/in_idx are every feature (empty here); csr is [out, in]

    @property
    def nnz(self) -> int:
        return int(self.csr.values().numel())

    @property
    def nbytes(self) -> int:
        parts = (self.csr.crow_indices(), self.csr.col_indices(), self.csr.values())
        return _nbytes(self.out_idx, self.in_idx, *parts)


@dataclass(frozen=True)
class VectorDelta:
    idx: torch.Tensor  # int32 flat positions
    values: torch.Tensor  # float32

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def nbytes(self) -> int:
        return _nbytes(self.idx, self.values)


Delta = MatrixDelta | VectorDelta


@dataclass(eq=False)
class Correction:
    """One adapter's prepared correction: a delta per changed tower parameter (state_dict key)."""

    deltas: dict[str, Delta] = field(default_factory=dict)
    # The same deltas grouped by the site (module) that applies them, in tower order.
    sites: list[tuple[Any, dict[str, Delta]]] = field(default_factory=list)

    @property
    def nnz(self) -> int:
        return sum(d.nnz for d in self.deltas.values())

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for d in self.deltas.values())

    @property
    def bytes_per_weight(self) -> float:
        """Resident bytes per changed weight of this form (counted in the cache budget)."""
        return self.nbytes / max(1, self.nnz)


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class MatrixLayout:
    """How a weight's flat (C-order) positions map to ``(output, input feature, tap)``.

    ``out_features`` rows; each row holds ``in_per_group × taps`` weights (a Linear: the input
    size and 1 tap; a convolution ``[O, I/g, kh, kw]``: ``I/g`` and ``kh·kw``); an output in
    group ``G`` reads input channels ``G·in_per_group …``. ``transposed``: the parameter is
    stored ``[in, out]`` (ViT's ``proj``, used as ``x @ proj``). ``conv``: a convolution's
    weight (prepared compact, see :func:`matrix_delta`).
    """

    out_features: int
    in_per_group: int
    groups: int = 1
    taps: int = 1
    transposed: bool = False
    conv: bool = False


COMPACT_BELOW = 8
"""A Linear delta that touches fewer than 1/8 of the output features is kept compact: its
scatter (~2.4 µs per touched feature at 197 tokens) then costs less than the full-width form's
pass over every output feature (~0.9 ms for a 3072×197 activation)."""


def matrix_delta(
    pos: torch.Tensor, delta: torch.Tensor, layout: MatrixLayout, device: torch.device
) -> MatrixDelta:
    """The CSR form of the changes at flat positions ``pos`` (int64, increasing) of a weight:
    full-width for a weight without kernel taps whose changes touch more than one output
    feature in :data:`COMPACT_BELOW`, compact otherwise (convolutions, and sparse rows such as
    low-density blocks)."""
    if layout.transposed:
        out = pos % layout.out_features
        inp = pos // layout.out_features
        tap = torch.zeros_like(pos)
    else:
        per_out = layout.in_per_group * layout.taps
        out = pos // per_out
        rem = pos % per_out
        tap = rem % layout.taps
        group = out // (layout.out_features // layout.groups)
        inp = group * layout.in_per_group + rem // layout.taps
    touched = int(torch.unique(out).numel())
    full = not layout.conv and touched * COMPACT_BELOW > layout.out_features
    if full:
        in_idx, col = torch.empty(0, dtype=torch.int64), inp
    else:
        in_idx, col = torch.unique(inp, return_inverse=True)
        col = col * layout.taps + tap
    width = layout.in_per_group * layout.groups if full else int(in_idx.numel()) * layout.taps
    with warnings.catch_warnings():  # torch calls its sparse CSR support "beta" on every use
        warnings.simplefilter("ignore", UserWarning)
        if layout.transposed:  # positions are column-major here: sort through COO
            out_idx, row = torch.unique(out, return_inverse=True)
            if full:
                out_idx, row = torch.empty(0, dtype=torch.int64), out
            size = (layout.out_features if full else int(out_idx.numel()), width)
            coo = torch.sparse_coo_tensor(
                torch.stack([row, col]), delta, size, check_invariants=False
            )
            csr = coo.coalesce().to_sparse_csr()
            crow, col, delta = csr.crow_indices(), csr.col_indices(), csr.values()
        elif full:  # increasing positions: rows in order, columns increasing within a row
            out_idx = torch.empty(0, dtype=torch.int64)
            size = (layout.out_features, width)
            counts = torch.bincount(out, minlength=layout.out_features)
            crow = torch.zeros(size[0] + 1, dtype=torch.int64)
            crow[1:] = counts.cumsum(0)
        else:
            out_idx, counts = torch.unique_consecutive(out, return_counts=True)
            size = (int(out_idx.numel()), width)
            crow = torch.zeros(size[0] + 1, dtype=torch.int64)
            crow[1:] = counts.cumsum(0)
        csr = torch.sparse_csr_tensor(
            crow.to(torch.int32),
            col.to(torch.int32),
            delta.contiguous(),
            size,
            check_invariants=False,
        )
    return MatrixDelta(
        _i32(out_idx, device), _i32(in_idx, device), csr.to(device), layout.taps, full
    )


def vector_delta(pos: torch.Tensor, delta: torch.Tensor, device: torch.device) -> VectorDelta:
    return VectorDelta(_i32(pos, device), delta.contiguous().to(device))


def _i32(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Positions inside one tower parameter fit int32 (format v1 allows int64 only past 2^31)."""
    if index.numel() and int(index.max()) >= 2**31:
        return index.to(device)
    return index.to(torch.int32).to(device)


def effective_delta(base: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep, ΔW)``: the float32 effective delta ``W_task − W_base`` at the given base values
    (in the serving dtype) and the mask of positions where it is not zero."""
    task = (base.float() + values.float()).to(base.dtype)
    delta = task.float() - base.float()
    return delta != 0, delta
