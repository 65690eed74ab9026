"""The proof that swapping adapters leaves the base exact, computed cheaply and served cached.

Hashing the whole tower costs tens of milliseconds on the worker (about 42 ms on the default
base), so ``GET /base`` never does it: the worker computes the proof between rounds, at most
every ``base_check_s`` seconds, or when an admin asks (``POST /admin/base/check``), and the route
serves the last proof with its age.

A check first verifies that the live weights are exactly what the engine's record says (the
base, or the base with the current adapter patched in), without writing anything. Only then does
it restore the base with a normal switch and hash it. A mismatch is never repaired silently: it
is logged, counted (``deltaclip_base_mismatches_total``), reported in the proof, and the weights
are then reset to the pristine base as a whole.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from prometheus_client import Counter

from .engine import Engine
from .metrics import Metrics

log = logging.getLogger("deltaclip.server")


@dataclass(frozen=True)
class BaseProof:
    """One check of the live weights.

    Attributes:
        live_fingerprint: the weights' fingerprint when the base was restored for the check.
        unchanged: ``live_fingerprint`` equals the serving fingerprint (the weights as served).
        consistent: the live weights were exactly what the engine's record of the patched
            adapter says (checked before anything was written).
        checked_at: when (Unix time).
    """

    live_fingerprint: str
    unchanged: bool
    consistent: bool
    checked_at: float

    @property
    def exact(self) -> bool:
        return self.unchanged and self.consistent


class BaseCheck:
    """Runs on the worker thread only (it switches the engine)."""

    def __init__(self, engine: Engine, metrics: Metrics, interval_s: float) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self.proof: BaseProof | None = None
        self._next = 0.0
        self.mismatches = 0  # checks that found a mismatch (also a Prometheus counter)
        self._mismatch_counter = Counter(
            "deltaclip_base_mismatches_total",
            "Checks that found the live weights differing from what they should be",
            registry=metrics.registry,
        )

    def _mismatch(self) -> None:
        self.mismatches += 1
        self._mismatch_counter.inc()

    def due(self) -> bool:
        return time.monotonic() >= self._next

    def between_rounds(self) -> None:
        """The worker's between-rounds duty: a check when one is due."""
        if self.due():
            self.run()

    def run(self) -> BaseProof:
        """Check now: verify without writing, restore the base, hash, record the proof."""
        engine = self.engine
        current = engine.current
        consistent = engine.verify()
        if consistent:
            engine.restore_base()
        else:
            self._mismatch()
            log.error(
                "the live weights differ from the record (%s patched); resetting the base",
                current.digest[:12] if current is not None else "no adapter",
            )
            engine.reset()
        fingerprint = engine.base_fingerprint()
        unchanged = fingerprint == engine.serving_fingerprint
        if not unchanged:
            self._mismatch()
            log.error(
                "the restored base's fingerprint %s is not the serving fingerprint %s; resetting",
                fingerprint[:12],
                engine.serving_fingerprint[:12],
            )
            engine.reset()
        self.proof = BaseProof(fingerprint, unchanged, consistent, time.time())
        self._next = time.monotonic() + self.interval_s
        return self.proof
