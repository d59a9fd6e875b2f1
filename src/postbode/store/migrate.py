"""Schema migrations: apply Alembic's revisions, once, even when several processes start."""

from __future__ import annotations

import fcntl
import functools
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, inspect, text

from postbode.store.engine import Store

if TYPE_CHECKING:
    from alembic.config import Config

# Alembic and the migration scripts it loads cost a process ~10 MiB that it keeps: a process
# whose store is at the head revision (every start but the first after an upgrade) reads the
# revisions without it, from the scripts' text and the alembic_version table.

MIGRATIONS = Path(__file__).with_name("migrations")
_PG_LOCK_KEY = 0x706F7374626F6465  # "postbode"


def alembic_config(conn: Connection | None = None, secret: str | None = None) -> Config:
    """`secret`: the configured installation secret key, for migrations that seal values."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    if secret:
        cfg.attributes["installation_secret"] = secret.encode()
    return cfg


_REVISION = re.compile(r"^revision(?::[^=]*)?=\s*[\"']([^\"']+)[\"']", re.MULTILINE)
_DOWN_REVISION = re.compile(
    r"^down_revision(?::[^=]*)?=\s*(?:None|[\"']([^\"']*)[\"'])\s*$", re.MULTILINE
)


@functools.cache
def head_revision() -> str | None:
    """The newest revision of this release's migrations."""
    return _head_from_scripts() or _alembic_head()


def _head_from_scripts() -> str | None:
    """The head read from the scripts' `revision` and `down_revision` lines: the one revision
    no other names as its parent; None when that is not plain (then alembic decides)."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for script in (MIGRATIONS / "versions").glob("*.py"):
        source = script.read_text()
        revision = _REVISION.findall(source)
        down = _DOWN_REVISION.findall(source)
        if len(revision) != 1 or len(down) != 1:
            return None  # not the plain form (a merge, a tuple of parents): ask alembic
        revisions.add(revision[0])
        if down[0]:
            parents.add(down[0])
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 and parents <= revisions else None


def _alembic_head() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(store: Store) -> str | None:
    """The revision the database's schema is at (None: no schema yet)."""
    with store.engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    if len(versions) > 1:  # several heads: alembic says what that means
        from alembic.runtime.migration import MigrationContext

        with store.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    return versions[0] if versions else None


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
    from alembic import command

    with _migration_lock(store), _migrating(store) as conn:
        command.upgrade(alembic_config(conn, store.configured_secret), revision)


def downgrade(store: Store, revision: str) -> None:
    """Undo migrations down to `revision` (for tests and for going back a release)."""
    from alembic import command

    with _migration_lock(store), _migrating(store) as conn:
        command.downgrade(alembic_config(conn, store.configured_secret), revision)


@contextmanager
def _migrating(store: Store) -> Iterator[Connection]:
    """A connection in a transaction for migrations. On SQLite, foreign keys are not enforced
    while they run: a migration that changes a constraint copies the table, and dropping the
    old copy would otherwise delete (ON DELETE CASCADE) every row that refers to it. They are
    checked before the commit instead, and enforced again after."""
    with store.engine.connect() as conn:
        if not store.is_sqlite:
            with conn.begin():
                yield conn
            return
        # On the driver's connection: SQLAlchemy would begin a transaction first, and inside
        # one SQLite ignores this pragma.
        driver = conn.connection.dbapi_connection
        assert driver is not None
        driver.execute("PRAGMA foreign_keys=OFF")
        try:
            with conn.begin():
                yield conn
                broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
                if broken:
                    raise RuntimeError(f"the migration broke foreign keys: {broken[:5]}")
        finally:
            driver.execute("PRAGMA foreign_keys=ON")


def ensure_migrated(store: Store) -> None:
    """Migrate when the database is behind (a fresh data directory, or a new release)."""
    if current_revision(store) != head_revision():
        migrate(store)


@contextmanager
def _quiet_alembic() -> Iterator[None]:
    """Alembic's INFO lines (plugins, context) say nothing when only the revision is read."""
    logger = logging.getLogger("alembic")
    level = logger.level
    logger.setLevel(max(logging.WARNING, level))
    try:
        yield
    finally:
        logger.setLevel(level)


def schema_mismatch(store: Store) -> str | None:
    """Why this code cannot use the database's schema as it is (one line), or None."""
    with _quiet_alembic():
        current, head = current_revision(store), head_revision()
    if current == head:
        return None
    if current is None:
        return (
            f"the database has no schema yet (this release expects revision {head}): "
            "run `postbode migrate`"
        )
    from alembic.script import ScriptDirectory

    with _quiet_alembic():
        script = ScriptDirectory.from_config(alembic_config())
        known = {rev.revision for rev in script.walk_revisions()}
    if current not in known:
        return (
            f"the database schema is at revision {current}, newer than this release knows "
            f"(it expects {head}): upgrade this node, then run `postbode migrate` with the new "
            "release if not done yet"
        )
    return (
        f"the database schema is at revision {current}, this release expects {head}: "
        "run `postbode migrate`"
    )
