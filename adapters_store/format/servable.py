"""Semantic checks: is a well-formed adapter also *servable* on this base, with sane answers?

``decode_adapter`` and ``check_against_base`` (``codec``) prove a file is well formed. A file can
pass them and still break serving later: an ``image_size`` the tower cannot take, a metric the
catalog cannot show, a head weight of 1e38 or a BatchNorm variance of -1 (every score NaN), or a
residual whose task weights overflow to inf in a serving dtype. :func:`check_servable` refuses
those, in one place, each with its rule name (``SERVABLE_RULES``, docs/FORMAT.md "rules"). The
registry runs it at registration and again whenever it loads a stored adapter against a base
(the server's cold-load path), since a store can hold files registered before these rules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

import torch

from ..adapter import Adapter
from ..bases import BaseSignature
from .framing import bad

SERVABLE_RULES = (
    "train-config",  # train_config.image_size not an integer the base's tower takes
    "metrics",  # a metric the catalog shows out of range, or any number beyond MAX_NUMBER
    "class-names",  # a class name too long or holding control characters
    "head-values",  # head or class embeddings beyond HEAD_BOUND, or a negative BatchNorm variance
    "merged-finite",  # base + residual is not finite in a serving dtype
)

MAX_NUMBER = float(2**53)
"""Largest magnitude of any number in ``train_config`` or ``metrics`` (exact in a float64)."""
HEAD_BOUND = 1e6
"""Largest magnitude of a head value. With LayerNorm between, finite features then always give
finite float32 logits (|logit| ≤ D·B·(√D·B + B), about 1e19 for D = 10^5)."""
MIN_IMAGE_SIZE = 8
MAX_IMAGE_SIZE = 1024
"""Input sizes a size-flexible (convolutional) tower may be served at; a tower with a fixed
positional-embedding grid (a ViT) takes only its native size."""
MAX_CLASS_NAME = 256
SERVING_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACCURACY_KEYS = ("target_accuracy", "target_acc", "accuracy", "acc")
"""The metrics the catalog shows as the adapter's accuracy (a fraction, or a percentage)."""


class BaseWeights(Protocol):
    """Where the base's weights can be read at given positions (any dtype)."""

    def base_values(self, key: str, indices: torch.Tensor) -> torch.Tensor:
        """The base parameter ``key``'s values at flat (C-order) ``indices``."""
        ...


class StateWeights:
    """:class:`BaseWeights` over a ``state_dict``-like mapping (e.g. a built base's tower)."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self.state = state

    def base_values(self, key: str, indices: torch.Tensor) -> torch.Tensor:
        return self.state[key].detach().reshape(-1).index_select(0, indices.to(torch.int64))


def fixed_image_size(base: BaseSignature) -> int | None:
    """The only input size of a tower with a fixed positional-embedding grid, else None.

    Read from the signature's shapes: an open_clip ViT has ``visual.positional_embedding`` of
    ``grid² (+1 class token)`` rows and patches of ``visual.conv1.weight``'s kernel size."""
    pos, conv = (
        base.param_shapes.get("visual.positional_embedding"),
        base.param_shapes.get("visual.conv1.weight"),
    )
    if pos is None or conv is None or len(pos) != 2 or len(conv) != 4:
        return None
    rows = pos[0]
    grid = math.isqrt(rows) if math.isqrt(rows) ** 2 == rows else math.isqrt(rows - 1)
    return grid * conv[-1]


def check_servable(
    adapter: Adapter,
    base: BaseSignature,
    weights: BaseWeights | Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Refuse an adapter the server would answer badly.

    Args:
        weights: the base's weights (a :class:`BaseWeights`, or a ``state_dict``); they enable
            ``merged-finite``, the only rule that reads weights.

    Raises:
        InvalidAdapter: the broken rule named in ``rule`` (one of ``SERVABLE_RULES``).
    """
    meta = adapter.meta
    _check_image_size(meta.train_config.get("image_size"), base)
    _check_numbers("train-config", "train_config", meta.train_config)
    _check_numbers("metrics", "metrics", meta.metrics)
    for key in ACCURACY_KEYS:
        value = meta.metrics.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100
        ):
            raise bad("metrics", f"metrics.{key} must be a number from 0 to 100 (or null)")
    for name in meta.class_names:
        if len(name) > MAX_CLASS_NAME or any(ch < " " or "\x7f" <= ch <= "\x9f" for ch in name):
            raise bad(
                "class-names",
                f"class name {name[:40]!r} must be at most {MAX_CLASS_NAME} characters, "
                "none of them control characters",
            )
    _check_head(adapter)
    if weights is not None:
        source = StateWeights(weights) if isinstance(weights, Mapping) else weights
        _check_merged(adapter, base, source)


def _check_image_size(size: Any, base: BaseSignature) -> None:
    if size is None:
        return  # served at the base's native size
    fixed = fixed_image_size(base)
    if type(size) is not int:
        raise bad("train-config", f"train_config.image_size must be an integer, got {size!r:.40}")
    if fixed is not None and size != fixed:
        raise bad(
            "train-config",
            f"train_config.image_size {size}: this base's tower takes only {fixed}×{fixed} images",
        )
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise bad(
            "train-config",
            f"train_config.image_size {size} is outside {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}",
        )


def _check_numbers(rule: str, where: str, value: Any) -> None:
    """Every number inside a JSON value is finite and within ``MAX_NUMBER`` (iteratively)."""
    stack: list[tuple[str, Any]] = [(where, value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, dict):
            stack.extend((f"{path}.{k}", v) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(item))
        elif (
            isinstance(item, int | float) and not isinstance(item, bool) and abs(item) > MAX_NUMBER
        ):
            raise bad(rule, f"{path[:80]} is a number beyond ±2^53")


def _check_head(adapter: Adapter) -> None:
    tensors = {f"head/{k}": v for k, v in adapter.head.items() if v.is_floating_point()}
    if adapter.class_embeddings is not None:
        tensors["text/class_embeddings"] = adapter.class_embeddings
    for name, t in tensors.items():
        if t.numel() and float(t.abs().max()) > HEAD_BOUND:
            raise bad("head-values", f"{name} holds values beyond ±{HEAD_BOUND:g}")
    var = adapter.head.get("bn.running_var")
    if var is not None and var.numel() and float(var.min()) < 0:
        raise bad("head-values", "head/bn.running_var holds a negative variance")
    count = adapter.head.get("bn.num_batches_tracked")
    if count is not None and int(count) < 0:
        raise bad("head-values", "head/bn.num_batches_tracked is negative")


def _check_merged(adapter: Adapter, sig: BaseSignature, weights: BaseWeights) -> None:
    """The merge (docs/FORMAT.md §7) is finite at every listed position in every serving dtype
    (block residuals expanded to their positions, a tail block's padding left out)."""
    for key, res in sorted(adapter.residual.items()):
        if not res.nnz:
            continue
        positions, deltas = res.positions(sig.numel(key))
        base = weights.base_values(key, positions)
        values = deltas.float()
        for dtype in SERVING_DTYPES:
            merged = (base.to(dtype).float() + values).to(dtype)
            if not bool(torch.isfinite(merged).all()):
                name = str(dtype).removeprefix("torch.")
                raise bad(
                    "merged-finite",
                    f"{key}: base + residual overflows in {name} (|value| up to "
                    f"{float(values.abs().max()):.3g})",
                )
