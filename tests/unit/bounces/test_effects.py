"""Applying bounces and complaints: delivery state, events, hard and repeated-soft suppression."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from postbode import tenancy
from postbode.bounces.classify import classify
from postbode.bounces.effects import (
    SoftBouncePolicy,
    after_smtp_bounce,
    apply_complaint,
    apply_dsn,
    load_target,
)
from postbode.bounces.parse import BounceRecord, BounceReport, parse
from postbode.config import Settings
from postbode.store.engine import Store
from postbode.store.schema import deliveries, events, stat_counters, suppressions, utcnow
from postbode.testing.factories import make_queued_message

SETTINGS = Settings(
    soft_bounce_suppress_count=3, soft_bounce_window_hours=168, soft_bounce_suppress_days=14
)
POLICY = SoftBouncePolicy.from_settings(SETTINGS)


def dsn(recipient: str, status: str, diagnostic: str, *, action: str = "failed") -> bytes:
    """A Postfix-style RFC 3464 DSN."""
    return (
        "From: MAILER-DAEMON@mx.dest.test (Mail Delivery System)\r\n"
        "To: tok@return.postbode.localhost\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n'
        "\r\n--B\r\nContent-Type: text/plain\r\n\r\n"
        "I'm sorry to have to inform you that your message could not be delivered.\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.dest.test\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\n"
        f"Action: {action}\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; {diagnostic}\r\n"
        "\r\n--B--\r\n"
    ).encode()


def record_of(raw: bytes) -> BounceRecord:
    report = parse(raw)
    assert report.kind == "bounce" and report.primary is not None
    return report.primary


USER_UNKNOWN = dsn("bob@dest.test", "5.1.1", "550 5.1.1 <bob@dest.test>: User unknown")
MAILBOX_FULL = dsn("bob@dest.test", "5.2.2", "552 5.2.2 Mailbox full, quota exceeded")
REPUTATION = dsn(
    "bob@dest.test",
    "5.7.1",
    "550 5.7.1 Service unavailable; client host blocked using a reputation list",
)
DELAYED = dsn(
    "bob@dest.test", "4.4.1", "connect to mx.dest.test: Connection timed out", action="delayed"
)


@pytest.fixture
def app_id(store: Store) -> int:
    return tenancy.create_app(store, "shop").app_id


def sent(
    store: Store, app_id: int, rcpt: str = "bob@dest.test", status: str = "delivered", **values: Any
) -> uuid.UUID:
    """A delivery the worker handed to the remote once, now in `status`."""
    _, (delivery_id,) = make_queued_message(store, app_id, [rcpt])
    with store.write() as conn:
        conn.execute(
            update(deliveries)
            .where(deliveries.c.id == delivery_id)
            .values(status=status, attempts=1, **values)
        )
    return delivery_id


def apply(
    store: Store, delivery_id: uuid.UUID, raw: bytes, policy: SoftBouncePolicy = POLICY
) -> str:
    with store.write() as conn:
        target = load_target(conn, delivery_id)
        assert target is not None
        return apply_dsn(conn, target, record_of(raw), policy, utcnow())


def smtp_bounce(store: Store, delivery_id: uuid.UUID, reply: str) -> None:
    """What the delivery worker writes for a refusal during the SMTP session."""
    status = reply.split()[1]
    found = classify(status, int(reply[:3]), reply)
    with store.write() as conn:
        conn.execute(
            update(deliveries)
            .where(deliveries.c.id == delivery_id)
            .values(
                status="bounced",
                bounce_category=found.category,
                bounce_status=status,
                hard=found.hard,
                last_reply=reply,
                updated_at=utcnow(),
            )
        )
        row = conn.execute(select(deliveries).where(deliveries.c.id == delivery_id)).one()
        after_smtp_bounce(conn, row, found, reply, SETTINGS, utcnow())


def delivery(store: Store, delivery_id: uuid.UUID) -> dict[str, Any]:
    with store.read() as conn:
        return dict(
            conn.execute(select(deliveries).where(deliveries.c.id == delivery_id)).mappings().one()
        )


def event_list(store: Store, delivery_id: uuid.UUID) -> list[tuple[str, dict[str, Any]]]:
    with store.read() as conn:
        rows = conn.execute(
            select(events.c.type, events.c.data)
            .where(events.c.delivery_id == delivery_id)
            .order_by(events.c.id)
        ).all()
    return [(r.type, r.data) for r in rows]


def listed(store: Store) -> list[dict[str, Any]]:
    with store.read() as conn:
        return [dict(r) for r in conn.execute(select(suppressions)).mappings()]


def test_a_dsn_bounces_a_delivered_delivery_and_suppresses_a_bad_address(
    store: Store, app_id: int
) -> None:
    delivery_id = sent(store, app_id)
    assert apply(store, delivery_id, USER_UNKNOWN) == "bounced"
    row = delivery(store, delivery_id)
    assert (row["status"], row["bounce_category"], row["bounce_status"], row["hard"]) == (
        "bounced",
        "user_unknown",
        "5.1.1",
        True,
    )
    assert "User unknown" in row["last_reply"]
    [(kind, data)] = event_list(store, delivery_id)
    assert kind == "delivery.bounced"
    assert data == {
        "hard": True,
        "category": "user_unknown",
        "status": "5.1.1",
        "diagnostic": row["last_reply"],
        "source": "dsn",
    }
    [entry] = listed(store)
    assert (entry["email"], entry["reason"], entry["source"], entry["stream"]) == (
        "bob@dest.test",
        "user_unknown",
        "bounce",
        "all",
    )
    assert entry["expires_at"] is None
    with store.read() as conn:
        counted = conn.execute(
            select(stat_counters.c.count).where(stat_counters.c.event_type == "delivery.bounced")
        ).scalar_one()
    assert counted == 1  # the event feeds the statistics in the same transaction


def test_the_same_dsn_twice_is_one_bounce(store: Store, app_id: int) -> None:
    delivery_id = sent(store, app_id)
    assert apply(store, delivery_id, USER_UNKNOWN) == "bounced"
    assert apply(store, delivery_id, USER_UNKNOWN) == "duplicate"
    assert [k for k, _ in event_list(store, delivery_id)] == ["delivery.bounced"]


def test_a_dsn_after_a_synchronous_bounce_changes_nothing(store: Store, app_id: int) -> None:
    delivery_id = sent(store, app_id)
    smtp_bounce(store, delivery_id, "550 5.1.1 <bob@dest.test>: User unknown")
    before = delivery(store, delivery_id)
    assert apply(store, delivery_id, MAILBOX_FULL) == "duplicate"
    assert delivery(store, delivery_id) == before


@pytest.mark.parametrize("status", ["delivered", "deferred", "sending"])
def test_a_delay_report_is_noted_without_changing_the_state(
    store: Store, app_id: int, status: str
) -> None:
    delivery_id = sent(store, app_id, status=status)
    assert apply(store, delivery_id, DELAYED) == "deferred"
    row = delivery(store, delivery_id)
    assert row["status"] == status and row["bounce_category"] is None and row["hard"] is None
    [(kind, data)] = event_list(store, delivery_id)
    assert kind == "delivery.deferred" and data["source"] == "dsn" and data["status"] == "4.4.1"
    assert listed(store) == []


@pytest.mark.parametrize("status", ["bounced", "failed", "suppressed", "cancelled"])
def test_a_delay_report_about_a_final_delivery_is_dropped(
    store: Store, app_id: int, status: str
) -> None:
    delivery_id = sent(store, app_id, status=status)
    assert apply(store, delivery_id, DELAYED) == "ignored"
    assert event_list(store, delivery_id) == []


def test_reports_about_mail_never_sent_are_dropped(store: Store, app_id: int) -> None:
    suppressed = sent(store, app_id, status="suppressed")
    _, (never_tried,) = make_queued_message(store, app_id, ["carol@dest.test"])
    assert apply(store, suppressed, USER_UNKNOWN) == "ignored"
    assert apply(store, never_tried, USER_UNKNOWN) == "ignored"
    assert delivery(store, never_tried)["status"] == "queued"
    assert listed(store) == []


def test_a_reputation_block_never_suppresses_however_often(store: Store, app_id: int) -> None:
    for _ in range(2):
        apply(store, sent(store, app_id), REPUTATION)
    for _ in range(3):
        smtp_bounce(
            store,
            sent(store, app_id),
            "550 5.7.1 Service unavailable; client host blocked using a reputation list",
        )
    with store.read() as conn:
        rows = conn.execute(select(deliveries.c.bounce_category, deliveries.c.hard)).all()
    assert set(rows) == {("blocked", False)}
    assert listed(store) == []


def test_repeated_soft_bounces_suppress_for_a_while(store: Store, app_id: int) -> None:
    first, second, third = (sent(store, app_id) for _ in range(3))
    apply(store, first, MAILBOX_FULL)
    apply(store, second, MAILBOX_FULL)
    assert listed(store) == []
    assert delivery(store, first)["bounce_category"] == "mailbox_full"
    assert delivery(store, first)["hard"] is False
    before = utcnow()
    apply(store, third, MAILBOX_FULL)
    [entry] = listed(store)
    assert (entry["email"], entry["reason"], entry["source"]) == (
        "bob@dest.test",
        "mailbox_full",
        "bounce",
    )
    assert before + timedelta(days=14) <= entry["expires_at"] <= utcnow() + timedelta(days=14)
    assert entry["detail"].startswith("3 soft bounces within 168 h")


def test_soft_bounces_count_across_smtp_replies_and_dsns(store: Store, app_id: int) -> None:
    smtp_bounce(store, sent(store, app_id), "552 5.2.2 <bob@dest.test>: Mailbox full")
    apply(store, sent(store, app_id), MAILBOX_FULL)
    assert listed(store) == []
    smtp_bounce(store, sent(store, app_id), "552 5.2.2 <bob@dest.test>: Mailbox full")
    [entry] = listed(store)
    assert entry["reason"] == "mailbox_full" and entry["expires_at"] is not None


def test_soft_bounces_outside_the_window_or_of_other_apps_do_not_count(
    store: Store, app_id: int
) -> None:
    other = tenancy.create_app(store, "other").app_id
    old = utcnow() - timedelta(hours=169)
    for _ in range(2):
        sent(
            store,
            app_id,
            status="bounced",
            bounce_category="mailbox_full",
            hard=False,
            updated_at=old,
        )
        sent(store, other, status="bounced", bounce_category="mailbox_full", hard=False)
    apply(store, sent(store, app_id), MAILBOX_FULL)
    apply(store, sent(store, app_id), MAILBOX_FULL)
    assert listed(store) == []
    apply(store, sent(store, app_id), MAILBOX_FULL)
    assert [e["app_id"] for e in listed(store)] == [app_id]


def test_the_soft_rule_can_be_turned_off(store: Store, app_id: int) -> None:
    off = SoftBouncePolicy.from_settings(
        SETTINGS.model_copy(update={"soft_bounce_suppress_count": 0})
    )
    for _ in range(4):
        apply(store, sent(store, app_id), MAILBOX_FULL, off)
    assert listed(store) == []


@pytest.mark.parametrize("categories", ["mailbox_full,blocked", "rate_limited", "nonsense"])
def test_the_policy_refuses_categories_that_must_never_suppress(categories: str) -> None:
    with pytest.raises(ValueError, match="soft_bounce_categories"):
        SoftBouncePolicy.from_settings(Settings(soft_bounce_categories=categories))


def test_an_expired_soft_suppression_gives_way_to_a_hard_bounce(store: Store, app_id: int) -> None:
    for _ in range(3):
        apply(store, sent(store, app_id), MAILBOX_FULL)
    with store.write() as conn:
        conn.execute(update(suppressions).values(expires_at=utcnow() - timedelta(seconds=1)))
    apply(store, sent(store, app_id), USER_UNKNOWN)
    [entry] = listed(store)
    assert (entry["reason"], entry["expires_at"]) == ("user_unknown", None)


def test_sync_and_async_reports_of_one_failure_end_in_the_same_state(
    store: Store, app_id: int
) -> None:
    sync_id = sent(store, app_id, "sync@dest.test")
    async_id = sent(store, app_id, "async@dest.test")
    smtp_bounce(
        store, sync_id, "550 5.1.1 <sync@dest.test>: Recipient address rejected: User unknown"
    )
    apply(
        store,
        async_id,
        dsn(
            "async@dest.test",
            "5.1.1",
            "550 5.1.1 <async@dest.test>: Recipient address rejected: User unknown",
        ),
    )

    def state(delivery_id: uuid.UUID) -> tuple[Any, ...]:
        row = delivery(store, delivery_id)
        return row["status"], row["bounce_category"], row["bounce_status"], row["hard"]

    assert state(sync_id) == state(async_id) == ("bounced", "user_unknown", "5.1.1", True)
    entries = {
        e["email"]: (e["reason"], e["source"], e["stream"], e["expires_at"]) for e in listed(store)
    }
    assert (
        entries["sync@dest.test"]
        == entries["async@dest.test"]
        == ("user_unknown", "bounce", "all", None)
    )


def arf(feedback_type: str = "abuse") -> BounceReport:
    raw = (
        "From: staff@hotmail.example\r\n"
        "To: abuse@return.postbode.localhost\r\n"
        "Subject: complaint about message from 192.0.2.1\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="A"\r\n'
        "\r\n--A\r\nContent-Type: text/plain\r\n\r\nThis is an email abuse report.\r\n"
        "--A\r\nContent-Type: message/feedback-report\r\n\r\n"
        f"Feedback-Type: {feedback_type}\r\nUser-Agent: SomeGenerator/1.0\r\nVersion: 1\r\n"
        "Original-Rcpt-To: <bob@dest.test>\r\n"
        "--A\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        "From: <orders@shop.test>\r\nTo: <bob@dest.test>\r\nMessage-ID: <m1@shop.test>\r\n"
        "\r\n--A--\r\n"
    ).encode()
    report = parse(raw)
    assert report.kind == "complaint"
    return report


def complain(store: Store, delivery_id: uuid.UUID, report: BounceReport) -> str:
    with store.write() as conn:
        target = load_target(conn, delivery_id)
        assert target is not None
        return apply_complaint(conn, target, report, utcnow())


def test_a_complaint_records_the_event_and_suppresses_on_its_stream(
    store: Store, app_id: int
) -> None:
    delivery_id = sent(store, app_id)
    assert complain(store, delivery_id, arf()) == "complained"
    assert complain(store, delivery_id, arf()) == "duplicate"
    [(kind, data)] = event_list(store, delivery_id)
    assert kind == "message.complained"
    assert data == {"feedback_type": "abuse", "source": "arf"}
    [entry] = listed(store)
    assert (entry["email"], entry["reason"], entry["source"], entry["stream"]) == (
        "bob@dest.test",
        "complaint",
        "complaint",
        "transactional",
    )
    assert entry["expires_at"] is None
    assert delivery(store, delivery_id)["status"] == "delivered"


def test_authentication_failure_reports_are_no_complaints(store: Store, app_id: int) -> None:
    delivery_id = sent(store, app_id)
    assert complain(store, delivery_id, arf("auth-failure")) == "ignored"
    assert event_list(store, delivery_id) == [] and listed(store) == []


def test_an_opt_out_report_unsubscribes(store: Store, app_id: int) -> None:
    delivery_id = sent(store, app_id)
    assert complain(store, delivery_id, arf("opt-out")) == "unsubscribed"
    assert [k for k, _ in event_list(store, delivery_id)] == ["message.unsubscribed"]
    assert [(e["reason"], e["source"]) for e in listed(store)] == [("unsubscribed", "unsubscribe")]


def test_control_characters_in_a_report_are_stored_as_spaces(store: Store, app_id: int) -> None:
    """PostgreSQL text holds no NUL; a hostile diagnostic must not fail the transaction."""
    delivery_id = sent(store, app_id)
    rec = BounceRecord(
        "bob@dest.test",
        "5.1.1",
        550,
        "User\x00unknown\x1b[31m",
        "user_unknown",
        True,
        action="failed",
    )
    with store.write() as conn:
        target = load_target(conn, delivery_id)
        assert target is not None
        assert apply_dsn(conn, target, rec, POLICY, utcnow()) == "bounced"
    assert delivery(store, delivery_id)["last_reply"] == "User unknown [31m"
    [(_, data)] = event_list(store, delivery_id)
    assert data["diagnostic"] == "User unknown [31m"
    assert listed(store)[0]["detail"] == "User unknown [31m"


def test_dsn_bounces_and_complaints_count_under_the_messages_template(
    store: Store, app_id: int
) -> None:
    from postbode.store.schema import messages

    bounced, complained = sent(store, app_id), sent(store, app_id, "cy@dest.test")
    with store.write() as conn:
        ids = select(deliveries.c.message_id).where(deliveries.c.id.in_([bounced, complained]))
        conn.execute(
            update(messages).where(messages.c.id.in_(ids)).values(template="welcome", tag="t")
        )
    assert apply(store, bounced, USER_UNKNOWN) == "bounced"
    assert complain(store, complained, arf()) == "complained"
    with store.read() as conn:
        rows = conn.execute(
            select(stat_counters.c.event_type, stat_counters.c.tag, stat_counters.c.template)
        ).all()
    assert sorted(tuple(r) for r in rows) == [
        ("delivery.bounced", "t", "welcome"),
        ("message.complained", "t", "welcome"),
    ]
