"""Opening a SQLite store: what `serve` does once, its child processes skip."""

from __future__ import annotations

from pathlib import Path

from postbode.config import Settings
from postbode.store.engine import Store, create_store


def _statistics(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT count(*) FROM sqlite_stat1").scalar_one())


def test_a_child_of_serve_opens_the_store_without_analysing_it(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    first = create_store(settings)  # serve: migrates and analyses
    try:
        assert _statistics(first) > 0
        with first.write() as conn:
            conn.exec_driver_sql("DELETE FROM sqlite_stat1")
    finally:
        first.dispose()

    child = create_store(settings, migrate=False, analyze=False)
    try:
        assert _statistics(child) == 0, "ANALYZE ran (and held the write lock)"
        assert child.checkpointer is not None and child.checkpointer.running
    finally:
        child.dispose()

    again = create_store(settings)
    try:
        assert _statistics(again) > 0
    finally:
        again.dispose()
