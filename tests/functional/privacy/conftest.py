"""A person's traces across two apps, made through Postbode's own paths: the send API (with an
idempotency key), delivery outcomes with attempts and transcripts, a hard bounce that
suppresses, opens and clicks through the tracking recorder, a one-click unsubscribe, webhook
requests with a logged response, an inbound message and audit records."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from sqlalchemy import delete, insert, select, update

from postbode import tenancy
from postbode.config import Settings
from postbode.events.record import Event, record
from postbode.events.types import EventType
from postbode.privacy.audit import Actor, write_audit
from postbode.store.engine import Store, create_store
from postbode.store.schema import (
    apps,
    attempts,
    deliveries,
    inbound_messages,
    login_attempts,
    messages,
    metadata,
    new_id,
    utcnow,
    webhook_attempts,
    webhook_requests,
)
from postbode.tracking import bots
from postbode.tracking.endpoints import Hit, unsubscribe, write_hits
from postbode.tracking.tokens import Token
from postbode.web.app import create_app
from postbode.webhooks.manage import create_webhook

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


def clean(store: Store) -> None:
    """Empty every table but the installation's own values (its secret)."""
    with store.write() as conn:
        for table in reversed(metadata.sorted_tables):
            if table.name != "system_values":
                conn.execute(delete(table))


PERSON = "person@x.test"
OTHER = "other@y.test"
PERSON_IP = "198.51.100.77"  # stored truncated: 198.51.100.0
IP_PREFIX = "198.51.100."
CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36"
)


@functools.cache
def _dkim_key(generate: Any = tenancy.generate_dkim_key) -> tuple[str, str]:
    return generate(1024)  # type: ignore[no-any-return]


@pytest.fixture(autouse=True)
def _fast_tenancy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tenancy, "generate_dkim_key", _dkim_key)
    monkeypatch.setattr(
        tenancy, "_hasher", PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
    )


@dataclass
class Installation:
    """A store of its own (SQLite in its own data directory, so its file can be searched)
    and the environment a `postbode` command needs to use it."""

    store: Store
    settings: Settings
    env: dict[str, str]
    db_path: Path | None  # SQLite's file

    def postbode(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "postbode", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )


@pytest.fixture(params=["sqlite", "postgresql"])
def installation(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Installation]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTBODE_")}
    if request.param == "sqlite":
        settings = Settings(data_dir=tmp_path)
        store = create_store(settings)
        env["POSTBODE_DATA_DIR"] = str(tmp_path)
        yield Installation(store, settings, env, tmp_path / "postbode.db")
        store.dispose()
    else:
        store = request.getfixturevalue("_postgresql_session_store")
        clean(store)
        url = store.engine.url.render_as_string(hide_password=False)
        settings = Settings(data_dir=tmp_path, database_url=url)
        env.update(POSTBODE_DATA_DIR=str(tmp_path), POSTBODE_DATABASE_URL=url)
        yield Installation(store, settings, env, None)
        clean(store)


@dataclass
class Traces:
    shop: tenancy.NewApp
    news: tenancy.NewApp
    person_deliveries: list[Any]
    other_deliveries: list[Any]
    messages: list[Any]


def _send(client: TestClient, key: str, body: dict[str, Any], idem: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {key}"}
    if idem:
        headers["Idempotency-Key"] = idem
    response = client.post("/api/v1/messages", json=body, headers=headers)
    assert response.status_code == 202, response.text
    return response.json()


def _attempt(conn: Any, delivery: Any, code: int, status: str, text: str) -> None:
    now = utcnow()
    conn.execute(
        insert(attempts).values(
            id=new_id(),
            delivery_id=delivery.id,
            started_at=now,
            duration_ms=12,
            outcome="Delivered" if code < 400 else "HardFail",
            mx_host="mx.x.test",
            ip="127.0.0.1",
            port=25,
            reply_code=code,
            enhanced_status=status,
            reply_text=text,
            transcript=(
                f"> MAIL FROM:<bounce@pb.test>\r\n< 250 ok\r\n> RCPT TO:<{delivery.recipient}>\r\n"
                f"< {code} {status} {text}\r\n"
            ),
        )
    )


def make_traces(inst: Installation) -> Traces:
    store = inst.store
    shop = tenancy.create_app(store, "shop")
    tenancy.add_domain(store, "shop", "shop.test")
    news = tenancy.create_app(store, "news")
    tenancy.add_domain(store, "news", "news.test")
    create_webhook(store, shop.app_id, "https://hooks.shop.test/postbode")
    create_webhook(store, news.app_id, "https://hooks.news.test/postbode")
    with TestClient(create_app(inst.settings, store)) as client:
        _send(
            client,
            shop.api_key,
            {
                "from": "Shop <orders@shop.test>",
                "to": [f"Person Example <{PERSON}>", OTHER],
                "subject": f"Your order, {PERSON}",
                "html": '<p>Hello, your order: <a href="https://shop.test/o/1">track</a></p>',
                "text": f"Hello {PERSON}",
                "metadata": {"customer": PERSON},
                "tag": "order",
                "track_opens": True,
                "track_clicks": True,
            },
            idem="order-1",
        )
        _send(
            client,
            shop.api_key,
            {
                "from": "orders@shop.test",
                "to": [OTHER],
                "subject": "For the other one",
                "text": "hi",
            },
        )
        _send(
            client,
            news.api_key,
            {
                "from": "news@news.test",
                "to": [PERSON.upper()],
                "subject": "News",
                "text": "news",
                "stream": "broadcast",
                "tag": "weekly",
            },
        )
    with store.write() as conn:
        rows = conn.execute(
            select(deliveries, messages.c.stream, messages.c.tag).join(
                messages, messages.c.id == deliveries.c.message_id
            )
        ).all()
        for d in rows:
            base = {
                "app_id": d.app_id,
                "stream": d.stream,
                "tag": d.tag,
                "message_id": d.message_id,
                "delivery_id": d.id,
                "recipient": d.recipient,
            }
            if d.app_id == news.app_id:  # a hard bounce at RCPT, and the suppression
                reply = f"<{d.recipient}>: Recipient address rejected: User unknown"
                _attempt(conn, d, 550, "5.1.1", reply)
                conn.execute(
                    update(deliveries)
                    .where(deliveries.c.id == d.id)
                    .values(
                        status="bounced",
                        attempts=1,
                        last_attempt_at=utcnow(),
                        last_reply=f"550 5.1.1 {reply}",
                        bounce_category="user_unknown",
                        bounce_status="5.1.1",
                        hard=True,
                    )
                )
                record(
                    conn,
                    Event(
                        type=EventType.DELIVERY_BOUNCED,
                        data={
                            "hard": True,
                            "category": "user_unknown",
                            "status": "5.1.1",
                            "diagnostic": f"550 5.1.1 {reply}",
                            "source": "smtp",
                        },
                        **base,
                    ),
                )
                from postbode.bounces.suppression import suppress

                suppress(
                    conn,
                    d.app_id,
                    d.recipient,
                    reason="user_unknown",
                    source="bounce",
                    message_id=d.message_id,
                    detail=f"550 5.1.1 {reply}",
                )
            else:
                reply = f"2.0.0 Ok: queued for <{d.recipient}>"
                _attempt(conn, d, 250, "2.0.0", reply)
                conn.execute(
                    update(deliveries)
                    .where(deliveries.c.id == d.id)
                    .values(
                        status="delivered",
                        attempts=1,
                        last_attempt_at=utcnow() - timedelta(minutes=10),
                        last_reply=f"250 {reply}",
                    )
                )
                record(
                    conn,
                    Event(
                        type=EventType.DELIVERY_DELIVERED,
                        data={"reply": f"250 {reply}", "attempt": 1},
                        **base,
                    ),
                )
    person = [d for d in rows if d.recipient.lower() == PERSON]
    other = [d for d in rows if d.recipient.lower() != PERSON]
    at_shop = next(d for d in person if d.app_id == shop.app_id)
    ip = bots.anonymise_ip(PERSON_IP)
    hits = [
        Hit("open", Token("open", at_shop.id), CHROME, ip, utcnow()),
        Hit(
            "click", Token("click", at_shop.id, "https://shop.test/o/1", 0, 1), CHROME, ip, utcnow()
        ),
        Hit("open", Token("open", other[0].id), CHROME, "203.0.113.0", utcnow()),
    ]
    with store.write() as conn:
        write_hits(conn, hits, 0.0)
    unsubscribe(store, Token("unsubscribe", at_shop.id), CHROME, ip, "one-click")
    with store.write() as conn:
        for req in conn.execute(select(webhook_requests.c.id)).scalars():
            conn.execute(
                insert(webhook_attempts).values(
                    id=new_id(),
                    request_id=req,
                    started_at=utcnow(),
                    duration_ms=5,
                    status_code=200,
                    response_body=f'{{"seen": "{PERSON}"}}',
                )
            )
        conn.execute(
            insert(inbound_messages).values(
                id=new_id(),
                app_id=shop.app_id,
                mail_from=PERSON,
                rcpt_to="support@shop.test",
                subject="Where is my order?",
                message_id_header="<q1@x.test>",
                raw=zlib.compress(
                    f"From: {PERSON}\r\nSubject: Where?\r\n\r\nfrom {PERSON_IP}".encode()
                ),
                status="delivered",
                attempts=1,
                next_attempt_at=utcnow(),
            )
        )
        org_id = conn.execute(
            select(apps.c.organization_id).where(apps.c.id == shop.app_id)
        ).scalar_one()
        write_audit(
            conn,
            Actor("owner@shop.test", ip="127.0.0.1"),
            "suppression.add",
            PERSON,
            {"email": PERSON},
            organization_id=org_id,
        )
        conn.execute(insert(login_attempts).values(key=PERSON, at=1.0))
    with store.read() as conn:
        msgs = conn.execute(select(messages)).all()
    return Traces(shop, news, person, other, msgs)
