"""SQLite writers of one installation take turns through a lock file, across processes."""

from __future__ import annotations

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
    entered = threading.Event()

    def other() -> None:
        with second.held():
            order.append("second")

    with first.held(), first.held():  # the same thread may nest
        thread = threading.Thread(target=other)
        thread.start()
        entered.wait(0.2)  # give it the chance to barge in
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
for i in range(100):
    with store.write() as conn:
        conn.execute(insert(system_values).values(name=f"{sys.argv[2]}-{i}", value="x"))
store.dispose()
"""


def test_processes_writing_at_once_all_get_their_turn(tmp_path: Path) -> None:
    create_store(Settings(data_dir=tmp_path)).dispose()  # migrated before they start
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), f"p{n}"])
        for n in range(3)
    ]
    assert [p.wait(60) for p in procs] == [0, 0, 0]
    store = create_store(Settings(data_dir=tmp_path))
    with store.read() as conn:
        count = conn.execute(
            select(func.count()).where(system_values.c.name.like("p_-%"))
        ).scalar_one()
    store.dispose()
    assert count == 300
