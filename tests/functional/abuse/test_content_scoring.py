"""Content scoring with a private rspamd on loopback: GTUBE is refused (550 5.7.1 over SMTP, 422
over HTTP), a message between the hold and reject scores is held with rspamd's symbols on its
page, in the API and in the queue, a plain message goes out; a held message outlives a restart
and an app release, and goes out when released by hand; rspamd away fails open (or, set so,
answers 451 / 503)."""

from __future__ import annotations

import contextlib
import re
import smtplib
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from postbode import tenancy
from postbode.abuse import alerts, hold
from postbode.abuse.release import release
from postbode.config import Settings
from postbode.delivery import manage
from postbode.store.engine import Store
from postbode.store.schema import app_alerts, deliveries, events, messages
from postbode.testing.dns import LoopbackDNS
from postbode.testing.process import free_port
from postbode.testing.rspamd import CONTENT_RULE, GTUBE, MIDDLE_MARKER, MIDDLE_SCORE, Rspamd
from postbode.testing.servers import HttpPostbode
from postbode.testing.sink import SmtpSink

# One private rspamd per test session: its tests share an xdist worker.
pytestmark = pytest.mark.xdist_group("rspamd")

PASSWORD = "a long password for the owner"
StartScanning = Callable[..., HttpPostbode]


@pytest.fixture
def scan_settings(settings: Settings, dns_server: LoopbackDNS, rspamd: Rspamd) -> Settings:
    """Settings scoring with the private rspamd (default hold 6 and reject 15 scores)."""
    return settings.model_copy(
        update={
            "dns_nameservers": dns_server.nameserver,
            "smtp_hostname": "mta.postbode.test",
            "rspamd_url": rspamd.url,
        }
    )


@pytest.fixture
def start_scanning(scan_settings: Settings, store: Store) -> Iterator[StartScanning]:
    """Start Postbode (SMTP, HTTP, a delivery worker) with settings overrides; stopped at the
    end of the test."""
    with contextlib.ExitStack() as stack:

        def start(**overrides: Any) -> HttpPostbode:
            changed = scan_settings.model_copy(update=overrides)
            return stack.enter_context(HttpPostbode(changed, store))

        yield start


def mail(
    subject: str, body: str = "Your order has shipped.", to: str = "a@dest.test"
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Shop <orders@shop.test>"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content(body)
    return msg


def smtp_send(postbode: HttpPostbode, app: tenancy.NewApp, msg: EmailMessage) -> None:
    with smtplib.SMTP(postbode.host, postbode.port, timeout=30) as client:
        client.login(app.smtp_username, app.smtp_password)
        client.send_message(msg)


def api_send(
    postbode: HttpPostbode, app: tenancy.NewApp, subject: str, text: str, to: str
) -> httpx.Response:
    return httpx.post(
        f"{postbode.http_url}/api/v1/messages",
        json={"from": "orders@shop.test", "to": [to], "subject": subject, "text": text},
        headers={"Authorization": f"Bearer {app.api_key}"},
        timeout=30,
    )


def delivery_of(store: Store, recipient: str) -> Any:
    with store.read() as conn:
        return conn.execute(
            select(deliveries, messages.c.spam_score, messages.c.spam_symbols)
            .join(messages, messages.c.id == deliveries.c.message_id)
            .where(deliveries.c.recipient == recipient)
        ).one()


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


def signed_in(base: str, email: str) -> httpx.Client:
    client = httpx.Client(base_url=base, timeout=30, follow_redirects=True)
    page = client.get("/login").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert token is not None
    answer = client.post(
        "/login", data={"email": email, "password": PASSWORD, "csrf_token": token[1]}
    )
    assert answer.status_code == 200 and "/dashboard" in str(answer.url), answer.text[:500]
    return client


def test_gtube_is_refused_a_middle_score_held_with_its_symbols_a_plain_message_sent(
    store: Store,
    shop: tenancy.NewApp,
    mx_sink: SmtpSink,
    start_scanning: StartScanning,
) -> None:
    tenancy.create_user(store, "owner@org.test", PASSWORD, role="owner")
    postbode = start_scanning()

    # GTUBE over SMTP: 550 5.7.1 naming what fired, nothing stored.
    with pytest.raises(smtplib.SMTPDataError) as refused:
        smtp_send(postbode, shop, mail("Spam test", f"Here it is: {GTUBE}", "gtube@dest.test"))
    assert refused.value.smtp_code == 550
    said = refused.value.smtp_error.decode()
    assert said.startswith("5.7.1") and "GTUBE" in said and "content" in said, said
    # … and over HTTP: 422, a JSON error naming the content.
    answer = api_send(postbode, shop, "Spam test", f"Here it is: {GTUBE}", "gtube2@dest.test")
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert (error["code"], error["field"]) == ("content_rejected", "content")
    assert "GTUBE" in error["message"]
    with store.read() as conn:
        # the alert's e-mail to the owner is the one message stored
        sources = conn.execute(select(messages.c.source)).scalars().all()
        assert sources == [alerts.SYSTEM_SOURCE]
        [alert] = conn.execute(select(app_alerts)).all()  # once per kind, app and hour
    assert alert.kind == "content" and alert.figures["outcome"] == "refused"
    assert "GTUBE" in alert.figures["symbols"]

    # Between the hold (6) and reject (15) scores: accepted, held with the rule that fired.
    smtp_send(postbode, shop, mail(f"Order {MIDDLE_MARKER}", to="middle@dest.test"))
    answer = api_send(postbode, shop, f"Order {MIDDLE_MARKER}", "Shipped.", "middle2@dest.test")
    assert answer.status_code == 202, answer.text
    assert answer.json()["recipients"][0]["status"] == "held"
    for rcpt in ("middle@dest.test", "middle2@dest.test"):
        row = delivery_of(store, rcpt)
        assert row.status == "held"
        assert 6 <= row.spam_score < 15
        assert row.last_reply.startswith(f"content score {row.spam_score:g} (hold at 6): ")
        assert f"{CONTENT_RULE} {MIDDLE_SCORE:g}" in row.last_reply
        [rule] = [s for s in row.spam_symbols if s["name"] == CONTENT_RULE]
        assert rule["score"] == MIDDLE_SCORE and MIDDLE_MARKER in rule["options"][0]

    # Plain mail goes out, scored below the hold score.
    smtp_send(postbode, shop, mail("Your order", to="plain@dest.test"))
    answer = api_send(postbode, shop, "Your order", "Shipped.", "plain2@dest.test")
    assert answer.status_code == 202, answer.text
    got = mx_sink.wait_for_sync(2, timeout=20)
    assert sorted(r for m in got for r in m.rcpt_tos) == ["plain2@dest.test", "plain@dest.test"]
    plain = delivery_of(store, "plain@dest.test")
    assert plain.spam_score is not None and plain.spam_score < 6
    assert delivery_of(store, "middle@dest.test").status == "held"  # still

    # The message API shows the score and symbols …
    middle = delivery_of(store, "middle@dest.test")
    detail = httpx.get(
        f"{postbode.http_url}/api/v1/messages/{middle.message_id}",
        headers={"Authorization": f"Bearer {shop.api_key}"},
    ).json()
    assert detail["content"]["score"] == middle.spam_score
    assert CONTENT_RULE in [s["name"] for s in detail["content"]["symbols"]]
    assert detail["recipients"][0]["last_reply"].startswith("content score")
    # … the queue gives the hold reason as for other holds …
    queued, _ = manage.list_deliveries(store, shop.app_id, status=["held"])
    reasons = {d["recipient"]: d["hold_reason"] for d in queued}
    assert reasons["middle@dest.test"] == middle.last_reply
    assert set(reasons) == {"middle@dest.test", "middle2@dest.test"}
    # … and the message page lists the symbols and says it is held.
    client = signed_in(postbode.http_url, "owner@org.test")
    try:
        page = client.get(f"/messages/{middle.message_id}").text
    finally:
        client.close()
    section = page[page.index('id="content-score"') :]
    assert CONTENT_RULE in section and f"{MIDDLE_SCORE:g}" in section
    assert "held for its content" in section
    with store.read() as conn:
        held_events = conn.execute(
            select(events.c.data).where(
                events.c.type == "delivery.held", events.c.delivery_id == middle.id
            )
        ).scalars()
        assert [d["reason"] for d in held_events] == [middle.last_reply]


def test_a_held_message_outlives_a_restart_and_an_app_release_until_released_by_hand(
    store: Store,
    shop: tenancy.NewApp,
    mx_sink: SmtpSink,
    scan_settings: Settings,
    start_scanning: StartScanning,
) -> None:
    with HttpPostbode(scan_settings, store) as first:
        smtp_send(first, shop, mail(f"Order {MIDDLE_MARKER}", to="kept@dest.test"))
    kept = delivery_of(store, "kept@dest.test")
    assert kept.status == "held"

    second = start_scanning()
    # An app hold and release in between: it sends the app's held mail, not this one.
    hold.hold(store, shop.app_id, "checking", hold.Actor("ops@shop.test"))
    assert release(store, shop.app_id, hold.Actor("ops@shop.test")) == 0
    smtp_send(second, shop, mail("Your order", to="after@dest.test"))
    mx_sink.wait_for_sync(1, timeout=20)
    again = delivery_of(store, "kept@dest.test")
    assert (again.status, again.last_reply, again.spam_score) == (
        "held",
        kept.last_reply,
        kept.spam_score,
    )
    assert [r for m in mx_sink.messages for r in m.rcpt_tos] == ["after@dest.test"]

    manage.change_one(store, shop.app_id, kept.id, "release", by="ops@shop.test")
    got = mx_sink.wait_for_sync(2, timeout=20)
    assert "kept@dest.test" in [r for m in got for r in m.rcpt_tos]
    wait_for(lambda: delivery_of(store, "kept@dest.test").status == "delivered")


def test_rspamd_away_fails_open_or_asks_to_retry(
    store: Store, shop: tenancy.NewApp, mx_sink: SmtpSink, start_scanning: StartScanning
) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    open_ = start_scanning(rspamd_url=nobody, rspamd_timeout=2.0)
    smtp_send(open_, shop, mail("Your order", to="open@dest.test"))
    mx_sink.wait_for_sync(1, timeout=20)
    assert delivery_of(store, "open@dest.test").spam_score is None  # accepted unscored

    closed = start_scanning(rspamd_url=nobody, rspamd_timeout=2.0, rspamd_fail_open=False)
    with pytest.raises(smtplib.SMTPDataError) as later:
        smtp_send(closed, shop, mail("Your order", to="closed@dest.test"))
    assert later.value.smtp_code == 451, later.value
    answer = api_send(closed, shop, "Your order", "Shipped.", "closed2@dest.test")
    assert answer.status_code == 503, answer.text
    with store.read() as conn:
        assert conn.execute(select(func.count()).select_from(messages)).scalar_one() == 1
