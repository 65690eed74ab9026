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
