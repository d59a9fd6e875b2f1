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


def test_postgresql_sessions_plan_every_statement_with_its_values(
    _postgresql_session_store: Store,
) -> None:
    """psycopg prepares a statement after five runs, and PostgreSQL may then plan it once for
    all values (a generic plan): the API's reply filter took 5 s instead of 13 ms at 10 M."""
    store = _postgresql_session_store
    connections = [store.engine.connect() for _ in range(3)]  # settings hold on each
    try:
        for conn in connections:
            shown = {
                name: conn.exec_driver_sql(f"SHOW {name}").scalar_one()
                for name in ("plan_cache_mode", "jit", "max_parallel_workers_per_gather")
            }
            assert shown == {
                "plan_cache_mode": "force_custom_plan",
                "jit": "off",
                "max_parallel_workers_per_gather": "0",
            }
    finally:
        for conn in connections:
            conn.close()
    # Write transactions' statements go by key, thousands a minute: their plans stay cached.
    with store.write() as conn:
        assert conn.exec_driver_sql("SHOW plan_cache_mode").scalar_one() == "auto"
    with store.read() as conn:
        assert conn.exec_driver_sql("SHOW plan_cache_mode").scalar_one() == "force_custom_plan"
