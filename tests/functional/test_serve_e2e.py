"""`postbode serve` as an operator runs it: SMTP in, delivery by its worker processes, out."""

from __future__ import annotations

import smtplib
from email.message import EmailMessage
from pathlib import Path

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import create_store
from postbode.testing.process import PostbodeProcess
from postbode.testing.sink import SmtpSink


def test_serve_delivers_through_worker_processes(tmp_path: Path) -> None:
    store = create_store(Settings(data_dir=tmp_path))
    app = tenancy.create_app(store, "shop")
    tenancy.add_domain(store, "shop", "shop.test")
    store.dispose()
    with SmtpSink() as sink:
        env = {"POSTBODE_TRANSPORT_MAP": f"dest.test={sink.host}:{sink.port}",
               "POSTBODE_WORKERS": "2"}
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
                f"user{i}@dest.test" for i in range(10))
        assert server.proc is not None and server.proc.returncode == 0, server.log()
