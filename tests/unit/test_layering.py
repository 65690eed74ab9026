"""The repository's structural rules, checked from the source text (``ast``), not by convention.

* Import direction: trainer → adapters_store ← server, deltaclip_demo on top. trainer and
  server never import each other (nor the demo); adapters_store imports none of them. The HTTP
  client (deltaclip_client) imports none of them either (it speaks HTTP only); trainer and the
  demo may use it, server and adapters_store do not. The HTTP API's answer models
  (deltaclip_api) import nothing of deltaclip's; the server declares them, the client reads
  with them. Imports inside functions and
  ``TYPE_CHECKING`` blocks count: they are dependencies all the same.
* No private name (leading underscore, not a dunder) is imported from another module or reached
  as ``module._name``: a private name is one its module may change without notice.
* No non-test module is longer than 400 lines.
* The repository carries its own contracts (docs/FORMAT.md, docs/METHOD.md, docs/API.md): no
  file refers to design documents that a clone of the repository does not have.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import checkout_files

ROOT = Path(__file__).resolve().parents[2]
SOURCE_PACKAGES = (
    "adapters_store",
    "trainer",
    "server",
    "deltaclip_demo",
    "deltaclip_client",
    "deltaclip_api",
    "bench",
)
MAX_MODULE_LINES = 400
# Which top-level packages each package must never import.
FORBIDDEN_IMPORTS = {
    "adapters_store": {"trainer", "server", "deltaclip_demo", "deltaclip_client"},
    "trainer": {"server", "deltaclip_demo"},
    "server": {"trainer", "deltaclip_demo", "deltaclip_client"},
    "deltaclip_client": {"adapters_store", "trainer", "server", "deltaclip_demo"},
    "deltaclip_api": {
        "adapters_store",
        "trainer",
        "server",
        "deltaclip_demo",
        "deltaclip_client",
        "bench",
    },
}
# Built at run time so that this file does not itself contain the names it looks for.
OUTSIDE_DOCUMENTS = re.compile(
    r"\b(?:" + "|".join(re.escape(n) for n in ("DESIGN", "CMKD-RST", "STYLE")) + r")\.md\b"
)


def modules_of(package: str) -> list[Path]:
    """Every Python file of a package, its subpackages included."""
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def absolute_from(node: ast.ImportFrom, path: Path) -> str:
    """The absolute module an ``ImportFrom`` reads from, relative imports resolved."""
    if node.level == 0:
        return node.module or ""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, module)`` for every import anywhere in the file, and ``import_module("...")``."""
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            source = absolute_from(node, path)
            yield node.lineno, source
            for alias in node.names:  # ``from . import server_module`` names a module too
                yield node.lineno, f"{source}.{alias.name}" if source else alias.name
        elif (
            isinstance(node, ast.Call)
            and (getattr(node.func, "attr", None) or getattr(node.func, "id", None))
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


@pytest.mark.parametrize("package", sorted(FORBIDDEN_IMPORTS))
def test_import_direction(package: str) -> None:
    forbidden = FORBIDDEN_IMPORTS[package]
    offenders = sorted(
        f"{path.relative_to(ROOT)}:{line}: imports {name}"
        for path in modules_of(package)
        for line, name in imported_modules(path)
        if name.split(".")[0] in forbidden
    )
    assert offenders == [], f"{package} must not import {sorted(forbidden)}:\n" + "\n".join(
        offenders
    )


def test_the_shipped_migrations_import_only_adapters_store() -> None:
    """alembic/ ships as adapters_store.migrations, so it follows adapters_store's rule."""
    forbidden = FORBIDDEN_IMPORTS["adapters_store"]
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: imports {name}"
        for path in sorted((ROOT / "alembic").rglob("*.py"))
        for line, name in imported_modules(path)
        if name.split(".")[0] in forbidden
    ]
    assert offenders == []


def is_module(dotted: str) -> bool:
    """Whether ``dotted`` names an importable module (a class or function attribute is not)."""
    try:
        return importlib.util.find_spec(dotted) is not None
    except (ImportError, ValueError, AttributeError):
        return False


def private_uses(path: Path) -> Iterator[str]:
    """Private names this file takes from other modules: ``from x import _y`` and ``x._y``."""
    tree = parse(path)
    modules: dict[str, str] = {}  # local name -> dotted module it may be bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    modules[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    modules[top] = top
        elif isinstance(node, ast.ImportFrom):
            source = absolute_from(node, path)
            for alias in node.names:
                if is_private(alias.name):
                    yield f"{node.lineno}: from {source or '.'} import {alias.name}"
                modules[alias.asname or alias.name] = f"{source}.{alias.name}".lstrip(".")
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and is_private(node.attr)):
            continue
        chain: list[str] = []
        value: ast.expr = node.value
        while isinstance(value, ast.Attribute):
            chain.insert(0, value.attr)
            value = value.value
        if isinstance(value, ast.Name) and value.id in modules:
            owner = ".".join([modules[value.id], *chain])
            if is_module(owner):
                yield f"{node.lineno}: {ast.unparse(node)} (private name of module {owner})"


def test_no_private_name_is_taken_from_another_module() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{use}"
        for package in SOURCE_PACKAGES
        for path in modules_of(package)
        for use in private_uses(path)
    ]
    assert offenders == [], "make these names public or keep them in their module:\n" + "\n".join(
        offenders
    )


def test_no_module_is_over_the_line_limit() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}: {n} lines"
        for package in SOURCE_PACKAGES
        for path in modules_of(package)
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    ]
    assert offenders == [], f"split modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(offenders)


def repository_files() -> list[Path]:
    """Tracked files plus new ones git does not ignore (what the next commit can hold)."""
    return [ROOT / name for name in checkout_files()]


def test_no_file_refers_to_documents_outside_the_repository() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}"
        for path in repository_files()
        for number, line in enumerate(
            path.read_bytes().decode("utf-8", errors="replace").splitlines(), start=1
        )
        if OUTSIDE_DOCUMENTS.search(line)
    ]
    assert offenders == [], (
        "refer to docs/FORMAT.md, docs/METHOD.md or docs/API.md instead:\n" + "\n".join(offenders)
    )


def test_the_checks_see_what_they_look_for(tmp_path: Path) -> None:
    """The checkers themselves: imports inside functions, aliases, ``module._name``."""
    planted = tmp_path / "planted.py"
    planted.write_text(
        "import os.path as osp\n"
        "from json import _default_decoder, __name__ as n\n"
        "def late():\n"
        "    import server.app\n"
        "    from trainer import cli\n"
        "    return osp._get_sep, cli.__doc__, importlib.import_module('deltaclip_demo')\n"
    )
    names = {name for _, name in imported_modules(planted)}
    assert {"server.app", "trainer", "trainer.cli", "deltaclip_demo"} <= names
    uses = list(private_uses(planted))
    assert any("import _default_decoder" in u for u in uses)
    assert any("osp._get_sep" in u for u in uses)
    assert not any("__name__" in u or "__doc__" in u for u in uses)
    assert OUTSIDE_DOCUMENTS.search("see " + "DESIGN" + ".md §3")
    assert not OUTSIDE_DOCUMENTS.search("see docs/FORMAT.md")
