"""The state a training run carries from its first step to its adapter, and how it is saved.

:class:`Plan` is what was checked before any compute was spent; :class:`Run` adds what was built
from it (model, session, loaders) and the bookkeeping the epochs update (per-epoch history, the
current epoch's partial loss sums, seconds spent). Both live here, apart from the functions that
start, step and finish a run (``trainer.run_start``, ``trainer.epoch``, ``trainer.finish``), so that
each of those reads one concern and none of them imports another.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from adapters_store.bases import BaseSignature
from adapters_store.config import StoreSettings

from .checkpoint import rng_state, save_checkpoint
from .config import RunOptions, TrainConfig
from .data import DomainFolder
from .distributed import Distributed
from .step import Session


class TrainLog:
    """``train_log.jsonl``: one JSON object per finished epoch, rewritten from history on resume.

    Rewriting on open keeps the file equal to the checkpoint's history, so a run that was
    stopped after an epoch was logged but before it was checkpointed does not log it twice.
    """

    def __init__(self, path: Path, history: list[dict[str, Any]]) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in history))

    def append(self, record: dict[str, Any]) -> None:
        """Add one epoch's record (appending, so a crash loses at most the line being written)."""
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


@dataclass(frozen=True)
class Plan:
    """A run's inputs after every check that needs no model: folders, names, device, checkpoint.

    Attributes:
        config: the user's settings with absolute folders and valid domain names; per-base
            defaults are filled in only once the base is built (``TrainConfig.resolve``).
        options: as given, except that ranks other than 0 of a ``torchrun`` job show no progress.
        source, target: the scanned domain folders; class_names: their common label order.
        ranks: the ``torchrun`` layout (one rank when not distributed); device: this rank's.
        workers: data-loading processes.
        ckpt_path, log_path: ``checkpoint.pt`` and ``train_log.jsonl`` in the run folder.
        saved: the checkpoint to resume from, read but not yet checked against the base.
    """

    config: TrainConfig
    options: RunOptions
    settings: StoreSettings
    source: DomainFolder
    target: DomainFolder
    class_names: list[str]
    ranks: Distributed
    device: torch.device
    workers: int
    ckpt_path: Path
    log_path: Path
    saved: dict[str, Any] | None


@dataclass
class Run:
    """A started run: the trainable session, its data, and the bookkeeping of its epochs.

    Attributes:
        cfg: the resolved configuration (no ``None`` left), as the adapter records it.
        signature: the base's identity, checked on resume and written into the adapter.
        class_embeddings: the text head's class embeddings (the adapter stores them).
        loader: the endless paired (source, target) batches; test_loader: the target images.
        source_images, target_images: how many labelled images each domain contributed.
        history: one record per finished epoch; sums: the current epoch's loss sums (with a
            ``_steps`` count); elapsed: seconds carried over from before a resume;
            started: when the current epoch (or resumed part of it) began.
        last_eval: the latest target evaluation, reused at the end if the weights are unchanged.
    """

    plan: Plan
    cfg: TrainConfig
    signature: BaseSignature
    session: Session
    class_embeddings: torch.Tensor
    loader: DataLoader[Any]
    test_loader: DataLoader[Any]
    source_images: int
    target_images: int
    log: TrainLog
    history: list[dict[str, Any]] = field(default_factory=list)
    sums: dict[str, float] = field(default_factory=dict)
    elapsed: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    last_eval: dict[str, Any] | None = None

    def checkpoint(self) -> None:
        """Save everything needed to continue to the same adapter bytes (rank 0 only).

        The elapsed time includes the current epoch's so far, so a resumed epoch reports the
        seconds of both parts.
        """
        if not self.plan.ranks.is_main:
            return
        save_checkpoint(
            self.plan.ckpt_path,
            {
                "config": self.cfg.to_dict(),
                "fingerprint": self.signature.fingerprint,
                "session": self.session.state(),
                "rng": rng_state(),
                "history": self.history,
                "sums": self.sums,
                "elapsed": self.elapsed + time.perf_counter() - self.started,
            },
        )
