"""The leaked-key drill: an app with a week of ordinary traffic (seeded statistics) suddenly
gets a burst through one API key and one SMTP login, on a real `postbode serve`. Postbode must
hold new mail within the first 300 messages, send none of the held mail, tell a webhook
(`app.alert`, kind `spike`) within a minute, keep the held mail through a kill -9, and send it
all once an owner releases the app, with the release in the audit log. Used by
tests/functional/abuse/test_spike_drill.py and benchmarks/spike_drill.py (which prints it)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import httpx
from sqlalchemy import func, insert, select

from postbode import tenancy
from postbode.config import Settings
from postbode.endpoints.destinations import DestinationPolicy
from postbode.store.engine import Store, create_store
from postbode.store.schema import audit_log, deliveries, events, messages, stat_counters, utcnow
from postbode.testing.process import PostbodeProcess
from postbode.testing.sink import SmtpSink

from ..webhooks import manage as hooks

OWNER = "owner@owners.test"
SECRET = "spike-drill"  # noqa: S105 (the drill nodes' secret key, for signing webhooks)
ALERT_TAG = "postbode-alert"


class Receiver:
    """A webhook endpoint on loopback that keeps what it is sent, with the time it came."""

    def __init__(self) -> None:
        self.got: list[tuple[float, dict[str, Any]]] = []
        received = self.got

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with contextlib.suppress(ValueError):
                    received.append((time.monotonic(), json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def alerts(self, kind: str) -> list[float]:
        found = []
        for at, body in self.got:
            items = body if isinstance(body, list) else [body]
            for item in items:
                data = item.get("data") if isinstance(item, dict) else None
                if (
                    isinstance(item, dict)
                    and item.get("type") == "app.alert"
                    and isinstance(data, dict)
                    and data.get("kind") == kind
                ):
                    found.append(at)
        return found


@dataclass
class Report:
    messages: int
    burst_seconds: float = 0.0
    acknowledged: int = 0
    refused: int = 0
    accepted_before_hold: int = 0  # accepted as queued (not held) once the burst began
    held_at_accept: int = 0
    sent_before_release: int = 0  # burst messages the sink had before the release
    held_before_release: int = 0
    alert_after_seconds: float | None = None
    held_after_restart: int = 0
    released: int = 0
    delivered_after_release: int = 0
    released_by: str = ""
    missing: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (
            self.accepted_before_hold <= 300
            and self.sent_before_release <= self.accepted_before_hold
            and self.alert_after_seconds is not None
            and self.alert_after_seconds <= 60
            and self.held_after_restart == self.held_before_release
            and self.missing == 0
            and OWNER in self.released_by
        )

    def lines(self) -> list[str]:
        rate = self.acknowledged / self.burst_seconds if self.burst_seconds else 0.0
        return [
            f"burst: {self.messages} messages, {self.acknowledged} acknowledged in "
            f"{self.burst_seconds:.1f} s ({rate:.0f}/s), {self.refused} refused",
            f"accepted before the hold: {self.accepted_before_hold} (target: at most 300)",
            f"held at accept: {self.held_at_accept}; held before the release: "
            f"{self.held_before_release}",
            f"sent before the release: {self.sent_before_release} (all accepted before the hold)",
            "spike alert at the webhook: "
            + (
                f"{self.alert_after_seconds:.1f} s after the burst began (target: 60 s)"
                if self.alert_after_seconds is not None
                else "never"
            ),
            f"held after kill -9 and restart: {self.held_after_restart}",
            f"released: {self.released} by {self.released_by or 'nobody'}; delivered after the "
            f"release: {self.delivered_after_release}; missing: {self.missing}",
            *self.notes,
            "PASSED" if self.passed else "FAILED",
        ]


def seed_history(store: Store, app_id: int, per_minute: float, days: int = 7) -> None:
    """A week of ordinary sending as the statistics keep it: hourly rows of message.received
    (what the rollup leaves of older minutes)."""
    now = utcnow().replace(minute=0, second=0, microsecond=0)
    rows = [
        {
            "app_id": app_id,
            "stream": "transactional",
            "tag": "order",
            "bucket": now - timedelta(hours=h),
            "event_type": "message.received",
            "count": round(per_minute * 60),
            "bot_count": 0,
        }
        for h in range(2, days * 24 + 1)
    ]
    with store.write() as conn:
        conn.execute(insert(stat_counters), rows)


def _raw(i: int) -> bytes:
    return (
        f"From: Shop <orders@shop.test>\r\nTo: user{i}@dest.test\r\nSubject: burst {i}\r\n"
        f"\r\nYou have won {i}.\r\n"
    ).encode()


async def _burst(
    app: tenancy.NewApp, node: PostbodeProcess, n: int, concurrency: int = 12
) -> tuple[int, int]:
    """n messages, even ones over SMTP (one login), odd ones over the API (one key)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    acked = refused = 0

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal acked, refused
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=node.smtp_port, start_tls=False)
        await smtp.connect()
        await smtp.login(app.smtp_username, app.smtp_password)
        try:
            while not queue.empty():
                i = queue.get_nowait()
                if i % 2 == 0:
                    try:
                        await smtp.sendmail("orders@shop.test", [f"user{i}@dest.test"], _raw(i))
                        acked += 1
                    except aiosmtplib.SMTPResponseException:
                        refused += 1
                    continue
                body = {
                    "from": "Shop <orders@shop.test>",
                    "to": [f"user{i}@dest.test"],
                    "subject": f"burst {i}",
                    "text": f"You have won {i}.",
                }
                async with http.post(
                    f"{node.http_url}/api/v1/messages",
                    json=body,
                    headers={"Authorization": f"Bearer {app.api_key}"},
                ) as answer:
                    await answer.read()
                    if answer.status == 202:
                        acked += 1
                    else:
                        refused += 1
        finally:
            with contextlib.suppress(Exception):
                await smtp.quit()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return acked, refused


def _settle(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:g} s")
        time.sleep(0.2)


def _count(store: Store, *where: Any) -> int:
    with store.read() as conn:
        query = (
            select(func.count())
            .select_from(deliveries)
            .join(messages, messages.c.id == deliveries.c.message_id)
            .where(messages.c.source != "system", *where)
        )
        return int(conn.execute(query).scalar_one())


def _burst_received(sink: SmtpSink) -> int:
    return sum(1 for m in sink.messages if b"Subject: burst " in m.data)


@contextlib.contextmanager
def _serve(data_dir: Path, env: dict[str, str]) -> Iterator[PostbodeProcess]:
    node = PostbodeProcess(data_dir, env, command="serve", new_session=True)
    node.start()
    try:
        yield node
    finally:
        if node.proc is not None and node.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(node.proc.pid), signal.SIGTERM)
            try:
                node.proc.wait(30)
            except Exception:
                os.killpg(os.getpgid(node.proc.pid), signal.SIGKILL)
                node.proc.wait()


def run(
    workdir: Path,
    database_url: str | None = None,
    *,
    messages_in_burst: int = 3000,
    history_per_minute: float = 2.0,
    log: Callable[[str], None] = print,
) -> Report:
    """The drill on a fresh store (SQLite in `workdir`, or the given PostgreSQL database)."""
    report = Report(messages_in_burst)
    # The nodes' secret key: the webhook's signing secret is sealed with it.
    settings = Settings(data_dir=workdir / "data", database_url=database_url, secret_key=SECRET)
    store = create_store(settings)
    try:
        app = tenancy.create_app(store, "shop")
        tenancy.add_domain(store, "shop", "shop.test")
        tenancy.create_user(store, OWNER, "a long owner password", admin=True)
        token = tenancy.create_org_token(store, tenancy.DEFAULT_ORGANIZATION, OWNER)["token"]
        seed_history(store, app.app_id, history_per_minute)
        with Receiver() as receiver, SmtpSink.on_random_loopback() as sink:
            hooks.create_webhook(
                store,
                app.app_id,
                receiver.url,
                ["app.alert"],
                policy=DestinationPolicy.parse("127.0.0.1"),
            )
            url = database_url or f"sqlite:///{settings.data_dir / 'postbode.db'}"
            env = {
                "POSTBODE_DATABASE_URL": url,
                "POSTBODE_TRANSPORT_MAP": f"dest.test={sink.host}:{sink.port},"
                f"owners.test={sink.host}:{sink.port}",
                "POSTBODE_WEBHOOK_ALLOW_PRIVATE": "127.0.0.1",
                "POSTBODE_SECRET_KEY": SECRET,
            }
            with _serve(workdir / "node", env) as node:
                log(f"burst of {messages_in_burst} over SMTP and the API …")
                started = time.monotonic()
                acked, refused = asyncio.run(_burst(app, node, messages_in_burst))
                report.burst_seconds = time.monotonic() - started
                report.acknowledged, report.refused = acked, refused
                _settle(lambda: bool(receiver.alerts("spike")), 120, "the spike alert")
                report.alert_after_seconds = receiver.alerts("spike")[0] - started
                with store.read() as conn:
                    report.accepted_before_hold = int(
                        conn.execute(
                            select(func.count()).where(
                                events.c.type == "delivery.queued",
                                events.c.app_id == app.app_id,
                                events.c.recipient.like("user%@dest.test"),
                            )
                        ).scalar_one()
                    )
                report.held_at_accept = report.acknowledged - report.accepted_before_hold
                # What was accepted before the hold is sent, or held at its attempt.
                _settle(
                    lambda: _count(store, deliveries.c.status.in_(("queued", "sending"))) == 0,
                    300,
                    "the queue drained",
                )
                report.held_before_release = _count(store, deliveries.c.status == "held")
                report.sent_before_release = _burst_received(sink)
                log("kill -9 of the node, then a restart …")
                os.killpg(os.getpgid(node.proc.pid), signal.SIGKILL)  # type: ignore[union-attr]
                node.proc.wait()  # type: ignore[union-attr]
            report.held_after_restart = _count(store, deliveries.c.status == "held")
            with _serve(workdir / "node2", env) as node:
                answer = httpx.post(
                    f"{node.http_url}/api/v1/apps/shop/release",
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=120,
                )
                answer.raise_for_status()
                report.released = int(answer.json()["released"])
                want = report.acknowledged
                _settle(lambda: _burst_received(sink) >= want, 600, "the released mail sent")
                report.delivered_after_release = _burst_received(sink) - report.sent_before_release
            seen = {
                int(m.message["Subject"].split()[-1])
                for m in sink.messages
                if b"Subject: burst " in m.data
            }
            report.missing = report.acknowledged - len(seen)
            with store.read() as conn:
                report.released_by = str(
                    conn.execute(
                        select(audit_log.c.actor)
                        .where(audit_log.c.action == "app.release")
                        .order_by(audit_log.c.id.desc())
                    ).scalar()
                    or ""
                )
    finally:
        store.dispose()
    return report
