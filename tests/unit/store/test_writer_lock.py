"""SQLite writers of one installation take turns through a lock file, across processes."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from pathlib import Path

from sqlalchemy import func, select

from postbode.config import Settings
from postbode.store.engine import WriterLock, create_store
from postbode.store.schema import system_values


def test_a_second_holder_waits_until_the_first_lets_go(tmp_path: Path) -> None:
    first, second = WriterLock(tmp_path / "w.lock"), WriterLock(tmp_path / "w.lock")
    order: list[str] = []

    def other() -> None:
        with second.held():
            order.append("second")

    thread = threading.Thread(target=other)
    with first.held(), first.held():  # the same thread may nest
        thread.start()
        thread.join(0.2)
        assert thread.is_alive(), "the second holder must wait"
        order.append("first")
    thread.join(5)
    assert order == ["first", "second"]
    first.close()
    second.close()


WRITER = """
import sys
from pathlib import Path
from sqlalchemy import insert
from postbode.config import Settings
from postbode.store.engine import create_store
from postbode.store.schema import system_values

store = create_store(Settings(data_dir=Path(sys.argv[1])))
with store.write() as conn:
    conn.execute(insert(system_values).values(name="written", value="x"))
store.dispose()
"""


def test_another_process_writes_only_once_the_lock_is_let_go(tmp_path: Path) -> None:
    store = create_store(Settings(data_dir=tmp_path))  # migrated before the writer starts
    path = Path(str(store.engine.url.database) + "-writer.lock")

    def written() -> int:
        with store.read() as conn:
            return int(
                conn.execute(
                    select(func.count()).where(system_values.c.name == "written")
                ).scalar_one()
            )

    held = WriterLock(path)
    with held.held():
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)])
        with contextlib.suppress(subprocess.TimeoutExpired):
            writer.wait(3)
        assert writer.returncode is None and written() == 0, "it must wait for its turn"
    assert writer.wait(60) == 0
    assert written() == 1
    held.close()
    store.dispose()
