"""On PostgreSQL the processes do not migrate: one whose code expects another schema revision
refuses to start with one line saying to run `postbode migrate`, which an operator runs once
per upgrade. SQLite keeps migrating on first use."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, make_url

from postbode.config import Settings
from postbode.store.engine import SchemaMismatch, Store, create_store
from postbode.store.migrate import alembic_config, current_revision, head_revision, migrate
from postbode.testing.pg import scratch_database

PG_ADMIN_URL = os.environ.get(
    "POSTBODE_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture
def fresh_pg() -> Iterator[str]:
    """An empty PostgreSQL database (no schema at all)."""
    with scratch_database(PG_ADMIN_URL, "postbode_schema") as url:
        yield url


def postbode(url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTBODE_")}
    env |= {"POSTBODE_DATABASE_URL": url, "POSTBODE_DATA_DIR": str(tmp_path / "data")}
    env |= {"POSTBODE_HTTP_PORT": "0", "POSTBODE_SMTP_PORT": "0"}
    return subprocess.run(
        [sys.executable, "-m", "postbode", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_processes_refuse_an_unmigrated_database_until_postbode_migrate(
    fresh_pg: str, tmp_path: Path
) -> None:
    for command in (["serve"], ["worker"], ["app", "list", "--json"]):
        refused = postbode(fresh_pg, tmp_path, *command)
        assert refused.returncode == 2, (command, refused.stderr)
        (line,) = refused.stderr.strip().splitlines()
        assert "no schema yet" in line and "run `postbode migrate`" in line, line
        assert "Traceback" not in refused.stderr
    with pytest.raises(SchemaMismatch):
        create_store(Settings(database_url=fresh_pg))

    migrated = postbode(fresh_pg, tmp_path, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert f"schema at revision {head_revision()}" in migrated.stdout
    listed = postbode(fresh_pg, tmp_path, "app", "list", "--json")
    assert listed.returncode == 0, listed.stderr


def test_a_release_ahead_of_the_database_refuses_to_start(fresh_pg: str, tmp_path: Path) -> None:
    # The database is one revision behind the code (the release was installed, migrate not run).
    head = ScriptDirectory.from_config(alembic_config()).get_revision(head_revision())
    behind = str(head.down_revision)
    store = Store(create_engine(make_url(Settings(database_url=fresh_pg).sqlalchemy_url)))
    try:
        migrate(store, behind)
        assert current_revision(store) == behind
    finally:
        store.dispose()
    refused = postbode(fresh_pg, tmp_path, "worker")
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert f"at revision {behind}, this release expects {head_revision()}" in line
    assert "run `postbode migrate`" in line


def test_sqlite_still_migrates_on_first_use(tmp_path: Path) -> None:
    store = create_store(Settings(data_dir=tmp_path))
    try:
        assert current_revision(store) == head_revision()
    finally:
        store.dispose()
