"""deltaclip_api: the HTTP API's answers as pydantic models, shared by both ends of the wire.

``deltaclip serve`` declares them as its routes' response models (so ``/openapi.json`` carries
them) and :mod:`deltaclip_client` reads answers with them, so the shapes are written once. The
package imports nothing of deltaclip's (tests/unit/test_layering.py checks it); docs/API.md
says what each field means beyond its description here.
"""

from .answers import (
    AdapterRef,
    AliasRemoved,
    AliasSet,
    AliasShare,
    BaseInfo,
    BaseStatus,
    Deleted,
    ErrorBody,
    ErrorDetail,
    Health,
    Label,
    Prediction,
    Readiness,
    Registration,
    ZeroShot,
)

__all__ = [
    "AdapterRef",
    "AliasRemoved",
    "AliasSet",
    "AliasShare",
    "BaseInfo",
    "BaseStatus",
    "Deleted",
    "ErrorBody",
    "ErrorDetail",
    "Health",
    "Label",
    "Prediction",
    "Readiness",
    "Registration",
    "ZeroShot",
]
