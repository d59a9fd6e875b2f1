"""Schema migrations: apply Alembic's revisions, once, even when several processes start."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

from postbode.store.engine import Store

MIGRATIONS = Path(__file__).with_name("migrations")
_PG_LOCK_KEY = 0x706F7374626F6465  # "postbode"


def alembic_config(conn: Connection | None = None, secret: str | None = None) -> Config:
    """`secret`: the configured installation secret key, for migrations that seal values."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    if secret:
        cfg.attributes["installation_secret"] = secret.encode()
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(store: Store) -> str | None:
    with store.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def _migration_lock(store: Store) -> Iterator[None]:
    """Only one process migrates at a time; the others wait, then find nothing to do."""
    if store.is_sqlite:
        database = store.engine.url.database or ""
        lock_path = Path(database + ".migrate.lock") if database else None
        if lock_path is None or database == ":memory:":
            yield
            return
        with open(lock_path, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    else:
        with store.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
                conn.commit()


def migrate(store: Store, revision: str = "head") -> None:
    """Apply every migration up to `revision`."""
    with _migration_lock(store), store.engine.begin() as conn:
        command.upgrade(alembic_config(conn, store.configured_secret), revision)


def ensure_migrated(store: Store) -> None:
    """Migrate when the database is behind (a fresh data directory, or a new release)."""
    if current_revision(store) != head_revision():
        migrate(store)
