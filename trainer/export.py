"""From a trained tower to a registered v1 adapter, verified to be exact before it is written.

``adapters_store`` *defines* the task weights as ``merge(W0, residual)``. An RST tower satisfies
that definition bit for bit in practice (each changed weight is a float32 residual away from its
base value); :func:`verified_adapter` proves it for the tower at hand and refuses otherwise, so
what is served is exactly what was trained and evaluated.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from adapters_store.adapter import (
    RESIDUAL_DTYPES,
    Adapter,
    AdapterInfo,
    build_adapter,
    merge_state,
)
from adapters_store.admission import admit
from adapters_store.config import StoreSettings
from adapters_store.errors import InvalidAdapter
from adapters_store.registry import Registration, Registry
from adapters_store.serving_base import ServingBase

from .errors import ExactnessError, TrainError


def verified_adapter(
    base_state: Mapping[str, torch.Tensor],
    task_state: Mapping[str, torch.Tensor],
    info: AdapterInfo,
    *,
    head_state: Mapping[str, torch.Tensor],
    class_embeddings: torch.Tensor | None = None,
    residual_dtype: str = "float32",
    block_size: int = 1,
) -> Adapter:
    """Build the adapter of ``task_state`` over ``base_state`` and check that it merges back exactly.

    Args:
        base_state, task_state: the tower's ``W0`` and ``W`` on CPU, keyed like the base.
        info: the adapter's metadata (task, base, class names, domains, config, metrics).
        head_state, class_embeddings: the task head and the teacher's class vectors.

    Raises:
        ExactnessError: ``merge_state(W0, adapter)`` differs from ``W`` somewhere (a tower that
            was not passed through :func:`snap`); names the parameters and counts.
    """
    adapter = build_adapter(
        base_state,
        task_state,
        info,
        head_state=head_state,
        class_embeddings=class_embeddings,
        eligible=base_state,
        residual_dtype=RESIDUAL_DTYPES[residual_dtype],
        block_size=block_size,
    )
    merged = merge_state(base_state, adapter)
    wrong = {
        key: int((merged[key] != task_state[key]).sum())
        for key in task_state
        if not torch.equal(merged[key], task_state[key])
    }
    if wrong:
        listed = ", ".join(f"{k} ({n})" for k, n in sorted(wrong.items())[:5])
        raise ExactnessError(
            f"the {residual_dtype} adapter does not reproduce the trained tower: "
            f"{sum(wrong.values())} weights differ after merging, in {listed}"
            + (" ..." if len(wrong) > 5 else "")
            + " (snap the tower with trainer.export.snap first)"
        )
    return adapter


@torch.no_grad()
def snap(
    base_state: Mapping[str, torch.Tensor],
    task_state: Mapping[str, torch.Tensor],
    residual_dtype: str,
    rounds: int = 4,
) -> tuple[dict[str, torch.Tensor], int]:
    """The tower an adapter will actually serve, ``merge(W0, round(W − W0))``, and how many differ.

    A float32 residual reproduces a weight exactly while it stays within a factor of two of its
    base value (Sterbenz); a weight that shrinks further towards zero (common for the many small
    weights of a large tower) can come back one rounding step off. A bfloat16 or float16
    residual rounds every delta. Training therefore evaluates and stores these served weights;
    re-rounding them changes nothing after one round in practice (up to ``rounds`` are tried).

    Returns:
        The served tower and the number of weights that differ from ``task_state``.
    """
    dtype = RESIDUAL_DTYPES[residual_dtype]
    current = {k: v.clone() for k, v in task_state.items()}
    for _ in range(rounds):
        changed = False
        for key, w in current.items():
            w0 = base_state[key]
            delta = (w.double() - w0.double()).to(dtype)
            merged = (w0.float() + delta.float()).to(w0.dtype)
            if not torch.equal(merged, w):
                current[key], changed = merged, True
        if not changed:
            break
    moved = sum(int((current[k] != task_state[k]).sum()) for k in task_state)
    return current, moved


def default_output(settings: StoreSettings, task: str, created_at: str) -> Path:
    """``<home>/adapters/<task>-<timestamp>.safetensors``: one file per run, named by its time."""
    stamp = created_at.replace("-", "").replace(":", "")
    return settings.home / "adapters" / f"{task}-{stamp}.safetensors"


def store_written(
    path: Path, base: ServingBase, settings: StoreSettings, alias: str | None, register: bool
) -> Registration | None:
    """Check a written adapter exactly as the store does, against ``base`` (its weights too, so
    ``merged-finite`` applies), and register it when asked: the file is decoded once.

    The file is written first (``adapters_store.format.codec.write_adapter``) so that a run's
    result is never lost, even when the store refuses it (say, a density above its limit).

    Raises:
        TrainError: the store refuses the file (the message names the rule and the file), or
            registering it failed (the message says how to register it later).
    """
    data = path.read_bytes()
    try:
        if not register:
            admit(data, base, settings.limits)
            return None
        registry = Registry.from_settings(settings)
        try:
            return registry.register(data, base, alias=alias)
        finally:
            registry.close()
    except InvalidAdapter as exc:
        raise TrainError(f"wrote {path}, but the store would refuse it: {exc}") from exc
    except Exception as exc:
        raise TrainError(
            f"wrote {path} but could not register it ({exc}); "
            f"register it later with `deltaclip adapters register {path}`"
        ) from exc
