"""What registration checks before anything is written: one function for every door.

:func:`admit` applies the file's own rules, the base's, the servability checks against the
base's weights (``merged-finite`` included) and what the catalog can keep; the registry runs it
before it stores a byte, and the trainer runs it alone when it only writes a file.
"""

from __future__ import annotations

from .adapter import Adapter
from .errors import InvalidAdapter
from .format.codec import check_against_base, decode_adapter
from .format.framing import DEFAULT_LIMITS, Limits
from .format.schema import META_FIELDS, AdapterMeta, Kind
from .format.servable import check_servable
from .models import AdapterRow
from .serving_base import ServingBase


def admit(data: bytes, base: ServingBase, limits: Limits = DEFAULT_LIMITS) -> Adapter:
    """The decoded adapter, if ``data`` passes every rule registration applies against ``base``.

    Raises:
        InvalidAdapter: a rule is broken (``rule`` says which; ``IncompatibleBase`` for
            ``fingerprint``, ``AdapterTooLarge`` for ``size-limit``).
    """
    adapter = decode_adapter(data, limits)
    check_against_base(adapter, base.signature, limits)
    check_servable(adapter, base.signature, base.weights)
    check_catalog_text(adapter.meta)
    return adapter


def check_catalog_text(meta: AdapterMeta) -> None:
    """Refuse free text the catalog cannot keep faithfully.

    The file format allows any text; the catalog refuses what it cannot store on every backend
    (PostgreSQL rejects NUL in text and over-long VARCHARs) or show safely (control characters
    in pages and logs). The length limit is the column's (models.py).
    """
    for f in META_FIELDS:
        if f.column is None or f.kind not in (Kind.TEXT, Kind.UTC_TIME):
            continue
        longest = getattr(AdapterRow.__table__.c[f.column].type, "length", None)
        value: str = getattr(meta, f.name)
        if longest is None:
            continue
        if len(value) > longest or any(ch < " " or "\x7f" <= ch <= "\x9f" for ch in value):
            shown = repr(value) if len(value) <= 80 else repr(value[:80]) + "…"
            raise InvalidAdapter(
                "metadata",
                f"{f.name} {shown} must be at most {longest} characters, none of them control characters",
            )
