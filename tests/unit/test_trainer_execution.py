"""Device choice, the thread budget, mixed precision rules and the checkpoint's RNG round trip."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from adapters_store.config import StoreSettings
from trainer.checkpoint import (
    check_compatible,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from trainer.errors import TrainError
from trainer.execution import autocast, resolve_device, thread_budget


def test_device_defaults_to_cuda_when_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DELTACLIP_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None, StoreSettings()).type == expected
    assert resolve_device("cpu").type == "cpu"
    monkeypatch.setenv("DELTACLIP_DEVICE", "cpu")
    assert resolve_device(None, StoreSettings()).type == "cpu"  # the environment is honoured
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(TrainError, match="CUDA is not available"):
            resolve_device("cuda")


def test_mixed_precision_is_cuda_only() -> None:
    with pytest.raises(TrainError, match="only supported on CUDA"):
        autocast(torch.device("cpu"), True)
    with autocast(torch.device("cpu"), False):
        assert torch.ones(2, 2).mm(torch.ones(2, 2)).dtype == torch.float32


def test_thread_budget_leaves_cores_to_loader_processes_and_restores() -> None:
    before = torch.get_num_threads()
    with thread_budget(torch.device("cpu"), num_workers=1000) as threads:
        assert threads == torch.get_num_threads() == 1
    with thread_budget(torch.device("cpu"), num_workers=0, threads=1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_checkpoint(tmp_path / "c.pt", {"rng": rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_foreign_files_and_other_settings_are_refused(tmp_path: Path) -> None:
    torch.save({"some": "thing"}, tmp_path / "x.pt")
    with pytest.raises(TrainError, match="not a deltaclip training checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    check_compatible({"lr": 1.0, "epochs": 2}, {"lr": 1.0, "epochs": 5}, "a" * 64, "a" * 64)
    with pytest.raises(TrainError, match="made on base weights"):
        check_compatible({}, {}, "a" * 64, "b" * 64)
    with pytest.raises(TrainError, match="tau: checkpoint 1e-06, now 1e-05"):
        check_compatible({"tau": 1e-6}, {"tau": 1e-5}, "a" * 64, "a" * 64)
