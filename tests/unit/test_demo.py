"""The demo seeder: realistic, self-consistent traffic (events, counters, deliveries and
suppressions agree), readable through the API and the statistics, on both stores."""

from __future__ import annotations

import json
import random
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.dialects import postgresql, sqlite
from typer.testing import CliRunner

from postbode import demo
from postbode.cli import app as cli
from postbode.config import Settings, get_settings
from postbode.stats import queries
from postbode.store.engine import Store
from postbode.store.schema import (
    UTCDateTime,
    deliveries,
    events,
    messages,
    raw_messages,
    stat_counters,
    suppressions,
)
from postbode.testing.factories import make_app
from postbode.web.app import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Starlette's TestClient warns when it runs on httpx
    from fastapi.testclient import TestClient

STATUSES = {"queued", "deferred", "delivered", "bounced", "failed", "suppressed", "held"}


# -- pure parts ----------------------------------------------------------------------------------


def test_uuid7_carries_the_instant_and_sorts_by_it() -> None:
    ms = 1_773_000_000_123
    value = uuid.UUID(int=demo.uuid7(ms, (1 << 74) - 1))
    assert value.version == 7 and value.variant == uuid.RFC_4122
    assert value.int >> 80 == ms
    assert demo.uuid7(ms, (1 << 74) - 1) < demo.uuid7(ms + 1, 0)


def test_encoder_writes_what_sqlalchemy_writes() -> None:
    rng = random.Random(4)
    for dialect in (sqlite.dialect(), postgresql.dialect()):
        enc = demo._Encoder(dialect.name)
        bind = UTCDateTime().dialect_impl(dialect).bind_processor(dialect) or (lambda v: v)
        for _ in range(2000):
            ms = rng.randrange(0, 4_000_000_000_000)
            at = datetime.fromtimestamp(ms // 1000, UTC).replace(microsecond=ms % 1000 * 1000)
            assert enc.ts(ms) == bind(at)


def test_plan_follows_the_rhythm_and_sends_newsletters_in_campaigns() -> None:
    end = datetime(2026, 3, 12, 12, tzinfo=UTC)  # a Thursday
    start = end - timedelta(days=28)
    plan = demo.plan_times(40_000, start, end, random.Random(1))
    assert len(plan) == 40_000
    times = [at for at, _, _ in plan]
    assert times == sorted(times)
    assert start.timestamp() * 1000 <= times[0] and times[-1] < end.timestamp() * 1000
    tags = Counter(demo.TAGS[i].tag for _, i, _ in plan)
    assert set(tags) == {t.tag for t in demo.TAGS}
    assert tags["order-confirmation"] > tags["welcome"]
    hours = Counter(datetime.fromtimestamp(at / 1000, UTC).hour for at, i, _ in plan if i != 5)
    assert hours[10] > 4 * hours[3]  # busy mornings, quiet nights
    days = Counter(datetime.fromtimestamp(at / 1000, UTC).weekday() for at, _, _ in plan)
    assert days[1] > 1.4 * days[6]  # Tuesdays (newsletter day) beat Sundays
    for at, i, campaign in plan:
        if demo.TAGS[i].stream == "broadcast":
            sent = datetime.fromtimestamp(at / 1000, UTC)
            assert campaign >= 0 and sent.weekday() in (1, 3) and sent.hour == 9


def test_hourly_weights_dip_at_night_and_on_weekends() -> None:
    monday = datetime(2026, 3, 2, tzinfo=UTC)
    weights = demo.hourly_weights(monday, 7 * 24, random.Random(2))
    assert weights[3] < 0.2 * max(weights[:24])
    weekday = sum(weights[24:48])
    sunday = sum(weights[6 * 24 :])
    assert sunday < 0.8 * weekday


# -- seeding a store -----------------------------------------------------------------------------


@pytest.fixture
def seeded(store: Store) -> Iterator[tuple[demo.SeedReport, str]]:
    app = make_app(store, "demo")
    report = demo.seed(store, messages=1500, app="demo", days=7, rng=random.Random(11))
    yield report, app.api_key


def test_seeding_writes_consistent_rows(store: Store, seeded: tuple[demo.SeedReport, str]) -> None:
    report, _ = seeded
    assert report.messages == 1500 and report.domain == "demo.test"
    with store.read() as conn:
        n_messages = conn.execute(select(func.count()).select_from(messages)).scalar()
        n_deliveries = conn.execute(select(func.count()).select_from(deliveries)).scalar()
        by_type = dict(
            conn.execute(select(events.c.type, func.count()).group_by(events.c.type)).all()
        )
        counted = {
            t: (int(n), int(b))
            for t, n, b in conn.execute(
                select(
                    stat_counters.c.event_type,
                    func.sum(stat_counters.c.count),
                    func.sum(stat_counters.c.bot_count),
                ).group_by(stat_counters.c.event_type)
            )
        }
        bots = Counter(
            t
            for t, data in conn.execute(select(events.c.type, events.c.data))
            if (data or {}).get("bot")
        )
        status = dict(
            conn.execute(
                select(deliveries.c.status, func.count()).group_by(deliveries.c.status)
            ).all()
        )
        order_by_id = list(conn.execute(select(messages.c.id).order_by(messages.c.id)).scalars())
        order_by_time = list(
            conn.execute(
                select(messages.c.id).order_by(messages.c.received_at, messages.c.id)
            ).scalars()
        )
        suppressed = {
            r.email for r in conn.execute(select(suppressions.c.email, suppressions.c.stream))
        }
        suppressed_to = set(
            conn.execute(
                select(deliveries.c.recipient).where(deliveries.c.status == "suppressed")
            ).scalars()
        )
        raw_kept = conn.execute(select(func.count()).select_from(raw_messages)).scalar()
        purged = conn.execute(
            select(func.count()).where(messages.c.raw_purged_at.is_not(None))
        ).scalar()
    assert n_messages == 1500 and n_deliveries == report.deliveries >= 1500
    assert sum(by_type.values()) == report.events
    # The counters say exactly what the events say, bots included.
    assert {t: n for t, (n, _) in counted.items()} == by_type
    assert {t: b for t, (_, b) in counted.items() if b} == dict(bots)
    assert by_type["message.received"] == 1500
    assert by_type["delivery.queued"] + by_type["delivery.suppressed"] == n_deliveries
    assert set(status) <= STATUSES
    assert status["delivered"] / n_deliveries > 0.85
    assert status.get("bounced", 0) > 0 and bots["message.opened"] > 0
    assert status == report.statuses
    assert order_by_id == order_by_time  # ids are UUIDv7 of the time received
    assert suppressed_to <= suppressed
    assert raw_kept + purged == 1500 and raw_kept > 0 and purged > 0


def test_seeded_mail_reads_through_the_api_and_stats(
    store: Store, settings: Settings, seeded: tuple[demo.SeedReport, str]
) -> None:
    report, key = seeded
    auth = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(settings, store)) as client:
        page = client.get("/api/v1/messages", params={"limit": 5}, headers=auth).json()
        assert len(page["data"]) == 5 and page["next_cursor"]
        newest = page["data"][0]
        assert newest["tag"] in {t.tag for t in demo.TAGS}
        assert newest["recipients"][0]["email"].startswith("user")
        detail = client.get(f"/api/v1/messages/{newest['id']}", headers=auth).json()
        assert detail["events"][0]["type"] == "message.received"
        bounced = client.get(
            "/api/v1/messages", params={"status": "bounced", "limit": 1}, headers=auth
        ).json()["data"][0]
        found = client.get(f"/api/v1/messages/{bounced['id']}", headers=auth).json()
        bounce = next(r for r in found["recipients"] if r["status"] == "bounced")
        assert bounce["bounce_category"] and bounce["last_reply"]
        stats = client.get("/api/v1/stats", params={"range": "7d"}, headers=auth).json()
    summary = stats["summary"]
    assert 0.9 * report.deliveries < summary["sent"] <= report.deliveries  # 7d: whole hours
    assert 0.85 < summary["rates"]["delivery_rate"] < 0.995
    assert 0.1 < summary["rates"]["open_rate"] < 0.8
    reasons = queries.top_bounce_reasons(store, [report.app_id], "7d")
    assert reasons and reasons[0].count > 0


def test_seeding_again_adds_up(store: Store) -> None:
    first = demo.seed(store, messages=200, app="twice", days=2, rng=random.Random(1))
    second = demo.seed(store, messages=300, app="twice", days=2, rng=random.Random(2))
    assert first.app_id == second.app_id and first.domain == second.domain
    with store.read() as conn:
        counted = conn.execute(select(func.sum(stat_counters.c.count))).scalar()
    assert counted == first.events + second.events


def test_seeding_leaves_pooled_sqlite_connections_durable(sqlite_store: Store) -> None:
    demo.seed(sqlite_store, messages=50, app="pool", days=1, rng=random.Random(3))
    for _ in range(3):
        with sqlite_store.read() as conn:
            assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL


def test_cli_seed(store: Store, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("postbode.cli._store", lambda: store)  # no second engine to leak
    monkeypatch.setenv("POSTBODE_DATA_DIR", str(settings.data_dir))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(
            cli,
            [
                "demo",
                "seed",
                "--messages",
                "120",
                "--app",
                "cli-demo",
                "--days",
                "3",
                "--seed",
                "5",
                "--json",
            ],
        )
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["app"] == "cli-demo" and report["messages"] == 120
        bad = CliRunner().invoke(cli, ["demo", "seed", "--messages", "5", "--app", "Bad Name"])
        assert bad.exit_code == 2 and "invalid app name" in bad.stderr
    finally:
        get_settings.cache_clear()
