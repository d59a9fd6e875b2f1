"""SQLite's WAL is copied into the database by a thread beside the store, not by commits."""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import insert

from postbode.config import Settings
from postbode.store.engine import WAL_AUTOCHECKPOINT_PAGES, Store, WalCheckpointer, create_store
from postbode.store.schema import system_values

PAGE = 4096


def _write_pages(store: Store, pages: int, tag: str) -> None:
    """About `pages` pages of new rows, one small transaction at a time."""
    for i in range(pages):
        with store.write() as conn:
            conn.execute(insert(system_values).values(name=f"{tag}-{i}", value="x" * 3000))


def _wal_bytes(store: Store) -> int:
    return Path(str(store.engine.url.database) + "-wal").stat().st_size


def _until(condition: object, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not condition() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.02)


def test_commits_do_not_checkpoint_and_the_background_keeps_the_wal_bounded(
    tmp_path: Path,
) -> None:
    store = create_store(Settings(data_dir=tmp_path))
    assert store.checkpointer is not None
    store.checkpointer.close()  # first without it: what the commits alone do
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == (
            WAL_AUTOCHECKPOINT_PAGES
        )
    _write_pages(store, 1500, "a")  # past SQLite's default of 1,000 pages
    unchecked = _wal_bytes(store)
    assert unchecked > 1500 * PAGE, "a commit checkpointed (the WAL started again)"

    checkpointer = WalCheckpointer(str(store.engine.url.database), interval=0.01)
    try:
        _until(lambda: checkpointer.pages >= 1500)
        assert checkpointer.runs >= 1 and checkpointer.pages >= 1500
        for round_ in range(3):  # three times as much again, with the checkpointer running
            copied = checkpointer.pages
            _write_pages(store, 500, f"b{round_}")
            _until(lambda: checkpointer.pages >= copied + 500)  # noqa: B023
        assert _wal_bytes(store) <= unchecked, "the WAL must start again, not keep growing"
    finally:
        checkpointer.close()
        store.dispose()


def test_the_checkpointer_stops_with_the_store(tmp_path: Path) -> None:
    store = create_store(Settings(data_dir=tmp_path))
    checkpointer = store.checkpointer
    assert checkpointer is not None and checkpointer.running
    store.dispose()
    assert not checkpointer.running
    assert store.checkpointer is None
