"""End-to-end training on the tiny base and synthetic day/night folders (a few seconds per run)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from adapters_store import cli as store_cli
from adapters_store.adapter import merge_state
from adapters_store.bases import TINY, tower_parameters
from adapters_store.catalog import upgrade
from adapters_store.config import StoreSettings
from adapters_store.format.codec import check_against_base, decode_adapter
from adapters_store.registry import Registry
from tests.synthetic_domains import make_domains
from trainer import main as trainer_main
from trainer.checkpoint import load_checkpoint
from trainer.config import RunOptions, TrainConfig
from trainer.errors import TrainError
from trainer.pipeline import train

CREATED = "2025-01-01T00:00:00Z"
TASK = "day2night"


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def domains(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_domains(tmp_path_factory.mktemp("data"), per_class=4, size=32)


def config(domains: tuple[Path, Path], **change: Any) -> TrainConfig:
    settings: dict[str, Any] = dict(
        source=str(domains[0]), target=str(domains[1]), task=TASK,
        base_model=TINY[0], base_pretrained=TINY[1], epochs=2, iters_per_epoch=3, batch_size=4,
        lr=1e-4, head_lr_mult=100.0, tau=1e-6, max_density=0.05,
    )  # fmt: skip
    return TrainConfig(**{**settings, **change})


def options(root: Path, **change: Any) -> RunOptions:
    base = RunOptions(
        output=root / "adapter.safetensors", run_dir=root / "run", register=False,
        num_workers=0, threads=1, progress=False, created_at=CREATED,
    )  # fmt: skip
    return dataclasses.replace(base, **change)


def sqlite_settings(root: Path) -> StoreSettings:
    url = f"sqlite:///{root / 'catalog.db'}"
    upgrade(url)
    return StoreSettings(
        home=root / "home", database_url=url, base_model=TINY[0], base_pretrained=TINY[1]
    )


@pytest.fixture(scope="module")
def reference(domains: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The adapter of an uninterrupted in-process run (no loader processes)."""
    root = tmp_path_factory.mktemp("reference")
    result = train(config(domains), options(root), StoreSettings(home=root))
    return result.adapter_path.read_bytes()


def test_train_writes_and_registers_a_valid_adapter(  # type: ignore[no-untyped-def]
    settings: StoreSettings, tiny, domains: tuple[Path, Path], tmp_path: Path
) -> None:
    net, sig = tiny
    result = train(config(domains), options(tmp_path, register=True), settings)
    data = result.adapter_path.read_bytes()
    adapter = decode_adapter(data)
    check_against_base(adapter, sig)
    meta = adapter.meta
    assert (meta.task, meta.method, meta.base_fingerprint) == (TASK, "cmkd+rst", sig.fingerprint)
    assert meta.class_names == ["big square", "circle", "plus sign", "triangle"]
    assert (meta.source_domain, meta.target_domain) == ("day", "night")
    assert 0 < meta.density <= 0.05 and meta.nnz <= 0.05 * meta.eligible_params
    assert meta.eligible_params == sig.eligible_params
    assert meta.train_config["tau"] == 1e-6 and meta.train_config["max_density"] == 0.05
    assert meta.train_config["lr"] == 1e-4 and meta.train_config["image_size"] == 32
    assert 0.0 <= meta.metrics["target_accuracy"] <= 1.0
    assert meta.metrics["density"] == meta.density and meta.metrics["steps"] == 6
    emb = adapter.class_embeddings
    assert emb is not None and torch.allclose(emb.norm(dim=1), torch.ones(4))
    merged = merge_state({k: p.detach() for k, p in tower_parameters(net).items()}, adapter)
    assert sum(int((merged[k] != p).sum()) for k, p in tower_parameters(net).items()) == meta.nnz
    # Registered under the file's digest.
    reg = result.registration
    assert reg is not None and reg.created and reg.record.version == 1
    assert reg.record.digest == hashlib.sha256(data).hexdigest()
    registry = Registry.from_settings(settings)
    try:
        assert registry.resolve(TASK).digest == reg.record.digest
    finally:
        registry.close()
    # One JSON object per epoch, with the density and accuracy of that epoch.
    lines = [json.loads(x) for x in result.log_path.read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert {"losses", "density", "nnz", "lr", "seconds", "target_accuracy"} <= set(lines[0])
    assert {"cls", "gi_h", "gi_m", "ce_g", "gi_g", "total"} <= set(lines[0]["losses"])
    assert lines[-1]["nnz"] == meta.nnz
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # a finished run leaves none


def test_same_seed_same_bytes_with_loader_processes(
    reference: bytes, domains: tuple[Path, Path], tmp_path: Path
) -> None:
    result = train(config(domains), options(tmp_path, num_workers=2), StoreSettings(home=tmp_path))
    assert result.adapter_path.read_bytes() == reference


def test_resume_reaches_the_same_adapter(
    reference: bytes, domains: tuple[Path, Path], tmp_path: Path
) -> None:
    def stop_at_5(step: int) -> None:
        if step == 5:
            raise Interrupted

    home = StoreSettings(home=tmp_path)
    with pytest.raises(Interrupted):  # checkpoints at steps 2, 3 (epoch end) and 4
        train(config(domains), options(tmp_path, checkpoint_every=2), home, on_step=stop_at_5)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["session"]["step"] == 4
    with pytest.raises(TrainError, match="--resume"):
        train(config(domains), options(tmp_path), home)
    with pytest.raises(TrainError, match=r"lr: checkpoint 0\.0001, now 0\.001"):
        train(config(domains, lr=1e-3), options(tmp_path, resume=True), home)
    result = train(config(domains), options(tmp_path, resume=True), home)
    assert result.adapter_path.read_bytes() == reference
    assert [json.loads(x)["epoch"] for x in result.log_path.read_text().splitlines()] == [1, 2]


def test_fixmatch_source_only_with_a_bfloat16_residual(
    domains: tuple[Path, Path], tmp_path: Path
) -> None:
    cfg = config(
        domains, method="source-only", fixmatch=True, fixmatch_threshold=0.25,
        residual_dtype="bfloat16", epochs=1,
    )  # fmt: skip
    result = train(cfg, options(tmp_path), StoreSettings(home=tmp_path))
    adapter = decode_adapter(result.adapter_path.read_bytes())
    assert adapter.meta.method == "source-only+rst+fixmatch"
    assert adapter.meta.residual_dtype == "bfloat16" and adapter.meta.nnz > 0
    assert result.metrics["snapped_weights"] > 0  # the served, rounded weights were evaluated
    log = json.loads(result.log_path.read_text().splitlines()[0])
    assert {"fm_h", "fm_g", "fm_mask_h", "fm_mask_g", "cls"} <= set(log["losses"])
    assert "gi_h" not in log["losses"]


def test_main_with_no_register_only_writes_the_file(
    domains: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out" / "a.safetensors"
    metrics = trainer_main([
        "--source", str(domains[0]), "--target", str(domains[1]), "--task", "main-run",
        "--base-model", TINY[0], "--base-pretrained", TINY[1], "--home", str(tmp_path / "home"),
        "--epochs", "1", "--iters", "2", "--batch-size", "4", "--lr", "1e-4", "--max-density",
        "0.01", "--workers", "0", "--threads", "1", "--no-progress", "--no-register", "-o", str(out),
    ])  # fmt: skip
    assert metrics["adapter_path"] == str(out) and out.is_file()
    assert metrics["version"] is None and metrics["method"] == "cmkd+rst"
    assert 0 < metrics["density"] <= 0.01 and 0 <= metrics["target_accuracy"] <= 1
    assert not (tmp_path / "home" / "catalog.db").exists()


def test_eval_reports_the_served_accuracy_and_draws_the_matrix(  # type: ignore[no-untyped-def]
    domains: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    settings = sqlite_settings(tmp_path)
    result = train(config(domains), options(tmp_path, register=True), settings)
    store = ["--home", str(settings.home), "--database-url", str(settings.database_url)]
    png = tmp_path / "cm.png"
    argv = ["eval", "--task", TASK, "--data", str(domains[1]), "--confusion", str(png)]
    assert store_cli.main([*argv, "--json", "--workers", "0", *store]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["task"], report["version"], report["images"]) == (TASK, 1, 16)
    assert report["accuracy"] == pytest.approx(result.metrics["target_accuracy"])
    assert set(report["per_class_accuracy"]) == {"big square", "circle", "plus sign", "triangle"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert store_cli.main([*argv, "--workers", "0", *store]) == 0
    text = capsys.readouterr().out
    assert "accuracy:" in text and "per-class accuracy:" in text and "plus sign" in text

    unknown = tmp_path / "unknown"
    (unknown / "Hexagon").mkdir(parents=True)
    shutil.copy(domains[1] / "circle" / "000.jpg", unknown / "Hexagon" / "0.jpg")
    assert store_cli.main(["eval", "--task", TASK, "--data", str(unknown), *store]) == 1
    assert "'Hexagon' (hexagon)" in capsys.readouterr().err


def test_eval_zero_shot_says_a_random_text_tower_is_chance(  # type: ignore[no-untyped-def]
    domains: tuple[Path, Path], capsys
) -> None:
    argv = ["eval", "--zero-shot", "--data", str(domains[1]), "--json", "--workers", "0"]
    base = ["--base-model", TINY[0], "--base-pretrained", TINY[1]]
    assert store_cli.main([*argv, *base]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert report["chance_accuracy"] == 0.25 and report["images"] == 16
    assert "chance level" in out.err and "chance level" in report["warning"]


def test_an_adapter_the_store_refuses_is_still_written(
    domains: tuple[Path, Path], tmp_path: Path
) -> None:
    """No budget and a large lr: most of the tower changes, beyond the store's 50 % limit."""
    cfg = config(domains, max_density=None, epochs=1, lr=1e-3)
    with pytest.raises(TrainError, match=r"store would refuse it: \[size-limit\]"):
        train(cfg, options(tmp_path), StoreSettings(home=tmp_path))
    assert decode_adapter((tmp_path / "adapter.safetensors").read_bytes()).meta.density > 0.5
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # the run itself did finish
