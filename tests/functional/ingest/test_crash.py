"""The promise of accept: whatever got 250 / 202 survives `kill -9`; nothing is half-written."""

from __future__ import annotations

import smtplib
import threading
import time
import uuid
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path

import httpx
from sqlalchemy import func, select

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import create_store
from postbode.store.schema import deliveries, events, messages, raw_messages
from postbode.testing.process import PostbodeProcess
from postbode.testing.sink import SmtpSink

SMTP_CLIENTS = 20
API_CLIENTS = 5
RECIPIENTS = 3


def test_kill_9_mid_run_loses_nothing_acknowledged(tmp_path: Path) -> None:
    store = create_store(Settings(data_dir=tmp_path))
    app = tenancy.create_app(store, "shop")
    tenancy.add_domain(store, "shop", "shop.test")
    store.dispose()

    acknowledged: list[tuple[str, uuid.UUID]] = []  # (client, message id) answered 250 / 202
    lock = threading.Lock()
    running = threading.Event()
    running.set()

    def smtp_client(n: int, port: int) -> None:
        i = 0
        while running.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", port, local_hostname="cms.test", timeout=10) as c:
                    c.login(app.smtp_username, app.smtp_password)
                    while running.is_set():
                        i += 1
                        msg = EmailMessage()
                        msg["From"] = "orders@shop.test"
                        msg["To"] = "a@dest.test"
                        msg["Subject"] = f"smtp {n}-{i}"
                        msg.set_content("x" * 1500)
                        c.mail("orders@shop.test")
                        for r in range(RECIPIENTS):
                            c.rcpt(f"r{r}-{n}-{i}@dest.test")
                        code, reply = c.data(msg.as_bytes(policy=SMTP_POLICY))
                        if code == 250:
                            queued = reply.decode().rsplit(" ", 1)[-1]
                            with lock:
                                acknowledged.append(("smtp", uuid.UUID(queued)))
            except (OSError, smtplib.SMTPException):
                time.sleep(0.05)  # the server is down: retry like a real client would

    def api_client(n: int, url: str) -> None:
        i = 0
        with httpx.Client(
            base_url=url, timeout=10, headers={"Authorization": f"Bearer {app.api_key}"}
        ) as http:
            while running.is_set():
                i += 1
                body = {
                    "from": "orders@shop.test",
                    "subject": f"api {n}-{i}",
                    "text": "x" * 1500,
                    "to": [f"r{r}-api{n}-{i}@dest.test" for r in range(RECIPIENTS)],
                }
                try:
                    answer = http.post("/api/v1/messages", json=body)
                except httpx.TransportError:
                    time.sleep(0.05)
                    continue
                if answer.status_code == 202:
                    with lock:
                        acknowledged.append(("api", uuid.UUID(answer.json()["id"])))

    with SmtpSink() as sink:
        env = {"POSTBODE_TRANSPORT_MAP": f"dest.test={sink.host}:{sink.port}"}
        server = PostbodeProcess(tmp_path, env).start()
        threads = [
            threading.Thread(target=smtp_client, args=(n, server.smtp_port))
            for n in range(SMTP_CLIENTS)
        ]
        threads += [
            threading.Thread(target=api_client, args=(n, server.http_url))
            for n in range(API_CLIENTS)
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(acknowledged) < 300 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.kill()  # SIGKILL, mid-run: clients are still sending
        with lock:
            answered = list(acknowledged)
        running.clear()
        for t in threads:
            t.join(30)
        # the restart recovers the store (SQLite replays its WAL) and serves again
        restarted = PostbodeProcess(tmp_path, env).start()
        assert restarted.stop() == 0, restarted.log()

    assert {kind for kind, _ in answered} == {"smtp", "api"}, "both paths were exercised"
    assert len(answered) >= 300
    store = create_store(Settings(data_dir=tmp_path))
    try:
        with store.read() as conn:
            ids = set(conn.execute(select(messages.c.id)).scalars())
            raw_ids = set(conn.execute(select(raw_messages.c.message_id)).scalars())
            per_message = dict(
                conn.execute(
                    select(deliveries.c.message_id, func.count()).group_by(deliveries.c.message_id)
                ).all()
            )
            received_events = dict(
                conn.execute(
                    select(events.c.message_id, func.count())
                    .where(events.c.type == "message.received")
                    .group_by(events.c.message_id)
                ).all()
            )
    finally:
        store.dispose()
    missing = [m for _, m in answered if m not in ids]
    assert not missing, f"{len(missing)} acknowledged messages lost"
    # nothing half-written: every stored message is whole
    assert raw_ids == ids
    assert all(per_message.get(m) == RECIPIENTS for m in ids)
    assert all(received_events.get(m) == 1 for m in ids)
