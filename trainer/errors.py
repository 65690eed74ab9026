"""Errors of the trainer, each a ``ValueError`` so the ``deltaclip`` CLI prints them as messages.

The CLI's ``main`` turns ``StoreError``, ``ValueError`` and ``OSError`` into one-line messages; a
trainer error subclasses ``ValueError`` so that a bad folder or flag never ends in a traceback.
"""

from __future__ import annotations


class TrainError(ValueError):
    """A training or evaluation run cannot go on (bad configuration, checkpoint mismatch...)."""


class DataError(TrainError):
    """A domain folder cannot be used: empty, mismatched classes, or class names that collide."""


class ExactnessError(TrainError):
    """The adapter built from the trained tower does not merge back to it bit for bit."""


class CheckpointRefused(TrainError):
    """A fine-tune (or head file) to import cannot be used: unsafe, unreadable, or not this base's."""


# How many offending keys an error message lists before "...".
SHOWN_KEYS = 8


def listed(keys: list[str]) -> str:
    """Up to ``SHOWN_KEYS`` of ``keys``, sorted and comma-separated, with the count when cut."""
    shown = ", ".join(sorted(keys)[:SHOWN_KEYS])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > SHOWN_KEYS else "")
