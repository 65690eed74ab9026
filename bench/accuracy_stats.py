"""The accuracy study's statistics: per-seed accuracies, CIs across seeds, paired differences.

A study row is one (shift, setting, seed) run. Seeds are the unit of replication: a method's
accuracy is its mean over seeds with a Student-t 95 % confidence interval, and a comparison
between two methods is the mean of their per-seed differences (paired: the same seed means the
same data order, head initialisation and augmentation draws) with its t interval. McNemar's exact
test on the per-image predictions, pooled over seeds and shifts, is reported beside it; pooling
treats every (seed, image) pair as independent, so it is the weaker evidence of the two.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from scipy import stats


@dataclass(frozen=True)
class Interval:
    """A mean with its 95 % confidence half-width (``None`` from fewer than two values)."""

    mean: float
    half: float | None
    n: int

    @property
    def excludes_zero(self) -> bool | None:
        return None if self.half is None else abs(self.mean) > self.half

    @property
    def low(self) -> float | None:
        return None if self.half is None else self.mean - self.half

    def pct(self, signed: bool = False) -> str:
        """``70.2 ± 1.3`` in percentage points (``+4.5 ± 2.0`` when ``signed``)."""
        m = f"{100 * self.mean:+.1f}" if signed else f"{100 * self.mean:.1f}"
        return m if self.half is None else f"{m} ± {100 * self.half:.1f}"


def interval(values: list[float]) -> Interval:
    """Mean and Student-t 95 % half-width of ``values`` (independent replicates)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, None, n)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Interval(mean, float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n), n)


Runs = Mapping[str, Mapping[str, Any]]


def accuracy(runs: Runs, shift: str, setting: str, split: str = "test") -> dict[int, float]:
    """Seed → accuracy of one (shift, setting) on ``split`` (``test`` or ``source_val``)."""
    out = {}
    for row in runs.values():
        if row["shift"] == shift and row["setting"] == setting:
            out[int(row["seed"])] = float(row["scores"][split]["accuracy"])
    return out


def mean_over_shifts(runs: Runs, shifts: list[str], setting: str) -> dict[int, float]:
    """Seed → the mean accuracy over ``shifts``, for the seeds that have every shift."""
    per = [accuracy(runs, s, setting) for s in shifts]
    seeds = set.intersection(*(set(p) for p in per)) if per else set()
    return {seed: sum(p[seed] for p in per) / len(per) for seed in sorted(seeds)}


def paired(a: dict[int, float], b: dict[int, float]) -> Interval | None:
    """The mean of ``a − b`` over the seeds both have, with its interval."""
    seeds = sorted(set(a) & set(b))
    return interval([a[s] - b[s] for s in seeds]) if seeds else None


def ratio(a: dict[int, float], b: dict[int, float]) -> Interval | None:
    """The mean of ``a / b`` over the seeds both have (e.g. RST's retention of full FT)."""
    seeds = sorted(set(a) & set(b))
    return interval([a[s] / b[s] for s in seeds]) if seeds else None


@dataclass(frozen=True)
class McNemar:
    """Images one method got right and the other wrong (``a_only``, ``b_only``), exact p."""

    a_only: int
    b_only: int
    pairs: int
    p: float


def mcnemar(runs: Runs, shifts: list[str], a: str, b: str) -> McNemar | None:
    """Exact McNemar test of settings ``a`` and ``b``, pooled over shared seeds and ``shifts``."""
    a_only = b_only = pairs = 0
    for shift in shifts:
        rows_a = {r["seed"]: r for r in runs.values() if r["shift"] == shift and r["setting"] == a}
        rows_b = {r["seed"]: r for r in runs.values() if r["shift"] == shift and r["setting"] == b}
        for seed in set(rows_a) & set(rows_b):
            ta, tb = rows_a[seed]["scores"]["test"], rows_b[seed]["scores"]["test"]
            if ta["labels"] != tb["labels"]:
                raise ValueError(f"{shift} seed {seed}: {a} and {b} were scored on other images")
            for pa, pb, y in zip(ta["predictions"], tb["predictions"], ta["labels"], strict=True):
                pairs += 1
                a_only += pa == y and pb != y
                b_only += pb == y and pa != y
    if not pairs:
        return None
    discordant = a_only + b_only
    p = stats.binomtest(a_only, discordant, 0.5).pvalue if discordant else 1.0
    return McNemar(a_only, b_only, pairs, float(p))
