"""Names that reach file paths, URLs, SQL rows and logs: one strict pattern for each kind."""

from __future__ import annotations

import re

from .errors import InvalidName

# Task and alias names: letters, digits, '.', '_', '-'; no leading punctuation (so no '..', no
# hidden files) and no separators or control characters.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""The pattern as a whole-string regular expression (the HTTP API's parameter rule too)."""
_NAME_RE = re.compile(NAME_PATTERN)
# A state_dict key: dotted identifiers, e.g. "visual.transformer.resblocks.3.mlp.c_fc.weight".
PARAM_RE = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")  # always fullmatch


def check_name(value: object, what: str = "task") -> str:
    """Return ``value`` if it is a valid task/alias/domain name, else raise :class:`InvalidName`."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise InvalidName(
            f"invalid {what} name {value!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def is_valid_name(value: object) -> bool:
    return isinstance(value, str) and bool(_NAME_RE.fullmatch(value))
