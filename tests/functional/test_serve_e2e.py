"""`postbode serve` as an operator runs it: SMTP in, delivery by its worker processes, out."""

from __future__ import annotations

import os
import signal
import smtplib
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import create_store
from postbode.testing.process import PostbodeProcess, listening_sockets
from postbode.testing.sink import SmtpSink


def test_serve_delivers_through_worker_processes(tmp_path: Path) -> None:
    store = create_store(Settings(data_dir=tmp_path))
    app = tenancy.create_app(store, "shop")
    tenancy.add_domain(store, "shop", "shop.test")
    store.dispose()
    with SmtpSink() as sink:
        env = {
            "POSTBODE_TRANSPORT_MAP": f"dest.test={sink.host}:{sink.port}",
            "POSTBODE_WORKERS": "2",
            "POSTBODE_WORKER_IDLE_SECONDS": "0",  # worker processes from start to stop
        }
        with PostbodeProcess(tmp_path, env) as server:
            for i in range(10):
                msg = EmailMessage()
                msg["From"] = "orders@shop.test"
                msg["To"] = f"user{i}@dest.test"
                msg["Subject"] = f"order {i}"
                msg.set_content("shipped")
                with smtplib.SMTP("127.0.0.1", server.smtp_port, local_hostname="cms.test") as c:
                    c.login(app.smtp_username, app.smtp_password)
                    c.send_message(msg)
            received = sink.wait_for_sync(10, timeout=30)
            assert sorted(m.rcpt_tos[0] for m in received) == sorted(
                f"user{i}@dest.test" for i in range(10)
            )
        assert server.proc is not None and server.proc.returncode == 0, server.log()


def _send(port: int, app: tenancy.NewApp, rcpt: str) -> None:
    msg = EmailMessage()
    msg["From"] = "orders@shop.test"
    msg["To"] = rcpt
    msg["Subject"] = "order"
    msg.set_content("shipped")
    with smtplib.SMTP("127.0.0.1", port, local_hostname="cms.test") as c:
        c.login(app.smtp_username, app.smtp_password)
        c.send_message(msg)


def _wait(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_several_listener_processes_share_the_ports_and_live_and_die_with_serve(
    tmp_path: Path,
) -> None:
    store = create_store(Settings(data_dir=tmp_path))
    app = tenancy.create_app(store, "shop")
    tenancy.add_domain(store, "shop", "shop.test")
    store.dispose()
    with SmtpSink() as sink:
        env = {
            "POSTBODE_TRANSPORT_MAP": f"dest.test={sink.host}:{sink.port}",
            "POSTBODE_LISTENERS": "3",
            "POSTBODE_WORKERS": "1",
            "POSTBODE_WORKER_IDLE_SECONDS": "0",  # worker processes from start to stop
        }
        server = PostbodeProcess(tmp_path, env).start()
        try:
            listeners = server.children("listen")
            assert len(listeners) == 2 and len(server.children("worker")) == 1
            assert listening_sockets(server.smtp_port) == listening_sockets(server.http_port) == 3
            # new connections are spread over the processes; whichever takes the mail, the
            # worker process delivers it
            for i in range(30):
                _send(server.smtp_port, app, f"user{i}@dest.test")
            assert len(sink.wait_for_sync(30, timeout=30)) == 30

            os.kill(listeners[0], signal.SIGKILL)  # a crashed listener is started again
            # (connections waiting in its queue when it died are reset, as with any crash)
            _wait(lambda: listening_sockets(server.smtp_port) == 2)
            for i in range(30, 40):  # meanwhile the others take the mail
                _send(server.smtp_port, app, f"user{i}@dest.test")
            _wait(lambda: len(server.children("listen")) == 2)
            server.wait_listeners()
            assert len(sink.wait_for_sync(40, timeout=30)) == 40

            children = server.children("listen") + server.children("worker")
            server.kill()  # serve dies without a word: its children follow
            _wait(lambda: not any(Path(f"/proc/{pid}").exists() for pid in children))
            assert listening_sockets(server.smtp_port) == listening_sockets(server.http_port) == 0
        finally:
            server.stop()
    assert sorted(m.rcpt_tos[0] for m in sink.messages) == sorted(
        f"user{i}@dest.test" for i in range(40)
    )
