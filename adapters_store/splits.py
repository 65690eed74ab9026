"""Weighted aliases: an alias that names several versions, each with a weight (a traffic split,
e.g. ``production``: v3 90, v4 10), and the sticky choice of one version per client key.

The choice hashes ``task``, ``alias`` and the client's key with SHA-256 (the same answer on every
replica and after a restart, unlike Python's ``hash``) to a point in ``[0, total weight)`` and
takes the version whose slice of the cumulative weights, in version order, holds it. Moving
weight from one version to the next (90/10 → 80/20) therefore moves only the keys in the slice
that changed hands. A request without a key gets a weighted random choice.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import InvalidRequest

MAX_WEIGHT = 10_000
MAX_SPLIT_VERSIONS = 16
PLAIN_WEIGHT = 100
"""The weight of a plain (one-version) alias's row."""


@dataclass(frozen=True)
class Share:
    """One version of a weighted alias and its weight."""

    version: int
    weight: int


def heaviest(shares: Sequence[Share]) -> Share:
    """The share with the most weight (the lowest version among equals)."""
    return max(shares, key=lambda sh: (sh.weight, -sh.version))


def check_split(weights: Mapping[int, int]) -> list[Share]:
    """The split ``version → weight`` as shares in version order, or :class:`InvalidRequest`."""
    if not 1 <= len(weights) <= MAX_SPLIT_VERSIONS:
        raise InvalidRequest(f"a split names 1 to {MAX_SPLIT_VERSIONS} versions")
    for version, weight in weights.items():
        if version < 1:
            raise InvalidRequest(f"version {version} is not a version number (>= 1)")
        if not 1 <= weight <= MAX_WEIGHT:
            raise InvalidRequest(f"the weight of v{version} must be 1..{MAX_WEIGHT}")
    return [Share(v, weights[v]) for v in sorted(weights)]


def parse_split(text: str) -> dict[int, int]:
    """``"3=90,4=10"`` (the CLI's form) as ``{3: 90, 4: 10}``; a repeated version is refused."""
    out: dict[int, int] = {}
    for part in text.split(","):
        version, sep, weight = part.strip().partition("=")
        if not sep or not version.strip().isdigit() or not weight.strip().isdigit():
            raise InvalidRequest(f"{part.strip()!r}: give VERSION=WEIGHT, e.g. 3=90,4=10")
        if int(version) in out:
            raise InvalidRequest(f"version {int(version)} is named twice")
        out[int(version)] = int(weight)
    return out


def pick(task: str, alias: str, shares: Sequence[Share], key: str | None) -> int:
    """The version of ``shares`` that serves ``key`` (sticky), or a weighted random one."""
    if len(shares) == 1:
        return shares[0].version
    ordered = sorted(shares, key=lambda s: s.version)
    total = sum(s.weight for s in ordered)
    if key is None:
        point = random.random() * total
    else:
        digest = hashlib.sha256(f"{task}\0{alias}\0{key}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") / 2**64 * total
    for share in ordered:
        if point < share.weight:
            return share.version
        point -= share.weight
    return ordered[-1].version  # float rounding at the very top of the range
