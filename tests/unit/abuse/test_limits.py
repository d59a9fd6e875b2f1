"""Sending limits: windows, counting in the store, refusals that take no place, the alert."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from postbode import tenancy
from postbode.abuse import limits
from postbode.store.engine import Store
from postbode.store.schema import app_alerts, send_counters


def test_windows_are_aligned_and_say_how_long_is_left() -> None:
    at = datetime(2026, 12, 7, 15, 20, 42, 500_000, tzinfo=UTC)
    assert limits.window(at, "minute") == (datetime(2026, 12, 7, 15, 20, tzinfo=UTC), 18)
    assert limits.window(at, "hour") == (datetime(2026, 12, 7, 15, 0, tzinfo=UTC), 2358)
    assert limits.window(at, "day")[0] == datetime(2026, 12, 7, tzinfo=UTC)


def test_credential_lookup_is_the_public_part_of_a_key() -> None:
    assert limits.credential_lookup("pb_abc123_secret_part") == "abc123"
    assert limits.credential_lookup("nope") is None
    assert limits.credential_lookup("pb_") is None


def counts(store: Store) -> dict[tuple[str, str], int]:
    with store.read() as conn:
        rows = conn.execute(
            select(send_counters.c.scope, send_counters.c.period, send_counters.c.count)
        )
        return {(r.scope, r.period): r.count for r in rows}


def test_a_limit_refuses_what_is_over_and_counts_only_what_it_took(store: Store) -> None:
    shop = tenancy.create_app(store, "shop")
    other = tenancy.create_app(store, "other")
    with store.write() as conn:
        assert limits.set_limits(conn, shop.app_id, {"per_minute": 3, "per_day": 100}) == (
            limits.Limits(3, None, 100)
        )
        with pytest.raises(ValueError, match="per_hour"):
            limits.set_limits(conn, shop.app_id, {"per_hour": -1})
    gate = limits.Gate(store)
    now = datetime(2026, 12, 7, 15, 20, 1, tzinfo=UTC)
    batch = [(shop.app_id, None)] * 5 + [(other.app_id, None)]
    answers = gate.take(batch, now=now)
    assert answers[:3] == [None, None, None] and answers[5] is None
    over = answers[3]
    assert over is not None and (over.scope, over.name, over.period, over.limit) == (
        "app",
        "shop",
        "minute",
        3,
    )
    assert over.retry_after == 59 and over.field == "per_minute"
    assert answers[4] == over
    assert gate.take([(shop.app_id, None)], now=now)[0] is not None
    assert counts(store) == {(f"app:{shop.app_id}", "minute"): 3, (f"app:{shop.app_id}", "day"): 3}
    # the next minute has room again; the day counts on
    later = datetime(2026, 12, 7, 15, 21, 0, tzinfo=UTC)
    assert gate.take([(shop.app_id, None)], now=later) == [None]
    with store.read() as conn:
        alerts = conn.execute(select(app_alerts.c.kind, app_alerts.c.figures)).all()
    assert [a.kind for a in alerts] == ["limit"]  # once an hour, however many refusals
    assert alerts[0].figures["limit"] == 3


def test_a_credential_has_limits_of_its_own(store: Store) -> None:
    shop = tenancy.create_app(store, "shop")
    lookup = limits.credential_lookup(shop.api_key)
    assert lookup is not None
    cred_id = next(
        c["id"] for c in tenancy.list_credentials(store, "shop") if c["lookup"] == lookup
    )
    with store.write() as conn:
        limits.set_limits(conn, shop.app_id, {"per_hour": 2}, credential_id=cred_id)
        with pytest.raises(LookupError):
            limits.get_limits(conn, shop.app_id, credential_id=cred_id + 1000)
    gate = limits.Gate(store)
    now = datetime(2026, 12, 7, 15, 20, 1, tzinfo=UTC)
    answers = gate.take([(shop.app_id, lookup)] * 3 + [(shop.app_id, "someone-else")], now=now)
    assert answers[:2] == [None, None] and answers[3] is None
    assert answers[2] is not None and answers[2].scope == "credential"
    assert answers[2].name == lookup


def test_no_limit_no_write(sqlite_store: Store) -> None:
    shop = tenancy.create_app(sqlite_store, "shop")
    assert limits.Gate(sqlite_store).take([(shop.app_id, None)] * 10) == [None] * 10
    assert counts(sqlite_store) == {}


def test_old_counters_are_purged(store: Store) -> None:
    shop = tenancy.create_app(store, "shop")
    with store.write() as conn:
        limits.set_limits(conn, shop.app_id, {"per_minute": 5})
    gate = limits.Gate(store)
    gate.take([(shop.app_id, None)], now=datetime(2026, 12, 1, tzinfo=UTC))
    gate.take([(shop.app_id, None)], now=datetime(2026, 12, 7, 15, tzinfo=UTC))
    assert limits.purge_counters(store, now=datetime(2026, 12, 7, 15, 1, tzinfo=UTC)) == 1
    assert counts(store) == {(f"app:{shop.app_id}", "minute"): 1}
