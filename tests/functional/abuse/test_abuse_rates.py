"""The rate guards end to end: real bounces from a receiving MTA and a real ARF complaint
through the return path trip the bounce-rate, list-bombing and complaint-rate guards, which hold
the app's new mail and raise an alert; after a release only new outcomes count."""

from __future__ import annotations

import asyncio
import smtplib
import time
from collections.abc import Callable
from email.message import EmailMessage

from sqlalchemy import select

from postbode import tenancy
from postbode.abuse import guards, hold
from postbode.abuse.release import release
from postbode.bounces.intake import BounceIntake
from postbode.config import Settings
from postbode.store.engine import Store
from postbode.store.schema import app_alerts, apps, deliveries, messages
from postbode.testing.servers import PostbodeInProcess, StartPostbode
from postbode.testing.sink import Rule, SmtpSink

UNKNOWN = "550 5.1.1 <{}>: Recipient address rejected: User unknown in local recipient table"


def wait_for(predicate: Callable[[], bool], store: Store, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            with store.read() as conn:
                rows = conn.execute(select(deliveries.c.status, deliveries.c.last_reply)).all()
            raise TimeoutError(f"condition not met in time: {sorted(set(rows))[:10]}")
        time.sleep(0.1)


def send_all(postbode: PostbodeInProcess, app: tenancy.NewApp, recipients: list[str]) -> None:
    with smtplib.SMTP(postbode.host, postbode.port, timeout=60) as client:
        client.login(app.smtp_username, app.smtp_password)
        for i, rcpt in enumerate(recipients):
            msg = EmailMessage()
            msg["From"] = "orders@shop.test"
            msg["To"] = rcpt
            msg["Subject"] = f"order {i}"
            msg.set_content("Your order has shipped.")
            client.send_message(msg)


def ended(store: Store) -> int:
    with store.read() as conn:
        rows = conn.execute(
            select(deliveries.c.status).where(deliveries.c.status.in_(("delivered", "bounced")))
        )
        return len(rows.all())


def alerts_of(store: Store) -> list[tuple[str, dict, bool]]:
    with store.read() as conn:
        rows = conn.execute(select(app_alerts.c.kind, app_alerts.c.figures, app_alerts.c.held))
        return [(r.kind, r.figures, r.held) for r in rows]


def hold_reason(store: Store, app_id: int) -> str | None:
    with store.read() as conn:
        return conn.execute(select(apps.c.hold_reason).where(apps.c.id == app_id)).scalar_one()


def test_30_hard_bounces_in_200_deliveries_hold_the_app(
    settings: Settings,
    store: Store,
    shop: tenancy.NewApp,
    mx_sink: SmtpSink,
    start_postbode: StartPostbode,
) -> None:
    gone = [f"gone{i}@dest.test" for i in range(30)]
    mx_sink.script.add(*(Rule.rcpt(a, UNKNOWN.format(a)) for a in gone))
    recipients = gone + [f"ok{i}@dest.test" for i in range(170)]
    postbode = start_postbode()
    send_all(postbode, shop, recipients)
    wait_for(lambda: ended(store) == 200, store)
    assert guards.check_rates(store, settings) != []
    reason = hold_reason(store, shop.app_id)
    assert reason is not None and "hard-bounce rate 15.0%" in reason
    [(kind, figures, held)] = alerts_of(store)
    assert (kind, held) == ("bounce_rate", True)
    assert (figures["hard_bounces"], figures["deliveries"], figures["rate"]) == (30, 200, 0.15)
    # New mail waits; a second look neither holds nor alerts again.
    send_all(postbode, shop, ["later@dest.test"])
    with store.read() as conn:
        later = conn.execute(
            select(deliveries.c.status).where(deliveries.c.recipient == "later@dest.test")
        ).scalar_one()
    assert later == "held"
    assert guards.check_rates(store, settings) == []
    # Released: the bounces before the release no longer count.
    release(store, shop.app_id, hold.Actor("owner@shop.test"))
    assert guards.check_rates(store, settings) == []
    assert hold_reason(store, shop.app_id) is None


def test_many_unknown_never_seen_addresses_at_one_domain_is_list_bombing(
    settings: Settings,
    store: Store,
    shop: tenancy.NewApp,
    mx_sink: SmtpSink,
    start_postbode: StartPostbode,
) -> None:
    # Fewer than 200 outcomes: the bounce-rate guard does not judge; the bombing guard does.
    gone = [f"random{i}@dest.test" for i in range(60)]
    mx_sink.script.add(*(Rule.rcpt(a, UNKNOWN.format(a)) for a in gone))
    postbode = start_postbode()
    send_all(postbode, shop, gone + [f"ok{i}@dest.test" for i in range(40)])
    wait_for(lambda: ended(store) == 100, store)
    [(app_id, trip)] = guards.check_rates(store, settings)
    assert (app_id, trip.kind) == (shop.app_id, "list_bombing")
    assert trip.figures["domain"] == "dest.test"
    assert trip.figures["unknown_new_recipients"] == 60
    assert [a[0] for a in alerts_of(store)] == ["list_bombing"]


def test_complaints_above_the_threshold_hold_the_app(
    settings: Settings,
    store: Store,
    shop: tenancy.NewApp,
    mx_sink: SmtpSink,
    start_postbode: StartPostbode,
) -> None:
    settings = settings.model_copy(update={"abuse_complaint_min_deliveries": 200})
    postbode = start_postbode()
    send_all(postbode, shop, [f"reader{i}@dest.test" for i in range(200)])
    wait_for(lambda: ended(store) == 200, store)
    assert guards.check_rates(store, settings) == []  # delivered, no complaint yet
    with store.read() as conn:
        mid, token = conn.execute(
            select(messages.c.message_id_header, deliveries.c.verp_token)
            .join(deliveries, deliveries.c.message_id == messages.c.id)
            .where(deliveries.c.recipient == "reader0@dest.test")
        ).one()
    report = (
        "From: fbl@isp.test\r\nTo: abuse@return.postbode.localhost\r\n"
        "Subject: FW: complaint\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="A"\r\n'
        "\r\n--A\r\nContent-Type: text/plain\r\n\r\nThis is an abuse report.\r\n"
        "--A\r\nContent-Type: message/feedback-report\r\n\r\n"
        "Feedback-Type: abuse\r\nUser-Agent: isp-fbl/1.0\r\nVersion: 1\r\n"
        "--A\r\nContent-Type: message/rfc822\r\n\r\n"
        f"From: orders@shop.test\r\nTo: reader0@dest.test\r\nMessage-ID: {mid}\r\n\r\nHi\r\n"
        "--A--\r\n"
    ).encode()
    intake = BounceIntake(settings, store)
    # The feedback loop sends the report to the message's return path (its VERP token).
    answer = asyncio.run(intake.receive("", [f"{token}@return.postbode.localhost"], report))
    assert answer == "250 2.0.0 Ok: complaint recorded"
    [(app_id, trip)] = guards.check_rates(store, settings)
    assert app_id == shop.app_id
    assert trip.kind == "complaint_rate"
    assert (trip.figures["complaints"], trip.figures["delivered"]) == (1, 200)
    assert "complaint rate 0.50%" in (hold_reason(store, shop.app_id) or "")
    assert [(a[0], a[2]) for a in alerts_of(store)] == [("complaint_rate", True)]
