"""The shipped EfficientNet base: BatchNorm towers stay frozen in eval mode, served == trained."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters_store.bases import EFFLITE0
from adapters_store.catalog import upgrade
from adapters_store.config import StoreSettings
from adapters_store.format.codec import decode_adapter
from deltaclip_demo.data import prepare_domains
from tests.synthetic_domains import WORDNET_SHAPES, make_domains
from trainer.config import TOWER_DEFAULTS, RunOptions, TrainConfig
from trainer.evaluate import evaluate_adapter
from trainer.pipeline import train


def test_efflite0_run_is_served_exactly_as_trained(tmp_path: Path) -> None:
    day, night = make_domains(tmp_path / "data", per_class=3, size=32, classes=WORDNET_SHAPES)
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    upgrade(url)
    settings = StoreSettings(home=tmp_path / "home", database_url=url)
    cfg = TrainConfig(
        source=str(day), target=str(night), task="eff", epochs=1, iters_per_epoch=3,
        batch_size=4, image_size=64, lr=1e-4,
    )  # fmt: skip
    opts = RunOptions(num_workers=0, threads=2, progress=False, run_dir=tmp_path / "run")
    result = train(cfg, opts, settings)
    meta = decode_adapter(result.adapter_path.read_bytes()).meta
    assert (meta.base_model, meta.base_pretrained) == EFFLITE0
    assert meta.train_config["tower_kind"] == "efficientnet"
    assert meta.train_config["tau"] == TOWER_DEFAULTS["efficientnet"][2]
    assert meta.nnz > 0
    # BatchNorm running statistics are not part of an adapter: had training updated them, the
    # served model (base + residual + head) would not reproduce the trained model's accuracy.
    served = evaluate_adapter(settings, "eff", night, num_workers=0)
    assert served["accuracy"] == pytest.approx(result.metrics["target_accuracy"])
    assert served["per_class_accuracy"] == result.metrics["target_per_class_accuracy"]


def test_cmkd_teacher_knows_real_images_above_chance(tmp_path: Path) -> None:
    """On real images (the demo's Fashion-MNIST, faded target), the default base's teacher (its
    ImageNet classifier read through WordNet) is well above chance before any training moves it."""
    folders, _ = prepare_domains(tmp_path / "data", ["faded"], source_per_class=2,
                                 target_per_class=20, test_per_class=1, seed=0)  # fmt: skip
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    upgrade(url)
    settings = StoreSettings(home=tmp_path / "home", database_url=url)
    cfg = TrainConfig(
        source=str(folders["photo"]), target=str(folders["faded"]), task="faded", epochs=1,
        iters_per_epoch=1, batch_size=4, image_size=128,
    )  # fmt: skip
    opts = RunOptions(num_workers=0, threads=2, progress=False, run_dir=tmp_path / "run")
    metrics = train(cfg, opts, settings).metrics
    chance = 1 / 10
    assert metrics["target_teacher_accuracy"] >= 2 * chance
