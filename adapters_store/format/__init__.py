"""Adapter file format v1 (docs/FORMAT.md): its public surface, importable from here.

* the metadata schema (:mod:`.schema`): :class:`AdapterMeta`, its constants and codec;
* the safetensors framing and size limits (:mod:`.framing`): :class:`Limits`;
* encode, decode and the rules that need the base (:mod:`.codec`), with the rule names
  (:data:`RULES`);
* the checks against the serving base (:mod:`.servable`), with their rule names.

The codec and the servability checks build on :mod:`adapters_store.adapter`, which itself reads
the schema from here, so their names are imported on first use (PEP 562) rather than at import.
"""

from __future__ import annotations

import importlib
from typing import Any

from .framing import DEFAULT_LIMITS, Limits
from .schema import (
    BLOCK_SIZES,
    FORMAT,
    FORMAT_VERSION,
    HEAD_TYPE,
    META_FIELDS,
    REQUIRED_KEYS,
    RESIDUAL_DTYPE_NAMES,
    AdapterMeta,
    decode_meta,
    encode_meta,
)

_LAZY = {
    "RULES": "codec",
    "check_against_base": "codec",
    "decode_adapter": "codec",
    "encode_adapter": "codec",
    "read_adapter": "codec",
    "write_adapter": "codec",
    "SERVABLE_RULES": "servable",
    "BaseWeights": "servable",
    "StateWeights": "servable",
    "check_servable": "servable",
}

__all__ = [
    "BLOCK_SIZES",
    "DEFAULT_LIMITS",
    "FORMAT",
    "FORMAT_VERSION",
    "HEAD_TYPE",
    "META_FIELDS",
    "REQUIRED_KEYS",
    "RESIDUAL_DTYPE_NAMES",
    "AdapterMeta",
    "Limits",
    "decode_meta",
    "encode_meta",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
