"""Adding one task's prepared delta (:mod:`server.corrections`) to its rows of an activation.

Every function here adds in place to ``out``, only on a run of consecutive batch rows ``rows =
(start, count)`` (a view: nothing is gathered or scattered along the batch). A matrix delta in
the full-width form (Linear, attention, 1×1 convolutions) is one sparse product read from and
added into the activations through views; the others gather the features they read and add
only at the features they touch (``index_add_`` along the feature dimension). Products are
computed in float32 and rounded once into the activation's dtype. The features sit either on the last
dimension (Linear, attention, LayerNorm, embeddings: ``[B, …, F]``) or on dimension 1
(convolutions and BatchNorm: ``[B, C, H, W]``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .corrections import MatrixDelta, VectorDelta

Rows = tuple[int, int]  # (first batch row, number of rows)


CHUNK_COLUMNS = 400
"""At most this many activation columns (tokens × rows) per sparse product: the CSR kernel runs
an axpy per changed weight over a row of ``xᵀ``, which falls from ~5–6 to ~0.5 GMAC/s once
those rows leave the cache (measured with a 3072×768 delta at 0.5 %: 200 columns 6.4 GMAC/s,
800 columns 3.6, 3,152 columns 0.5), so a long run of rows is split by rows."""


def linear(out: torch.Tensor, x: torch.Tensor, rows: Rows, d: MatrixDelta) -> None:
    """``out += x @ ΔWᵀ`` on ``rows`` (features on the last dimension of ``x`` and ``out``).

    A compact delta (few output features, :data:`server.corrections.COMPACT_BELOW`) gathers
    the input features it reads and scatters into the outputs it touches. Two calls per chunk
    of rows (:data:`CHUNK_COLUMNS`) for a full-width delta: ``ΔW @ xᵀ`` in
    float32 over a row-major copy of the chunk's ``xᵀ`` (the kernel runs ~1.4× faster on it than
    on the transposed view, copy included), and its add, rounded once, into ``outᵀ``, a view
    (no scatter). (``outᵀ.addmm_`` in one call measured slower: torch copies a column-major
    result.)"""
    if not d.full:  # few output features: gather the inputs read, scatter the outputs
        xs = _rows(x, rows)
        xt = xs.reshape(-1, xs.shape[-1]).T.index_select(0, d.in_idx)  # [|U|, n·T]
        corr = d.csr @ xt.float()  # [|V|, n·T]
        o = _rows(out, rows)
        o.view(-1, o.shape[-1]).index_add_(1, d.out_idx, corr.T.to(out.dtype))
        return
    tokens = x[0].numel() // x.shape[-1]
    step = max(1, CHUNK_COLUMNS // tokens)
    for start in range(rows[0], rows[0] + rows[1], step):
        chunk = (start, min(step, rows[0] + rows[1] - start))
        xs = _rows(x, chunk)
        o2 = _rows(out, chunk).view(-1, out.shape[-1]).T
        o2.add_(d.csr @ xs.reshape(-1, xs.shape[-1]).T.float().contiguous())


def vector_last(out: torch.Tensor, rows: Rows, d: VectorDelta) -> None:
    """``out += Δb`` on ``rows`` along the last dimension (a bias)."""
    o = _rows(out, rows)
    o2 = o.view(-1, o.shape[-1])
    o2.index_add_(1, d.idx, d.values.to(out.dtype).view(1, -1).expand(o2.shape[0], -1))


def vector_flat(out: torch.Tensor, rows: Rows, d: VectorDelta) -> None:
    """``out.view(B, -1)[rows, idx] += Δ``: a delta over a row's flattened positions (ViT's
    class and positional embeddings on the token stream ``[B, T, D]``)."""
    o2 = _rows(out, rows).view(rows[1], -1)
    o2.index_add_(1, d.idx, d.values.to(out.dtype).view(1, -1).expand(rows[1], -1))


def vector_channels(out: torch.Tensor, rows: Rows, d: VectorDelta) -> None:
    """``out += Δb`` on ``rows`` along dimension 1 (a convolution's or BatchNorm's bias)."""
    o3 = _rows(out, rows).view(rows[1], out.shape[1], -1)
    v = d.values.to(out.dtype).view(1, -1, 1).expand(rows[1], -1, o3.shape[2])
    o3.index_add_(1, d.idx, v)


def pointwise(out: torch.Tensor, x: torch.Tensor, rows: Rows, d: MatrixDelta) -> None:
    """``out += conv1x1(x, ΔW)`` on ``rows`` for an unpadded, ungrouped 1×1 convolution of stride
    1 with a full-width delta: ``ΔW [out, in] @ x [in, n·H·W]`` (a view for one row)."""
    n = rows[1]
    xs, o = _rows(x, rows), _rows(out, rows)
    x2 = xs.reshape(n, xs.shape[1], -1).transpose(0, 1).reshape(xs.shape[1], -1)
    corr = d.csr @ x2.float()  # [out, n·H·W]
    o.view(n, out.shape[1], -1).add_(corr.view(out.shape[1], n, -1).transpose(0, 1))


def conv(
    out: torch.Tensor, x: torch.Tensor, rows: Rows, d: MatrixDelta, geometry: ConvGeometry
) -> None:
    """``out += conv(x, ΔW)`` on ``rows``, as a sparse product over the input's patches (only the
    input channels the delta reads are unfolded)."""
    n = rows[1]
    xs = _rows(x, rows).index_select(1, d.in_idx).float()
    if geometry.same:
        xs = geometry.pad(xs)
    cols = F.unfold(xs, geometry.kernel, geometry.dilation, geometry.padding, geometry.stride)
    k, length = cols.shape[1], cols.shape[2]
    corr = d.csr @ cols.transpose(0, 1).reshape(k, n * length)  # [|V|, n·L]
    o3 = _rows(out, rows).view(n, out.shape[1], -1)
    o3.index_add_(1, d.out_idx, corr.view(-1, n, length).transpose(0, 1).to(out.dtype))


def layer_norm_weight(
    out: torch.Tensor, x: torch.Tensor, rows: Rows, d: VectorDelta, eps: float
) -> None:
    """``out += x̂ · Δγ`` on ``rows``, ``x̂`` the input normalised over its last dimension."""
    xs = _rows(x, rows).float()
    xhat = F.layer_norm(xs, (xs.shape[-1],), eps=eps)
    xhat = xhat.reshape(-1, xs.shape[-1]).index_select(1, d.idx)
    o = _rows(out, rows)
    o.view(-1, o.shape[-1]).index_add_(1, d.idx, (xhat * d.values).to(out.dtype))


def batch_norm_weight(
    out: torch.Tensor, x: torch.Tensor, rows: Rows, d: VectorDelta, stats: BatchStats
) -> None:
    """``out += x̂ · Δγ`` on ``rows``, ``x̂ = (x − mean) / √(var + eps)`` with the running stats
    (eval mode), only at the changed channels."""
    xs = _rows(x, rows).index_select(1, d.idx).float()
    mean = stats.mean.index_select(0, d.idx).float().view(1, -1, 1, 1)
    var = stats.var.index_select(0, d.idx).float().view(1, -1, 1, 1)
    xhat = (xs - mean) * torch.rsqrt(var + stats.eps)
    v = (xhat * d.values.view(1, -1, 1, 1)).flatten(2).to(out.dtype)
    _rows(out, rows).view(rows[1], out.shape[1], -1).index_add_(1, d.idx, v)


def _rows(t: torch.Tensor, rows: Rows) -> torch.Tensor:
    """The run of batch rows ``rows = (start, count)`` of ``t``: a view, written in place."""
    return t.narrow(0, rows[0], rows[1])


class ConvGeometry:
    """A convolution's kernel, stride, padding and dilation (``same``: TensorFlow-style dynamic
    padding, applied to the input by ``pad`` before an unpadded convolution)."""

    def __init__(self, module: torch.nn.Conv2d, same_pad: object | None) -> None:
        self.kernel: tuple[int, ...] = tuple(module.kernel_size)
        self.stride: tuple[int, ...] = tuple(module.stride)
        self.dilation: tuple[int, ...] = tuple(module.dilation)
        padding = (0, 0) if same_pad is not None else module.padding
        self.padding: tuple[int, ...] = tuple(int(p) for p in padding)
        self.same = same_pad is not None
        self._pad: Any = same_pad

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        return self._pad(x, list(self.kernel), list(self.stride), list(self.dilation))


class BatchStats:
    """A BatchNorm's running statistics and eps, read at call time (they are buffers)."""

    def __init__(self, module: torch.nn.BatchNorm2d) -> None:
        self.module = module

    @property
    def mean(self) -> torch.Tensor:
        return self.module.running_mean  # type: ignore[return-value]

    @property
    def var(self) -> torch.Tensor:
        return self.module.running_var  # type: ignore[return-value]

    @property
    def eps(self) -> float:
        return float(self.module.eps)
