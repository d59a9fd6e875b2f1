"""Report periods in the organisation's time zone: weeks start at local midnight Monday and
months at local midnight on the 1st, across DST changes; mail sent a minute before or after
local midnight lands in the right period, on both stores; the CSV, text and HTML show local
times."""

from __future__ import annotations

import csv
import io
import zlib
from datetime import UTC, date, datetime, timedelta
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select, update

from postbode import tenancy
from postbode.ingest.system_mail import queue_system_mail
from postbode.stats import reports, rollup
from postbode.store.engine import Store
from postbode.store.schema import (
    app_alerts,
    apps,
    events,
    messages,
    organizations,
    raw_messages,
    stat_counters,
    users,
)

AUCKLAND = ZoneInfo("Pacific/Auckland")
LOS_ANGELES = ZoneInfo("America/Los_Angeles")
MINUTE = timedelta(minutes=1)


def test_a_week_starts_at_local_midnight_monday_across_a_dst_change() -> None:
    # Los Angeles springs forward on Sunday 8 March 2026: that week has 167 hours.
    now = datetime(2026, 3, 9, 7, 10, tzinfo=UTC)  # Monday 00:10 PDT
    week = reports.last_complete("weekly", now, LOS_ANGELES)
    assert week.since == datetime(2026, 3, 2, 8, tzinfo=UTC)  # Monday 00:00 PST (-8)
    assert week.until == datetime(2026, 3, 9, 7, tzinfo=UTC)  # Monday 00:00 PDT (-7)
    assert week.until - week.since == timedelta(hours=167)
    assert week.previous_since == datetime(2026, 2, 23, 8, tzinfo=UTC)
    assert week.key == "2026-W10" and week.zone == "America/Los_Angeles"
    assert week.title == "week 2026-W10 (02 Mar to 08 Mar 2026)"
    # Five minutes earlier it is still Sunday there: the week before is the last complete one.
    earlier = reports.last_complete("weekly", now - timedelta(minutes=15), LOS_ANGELES)
    assert earlier.key == "2026-W09" and earlier.until == week.since

    # Auckland falls back on Sunday 5 April 2026 (NZDT +13 to NZST +12): 169 hours.
    week = reports.last_complete("weekly", datetime(2026, 4, 5, 12, 0, tzinfo=UTC), AUCKLAND)
    assert week.since == datetime(2026, 3, 29, 11, tzinfo=UTC)  # Monday 30 March, NZDT
    assert week.until == datetime(2026, 4, 5, 12, tzinfo=UTC)  # Monday 6 April, NZST
    assert week.until - week.since == timedelta(hours=169)
    # On that Monday morning in Auckland it is still Sunday in UTC: UTC's week is another.
    utc_week = reports.last_complete("weekly", datetime(2026, 4, 5, 12, 0, tzinfo=UTC))
    assert utc_week.key == "2026-W13" and week.key == "2026-W14"


def test_a_month_starts_at_local_midnight_on_the_first() -> None:
    # 1 April 00:30 in Auckland is 31 March 11:30 UTC: March is complete there, not in UTC.
    now = datetime(2026, 3, 31, 11, 30, tzinfo=UTC)
    month = reports.last_complete("monthly", now, AUCKLAND)
    assert month.key == "2026-03" and month.title == "March 2026"
    assert month.since == datetime(2026, 2, 28, 11, tzinfo=UTC)  # 1 March 00:00 NZDT
    assert month.until == datetime(2026, 3, 31, 11, tzinfo=UTC)  # 1 April 00:00 NZDT
    assert month.previous_since == datetime(2026, 1, 31, 11, tzinfo=UTC)
    assert reports.last_complete("monthly", now).key == "2026-02"
    # Los Angeles falls back on 1 November: October ends at 00:00 PDT, November at PST.
    month = reports.last_complete("monthly", datetime(2026, 12, 1, 9, tzinfo=UTC), LOS_ANGELES)
    assert month.since == datetime(2026, 11, 1, 7, tzinfo=UTC)
    assert month.until == datetime(2026, 12, 1, 8, tzinfo=UTC)


def test_a_midnight_that_dst_skips_starts_the_day_at_its_first_instant() -> None:
    # Santiago springs forward at midnight: Sunday 6 September 2026 begins at 01:00 (-03),
    # the instant after Saturday 23:59:59 (-04).
    santiago = ZoneInfo("America/Santiago")
    assert reports._midnight(date(2026, 9, 6), santiago) == datetime(2026, 9, 6, 4, tzinfo=UTC)
    assert reports._midnight(date(2026, 9, 7), santiago) == datetime(2026, 9, 7, 3, tzinfo=UTC)


def _org_in(store: Store, zone: str) -> tuple[int, int, int]:
    """(organization id, app id, user id) of a fresh organisation in `zone`."""
    app = tenancy.create_app(store, f"shop-{zone.replace('/', '-').lower()}")
    tenancy.create_user(store, f"owner@{app.app_id}.test", "correct horse battery")
    with store.write() as conn:
        org_id = conn.execute(
            select(apps.c.organization_id).where(apps.c.id == app.app_id)
        ).scalar_one()
        conn.execute(
            update(organizations).where(organizations.c.id == org_id).values(time_zone=zone)
        )
        user_id = conn.execute(
            select(users.c.id).where(users.c.email == f"owner@{app.app_id}.test")
        ).scalar_one()
    return int(org_id), app.app_id, int(user_id)


def _received_at(store: Store, app_id: int, *times: datetime) -> None:
    with store.write() as conn:
        for at in times:
            queue_system_mail(
                conn,
                app_id=app_id,
                sender="orders@shop.test",
                recipients=["ann@dest.test"],
                subject=f"sent at {at.isoformat()}",
                body="hi",
                tag="order",
                now=at,
            )


@pytest.mark.parametrize(
    ("zone", "kind", "boundary", "start", "now"),
    [
        # Los Angeles, the week across spring forward: Monday 2 and 9 March, local midnight.
        (
            "America/Los_Angeles",
            "weekly",
            datetime(2026, 3, 2, 8, tzinfo=UTC),
            datetime(2026, 3, 9, 7, tzinfo=UTC),
            datetime(2026, 3, 9, 7, 20, tzinfo=UTC),
        ),
        # Auckland, the week across fall back: Monday 30 March and 6 April, local midnight.
        (
            "Pacific/Auckland",
            "weekly",
            datetime(2026, 3, 29, 11, tzinfo=UTC),
            datetime(2026, 4, 5, 12, tzinfo=UTC),
            datetime(2026, 4, 5, 12, 20, tzinfo=UTC),
        ),
        # Auckland, April across fall back: 1 April 00:00 NZDT to 1 May 00:00 NZST.
        (
            "Pacific/Auckland",
            "monthly",
            datetime(2026, 3, 31, 11, tzinfo=UTC),
            datetime(2026, 4, 30, 12, tzinfo=UTC),
            datetime(2026, 4, 30, 12, 20, tzinfo=UTC),
        ),
    ],
)
def test_mail_a_minute_either_side_of_local_midnight_lands_in_its_period(
    store: Store, zone: str, kind: str, boundary: datetime, start: datetime, now: datetime
) -> None:
    """`boundary` starts the reported period, `start` starts the next (incomplete) one."""
    org_id, app_id, user_id = _org_in(store, zone)
    _received_at(
        store,
        app_id,
        boundary - MINUTE,  # the previous period
        boundary,  # this period, its first minute
        boundary + MINUTE,  # this period
        start - MINUTE,  # this period, its last minute
        start,  # the next period: not reported yet
        start + MINUTE,
    )
    with store.write() as conn:
        conn.execute(
            app_alerts.insert().values(
                app_id=app_id, kind="volume_drop", figures={}, created_at=start - MINUTE
            )
        )

    with store.read() as conn:
        tz = reports.organization_zone(conn, org_id)
    assert tz.key == zone
    period = reports.last_complete(kind, now, tz)
    assert (period.since, period.until) == (boundary, start)
    report = reports.build(store, [app_id], "shop", period)
    assert (report.now.received, report.previous.received) == (3, 1)
    assert [a["kind"] for a in report.alerts] == ["volume_drop"]
    # A month later every counter row of then is merged into UTC days, which local midnight
    # cuts through: the figures stay the same.
    rollup.compact(store, now=now + timedelta(days=40))
    with store.read() as conn:
        sizes = conn.execute(
            select(stat_counters.c.bucket).where(stat_counters.c.app_id == app_id)
        ).scalars()
        assert {(b.hour, b.minute) for b in sizes} == {(0, 0)}
    again = reports.build(store, [app_id], "shop", period)
    assert (again.now.received, again.previous.received) == (3, 1)

    # The CSV, the text and the HTML tell local times.
    local_start = start.astimezone(tz)
    assert local_start.hour == 0 and local_start.minute == 0
    rows = list(csv.reader(io.StringIO(reports.csv_text(report))))
    assert rows[1] == ["period", kind, boundary.astimezone(tz).isoformat(), ""]
    assert rows[2] == ["period", "until", local_start.isoformat(), ""]
    assert rows[3] == ["period", "time_zone", zone, ""]
    alert_at = (start - MINUTE).astimezone(tz).isoformat()
    assert rows[-1][:2] == ["alert", "volume_drop"] and rows[-1][3] == alert_at
    last_minute = f"{(start - MINUTE).astimezone(tz):%Y-%m-%d} 23:59"
    assert f"  {last_minute}  {rows[-1][2]}: volume_drop" in reports.text(report)
    assert f"Times are {zone}." in reports.text(report)
    assert last_minute in reports.html(report)

    # The e-mail goes out once for the period, judged in the organisation's zone.
    reports.subscribe(store, org_id, user_id, kind)
    assert reports.send_due(store, "reports@postbode.test", now=now) == 1
    assert reports.send_due(store, "reports@postbode.test", now=now + MINUTE) == 0
    with store.read() as conn:
        raw = conn.execute(
            select(raw_messages.c.data)
            .join(messages, messages.c.id == raw_messages.c.message_id)
            .where(messages.c.app_id == app_id, messages.c.tag == reports.REPORT_TAG)
        ).scalar_one()
    mail = message_from_bytes(zlib.decompress(raw), policy=default)
    assert isinstance(mail, EmailMessage)
    assert mail.get_content_type() == "multipart/alternative"
    assert str(mail["Subject"]).strip().endswith(f"{kind} report: default, {period.title}")
    plain = mail.get_body(("plain",))
    rich = mail.get_body(("html",))
    assert plain is not None and rich is not None
    assert isinstance(plain, EmailMessage) and isinstance(rich, EmailMessage)
    assert "Times are " + zone in plain.get_content()
    page = rich.get_content()
    assert "<script" not in page.lower() and "<style" not in page.lower()
    assert 'style="' in page  # the CSS went inline
    assert last_minute in page


def test_a_slice_whose_events_retention_deleted_falls_back_to_the_days_counters(
    store: Store,
) -> None:
    """Once the event rows of a cut UTC day are gone, its day row of counters counts in the
    period where that UTC day starts: less exact, never lost or counted twice."""
    _, app_id, _ = _org_in(store, "America/Los_Angeles")
    boundary = datetime(2026, 3, 2, 8, tzinfo=UTC)  # Monday 2 March 00:00 PST
    _received_at(store, app_id, boundary - MINUTE, boundary, boundary + MINUTE)
    period = reports.last_complete("weekly", datetime(2026, 3, 9, 7, 20, tzinfo=UTC), LOS_ANGELES)
    rollup.compact(store, now=datetime(2026, 4, 20, tzinfo=UTC))
    report = reports.build(store, [app_id], "shop", period)
    assert (report.now.received, report.previous.received) == (2, 1)
    with store.write() as conn:
        conn.execute(
            events.delete().where(events.c.app_id == app_id, events.c.type == "message.received")
        )
    report = reports.build(store, [app_id], "shop", period)
    # The 2 March UTC day row (all three) starts at 00:00 UTC, in the week before.
    assert (report.now.received, report.previous.received) == (0, 3)
