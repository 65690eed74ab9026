"""docs/API.md's table of statuses and codes is exactly what server/errors.py RULES answers, and
covers every code the OpenAPI document declares."""

from __future__ import annotations

import errno
import re
from pathlib import Path

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from adapters_store import errors as store
from server import errors
from server.main import create_app

ROOT = Path(__file__).resolve().parents[2]


def subclasses(kind: type[BaseException]) -> set[type[BaseException]]:
    found = {kind}
    for sub in kind.__subclasses__():
        found |= subclasses(sub)
    return found


def answerable() -> set[tuple[int, str]]:
    """Every (status, code) RULES can produce: each of the server's and the store's error types,
    the framework's own errors, a full disk, and a bug."""
    pairs = set()
    for kind in (subclasses(errors.ServerError) - {errors.ServerError}) | subclasses(
        store.StoreError
    ):
        rule = next(r for r in errors.RULES if issubclass(kind, r.kind))
        assert rule.status is not None, kind
        pairs.add((rule.status, rule.code or str(kind.code)))
    for exc in (HTTPException(404), HTTPException(405), RequestValidationError([]),
                ClientDisconnect(), OSError(errno.ENOSPC, "full"), RuntimeError("a bug")):  # fmt: skip
        status, code, _, _ = errors.answer_for(exc)
        pairs.add((status, code))
    return pairs


def documented() -> set[tuple[int, str]]:
    text = (ROOT / "docs" / "API.md").read_text(encoding="utf-8")
    section = text.split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    pairs = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].isdigit():
            codes = re.findall(r"`([a-z_]+)`", cells[1])
            assert codes, line
            pairs |= {(int(cells[0]), code) for code in codes}
    return pairs


def declared() -> set[tuple[int, str]]:
    """(status, code) of every error response the OpenAPI document declares."""
    pairs = set()
    for methods in create_app().openapi()["paths"].values():
        for operation in methods.values():
            for status, response in operation["responses"].items():
                schema = response.get("content", {}).get("application/json", {}).get("schema", {})
                if schema.get("$ref", "").endswith("/ErrorBody"):
                    codes = re.findall(r"`([a-z_]+)`:", response["description"])
                    assert codes, (status, response)
                    pairs |= {(int(status), code) for code in codes}
    return pairs


def test_the_docs_table_is_the_rules_table() -> None:
    doc, rules = documented(), answerable()
    assert len(doc) >= 30
    assert doc - rules == set(), "docs/API.md lists answers RULES never gives"
    assert rules - doc == set(), "RULES gives answers docs/API.md does not list"


def test_every_code_the_openapi_document_declares_is_documented() -> None:
    openapi = declared()
    assert (404, "adapter_not_found") in openapi and (413, "too_many_images") in openapi
    assert openapi - documented() == set()
