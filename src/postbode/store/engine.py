"""The store's engine: SQLite (embedded, WAL) or PostgreSQL, and its transaction helpers."""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, create_engine, event, insert, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool

SQLITE_BUSY_TIMEOUT_MS = 30_000
PROBE_TIMEOUT_SECONDS = 2.0  # how long the health probe waits for the write lock
MIN_FREE_BYTES = 1024 * 1024  # less free disk than this beside a SQLite store: not writable
# The WAL is copied into the database by a thread beside each store (`WalCheckpointer`), not by
# the commit that happens to cross SQLite's threshold: that commit's clients would wait for the
# copy and the database file's fsync. A commit still checkpoints itself past this many pages
# (about 40 MiB), a safety net should no checkpointer keep up.
WAL_AUTOCHECKPOINT_PAGES = 10_000
WAL_CHECKPOINT_INTERVAL = 0.2  # seconds between background checkpoints
# Past this many pages in the WAL (readers kept a passive checkpoint from finishing), the
# checkpointer waits briefly for readers to move on so the WAL starts again from its beginning.
WAL_RESTART_PAGES = 4_000
WAL_RESTART_WAIT_MS = 200
# Files an earlier run leaves beside the SQLite database.
_SQLITE_COMPANIONS = ("-wal", "-shm", "-writer.lock", ".migrate.lock")


# Every PostgreSQL session's settings. No JIT compilation and no parallel workers: the log's
# and the dashboard's queries are short; at 10 million deliveries a plan estimated costly enough
# for JIT spent ~30 ms compiling to save nothing, and starting workers for a 50-row page cost
# more than the page. Custom plans: psycopg prepares a statement run five times, and after five
# more PostgreSQL may settle on a generic plan, made without the values; for the log's filters
# (an app, an address, a time bound) that plan read the wrong index: the API's reply filter went
# from 13 ms to 5 s at its eleventh run (docs/performance.md). Write transactions go back to
# PostgreSQL's default (`_PG_WRITE_PLANS`): their statements, by key and run thousands of times
# a minute, keep their cached plans (planned anew each time, PostgreSQL spent 45 % more CPU per
# relayed message).
_PG_WRITE_PLANS = "SET LOCAL plan_cache_mode = auto"
_PG_OPTIONS = ("jit=off", "max_parallel_workers_per_gather=0", "plan_cache_mode=force_custom_plan")


class StoreNotWritable(Exception):
    """The store does not take writes now (disk full, database locked, read-only)."""


class LostStore(Exception):
    """The SQLite database file is empty or gone while an earlier installation's files remain:
    starting afresh would make a new secret key (breaking every link already sent)."""


class _Secret(Protocol):
    def get_secret_value(self) -> str: ...


class StoreSettings(Protocol):
    """What the store reads of the settings (the store does not import the settings schema:
    settings know no database, and the database knows settings only by this shape)."""

    @property
    def sqlalchemy_url(self) -> str: ...

    @property
    def secret_key(self) -> _Secret: ...


class WriterLock:
    """Turns for SQLite's one writer among the threads and processes of an installation.

    SQLite lets a writer that finds the database locked sleep and look again, up to 100 ms at
    a time, so with two busy processes the lock often lies free while both sleep. Queueing on
    an flock(2) of a file beside the database instead wakes the next writer as soon as the
    lock is let go. SQLite's own lock still guards the data; this only orders the turns."""

    def __init__(self, path: Path) -> None:
        self._threads = threading.RLock()  # flock(2) does not exclude threads sharing the fd
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._depth = 0

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._threads:
            if self._depth == 0:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)


class WalCheckpointer:
    """Copies a SQLite store's WAL into the database in the background.

    Every connection of the store sets `wal_autocheckpoint` high, so commits no longer run the
    checkpoint themselves; this thread runs `wal_checkpoint(PASSIVE)` every
    WAL_CHECKPOINT_INTERVAL on a connection of its own. PASSIVE neither waits for nor blocks
    readers and writers: it copies what no reader still needs, and once all is copied the next
    writer starts the WAL again from its beginning, so the file stays bounded. When readers keep
    it from finishing and the WAL passes WAL_RESTART_PAGES, it runs a RESTART checkpoint, which
    waits up to WAL_RESTART_WAIT_MS for them. Each process with a store runs one; SQLite lets
    one checkpoint run at a time and the others find nothing to do or come back later.

    Durability does not depend on it: a commit is durable once in the WAL (synchronous=FULL)."""

    def __init__(self, path: str, interval: float = WAL_CHECKPOINT_INTERVAL) -> None:
        self._path = path
        self._interval = interval
        self._stop = threading.Event()
        self.runs = 0  # checkpoints that copied pages
        self.pages = 0  # pages copied
        self.restarts = 0
        self._log = self._copied = 0  # the last round's figures
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        connection: sqlite3.Connection | None = None
        try:
            while not self._stop.wait(self._interval):
                try:
                    if connection is None:
                        connection = sqlite3.connect(
                            Path(self._path).resolve().as_uri() + "?mode=rw",  # never makes it
                            uri=True,
                            timeout=WAL_RESTART_WAIT_MS / 1000,
                            isolation_level=None,
                        )
                        connection.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
                    self.checkpoint(connection)
                except sqlite3.Error:
                    pass  # busy, or the file is being replaced: the next round tries again
        finally:
            if connection is not None:
                connection.close()

    def checkpoint(self, connection: sqlite3.Connection) -> None:
        """One round: PASSIVE, and RESTART when the WAL has grown past WAL_RESTART_PAGES."""
        busy, log, copied = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        # `copied` counts all the WAL's pages in the database so far: what is new since the
        # last round, unless the WAL started again in between.
        before = self._copied if log >= self._log and copied >= self._copied else 0
        self._log, self._copied = log, copied
        if copied > before:
            self.runs += 1
            self.pages += copied - before
        if log >= WAL_RESTART_PAGES and (busy or copied < log):
            connection.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            self.restarts += 1

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Store:
    """One database: `write()` for transactions that change it, `read()` for queries."""

    def __init__(
        self,
        engine: Engine,
        writer_lock: WriterLock | None = None,
        secret: str = "",
        checkpointer: WalCheckpointer | None = None,
    ) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name  # "sqlite" | "postgresql"
        self._writer_lock = writer_lock
        self.checkpointer = checkpointer
        # The configured installation secret ("" when it is generated and kept in the store):
        # code that holds only the store derives keys from it (see `installation_secret`).
        self.configured_secret = secret

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One write transaction; on SQLite it takes the write lock up front (BEGIN IMMEDIATE),
        so it waits on busy_timeout instead of failing when it would upgrade a read lock."""
        with self._writer_lock.held() if self._writer_lock else nullcontext():
            connection = self.engine.connect().execution_options(postbode_immediate=True)
            with connection as conn, conn.begin():
                if not self.is_sqlite:
                    conn.exec_driver_sql(_PG_WRITE_PLANS)
                yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction (a consistent snapshot on both dialects)."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def ping(self) -> bool:
        """True when the database answers."""
        with self.engine.connect() as conn:
            return conn.execute(text("SELECT 1")).scalar() == 1

    def probe_write(self, timeout: float = PROBE_TIMEOUT_SECONDS) -> None:
        """Write one row now, waiting at most `timeout` for the lock: raises StoreNotWritable
        when the disk is full, the database is locked or read-only. Cheap: one small upsert."""
        from postbode.store.schema import utcnow

        now = utcnow().isoformat()
        upsert = (
            "INSERT INTO system_values (name, value) VALUES ('health_probe', {0}) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
        )
        try:
            if self.is_sqlite:
                self._probe_sqlite(upsert.format("?"), now, timeout)
            else:
                ms = int(timeout * 1000)
                with self.engine.connect() as conn, conn.begin():
                    conn.exec_driver_sql(f"SET LOCAL lock_timeout = {ms}")
                    conn.exec_driver_sql(f"SET LOCAL statement_timeout = {ms}")
                    conn.exec_driver_sql(upsert.format("%s"), (now,))
        except StoreNotWritable:
            raise
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise StoreNotWritable(first) from exc

    def _probe_sqlite(self, upsert: str, now: str, timeout: float) -> None:
        database = self.engine.url.database or ""
        if database and database != ":memory:":
            free = shutil.disk_usage(Path(database).parent).free
            if free < MIN_FREE_BYTES:
                raise StoreNotWritable(f"{free} bytes free on the store's disk")
        # On the driver's connection: not through the writer lock, and not waiting SQLite's
        # usual 30 s for the lock.
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
            try:
                cursor.execute("BEGIN IMMEDIATE")
                try:
                    cursor.execute(upsert, (now,))
                    cursor.execute("COMMIT")
                except Exception:
                    cursor.execute("ROLLBACK")
                    raise
            finally:
                cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
                cursor.close()
        finally:
            raw.close()

    def dispose(self) -> None:
        if self.checkpointer:
            self.checkpointer.close()
            self.checkpointer = None
        self.engine.dispose()
        if self._writer_lock:
            self._writer_lock.close()
            self._writer_lock = None


def _sqlite_engine(url: str) -> Engine:
    path = make_url(url).database
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        pool_size=8,
        max_overflow=16,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        # Let us emit BEGIN ourselves: pysqlite's implicit transactions would defer the lock.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        # FULL: a commit that acknowledged mail (250 / 202) is on disk, not just in the WAL.
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")  # see WalCheckpointer
        cur.execute("PRAGMA foreign_keys=ON")
        # Deleted and overwritten content is zeroed, not left in free space of pages and in
        # freed pages, so what retention and erasure remove is gone from the file.
        cur.execute("PRAGMA secure_delete=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("postbode_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def lost_store(path: Path) -> str | None:
    """Why the SQLite database at `path` looks lost, or None: an empty file, or no file
    while the files an earlier run leaves beside it are there."""
    companions = [path.with_name(path.name + suffix) for suffix in _SQLITE_COMPANIONS]
    if path.exists() and path.stat().st_size == 0:
        return f"{path} is empty"
    if not path.exists() and any(c.exists() for c in companions):
        return f"{path} is missing but an earlier installation's files are beside it"
    return None


class SchemaMismatch(Exception):
    """The PostgreSQL database's schema is not the revision this code expects; str() is one
    line saying what to do."""


def create_store(
    settings: StoreSettings,
    *,
    pool: bool = True,
    init: bool = False,
    migrate: bool | None = None,
    analyze: bool = True,
) -> Store:
    """The store the settings name, at the schema revision this code expects.

    `migrate` None (the default): SQLite is migrated on first use (one installation, one
    release); PostgreSQL is not, as many processes on many nodes share it and an upgrade is
    a deliberate step (`postbode migrate`): a database at another revision raises
    SchemaMismatch. `migrate` True migrates either (the `migrate` command, tests and tools
    that make a fresh database).

    A SQLite database that looks lost (`lost_store`) raises LostStore, unless `init`: then
    it is started afresh, deliberately.

    `analyze` False skips refreshing SQLite's planner statistics: for the processes `serve`
    starts, which open the store `serve` has just opened, migrated and analysed (ANALYZE holds
    the write lock, ~0.1 s at a million messages, while mail is coming in)."""
    url = settings.sqlalchemy_url
    writer_lock = None
    database = make_url(url).database if url.startswith("sqlite") else None
    if database and database != ":memory:":
        file = Path(database)
        why = lost_store(file)
        if why is not None and not init:
            raise LostStore(why)
        if why is not None:
            for leftover in (file, *(file.with_name(file.name + s) for s in ("-wal", "-shm"))):
                leftover.unlink(missing_ok=True)
    if url.startswith("sqlite"):
        engine = _sqlite_engine(url)
        path = make_url(url).database
        if path and path != ":memory:":
            writer_lock = WriterLock(Path(f"{path}-writer.lock"))
    else:
        kwargs: dict[str, Any] = {
            "pool_pre_ping": True,
            "connect_args": {"options": " ".join(f"-c {o}" for o in _PG_OPTIONS)},
        }
        if pool:
            kwargs.update(pool_size=10, max_overflow=20)
        else:
            kwargs["poolclass"] = NullPool
        engine = create_engine(url, **kwargs)
    from postbode.store.migrate import ensure_migrated, schema_mismatch

    store = Store(engine, writer_lock, settings.secret_key.get_secret_value())
    if migrate or (migrate is None and store.is_sqlite):
        ensure_migrated(store)
    else:
        problem = schema_mismatch(store)
        if problem is not None:
            store.dispose()
            raise SchemaMismatch(problem)
    if store.is_sqlite and analyze:
        # Fresh planner statistics, sampled (about 0.1 s at a million messages): without them
        # SQLite may pick a full index scan for the message log's searches.
        with store.write() as conn:
            conn.exec_driver_sql("PRAGMA analysis_limit=400")
            conn.exec_driver_sql("ANALYZE")
    if store.is_sqlite and writer_lock is not None:  # a file (not :memory:), there by now
        store.checkpointer = WalCheckpointer(str(store.engine.url.database))
    return store


def system_value(store: Store, name: str, make: Callable[[], str]) -> str:
    """A value every process of this installation shares (e.g. a generated secret key):
    read from the store, or made by `make()` and stored by whichever process comes first."""
    from postbode.store.schema import system_values

    with store.read() as conn:
        value = conn.execute(
            select(system_values.c.value).where(system_values.c.name == name)
        ).scalar()
    if value is not None:
        return str(value)
    try:
        with store.write() as conn:
            value = conn.execute(
                select(system_values.c.value).where(system_values.c.name == name)
            ).scalar()
            if value is None:
                value = make()
                conn.execute(insert(system_values).values(name=name, value=value))
    except IntegrityError:
        # PostgreSQL: another process stored it between our read and our insert (two first
        # uses at once); theirs is the one everybody uses.
        with store.read() as conn:
            value = conn.execute(
                select(system_values.c.value).where(system_values.c.name == name)
            ).scalar_one()
    return str(value)


def secret_key(settings: StoreSettings, store: Store) -> bytes:
    """The installation's signing key: the setting, or one generated once and kept in the store
    (so every process on every machine signs and checks with the same key)."""
    configured = settings.secret_key.get_secret_value()
    if configured:
        return configured.encode()
    return system_value(store, "secret_key", lambda: secrets.token_urlsafe(48)).encode()


def installation_secret(store: Store) -> bytes:
    """`secret_key` of the settings the store was created with, for code that has only the
    store (read it outside any write transaction: the first call may write)."""
    if store.configured_secret:
        return store.configured_secret.encode()
    return system_value(store, "secret_key", lambda: secrets.token_urlsafe(48)).encode()
