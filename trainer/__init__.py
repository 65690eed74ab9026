"""CMKD + RST (+ FixMatch) training of task adapters for deltaclip (docs/METHOD.md).

``trainer.main(argv)`` runs ``deltaclip train`` from a list of arguments and returns the run's
metrics; :func:`trainer.pipeline.train` is the same with typed settings. Imports go one way:
``trainer`` uses ``adapters_store`` and never ``server``. Heavy modules load on first use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``deltaclip train ARGS`` as a function returning the metrics dict (for tests and notebooks)."""
    from .cli import main as _main

    return _main(argv)
