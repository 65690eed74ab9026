"""One error hierarchy for the store, mapped to HTTP statuses and CLI exit codes in one place each.

Every error also subclasses the closest built-in (``ValueError``, ``LookupError``, ...) so callers
that do not know deltaclip can still catch them sensibly, as PEFT does with its errors.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of every error raised by :mod:`adapters_store`.

    Attributes:
        code: a short stable machine-readable code (used in HTTP error bodies).
    """

    code = "store_error"


class InvalidAdapter(StoreError, ValueError):
    """An adapter file breaks a rule of format v1 (docs/FORMAT.md, "format v1").

    Attributes:
        rule: the rule that was broken, e.g. ``indices-order``; stable, used by tests and clients.
    """

    code = "invalid_adapter"

    def __init__(self, rule: str, message: str) -> None:
        self.rule = rule
        super().__init__(f"[{rule}] {message}")


class IncompatibleBase(InvalidAdapter):
    """The adapter was trained against other base weights than the ones it is checked against."""

    code = "incompatible_base"

    def __init__(self, message: str) -> None:
        super().__init__("fingerprint", message)


class AdapterTooLarge(InvalidAdapter):
    """The adapter exceeds a configured size limit (file bytes, header bytes or density)."""

    code = "adapter_too_large"

    def __init__(self, message: str) -> None:
        super().__init__("size-limit", message)


class ChecksumMismatch(StoreError, OSError):
    """Stored bytes no longer hash to the digest they were stored under (disk corruption)."""

    code = "checksum_mismatch"


class NotFound(StoreError, LookupError):
    """Base of the *not found* errors."""

    code = "not_found"


class AdapterNotFound(NotFound):
    """No such task, version or alias."""

    code = "adapter_not_found"


class BlobNotFound(NotFound):
    """No stored file under that digest."""

    code = "blob_not_found"


class BaseNotFound(NotFound):
    """No such base model."""

    code = "base_not_found"


class AlreadyExists(StoreError, ValueError):
    """A uniqueness rule of the catalog would be broken (mapped from ``IntegrityError``)."""

    code = "already_exists"


class SchemaOutOfDate(StoreError, RuntimeError):
    """The catalog database is not at the head migration; ``deltaclip db upgrade`` fixes it."""

    code = "schema_out_of_date"


class InvalidRequest(StoreError, ValueError):
    """Arguments to a store call that can never be answered (both a version and an alias, a
    page size outside 1..1000): the caller's mistake, told apart from a missing adapter."""

    code = "invalid_request"


class InvalidDigest(StoreError, ValueError):
    """A digest that is not 64 lowercase hex digits; digests reach file paths, so none passes."""

    code = "invalid_digest"


class InvalidTaskState(StoreError, ValueError):
    """Task weights that cannot become an adapter of their base (shapes or dtypes differ, a
    parameter outside the eligible set changed, a residual is not finite)."""

    code = "invalid_task_state"


class ParameterNotFound(NotFound, KeyError):
    """An adapter's residual names a parameter the base's weights lack (a ``KeyError`` too, as a
    missing key of a ``state_dict``)."""

    code = "parameter_not_found"
    __str__ = StoreError.__str__  # the message itself, not KeyError's quoted repr of it


class BrokenMigrations(StoreError, RuntimeError):
    """The packaged migrations do not form one line of revisions (an installation fault)."""

    code = "broken_migrations"


class InvalidName(StoreError, ValueError):
    """A task, alias or domain name is empty, too long or has characters outside the allowed set."""

    code = "invalid_name"


class UnmappedLabel(StoreError, ValueError):
    """A class label that the base's text side cannot place (the default base: no WordNet noun
    with ImageNet-1k classes under or near it)."""

    code = "unmapped_label"
