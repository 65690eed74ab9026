"""CMKD's ramp follows the run (T = its optimiser steps), and its weighted terms are reported.

The reference's schedule is ``λ(p) = 2 / (1 + exp(-gamma·p)) − 1`` with ``p = t / T`` climbing to 1
over the run, so the last step weighs the target terms by ``λ(1) ≈ 0.462``. A fixed T of 10,000
would leave every shorter run at ``λ ≈ 0``: the teacher's target terms switched off.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from adapters_store.bases import TINY
from adapters_store.config import StoreSettings
from adapters_store.format.codec import decode_adapter
from tests.integration.test_train_tiny import Interrupted, config, options
from tests.synthetic_domains import make_domains
from trainer import main as trainer_main
from trainer.config import TrainConfig
from trainer.errors import TrainError
from trainer.pipeline import train


def reference_lambda(curr_iter: int, max_iter: int, gamma: float = 1.0) -> float:
    """The reference schedule at iteration ``curr_iter`` of ``max_iter`` (capped at the end)."""
    p = min(curr_iter, max_iter) / max_iter
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


@pytest.fixture(scope="module")
def domains(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_domains(tmp_path_factory.mktemp("data"), per_class=4, size=32)


def log_lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_the_ramp_spans_the_run_and_the_weighted_terms_are_logged(
    domains: tuple[Path, Path], tmp_path: Path
) -> None:
    result = train(config(domains), options(tmp_path), StoreSettings(home=tmp_path))  # 2 × 3
    meta = decode_adapter(result.adapter_path.read_bytes()).meta
    assert meta.train_config["ramp_iters"] == 6  # T = epochs × iters, written into the adapter
    last = result.metrics["loss_terms_last_step"]
    assert last["ramp"] == pytest.approx(reference_lambda(6, 6))  # λ(T) at the last step
    assert last["ramp"] == pytest.approx(0.4621171573)
    lines = log_lines(result.log_path)
    assert lines[0]["last_step"]["ramp"] == pytest.approx(reference_lambda(3, 6))  # half-way
    # The target terms carry real weight by the end: each is its coefficient × λ × the term.
    for name, coef in (("gi_h", 0.25), ("gi_m", 0.25), ("gi_g", 0.025)):
        assert last[f"w_{name}"] > 0.01
        epoch = lines[-1]["losses"]
        assert epoch[f"w_{name}"] == pytest.approx(coef * epoch["ramp"] * epoch[name], rel=0.2)
    assert last["w_ce_g"] > 0 and last["w_cls"] > 0
    # The weighted terms are the whole loss: their epoch means add up to the mean total.
    epoch = lines[-1]["losses"]
    weighted = sum(v for k, v in epoch.items() if k.startswith("w_"))
    assert weighted == pytest.approx(epoch["total"], rel=1e-6)
    assert result.metrics["loss_terms"] == {k: v for k, v in epoch.items() if k.startswith("w_")}
    assert meta.metrics["loss_terms_last_step"]["ramp"] == pytest.approx(last["ramp"])


def test_an_explicit_ramp_length_overrides_the_run(
    domains: tuple[Path, Path], tmp_path: Path
) -> None:
    cfg = config(domains, epochs=1, ramp_iters=1000)
    result = train(cfg, options(tmp_path), StoreSettings(home=tmp_path))
    assert result.config.ramp_iters == 1000
    assert result.metrics["loss_terms_last_step"]["ramp"] == pytest.approx(
        reference_lambda(3, 1000)
    )
    with pytest.raises(TrainError, match="ramp iters must be >= 1"):
        TrainConfig(source="s", target="t", task="x", ramp_iters=0).validate()


def test_resume_keeps_the_ramp_the_run_started_with(
    domains: tuple[Path, Path], tmp_path: Path
) -> None:
    def stop_at_4(step: int) -> None:
        if step == 4:
            raise Interrupted

    home = StoreSettings(home=tmp_path)
    with pytest.raises(Interrupted):
        train(config(domains), options(tmp_path, checkpoint_every=2), home, on_step=stop_at_4)
    # Resumed with one more epoch (allowed): T stays the 6 steps the run started with.
    result = train(config(domains, epochs=3), options(tmp_path, resume=True), home)
    assert result.config.ramp_iters == 6 and result.metrics["steps"] == 9
    meta = decode_adapter(result.adapter_path.read_bytes()).meta
    assert meta.train_config["ramp_iters"] == 6
    assert result.metrics["loss_terms_last_step"]["ramp"] == pytest.approx(reference_lambda(9, 6))
    # An explicit, different T cannot be resumed into (it would change steps already taken).
    with pytest.raises(Interrupted):
        train(config(domains), options(tmp_path, checkpoint_every=2), home, on_step=stop_at_4)
    with pytest.raises(TrainError, match="ramp_iters: checkpoint 6, now 100"):
        train(config(domains, ramp_iters=100), options(tmp_path, resume=True), home)


def test_adabn_passes_target_batches_through_the_head_without_a_target_loss(
    domains: tuple[Path, Path], tmp_path: Path
) -> None:
    runs = {}
    for adabn in (False, True):
        cfg = config(domains, method="source-only", adabn=adabn, epochs=1)
        result = train(cfg, options(tmp_path / str(adabn)), StoreSettings(home=tmp_path))
        runs[adabn] = (result, decode_adapter(result.adapter_path.read_bytes()))
    plain, adabn = runs[False][1], runs[True][1]
    assert (plain.meta.method, adabn.meta.method) == ("source-only+rst", "source-only+rst+adabn")
    # Only the labelled source is in the loss ...
    assert set(runs[True][0].metrics["loss_terms"]) == {"w_cls"}
    # ... but the head's BatchNorm statistics have seen the target batches too.
    means = [k for k in adabn.head if k.endswith("running_mean")]
    assert means and any(not torch.equal(plain.head[k], adabn.head[k]) for k in means)
    with pytest.raises(TrainError, match="--adabn is the source-only control"):
        config(domains, adabn=True).validate()


def test_the_command_prints_the_weighted_terms(
    domains: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--source", str(domains[0]), "--target", str(domains[1]), "--task", "ramp-run",
        "--base-model", TINY[0], "--base-pretrained", TINY[1], "--home", str(tmp_path / "home"),
        "--epochs", "1", "--iters", "4", "--batch-size", "4", "--lr", "1e-4", "--max-density",
        "0.01", "--workers", "0", "--threads", "1", "--no-progress", "--no-register",
        "-o", str(tmp_path / "a.safetensors"),
    ]  # fmt: skip
    from adapters_store import cli as store_cli

    assert store_cli.main(["train", *argv]) == 0
    out = capsys.readouterr().out
    assert "loss terms at the last step (weighted): L_cls " in out
    assert "λ1·λ·GI_alpha(p_h)" in out and "λ3·λ·GI(p_g)" in out and "λ = 0.462" in out
    metrics = trainer_main([*argv, "--ramp-iters", "40", "-o", str(tmp_path / "b.safetensors")])
    assert metrics["loss_terms_last_step"]["ramp"] == pytest.approx(reference_lambda(4, 40))


def test_a_budget_at_the_end_trains_free_and_serves_within_the_budget(
    domains: tuple[Path, Path], tmp_path: Path
) -> None:
    cfg = config(domains, budget_at_end=True, max_density=0.01, lr=1e-3, epochs=1)
    result = train(cfg, options(tmp_path), StoreSettings(home=tmp_path))
    meta = decode_adapter(result.adapter_path.read_bytes()).meta
    trained = log_lines(result.log_path)[-1]["density"]
    assert trained > 0.01  # no budget during training: more than 1 % moved ...
    assert 0 < meta.density <= 0.01 and result.metrics["density"] == meta.density  # ... not served
    assert meta.train_config["budget_at_end"] is True
    with pytest.raises(TrainError, match="--budget-at-end needs a budget"):
        config(domains, budget_at_end=True, max_density=None).validate()
