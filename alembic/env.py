"""Alembic environment for the deltaclip catalog (online and offline modes).

``deltaclip db upgrade`` passes its own connection (``config.attributes["connection"]``).
``alembic upgrade head`` from a checkout (``alembic.ini``) passes none and no URL: the catalog is
then the one ``deltaclip`` itself would use (``DELTACLIP_DATABASE_URL``, else the SQLite catalog
under ``DELTACLIP_HOME``), opened through the same engines (WAL, foreign keys, busy timeout).
"""

from __future__ import annotations

from alembic import context

from adapters_store.catalog import make_engines
from adapters_store.config import StoreSettings
from adapters_store.models import Base

config = context.config
target_metadata = Base.metadata


def database_url() -> str:
    """The URL the configuration names, else the one from deltaclip's own settings."""
    return config.get_main_option("sqlalchemy.url") or StoreSettings().resolved_database_url


def run_offline() -> None:
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(
            connection=connection, target_metadata=target_metadata, render_as_batch=True
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    engine, _ = make_engines(database_url())
    try:
        with engine.begin() as conn:
            context.configure(
                connection=conn, target_metadata=target_metadata, render_as_batch=True
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
