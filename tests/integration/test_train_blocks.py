"""Block-structured RST end to end on the tiny base: train with ``block_size`` 16, register the
adapter, serve it, and get exactly the exported merged model's answers."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from adapters_store.adapter import merge_state
from adapters_store.bases import TINY, tower_parameters
from adapters_store.config import StoreSettings
from adapters_store.format.codec import decode_adapter
from adapters_store.registry import Registry
from adapters_store.serving_base import ServingBase
from server.engine import Engine
from tests.synthetic_domains import make_domains
from trainer.config import RunOptions, TrainConfig
from trainer.errors import TrainError
from trainer.pipeline import train


@pytest.fixture(scope="module")
def domains(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_domains(tmp_path_factory.mktemp("data"), per_class=4, size=32)


def _config(domains: tuple[Path, Path], block_size: int) -> TrainConfig:
    return TrainConfig(
        source=str(domains[0]), target=str(domains[1]), task="blocks", base_model=TINY[0],
        base_pretrained=TINY[1], epochs=1, iters_per_epoch=3, batch_size=4, lr=1e-4,
        head_lr_mult=100.0, tau=1e-6, max_density=0.05, block_size=block_size,
    )  # fmt: skip


def test_a_block_adapter_trains_registers_and_serves_like_its_merged_model(  # type: ignore[no-untyped-def]
    settings: StoreSettings, tiny, domains: tuple[Path, Path], tmp_path: Path
) -> None:
    net, sig = tiny
    opts = RunOptions(
        output=tmp_path / "a.safetensors", run_dir=tmp_path / "run", register=True,
        num_workers=0, threads=1, progress=False, created_at="2025-01-01T00:00:00Z",
    )  # fmt: skip
    result = train(_config(domains, 16), opts, settings)
    adapter = decode_adapter(result.adapter_path.read_bytes())
    meta = adapter.meta
    assert adapter.block_size == 16 and meta.train_config["block_size"] == 16
    assert 0 < meta.nnz <= 0.05 * meta.eligible_params and meta.nnz % 16 == 0
    assert meta.metrics["nnz"] == meta.nnz, "the trainer counts what the adapter stores"
    assert all(tuple(r.values.shape)[1] == 16 for r in adapter.residual.values())

    merged = copy.deepcopy(net)
    merged.load_state_dict(merge_state(net.state_dict(), adapter))
    changed = sum(
        int((merged.state_dict()[k] != p).sum()) for k, p in tower_parameters(net).items()
    )
    assert 0 < changed <= meta.nnz

    registry = Registry.from_settings(settings)
    try:
        record = registry.resolve("blocks")
        engine = Engine(copy.deepcopy(net), sig, "cpu", "float32")
        prepared = engine.prepare(record, registry.load(record, ServingBase.of(net, sig)))
    finally:
        registry.close()
    assert prepared.residual.block_rows, "served as whole blocks"
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    served = engine.run(prepared, x)
    with torch.inference_mode():
        want = prepared.head(merged.encode_image(x).float()).softmax(-1)
        assert torch.equal(engine.features(x), merged.encode_image(x).float())
    assert torch.equal(served, want)
    engine.restore_base()
    assert engine.patcher.is_pristine()


def test_an_unknown_block_size_is_refused_before_training(domains: tuple[Path, Path]) -> None:
    with pytest.raises(TrainError, match="block size must be one of 1, 2, 4, 8, 16, got 3"):
        dataclasses.replace(_config(domains, 3)).validate()
