"""Checkpoints of a run: everything needed to continue it to the same result as without a stop.

A checkpoint holds the tower's parameters, the task head, the optimiser (momentum buffers),
the step counters, the partial sums of the current epoch, the per-epoch log so far, the RNG
states, the base fingerprint and the resolved configuration. It is written atomically with
``torch.save`` and read back with ``weights_only=True`` (plain containers and tensors only, never
arbitrary pickles). The data stream needs no state: batches and augmentations are a function of
the step number (see ``trainer.data.InfiniteBatchSampler``).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from adapters_store.files import atomic_write

from .errors import TrainError

FORMAT = "deltaclip.train-checkpoint/1"
# Settings that may differ on resume: they cannot change what the steps already taken computed.
RESUMABLE_CHANGES = frozenset({"epochs"})


def rng_state() -> dict[str, Any]:
    """Every random number generator a run could draw from, as weights-only-loadable values."""
    np_state = cast(tuple[Any, ...], np.random.get_state(legacy=True))
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved: a resumed run draws what the stopped one would have."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically (a crash mid-write leaves the previous checkpoint intact)."""
    with atomic_write(path, suffix=".pt") as f:
        torch.save({"format": FORMAT, **payload}, f)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint (weights only, on CPU).

    Raises:
        TrainError: the file is not a checkpoint of this trainer.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise TrainError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise TrainError(f"{path} is not a deltaclip training checkpoint ({FORMAT})")
    return payload


def check_compatible(
    saved_config: dict[str, Any], config: dict[str, Any], saved_fp: str, fingerprint: str
) -> None:
    """Refuse to resume a run under other settings or on other base weights.

    Raises:
        TrainError: naming every setting that differs.
    """
    if saved_fp != fingerprint:
        raise TrainError(
            f"the checkpoint was made on base weights {saved_fp[:12]}…, these are {fingerprint[:12]}…"
        )
    diffs = [
        f"{k}: checkpoint {saved_config.get(k)!r}, now {config.get(k)!r}"
        for k in sorted(set(saved_config) | set(config))
        if k not in RESUMABLE_CHANGES and saved_config.get(k) != config.get(k)
    ]
    if diffs:
        raise TrainError(
            "cannot resume: the run's settings differ from the checkpoint's ("
            + "; ".join(diffs)
            + ")"
        )
