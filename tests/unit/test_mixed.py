"""The mixed-task (unmerged) forward: each row of a batch of many tasks equals the same image
served alone by the patched path, within 1e-5 relative in float32, on the three kinds of tower
the server supports (the tiny ViT, EfficientNet-Lite0 with its depthwise and TF-"same"
convolutions and fused BatchNorm+activation, a ViT-B-16-shaped tower with seeded weights); the
live weights are never written by it, even when a correction fails partway."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from adapters_store.bases import BaseSignature, base_fingerprint, build_base, signature_of
from adapters_store.synthetic import random_adapter
from server import apply
from server.corrections import MatrixDelta, NotMixable
from server.engine import Engine, PreparedAdapter

TOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| relative to max |b|."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def make(
    engine: Engine,
    base: tuple[nn.Module, BaseSignature],
    task: str,
    seed: int,
    density: float = 0.02,
    block: int = 1,
) -> PreparedAdapter:
    net, sig = base
    adapter = random_adapter(net, sig, task, density=density, seed=seed, block_size=block)
    record = SimpleNamespace(task=task, version=1, digest=f"{task}-{seed}-{block}")
    prepared = engine.prepare(record, adapter)
    assert prepared.correction is not None
    return prepared


def alone(engine: Engine, who: PreparedAdapter | None, image: torch.Tensor) -> torch.Tensor:
    """The image's features served alone: by the patched path, or the bare base for None."""
    if who is None:
        engine.restore_base()
    else:
        engine.run(who, image[None])  # patches ``who`` in (and leaves it patched)
    return engine.features(image[None])[0]


def check_rows(
    engine: Engine,
    owners: list[PreparedAdapter | None],
    images: torch.Tensor,
    tol: float = TOL,
    margin: float = 100,
) -> None:
    """One mixed forward over rows owned as given; every row against the row served alone, and
    every adapter row measurably far from the base (so the check can fail)."""
    parts = [(o.correction if o is not None else None, 1) for o in owners]
    mixed = engine.run_mixed(parts, images)
    assert engine.patcher.is_pristine()
    for row, owner in enumerate(owners):
        expected = alone(engine, owner, images[row])
        assert rel(mixed[row], expected) <= tol, (row, owner and owner.task)
        if owner is not None:
            bare = alone(engine, None, images[row])
            assert rel(bare, expected) > margin * tol  # the correction is really there
            probs = engine.head_probs(owner, mixed[row : row + 1])
            assert rel(probs, engine.run(owner, images[row : row + 1])) <= 10 * tol


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def engine(tiny: tuple[nn.Module, BaseSignature]) -> Engine:
    return Engine(copy.deepcopy(tiny[0]), tiny[1], "cpu", "float32")


def test_tiny_mixed_rows_match_each_task_alone_in_any_order(engine: Engine, tiny) -> None:  # type: ignore[no-untyped-def]
    """Base rows mixed in, tasks interleaved and out of order, one task split across the batch,
    block and unstructured adapters together."""
    a, b = make(engine, tiny, "a", 1), make(engine, tiny, "b", 2, block=16)
    c = make(engine, tiny, "c", 3, block=4)
    owners = [b, None, a, c, a, None, b, b, c, a]
    check_rows(engine, owners, images(len(owners), 32))


def test_tiny_every_row_a_distinct_task(engine: Engine, tiny) -> None:  # type: ignore[no-untyped-def]
    owners: list[PreparedAdapter | None] = [
        make(engine, tiny, f"t{i}", 10 + i, block=16 if i % 2 else 1) for i in range(8)
    ]
    check_rows(engine, owners, images(8, 32, seed=1))


def test_an_adapter_patched_before_the_mixed_forward_is_restored_first(engine, tiny) -> None:  # type: ignore[no-untyped-def]
    a, b = make(engine, tiny, "a", 1), make(engine, tiny, "b", 2)
    engine.run(a, images(1, 32))
    assert engine.current is a
    check_rows(engine, [b, None], images(2, 32))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_rows_stay_within_the_dtypes_rounding(tiny, dtype: str) -> None:  # type: ignore[no-untyped-def]
    """In half precision the correction is computed in float32 and rounded once into the
    activation, and attention runs as one fused kernel call instead of PyTorch's fast path, so a
    row differs from the patched path by the dtype's rounding: within 2 machine epsilons
    (measured: 1.2 ε), while the correction it carries is at least twice that again (so a
    missing one would fail)."""
    engine = Engine(copy.deepcopy(tiny[0]), tiny[1], "cpu", dtype)
    a = make(engine, tiny, "a", 1, density=0.5)
    b = make(engine, tiny, "b", 2, density=0.5, block=16)
    eps = torch.finfo(getattr(torch, dtype)).eps
    check_rows(engine, [a, None, b, a], images(4, 32), tol=2 * eps, margin=2)


def test_the_base_is_bit_identical_after_thousands_of_mixed_batches(engine, tiny) -> None:  # type: ignore[no-untyped-def]
    before = engine.base_fingerprint()
    a, b = make(engine, tiny, "a", 1), make(engine, tiny, "b", 2, block=16)
    x = images(3, 32)
    first = engine.run_mixed([(a.correction, 1), (None, 1), (b.correction, 1)], x)
    for i in range(2000):
        parts = [(a.correction, 1), (None, 1), (b.correction, 1)]
        out = engine.run_mixed(parts if i % 2 else parts[::-1], x if i % 2 else x.flip(0))
        if i % 500 == 1:
            assert torch.equal(out, first)
    assert engine.patcher.is_pristine()
    assert engine.base_fingerprint() == before == engine.serving_fingerprint


def test_a_failing_correction_leaves_weights_hooks_and_later_answers_intact(  # type: ignore[no-untyped-def]
    engine, tiny, monkeypatch
) -> None:
    a, b = make(engine, tiny, "a", 1), make(engine, tiny, "b", 2)
    x = images(2, 32)
    good = engine.run_mixed([(a.correction, 1), (b.correction, 1)], x)
    calls = {"n": 0}
    linear = apply.linear

    def fail_third(*args):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected")
        return linear(*args)

    monkeypatch.setattr(apply, "linear", fail_third)
    with pytest.raises(RuntimeError, match="injected"):
        engine.run_mixed([(a.correction, 1), (b.correction, 1)], x)
    monkeypatch.setattr(apply, "linear", linear)
    for module in engine.visual.modules():  # every hook and forward override is gone
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert "forward" not in module.__dict__
    assert engine.patcher.is_pristine()
    assert torch.equal(engine.run_mixed([(a.correction, 1), (b.correction, 1)], x), good)
    check_rows(engine, [a, b], x)


def test_the_correction_form_is_sparse_and_counted_in_the_adapter_bytes(engine, tiny) -> None:  # type: ignore[no-untyped-def]
    a = make(engine, tiny, "a", 1, density=0.005)
    corr = a.correction
    assert corr is not None
    sizes = dict(engine.visual.named_parameters())
    for key, delta in corr.deltas.items():
        numel = sizes[key.removeprefix("visual.")].numel()
        tensors = (
            [delta.csr.values(), delta.csr.col_indices()]
            if isinstance(delta, MatrixDelta)
            else [delta.values]
        )
        assert all(t.numel() == delta.nnz < numel for t in tensors), key  # never dense
    assert corr.nnz == a.residual.nnz  # float32 residuals: every stored delta is effective
    assert a.nbytes == a.residual.nbytes + corr.nbytes + sum(
        t.numel() * t.element_size() for t in a.head.state_dict().values()
    )
    # 8 B per changed weight, plus per touched row/feature: large on a tiny tower's few weights
    assert 8 <= corr.bytes_per_weight < 32


def test_a_parameter_without_a_site_is_not_mixable(engine, tiny) -> None:  # type: ignore[no-untyped-def]
    net, sig = tiny
    adapter = random_adapter(net, sig, "a", density=0.05, seed=1)
    assert engine.mixer is not None
    key = next(iter(adapter.residual))
    del engine.mixer.by_key[key]
    with pytest.raises(NotMixable, match=key):
        engine.mixer.prepare(adapter.residual)
    prepared = engine.prepare(SimpleNamespace(task="a", version=1, digest="d"), adapter)
    assert prepared.correction is None  # served by the patched path only


@pytest.fixture(scope="module")
def efflite0() -> tuple[nn.Module, BaseSignature]:
    net = build_base("deltaclip-efflite0", "imagenet")
    return net, signature_of(net, "deltaclip-efflite0", "imagenet")


def test_efflite0_mixed_rows_match_each_task_alone(efflite0) -> None:  # type: ignore[no-untyped-def]
    """Depthwise and k×k TF-"same" convolutions, 1×1 convolutions, fused BatchNorm+ReLU6 affine
    parameters and the classifier Linear (the embedding)."""
    engine = Engine(copy.deepcopy(efflite0[0]), efflite0[1], "cpu", "float32")
    a = make(engine, efflite0, "a", 1, density=0.005)
    b = make(engine, efflite0, "b", 2, density=0.005, block=16)
    kinds = {type(site).__name__ for site, _ in a.correction.sites}  # type: ignore[union-attr]
    assert {"ConvSite", "BatchNormSite", "LinearSite"} <= kinds
    assert a.correction.bytes_per_weight < 13  # type: ignore[union-attr]  # measured 12.6
    check_rows(engine, [a, None, b, a], images(4, 64, seed=2))


@pytest.mark.slow
def test_vit_b16_shaped_mixed_rows_match_each_task_alone() -> None:
    """Attention in_proj (inside nn.MultiheadAttention, corrected before the softmax), out_proj,
    MLP Linears, LayerNorms, the 16×16 patch convolution, class and positional embeddings and
    the output projection, at ViT-B-16's shapes (seeded random weights)."""
    net = build_base("ViT-B-16", "random")
    base = (net, signature_of(net, "ViT-B-16", "random"))
    engine = Engine(net, base[1], "cpu", "float32")
    a = make(engine, base, "a", 1, density=0.005)
    b = make(engine, base, "b", 2, density=0.005, block=16)
    kinds = {type(site).__name__ for site, _ in a.correction.sites}  # type: ignore[union-attr]
    assert kinds == {
        "AttentionSite", "LinearSite", "LayerNormSite", "ConvSite", "EmbeddingSite",
        "ProjectionSite",
    }  # fmt: skip
    fingerprint = base_fingerprint(net)
    check_rows(engine, [a, b, None], images(3, 224, seed=3))
    assert base_fingerprint(net) == fingerprint
