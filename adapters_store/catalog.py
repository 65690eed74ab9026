"""Catalog database: engines, managed session scopes, migrations and the schema check.

SQLite (the embedded default) runs in WAL mode with foreign keys and a busy timeout, and every
*write* scope starts with ``BEGIN IMMEDIATE`` so concurrent writers queue on the busy timeout
instead of failing with 'database is locked' when a read lock would have to be upgraded.
Read scopes use a second engine with ordinary deferred transactions, so reads never queue
behind writes. PostgreSQL is selected by a ``postgresql+psycopg://`` URL.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from .errors import AlreadyExists, BrokenMigrations, SchemaOutOfDate

SQLITE_BUSY_TIMEOUT_MS = 60_000


def _sqlite_engine(url: str, immediate: bool) -> Engine:
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's own BEGIN is deferred).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _ensure_sqlite_dir(url: str) -> None:
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


def make_engines(url: str) -> tuple[Engine, Engine]:
    """``(write_engine, read_engine)`` for ``url``; the same engine twice except on SQLite."""
    if url.startswith("sqlite"):
        _ensure_sqlite_dir(url)
        return _sqlite_engine(url, immediate=True), _sqlite_engine(url, immediate=False)
    engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    return engine, engine


def migrations_dir() -> Path:
    """The folder holding the Alembic ``env.py`` and ``versions/`` for this installation.

    A wheel installs the checkout's top-level ``alembic/`` folder as the package
    ``adapters_store.migrations`` (see pyproject.toml), so an installed ``deltaclip`` needs
    neither the checkout nor an ini file. A development checkout has no such package folder;
    there the scripts are the ``alembic/`` folder next to this package, the one ``alembic.ini``
    points at, so both ways of migrating run the same scripts.
    """
    spec = importlib.util.find_spec(f"{__package__}.migrations")
    if spec is not None:
        for location in spec.submodule_search_locations or ():
            if (Path(location) / "env.py").is_file():
                return Path(location)
    checkout = Path(__file__).resolve().parent.parent / "alembic"
    if (checkout / "env.py").is_file():
        return checkout
    raise RuntimeError(
        f"the catalog migrations are missing: neither {__package__}.migrations nor {checkout} "
        "holds env.py (reinstall deltaclip)"
    )


def alembic_config(url: str) -> Any:
    """An Alembic configuration built in code: the scripts of this installation, ``url``.

    No ini file is read, so ``deltaclip db upgrade`` behaves the same from any working folder.
    """
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()
    if len(heads) != 1:
        raise BrokenMigrations(f"migrations must have exactly one head, found {heads}")
    return heads[0]


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the catalog at ``url`` to ``revision`` (``deltaclip db upgrade``)."""
    from alembic import command

    _run_migration(url, lambda cfg: command.upgrade(cfg, revision))


def _run_migration(url: str, step: Any) -> None:
    """Run an alembic command over our own engine (WAL, foreign keys, busy timeout on SQLite)."""
    engine, _ = make_engines(url)
    try:
        with engine.begin() as conn:
            cfg = alembic_config(url)
            cfg.attributes["connection"] = conn
            step(cfg)
    finally:
        engine.dispose()


def downgrade(url: str, revision: str) -> None:
    from alembic import command

    _run_migration(url, lambda cfg: command.downgrade(cfg, revision))


class Catalog:
    """Engines plus managed session scopes over one catalog database."""

    def __init__(self, url: str, *, check_schema: bool = True) -> None:
        self.url = url
        self.write_engine, self.read_engine = make_engines(url)
        self._write = sessionmaker(self.write_engine, expire_on_commit=False)
        self._read = sessionmaker(self.read_engine, expire_on_commit=False)
        if check_schema:
            self.check_schema()

    def check_schema(self) -> None:
        """Refuse a catalog that is not at the head migration, saying how to fix it."""
        current, head = current_revision(self.read_engine), head_revision()
        if current != head:
            where = "empty (no schema)" if current is None else f"at revision {current}"
            raise SchemaOutOfDate(
                f"the catalog database is {where}, but this deltaclip needs revision {head}: "
                "run `deltaclip db upgrade`"
            )

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction that commits on success and rolls back on any error.

        ``IntegrityError`` leaves as :class:`AlreadyExists`.
        """
        session = self._write()
        try:
            yield session
            session.commit()
        except IntegrityError as exc:
            session.rollback()
            raise AlreadyExists(str(exc.orig).splitlines()[0]) from exc
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    @contextlib.contextmanager
    def read(self, snapshot: bool = False) -> Iterator[Session]:
        """A read-only session. With ``snapshot``, every statement in it reads one snapshot of
        the database: PostgreSQL's default READ COMMITTED gives each statement its own, so two
        reads (an alias, then the version it names) could straddle another replica's move and
        delete; REPEATABLE READ takes one for the whole transaction. SQLite's read transaction
        is one snapshot already."""
        session = self._read()
        if snapshot and self.read_engine.dialect.name == "postgresql":
            session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        try:
            yield session
        finally:
            session.rollback()
            session.close()

    def dispose(self) -> None:
        self.write_engine.dispose()
        if self.read_engine is not self.write_engine:
            self.read_engine.dispose()
