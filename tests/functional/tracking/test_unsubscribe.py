"""One-click unsubscribe end to end (RFC 8058): broadcast mail leaves with signed
List-Unsubscribe headers, a POST to its URL suppresses the address for broadcast mail only."""

from __future__ import annotations

import email
import re
import smtplib
from collections.abc import Callable
from email import policy
from email.message import EmailMessage
from typing import Any

import dkim
import httpx
from sqlalchemy import select

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import Store
from postbode.store.schema import deliveries, events, suppressions
from postbode.testing.servers import PostbodeInProcess
from postbode.testing.sink import SmtpSink
from postbode.web.app import create_app


def send(postbode: PostbodeInProcess, app: tenancy.NewApp, stream: str) -> None:
    msg = EmailMessage()
    msg["From"] = "News <news@shop.test>"
    msg["To"] = "alice@dest.test"
    msg["Subject"] = f"{stream} mail"
    msg["X-Postbode-Stream"] = stream
    msg.set_content("News of the week.")
    with smtplib.SMTP(postbode.host, postbode.port) as client:
        client.login(app.smtp_username, app.smtp_password)
        client.send_message(msg)


def statuses(store: Store) -> list[str]:
    with store.read() as conn:
        return list(conn.execute(select(deliveries.c.status).order_by(deliveries.c.id)).scalars())


def test_one_click_unsubscribe(
    settings: Settings, store: Store, http: Any, eventually: Callable[..., None]
) -> None:
    shop = tenancy.create_app(store, "shop")
    domain = tenancy.add_domain(store, "shop", "shop.test")
    with SmtpSink() as sink:
        settings = settings.model_copy(
            update={
                "tracking_url": http.base,
                "transport_map": f"dest.test={sink.host}:{sink.port}",
            }
        )
        http.start(create_app(settings, store))
        with PostbodeInProcess(settings, store) as postbode:
            send(postbode, shop, "broadcast")
            (received,) = sink.wait_for_sync(1, timeout=20)
            public = domain["dkim_public_key"].encode()
            assert dkim.verify(received.data, dnsfunc=lambda name, timeout=5: public)
            parsed = email.message_from_bytes(received.data, policy=policy.default)
            signed = re.sub(r"\s", "", str(parsed["DKIM-Signature"]))
            fields = re.search(r"h=([^;]+)", signed)
            assert fields and {"list-unsubscribe", "list-unsubscribe-post"} <= set(
                fields.group(1).lower().split(":")
            )
            assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
            (url,) = re.findall(r"<([^>]+)>", parsed["List-Unsubscribe"])
            assert url.startswith(f"{http.base}/t/u/")

            with httpx.Client() as client:
                page = client.get(url)  # what a link scanner does: nothing happens
                assert page.status_code == 200 and 'method="post"' in page.text
                with store.read() as conn:
                    assert conn.execute(select(suppressions)).first() is None
                # RFC 8058 §3.2: what the mailbox provider sends for the one click
                done = client.post(
                    url,
                    content=b"List-Unsubscribe=One-Click",
                    headers={"content-type": "application/x-www-form-urlencoded"},
                )
                assert done.status_code == 200

            with store.read() as conn:
                listed = conn.execute(select(suppressions)).mappings().one()
                (event,) = conn.execute(
                    select(events.c.data).where(events.c.type == "message.unsubscribed")
                ).scalars()
            assert (listed["email"], listed["stream"], listed["reason"]) == (
                "alice@dest.test",
                "broadcast",
                "unsubscribed",
            )
            assert event["source"] == "one-click"

            # The next broadcast is suppressed at accept; transactional mail still goes out.
            send(postbode, shop, "broadcast")
            send(postbode, shop, "transactional")
            sink.wait_for_sync(2, timeout=20)
            eventually(lambda: statuses(store) == ["delivered", "suppressed", "delivered"])
    transactional = sink.messages[1].message
    assert transactional["Subject"] == "transactional mail"
    assert transactional["List-Unsubscribe"] is None  # only broadcast mail gets one
