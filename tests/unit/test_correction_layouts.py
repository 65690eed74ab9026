"""The prepared matrix layouts (server/corrections.py) and the functions that apply them
(server/apply.py), checked against dense arithmetic: the full-width CSR of a Linear, of ViT's
transposed projection and of a 1×1 convolution, unstructured and in 16-wide blocks; the
compact form of a k×k convolution; several runs of rows at once with base rows between them;
float32 and half precision (product in float32, rounded once into the activation)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server import apply
from server.corrections import COMPACT_BELOW, MatrixLayout, matrix_delta

CPU = torch.device("cpu")


def positions(numel: int, density: float, block: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    nblocks = max(1, int(numel * density / block))
    starts = torch.randperm(numel // block, generator=g)[:nblocks].sort().values * block
    return (starts[:, None] + torch.arange(block)).reshape(-1)


def sparse_delta(
    shape: tuple[int, ...], block: int, seed: int, density: float = 0.05
) -> tuple[torch.Tensor, ...]:
    """``(pos, values, dense)``: a delta at ``density`` of a weight's positions."""
    numel = int(torch.tensor(shape).prod())
    pos = positions(numel, density, block, seed)
    values = torch.randn(pos.numel(), generator=torch.Generator().manual_seed(seed + 1))
    dense = torch.zeros(numel).index_put_((pos,), values).view(shape)
    return pos, values, dense


@pytest.mark.parametrize("block", [1, 16])
def test_a_linear_delta_on_many_outputs_is_full_width_and_exact(block: int) -> None:
    pos, values, dense = sparse_delta((48, 32), block, seed=block, density=0.3)
    d = matrix_delta(pos, values, MatrixLayout(48, 32), CPU)
    assert d.full and d.out_idx.numel() == 0 and d.in_idx.numel() == 0
    assert d.nnz == pos.numel()
    torch.testing.assert_close(d.csr.to_dense(), dense)


def test_a_linear_delta_on_few_outputs_stays_compact() -> None:
    pos, values, dense = sparse_delta((48, 32), 16, seed=4, density=0.04)  # 3 blocks
    d = matrix_delta(pos, values, MatrixLayout(48, 32), CPU)
    assert not d.full and d.out_idx.numel() * COMPACT_BELOW <= 48
    rows, cols = d.out_idx.long(), d.in_idx.long()
    torch.testing.assert_close(d.csr.to_dense(), dense[rows][:, cols])


def test_the_transposed_projection_delta_is_its_weight_transposed() -> None:
    pos, values, dense = sparse_delta((32, 24), 1, seed=3, density=0.3)  # [in, out]: x @ proj
    d = matrix_delta(pos, values, MatrixLayout(24, 32, transposed=True), CPU)
    assert d.full
    torch.testing.assert_close(d.csr.to_dense(), dense.T)


@pytest.mark.parametrize("chunk", [400, 10, 5])  # whole runs; two rows and a rest; row by row
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_linear_corrects_each_run_of_rows_and_leaves_base_rows(  # type: ignore[no-untyped-def]
    dtype: torch.dtype, chunk: int, monkeypatch
) -> None:
    """Two tasks' runs, one of them three rows long, and base rows at both ends and between,
    with the columns of one sparse product capped so that a run is split into chunks."""
    monkeypatch.setattr(apply, "CHUNK_COLUMNS", chunk)
    g = torch.Generator().manual_seed(chunk)
    x = torch.randn(7, 5, 32, generator=g).to(dtype)  # [rows, tokens, features]
    out = torch.randn(7, 5, 48, generator=g).to(dtype)
    expected = out.clone().float()
    deltas = []
    for seed, (start, count) in ((1, (1, 3)), (2, (5, 1))):  # full width, then compact
        pos, values, dense = sparse_delta((48, 32), 16 if seed == 2 else 1, seed)
        deltas.append(((start, count), matrix_delta(pos, values, MatrixLayout(48, 32), CPU)))
        rows = slice(start, start + count)
        expected[rows] = (expected[rows] + x[rows].float() @ dense.T).to(dtype).float()
    assert [d.full for _, d in deltas] == [True, False]
    for run, d in deltas:
        apply.linear(out, x, run, d)
    # float32: the product's summation order; half: one rounding step of the dtype at most
    tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)
    assert torch.equal(out[[0, 4, 6]].float(), expected[[0, 4, 6]])  # base rows untouched


@pytest.mark.parametrize("rows", [(0, 1), (1, 2)])
def test_a_pointwise_convolution_is_corrected_like_a_dense_1x1_convolution(rows) -> None:  # type: ignore[no-untyped-def]
    pos, values, dense = sparse_delta((24, 16), 16, seed=5, density=0.5)
    d = matrix_delta(pos, values, MatrixLayout(24, 16), CPU)
    assert d.full
    g = torch.Generator().manual_seed(rows[1])
    x, out = torch.randn(3, 16, 5, 7, generator=g), torch.randn(3, 24, 5, 7, generator=g)
    expected = out.clone()
    sel = slice(rows[0], rows[0] + rows[1])
    expected[sel] += F.conv2d(x[sel], dense.view(24, 16, 1, 1))
    apply.pointwise(out, x, rows, d)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_a_kxk_convolution_delta_stays_compact() -> None:
    numel = 8 * 4 * 3 * 3
    pos = positions(numel, 0.1, 1, seed=7)
    d = matrix_delta(pos, torch.ones(pos.numel()), MatrixLayout(8, 4, 1, 9, conv=True), CPU)
    assert not d.full and 0 < d.out_idx.numel() <= 8 and 0 < d.in_idx.numel() <= 4
    assert d.csr.shape == (d.out_idx.numel(), d.in_idx.numel() * 9)
