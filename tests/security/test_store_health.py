"""/healthz tells the truth about the store (a real write: 503 when the disk is full or the
database locked), and a lost SQLite database is never silently replaced by a new one."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from postbode.config import Settings
from postbode.store.engine import Store, create_store
from postbode.web.app import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


def health(client: TestClient) -> tuple[int, dict[str, str]]:
    answer = client.get("/healthz")
    return answer.status_code, answer.json()


def test_a_locked_database_is_unhealthy(settings: Settings, store: Store) -> None:
    with TestClient(create_app(settings, store)) as client:
        assert health(client)[0] == 200
        if store.is_sqlite:
            holder = sqlite3.connect(str(store.engine.url.database), isolation_level=None)
            holder.execute("BEGIN IMMEDIATE")
            try:
                status, body = health(client)
            finally:
                holder.execute("ROLLBACK")
                holder.close()
        else:
            with store.engine.connect() as holder, holder.begin():
                holder.execute(text("LOCK TABLE system_values IN EXCLUSIVE MODE"))
                status, body = health(client)
        assert (status, body["store"]) == (503, "not writable")
        assert health(client) == (
            200,
            {"status": "ok", "store": "writable", "version": body["version"]},
        )


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MB file system of its own (tmpfs), to fill up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)])
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_is_unhealthy(small_disk: Path) -> None:
    settings = Settings(data_dir=small_disk / "data", secret_key="k")
    store = create_store(settings)
    try:
        with TestClient(create_app(settings, store)) as client:
            assert health(client)[0] == 200
            filler = small_disk / "filler"
            with open(filler, "wb", buffering=0) as f:  # nothing left to flush at close
                try:
                    while True:
                        f.write(b"\0" * 65536)
                except OSError:  # ENOSPC: the disk is full
                    pass
            assert health(client)[0] == 503
            filler.unlink()
            assert health(client)[0] == 200
    finally:
        store.dispose()


def postbode(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "POSTBODE_DATA_DIR": str(data_dir)}
    env.pop("POSTBODE_DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "postbode", *args], env=env, capture_output=True, text=True
    )


@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_an_empty_database_beside_an_installation_refuses_to_start(
    tmp_path: Path, command: str
) -> None:
    create_store(Settings(data_dir=tmp_path)).dispose()  # an installation
    database = tmp_path / "postbode.db"
    database.write_bytes(b"")  # its database lost (a bad restore, a full disk …)
    done = postbode(tmp_path, command)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--init" in lines[0] and "is empty" in lines[0], done.stderr
    assert database.stat().st_size == 0  # nothing was made in its place


def test_a_missing_database_beside_an_installation_refuses_too(tmp_path: Path) -> None:
    create_store(Settings(data_dir=tmp_path)).dispose()
    (tmp_path / "postbode.db").unlink()
    done = postbode(tmp_path, "migrate")
    assert done.returncode == 2 and "is missing" in done.stderr


def test_init_starts_afresh_on_purpose(tmp_path: Path) -> None:
    create_store(Settings(data_dir=tmp_path)).dispose()
    (tmp_path / "postbode.db").write_bytes(b"")
    done = postbode(tmp_path, "migrate", "--init")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "postbode.db").stat().st_size > 0
    assert postbode(tmp_path, "migrate").returncode == 0


def test_a_new_data_directory_needs_no_init(tmp_path: Path) -> None:
    assert postbode(tmp_path / "new", "migrate").returncode == 0
