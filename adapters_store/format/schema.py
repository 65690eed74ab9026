"""The adapter metadata schema of format v1, declared once (docs/FORMAT.md, "format v1").

Every ``__metadata__`` key of a v1 file (bar the constant ``format`` and ``format_version``) is
one field of :class:`AdapterMeta`, and the field carries everything the store needs to know about
it: its :class:`Kind` (how the value is written as a string and parsed back), a validator, a
description and the catalog column that keeps it. Decoding (:func:`decode_meta`), encoding
(:func:`encode_meta`), the catalog row (:func:`catalog_values`), the registry's record (a subclass
of :class:`AdapterMeta`) and the HTTP API's response models all read this one declaration. A new
field is one line here; a field the producer gives also joins
:class:`~adapters_store.adapter.AdapterInfo`; one the catalog keeps in a column also needs that
column (``adapters_store/models.py``) and a migration; and docs/FORMAT.md §3 lists every key.

Torch-free on purpose (tests/unit/test_codec.py checks it): the CLI and the catalog read metadata
without loading torch.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import AdapterTooLarge
from ..names import is_valid_name
from .framing import Limits, bad, show

FORMAT = "deltaclip.adapter"
FORMAT_VERSION = "1"
HEAD_TYPE = "bn-ln-linear"
RESIDUAL_DTYPE_NAMES = ("float32", "bfloat16", "float16")
# The block form's sizes B (residual/<P>/blocks + values [n_blocks, B]; docs/FORMAT.md): powers of
# two whose blocks, in float32 or narrower, fit a 64-byte cache line, so a server that aligns its
# parameters to 64 bytes moves each block as one item. A file's B is its values' second dimension.
BLOCK_SIZES = (2, 4, 8, 16)
SPEC = "deltaclip.meta"  # the key of a field's :class:`MetaField` in its dataclass metadata
DOC = "doc"  # the key of a field's description (record fields outside the schema use it too)


class Kind(enum.Enum):
    """How a field's value is written as a ``__metadata__`` string, and what parsing accepts."""

    TEXT = "text"  # the string itself
    JSON_LIST = "JSON list"  # json.dumps with non-ASCII kept (class names are people's words)
    JSON_DICT = "JSON dict"  # json.dumps with sorted keys, so equal adapters give equal bytes
    COUNT = "non-negative integer"  # ASCII decimal digits, at most 18 (fits int64)
    FLOAT = "finite float"  # repr(float): the shortest text that reads back to the same float
    UTC_TIME = "UTC timestamp"  # ISO 8601 with a zero UTC offset, kept as written


Check = Callable[[Any, Mapping[str, Any], Limits], None]
"""A field validator: ``(value, fields decoded before it, limits)``; raises ``InvalidAdapter``."""


@dataclass(frozen=True)
class MetaField:
    """One metadata field as the store sees it.

    Attributes:
        column: the ``adapters`` catalog column keeping the value, or None when the catalog keeps
            it elsewhere (the base's names are in ``base_models``; the head follows from
            ``num_classes`` and the base's embedding size).
    """

    name: str
    kind: Kind
    doc: str
    check: Check | None
    column: str | None


_SAME = object()  # meta(column=...) default: a column named like the field


def meta(
    kind: Kind, doc: str, *, check: Check | None = None, column: str | object | None = _SAME
) -> dict[str, Any]:
    """The dataclass ``metadata`` declaring a schema field (its name comes from the dataclass)."""
    return {SPEC: (kind, check, column), DOC: doc}


# ---------------------------------------------------------------------------------- validators


def _check_task(value: str, _: Mapping[str, Any], __: Limits) -> None:
    if not is_valid_name(value):
        raise bad(
            "metadata", f"task name {show(value)} is not allowed (letters, digits, '.', '_', '-')"
        )


def _check_fingerprint(value: str, _: Mapping[str, Any], __: Limits) -> None:
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise bad("metadata", "base_fingerprint must be 64 lowercase hex digits")


def _check_class_names(classes: list[Any], _: Mapping[str, Any], limits: Limits) -> None:
    if not classes or not all(isinstance(c, str) and c.strip() for c in classes):
        raise bad("metadata", "class_names must be a non-empty JSON list of non-empty strings")
    if len(set(classes)) != len(classes):
        raise bad("metadata", "class_names has duplicates")
    if len(classes) > limits.max_classes:
        raise AdapterTooLarge(f"{len(classes)} classes, the limit is {limits.max_classes}")


def _check_head(head: dict[str, Any], before: Mapping[str, Any], _: Limits) -> None:
    classes = len(before["class_names"])
    if (
        head.get("type") != HEAD_TYPE
        or type(head.get("dim")) is not int
        or head.get("num_classes") != classes
    ):
        raise bad(
            "metadata",
            f"head must be {{'type': {HEAD_TYPE!r}, 'dim': D, 'num_classes': {classes}}}",
        )


def _check_residual_dtype(value: str, _: Mapping[str, Any], __: Limits) -> None:
    if value not in RESIDUAL_DTYPE_NAMES:
        raise bad("metadata", f"residual_dtype must be one of {sorted(RESIDUAL_DTYPE_NAMES)}")


def _check_density(density: float, before: Mapping[str, Any], _: Limits) -> None:
    nnz, eligible = before["nnz"], before["eligible_params"]
    if nnz > eligible or abs(density - (nnz / eligible if eligible else 0.0)) > 1e-9:
        raise bad(
            "metadata", "density must equal nnz / eligible_params, with nnz <= eligible_params"
        )


# ---------------------------------------------------------------------------------- the schema


@dataclass
class AdapterMeta:
    """The typed ``__metadata__`` of a v1 adapter file: the schema itself.

    Fields are decoded and validated in this order, so a validator may read the fields above it
    (``head`` reads ``class_names``, ``density`` reads ``nnz`` and ``eligible_params``).
    """

    task: str = field(metadata=meta(Kind.TEXT, "Task name.", check=_check_task))
    base_model: str = field(metadata=meta(Kind.TEXT, "Base model name.", column=None))
    base_pretrained: str = field(
        metadata=meta(Kind.TEXT, "The base's pretrained weights tag.", column=None)
    )
    base_fingerprint: str = field(
        metadata=meta(Kind.TEXT, "SHA-256 of the base's weights.", check=_check_fingerprint)
    )
    class_names: list[str] = field(
        metadata=meta(Kind.JSON_LIST, "Class labels, in head order.", check=_check_class_names)
    )
    head: dict[str, Any] = field(
        metadata=meta(Kind.JSON_DICT, "Head type and shape.", check=_check_head, column=None)
    )
    residual_dtype: str = field(
        metadata=meta(Kind.TEXT, "dtype of the stored deltas.", check=_check_residual_dtype)
    )
    nnz: int = field(metadata=meta(Kind.COUNT, "Weights the adapter changes."))
    eligible_params: int = field(metadata=meta(Kind.COUNT, "Weights training could change."))
    density: float = field(
        metadata=meta(Kind.FLOAT, "nnz / eligible_params.", check=_check_density)
    )
    source_domain: str = field(default="", metadata=meta(Kind.TEXT, "Domain trained from."))
    target_domain: str = field(default="", metadata=meta(Kind.TEXT, "Domain adapted to."))
    method: str = field(default="", metadata=meta(Kind.TEXT, "Training method."))
    train_config: dict[str, Any] = field(
        default_factory=dict, metadata=meta(Kind.JSON_DICT, "Training configuration.")
    )
    metrics: dict[str, Any] = field(
        default_factory=dict, metadata=meta(Kind.JSON_DICT, "Evaluation results.")
    )
    created_at: str = field(
        default="",
        metadata=meta(Kind.UTC_TIME, "When the adapter was made.", column="adapter_created_at"),
    )


def _spec(f: dataclasses.Field[Any]) -> MetaField:
    kind, check, column = f.metadata[SPEC]
    return MetaField(f.name, kind, f.metadata[DOC], check, f.name if column is _SAME else column)


META_FIELDS: tuple[MetaField, ...] = tuple(_spec(f) for f in dataclasses.fields(AdapterMeta))
REQUIRED_KEYS: tuple[str, ...] = ("format", "format_version", *(f.name for f in META_FIELDS))


def head_meta(dim: int, num_classes: int) -> dict[str, Any]:
    """The ``head`` field of an adapter whose head maps ``dim`` features to ``num_classes``."""
    return {"type": HEAD_TYPE, "dim": dim, "num_classes": num_classes}


# ---------------------------------------------------------------------------------- encode


_ENCODE: dict[Kind, Callable[[Any], str]] = {
    Kind.TEXT: str,
    Kind.JSON_LIST: lambda v: json.dumps(v, ensure_ascii=False),
    Kind.JSON_DICT: lambda v: json.dumps(v, sort_keys=True),
    Kind.COUNT: str,
    Kind.FLOAT: lambda v: repr(float(v)),
    Kind.UTC_TIME: str,
}


def encode_meta(value: AdapterMeta) -> dict[str, str]:
    """The ``__metadata__`` strings of ``value`` (deterministic: the file's bytes depend on it)."""
    out = {"format": FORMAT, "format_version": FORMAT_VERSION}
    out.update({f.name: _ENCODE[f.kind](getattr(value, f.name)) for f in META_FIELDS})
    return out


def catalog_values(value: AdapterMeta) -> dict[str, Any]:
    """The ``adapters`` catalog columns that keep ``value``'s fields, by column name."""
    return {f.column: getattr(value, f.name) for f in META_FIELDS if f.column is not None}


# ---------------------------------------------------------------------------------- decode


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _parse_json(key: str, text: str, kind: type) -> Any:
    try:
        # NaN and Infinity are not JSON: PostgreSQL's json type and strict clients refuse them.
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        raise bad("metadata", f"{key} is not valid JSON (NaN and Infinity are not)") from None
    if not isinstance(value, kind):
        raise bad("metadata", f"{key} must be a JSON {kind.__name__}")
    return value


def _parse(kind: Kind, key: str, text: str) -> Any:
    """The value of one field from its string; raises ``InvalidAdapter`` (rule ``metadata``)."""
    if kind is Kind.JSON_LIST or kind is Kind.JSON_DICT:
        return _parse_json(key, text, list if kind is Kind.JSON_LIST else dict)
    if kind is Kind.COUNT:
        if not (text.isascii() and text.isdigit()) or len(text) > 18:
            raise bad("metadata", f"{key} must be a non-negative decimal integer, got {show(text)}")
        return int(text)
    if kind is Kind.FLOAT:
        try:
            number = float(text)
        except ValueError:
            raise bad("metadata", f"{key} is not a number") from None
        if not math.isfinite(number):
            raise bad("metadata", f"{key} must be a finite number, got {show(text)}")
        return number
    if kind is Kind.UTC_TIME:
        try:
            offset = dt.datetime.fromisoformat(text).utcoffset()
        except ValueError:
            offset = None
        if offset != dt.timedelta(0):
            raise bad(
                "metadata",
                f"{key} must be an ISO 8601 UTC timestamp (e.g. 2026-01-31T12:00:00Z)",
            )
    return text


def decode_meta(raw: Mapping[str, str], limits: Limits) -> AdapterMeta:
    """Parse and validate a file's ``__metadata__`` (keys beyond the schema's are ignored).

    Raises:
        InvalidAdapter: rule ``metadata``, naming the key; ``AdapterTooLarge`` past a limit.
    """
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise bad("metadata", f"missing metadata keys: {', '.join(missing)}")
    if raw["format"] != FORMAT:
        raise bad("metadata", f"format is {show(raw['format'])}, expected {FORMAT!r}")
    if raw["format_version"] != FORMAT_VERSION:
        raise bad(
            "metadata",
            f"format_version {show(raw['format_version'])} is not supported (this reader knows {FORMAT_VERSION})",
        )
    values: dict[str, Any] = {}
    for f in META_FIELDS:
        value = _parse(f.kind, f.name, raw[f.name])
        if f.check is not None:
            f.check(value, values, limits)
        values[f.name] = value
    return AdapterMeta(**values)
