"""The planner's cost model: what a forward of n images, a swap and a task's correction cost.

A forward's time is not linear in its batch size: on a CPU a ViT's batch-1 forward runs its
matrices at a fraction of the efficiency of a batch of 16 (49–197 tokens per product), and on a
GPU a batch of 16 costs little more than one image. What mixing saves is exactly that gap, so
the model keeps a table of measured forward times by batch size (:attr:`CostModel.batch_s`),
interpolated in between, rather than a line through two points. Without a table (a configured
model of the first form) a forward costs ``forward_s + image_s·n``.

:func:`server.planner.measure_costs` measures the model at start-up; ``DELTACLIP_MIX_COSTS``
configures it (:meth:`CostModel.parse` checks it when the settings are read).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class CostModel:
    """Seconds: a forward of n images (``batch_s`` by size, or ``forward_s + image_s·n``);
    ``swap_weight_s`` per changed weight for a patch + restore; ``site_s`` per corrected module
    and ``weight_row_s`` per changed weight and row in a mixed forward."""

    forward_s: float = 0.0
    image_s: float = 0.0
    swap_weight_s: float = 0.0
    site_s: float = 0.0
    weight_row_s: float = 0.0
    batch_s: Mapping[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "batch_s" and not (isinstance(value, int | float) and value >= 0):
                raise ValueError(f"{f.name} must be a number of seconds >= 0, got {value!r}")
        if any(n < 1 or not s >= 0 for n, s in self.batch_s.items()):
            raise ValueError(f"batch_s maps batch sizes >= 1 to seconds >= 0, got {self.batch_s}")
        object.__setattr__(self, "batch_s", dict(sorted(self.batch_s.items())))

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> CostModel:
        """From ``DELTACLIP_MIX_COSTS``'s JSON (batch sizes come as strings); ValueError names
        what is wrong."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown cost model fields {unknown}; known: {sorted(known)}")
        values = dict(raw)
        table = values.pop("batch_s", {})
        if not isinstance(table, Mapping):
            raise ValueError("batch_s must map batch sizes to seconds")
        try:
            batch_s = {int(n): float(s) for n, s in table.items()}
            scalars = {k: float(v) for k, v in values.items()}
        except (TypeError, ValueError) as exc:
            raise ValueError(f"cost model values must be numbers: {exc}") from None
        return cls(**scalars, batch_s=batch_s)

    def forward(self, n: int) -> float:
        """One forward of ``n`` images: the table, linear between its sizes and beyond its last
        (the slope of its last two sizes), or ``forward_s + image_s·n``."""
        if n <= 0:
            return 0.0
        if not self.batch_s:
            return self.forward_s + self.image_s * n
        sizes = list(self.batch_s)
        if n in self.batch_s:
            return self.batch_s[n]
        if len(sizes) == 1 or n < sizes[0]:
            return self.batch_s[sizes[0]] * n / sizes[0]
        right = next((i for i, s in enumerate(sizes) if s > n), len(sizes) - 1)  # >= 1 here
        lo, hi = sizes[right - 1], sizes[right]
        slope = (self.batch_s[hi] - self.batch_s[lo]) / (hi - lo)
        return max(0.0, self.batch_s[lo] + slope * (n - lo))

    def forwards(self, n: int, max_batch: int) -> float:
        """``n`` images in forwards of at most ``max_batch``."""
        full, rest = divmod(n, max_batch)
        return full * self.forward(max_batch) + self.forward(rest)

    def swap(self, nnz: int) -> float:
        return self.swap_weight_s * nnz

    def correction(self, sites: int, nnz: int, rows: int) -> float:
        """What one task's correction on ``rows`` rows adds to a mixed forward."""
        return self.site_s * sites + self.weight_row_s * nnz * rows

    def as_config(self) -> dict[str, Any]:
        """The form ``DELTACLIP_MIX_COSTS`` takes (to pin a measured model)."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["batch_s"] = {str(n): s for n, s in self.batch_s.items()}
        return out


def batch_sizes(max_batch: int) -> list[int]:
    """The sizes measured at start-up: powers of two up to ``max_batch``, and ``max_batch``."""
    sizes = [1 << i for i in range(max(1, max_batch).bit_length()) if 1 << i <= max_batch]
    return sorted({*sizes, max_batch})
