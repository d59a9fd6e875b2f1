"""`postbode serve` starts worker processes when mail comes in faster than it delivers it
itself, and they leave when idle; serve alone delivers and runs the periodic tasks."""

from __future__ import annotations

import os
import signal
import smtplib
import threading
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from sqlalchemy import select

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import Store, create_store
from postbode.store.schema import worker_roles
from postbode.testing.process import PostbodeProcess
from postbode.testing.sink import SmtpSink


def _message(i: int) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "orders@shop.test"
    msg["To"] = f"user{i}@dest.test"
    msg["Subject"] = f"order {i}"
    msg.set_content("shipped")
    return msg


def _wait(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:  # gone (ENOENT), or going while read (ESRCH)
        return True


def _sweeps(store: Store) -> int:
    with store.read() as conn:
        runs = conn.execute(
            select(worker_roles.c.runs).where(worker_roles.c.name == "sweep.deliveries")
        ).scalar()
    return int(runs or 0)


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[tuple[Store, tenancy.NewApp]]:
    store = create_store(Settings(data_dir=tmp_path))
    app = tenancy.create_app(store, "shop")
    tenancy.add_domain(store, "shop", "shop.test")
    yield store, app
    store.dispose()


def _env(sink: SmtpSink, **more: str) -> dict[str, str]:
    return {
        "POSTBODE_TRANSPORT_MAP": f"dest.test={sink.host}:{sink.port}",
        "POSTBODE_SHAPING_MAX_CONNECTIONS": "0",
        "POSTBODE_SHAPING_RATE_PER_MINUTE": "0",
        # A killed worker's deliveries come back within seconds; the sweep runs every second.
        "POSTBODE_DELIVERY_LEASE_SECONDS": "3",
        **more,
    }


def test_worker_processes_come_with_a_burst_of_mail_and_leave_when_idle(
    tmp_path: Path, shop: tuple[Store, tenancy.NewApp]
) -> None:
    store, app = shop
    # A busy receiver: a claim's deliveries are still in hand when the next mail is queued.
    with SmtpSink(data_delay=0.2) as sink:
        env = _env(
            sink,
            POSTBODE_WORKERS="1",
            POSTBODE_WORKER_IDLE_SECONDS="2",
            # Longer than serve's runner may take to finish what it holds when it pauses (its
            # leases are not renewed meanwhile); the sweep runs every 10 s.
            POSTBODE_DELIVERY_LEASE_SECONDS="30",
        )
        with PostbodeProcess(tmp_path, env) as server:
            assert server.children("worker") == []  # idle: one process
            sent = 0
            with smtplib.SMTP("127.0.0.1", server.smtp_port, local_hostname="cms.test") as c:
                c.login(app.smtp_username, app.smtp_password)
                while not server.children("worker"):
                    assert sent < 500, "no worker process came while mail kept coming"
                    c.send_message(_message(sent))
                    sent += 1
                workers = server.children("worker")
                for i in range(sent, sent + 20):  # the worker process takes these
                    c.send_message(_message(i))
                sent += 20
            received = sink.wait_for_sync(sent, timeout=60)
            assert sorted(m.rcpt_tos[0] for m in received) == sorted(
                f"user{i}@dest.test" for i in range(sent)
            )

            # Two seconds without work: the worker process leaves; serve stays.
            _wait(lambda: all(_gone(pid) for pid in workers))
            assert server.children("worker") == []
            assert server.proc is not None and server.proc.poll() is None
            # Its counts stay in the node's metrics under its slot's name, not its pid: worker
            # processes that come and go reuse those files.
            metrics = {f.name for f in (tmp_path / "metrics").glob("*.db")}
            assert any(name.endswith("_worker0.db") for name in metrics), metrics
            assert not any(name.endswith(f"_{pid}.db") for pid in workers for name in metrics)

            # One message at a time: serve delivers it alone, and runs the periodic tasks.
            sweeps = _sweeps(store)
            with smtplib.SMTP("127.0.0.1", server.smtp_port, local_hostname="cms.test") as c:
                c.login(app.smtp_username, app.smtp_password)
                c.send_message(_message(sent))
            assert list(sink.wait_for_sync(sent + 1, timeout=30)[-1].rcpt_tos) == [
                f"user{sent}@dest.test"
            ]
            _wait(lambda: _sweeps(store) >= sweeps + 1)
            assert server.children("worker") == []
        assert server.proc.returncode == 0, server.log()


def test_a_killed_worker_process_is_replaced_while_mail_comes_in_and_all_die_with_serve(
    tmp_path: Path, shop: tuple[Store, tenancy.NewApp]
) -> None:
    _, app = shop
    with SmtpSink(data_delay=0.05) as sink:
        env = _env(sink, POSTBODE_WORKERS="2", POSTBODE_WORKER_IDLE_SECONDS="30")
        server = PostbodeProcess(tmp_path, env).start()
        stop = threading.Event()
        sent: list[int] = []

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", server.smtp_port, local_hostname="cms.test") as c:
                c.login(app.smtp_username, app.smtp_password)
                while not stop.is_set():
                    c.send_message(_message(len(sent)))
                    sent.append(len(sent))

        sender = threading.Thread(target=send)
        sender.start()
        try:
            _wait(lambda: len(server.children("worker")) == 2)
            first = set(server.children("worker"))
            victim = min(first)
            os.kill(victim, signal.SIGKILL)
            # the mail goes on: another worker process takes the victim's place
            _wait(lambda: len(set(server.children("worker")) - first) == 1)
            assert victim not in server.children("worker")
            stop.set()
            sender.join(30)
            # every message arrives, the victim's once its lease ran out
            _wait(
                lambda: (
                    {m.rcpt_tos[0] for m in sink.messages} >= {f"user{i}@dest.test" for i in sent}
                )
            )

            children = server.children("worker")
            server.kill()  # serve dies without a word: its worker processes follow
            _wait(lambda: all(_gone(pid) for pid in children))
        finally:
            stop.set()
            sender.join(30)
            server.stop()
