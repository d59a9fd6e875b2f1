"""The migrations build the schema the code declares, on both dialects, and go down and up."""

from __future__ import annotations

import warnings
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from postbode.store.engine import Store
from postbode.store.migrate import current_revision, downgrade, head_revision, migrate
from postbode.store.schema import metadata

# Expression indexes cannot be compared by autogenerate (they are written by hand).
EXPRESSION_INDEXES = {
    "ix_deliveries_app_id_lower_recipient",
    "ix_deliveries_app_id_lower_recipient_message_id",
}


def differences(store: Store) -> list[object]:
    with store.engine.connect() as conn, warnings.catch_warnings():
        # SQLAlchemy cannot reflect SQLite's expression indexes, and says so.
        warnings.filterwarnings("ignore", "Skipped unsupported reflection")
        warnings.filterwarnings("ignore", "autogenerate skipping metadata-specified expression")
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        found = compare_metadata(context, metadata)
    return [
        d
        for d in found
        if not (
            isinstance(d, tuple)
            and d[0] in ("add_index", "remove_index")
            and getattr(d[1], "name", None) in EXPRESSION_INDEXES
        )
    ]


def test_the_migrated_schema_is_the_declared_one(store: Store) -> None:
    assert current_revision(store) == head_revision()
    assert differences(store) == []


def test_the_newest_migration_goes_down_and_up_again(store: Store) -> None:
    downgrade(store, "-1")
    assert current_revision(store) != head_revision()
    migrate(store, "head")
    assert current_revision(store) == head_revision()
    assert differences(store) == []
    assert "worker_roles" in inspect(store.engine).get_table_names()


def test_the_head_read_from_the_scripts_is_alembics() -> None:
    # Processes at the head revision check it without loading alembic (postbode/store/migrate.py).
    from postbode.store.migrate import _alembic_head, _head_from_scripts

    assert _head_from_scripts() is not None
    assert _head_from_scripts() == _alembic_head() == head_revision()


def test_a_database_without_a_schema_has_no_revision(tmp_path: Path) -> None:
    empty = Store(create_engine(f"sqlite:///{tmp_path / 'empty.db'}"), None, "secret")
    try:
        assert current_revision(empty) is None
    finally:
        empty.dispose()


def test_names_per_organisation_keep_every_row_on_the_way(store: Store) -> None:
    """0015 copies `apps` on SQLite: the apps' credentials and domains survive it both ways."""
    from sqlalchemy import func, select

    from postbode import tenancy
    from postbode.store.schema import credentials, domains

    tenancy.create_app(store, "shop")
    tenancy.add_domain(store, "shop", "shop.test")

    def counted() -> tuple[int, int]:
        with store.read() as conn:
            return (
                conn.execute(select(func.count()).select_from(credentials)).scalar_one(),
                conn.execute(select(func.count()).select_from(domains)).scalar_one(),
            )

    downgrade(store, "0014")
    assert counted() == (2, 1)
    migrate(store)
    assert counted() == (2, 1)


def test_counters_per_template_merge_on_the_way_down(store: Store) -> None:
    """0017 puts the template in stat_counters' key; going down, rows that differ only by
    template become one row with their sums, and going up they stay (as template '')."""
    from datetime import UTC, datetime

    from sqlalchemy import select, text

    from postbode.events.record import Event, record
    from postbode.events.types import EventType
    from postbode.testing.factories import make_app

    app = make_app(store).app_id
    at = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
    with store.write() as conn:
        record(
            conn,
            [
                Event(app, EventType.MESSAGE_OPENED, tag="t", template=alias, at=at, bot=bot)
                for alias, bot in (("welcome", True), ("receipt", False), (None, False))
            ],
        )
    downgrade(store, "0016")
    with store.read() as conn:
        rows = conn.execute(text("SELECT tag, count, bot_count FROM stat_counters")).all()
    assert [tuple(r) for r in rows] == [("t", 3, 1)]
    migrate(store)
    from postbode.store.schema import stat_counters

    with store.read() as conn:
        after = conn.execute(
            select(stat_counters.c.template, stat_counters.c.count, stat_counters.c.bot_count)
        ).all()
    assert [tuple(r) for r in after] == [("", 3, 1)]


def test_bounce_counters_are_filled_from_the_events_on_the_way_up(store: Store) -> None:
    """0019 counts the delivery.bounced events the store holds into bounce_counters: the same
    rows the events bumped as they were recorded (each with its message's stream and tag)."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import select, update

    from postbode.events.record import Event, record
    from postbode.events.types import EventType
    from postbode.store.schema import bounce_counters, messages
    from postbode.testing.factories import make_app, make_queued_message

    app = make_app(store).app_id
    tagged, _ = make_queued_message(store, app, ["a@dest.test"])
    plain, _ = make_queued_message(store, app, ["b@dest.test"])
    at = datetime(2026, 3, 1, 9, 30, 17, 250_000, tzinfo=UTC)
    with store.write() as conn:
        conn.execute(
            update(messages)
            .where(messages.c.id == tagged)
            .values(tag="welcome", stream="broadcast")
        )
        record(
            conn,
            [
                Event(
                    app,
                    EventType.DELIVERY_BOUNCED,
                    stream="broadcast",
                    tag="welcome",
                    message_id=tagged,
                    at=at + timedelta(seconds=s),
                    data={"category": "user_unknown", "hard": True},
                )
                for s in (0, 20, 50)  # two in one minute, one in the next
            ]
            + [
                Event(
                    app,
                    EventType.DELIVERY_BOUNCED,
                    message_id=plain,
                    at=at,
                    data={"category": "mailbox_full", "hard": False},
                ),
                Event(app, EventType.DELIVERY_BOUNCED, message_id=plain, at=at, data={}),
                Event(app, EventType.DELIVERY_DELIVERED, message_id=plain, at=at),
            ],
        )

    def rows() -> list[tuple[object, ...]]:
        with store.read() as conn:
            return [
                tuple(r)
                for r in conn.execute(
                    select(bounce_counters).order_by(*bounce_counters.primary_key.columns)
                )
            ]

    live = rows()
    assert sorted((r[4], r[5], r[6]) for r in live) == [
        ("mailbox_full", False, 1),
        ("unknown", False, 1),
        ("user_unknown", True, 1),
        ("user_unknown", True, 2),
    ]
    downgrade(store, "0018")
    assert "bounce_counters" not in inspect(store.engine).get_table_names()
    migrate(store)
    assert rows() == live


def test_the_planner_knows_which_apps_use_a_tag_on_postgresql(private_pg_store: Store) -> None:
    """0021: with the (app_id, tag) statistics the planner expects next to none of an app's
    messages under another app's tag; estimated column by column it expected hundreds."""
    import json

    from sqlalchemy import insert

    from postbode.store.schema import messages, new_id
    from postbode.testing.factories import make_app

    store = private_pg_store  # its statistics are analysed here: not the session's database
    shop, forum = make_app(store).app_id, make_app(store).app_id
    row = {"source": "api", "message_id_header": "<m@shop.test>", "mail_from": "a@shop.test"}
    with store.write() as conn:
        conn.execute(
            insert(messages),
            [
                {**row, "id": new_id(), "app_id": app, "tag": tag, "size": 1}
                for app, tags in ((shop, ("invoice", "welcome")), (forum, ("reply", "digest")))
                for i in range(2000)
                for tag in tags[i % 2 :][:1]
            ],
        )

    def expected_rows() -> float:
        with store.engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE messages")
            plan = conn.exec_driver_sql(
                "EXPLAIN (FORMAT JSON) SELECT id FROM messages WHERE app_id = %s AND tag = %s",
                (forum, "invoice"),
            ).scalar_one()
            conn.commit()
        plan = json.loads(plan) if isinstance(plan, str) else plan
        return float(plan[0]["Plan"]["Plan Rows"])

    downgrade(store, "0020")
    assert expected_rows() > 200  # a quarter of 4,000: the two columns taken apart
    migrate(store)
    assert expected_rows() < 20
