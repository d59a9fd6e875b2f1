"""`postbode privacy erase`: afterwards no row of any table holds the person's address or IP (in
clear, in JSON, or inside a compressed body), statistics are as they were, a suppressed address
stays suppressed, and on SQLite the bytes are gone from the database file and its WAL. The
export taken before holds everything the store held about the person."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
import uuid
import zlib
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from postbode.delivery.worker import DeliveryWorker
from postbode.stats.queries import top_bounce_reasons
from postbode.store.schema import (
    attempts,
    deliveries,
    events,
    messages,
    metadata,
    stat_counters,
    suppressions,
)
from postbode.testing.servers import LoopThread
from postbode.web.app import create_app

from .conftest import IP_PREFIX, OTHER, PERSON, Installation, make_traces


def _texts(value: Any) -> list[str]:
    """What a stored value can be read as: text, JSON, and bytes also decompressed."""
    if value is None:
        return []
    if isinstance(value, bytes | memoryview):
        data = bytes(value)
        found = [data.decode("latin-1")]
        with contextlib.suppress(zlib.error):
            found.append(zlib.decompress(data).decode("latin-1"))
        return found
    if isinstance(value, dict | list):
        return [json.dumps(value)]
    return [str(value)]


def scan(inst: Installation, *needles: str) -> list[str]:
    """Every (table.column, needle) where a needle occurs, in any row of any table."""
    hits = []
    with inst.store.read() as conn:
        for table in metadata.sorted_tables:
            for row in conn.execute(select(table)).mappings():
                for column, value in row.items():
                    for text in _texts(value):
                        for needle in needles:
                            if needle in text.lower():
                                hits.append(f"{table.name}.{column}: {needle}")
    return sorted(set(hits))


def statistics(inst: Installation, app_ids: list[int]) -> tuple[list[Any], list[Any]]:
    with inst.store.read() as conn:
        counters = [
            tuple(r)
            for r in conn.execute(
                select(stat_counters).order_by(*stat_counters.primary_key.columns)
            )
        ]
    reasons = top_bounce_reasons(inst.store, app_ids, "24h")
    return counters, reasons


def store_counts(inst: Installation) -> dict[str, int]:
    """What the store holds about the person, counted straight from the tables."""
    with inst.store.read() as conn:
        mine = select(deliveries.c.id).where(func.lower(deliveries.c.recipient) == PERSON)
        return {
            "messages": conn.execute(
                select(func.count(func.distinct(deliveries.c.message_id))).where(
                    func.lower(deliveries.c.recipient) == PERSON
                )
            ).scalar_one(),
            "deliveries": conn.execute(
                select(func.count()).where(func.lower(deliveries.c.recipient) == PERSON)
            ).scalar_one(),
            "attempts": conn.execute(
                select(func.count()).where(attempts.c.delivery_id.in_(mine))
            ).scalar_one(),
            "events": conn.execute(
                select(func.count()).where(events.c.delivery_id.in_(mine))
            ).scalar_one(),
            "suppressions": conn.execute(
                select(func.count()).where(suppressions.c.email == PERSON)
            ).scalar_one(),
        }


def wait_for_status(inst: Installation, delivery_id: Any, timeout: float = 30.0) -> str:
    """Run a delivery worker until the delivery leaves the queue; its status then."""
    settings = inst.settings.model_copy(
        update={"transport_map": "x.test=127.0.0.1:9", "runner_poll_seconds": 0.1}
    )
    loop = LoopThread()
    stop: asyncio.Event | None = None

    async def start() -> asyncio.Future[None]:
        nonlocal stop
        stop = asyncio.Event()
        return asyncio.ensure_future(DeliveryWorker(settings, inst.store).run(stop))

    task = loop.run(start())
    try:
        deadline = time.monotonic() + timeout
        while True:
            with inst.store.read() as conn:
                status = conn.execute(
                    select(deliveries.c.status).where(deliveries.c.id == delivery_id)
                ).scalar_one()
            if status not in ("queued", "sending") or time.monotonic() > deadline:
                return str(status)
            time.sleep(0.05)
    finally:

        async def shutdown() -> None:
            assert stop is not None
            stop.set()
            await task

        loop.run(shutdown())
        loop.close()


def test_erasure_leaves_no_trace_and_keeps_the_statistics(installation: Installation) -> None:
    inst = installation
    traces = make_traces(inst)
    app_ids = [traces.shop.app_id, traces.news.app_id]
    assert scan(inst, PERSON, IP_PREFIX)  # the traces are there to be found
    before = statistics(inst, app_ids)
    assert before[1] and before[1][0].category == "user_unknown"

    # the export first: everything the store holds about the person
    held = store_counts(inst)
    exported = inst.postbode("privacy", "export", PERSON)
    assert exported.returncode == 0, exported.stderr
    doc = json.loads(exported.stdout)
    assert doc["schema"] == "postbode.privacy.export" and doc["schema_version"] == 1
    assert {k: doc["counts"][k] for k in held} == held
    assert held == {
        "messages": 2,
        "deliveries": 2,
        "attempts": 2,
        "events": held["events"],
        "suppressions": 2,
    }
    assert doc["counts"]["inbound_messages"] == 1 and doc["counts"]["tracking_hits"] == 3
    assert doc["counts"]["webhook_requests"] == held["events"]  # one endpoint per app
    hits = [
        e
        for m in doc["messages"]
        for d in m["deliveries"]
        for e in d["events"]
        if e["type"] in ("message.opened", "message.clicked")
    ]
    assert {h["data"]["ip"] for h in hits} == {IP_PREFIX + "0"}
    assert all(h["data"]["user_agent"] for h in hits)
    assert all(m["content"] and PERSON in m["content"].lower() for m in doc["messages"])

    dry = inst.postbode("privacy", "erase", PERSON, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert scan(inst, PERSON)  # a dry run changes nothing

    erased = inst.postbode("privacy", "erase", PERSON, "--json")
    assert erased.returncode == 0, erased.stderr
    result = json.loads(erased.stdout)
    assert result["counts"] == json.loads(dry.stdout)["counts"]
    counts = result["counts"]
    assert result["complete"] and result["address_hash"].startswith("hmac:")
    assert {k: counts[k] for k in ("messages", "bodies", "deliveries", "attempts")} == {
        "messages": 2,
        "bodies": 2,
        "deliveries": 2,
        "attempts": 2,
    }
    assert counts["events"] + counts["events_reduced"] + counts["tracking_hits"] == held["events"]
    assert counts["tracking_hits"] == 3 and counts["events_reduced"] == 1
    assert counts["webhook_requests"] == held["events"]
    assert counts["suppressions"] == 2 and counts["inbound_messages"] == 1
    assert counts["idempotency_records"] == 1 and counts["login_attempts"] == 1
    assert counts["audit_records"] >= 1

    if inst.db_path is not None:  # nothing left in the file or its WAL
        assert result["wal_truncated"] is True
        for path in (inst.db_path, inst.db_path.with_name(inst.db_path.name + "-wal")):
            if path.exists():
                for needle in (PERSON, IP_PREFIX):
                    found = subprocess.run(
                        ["grep", "-c", "-a", "-i", needle, str(path)],
                        capture_output=True,
                        text=True,
                    )
                    assert found.stdout.strip() == "0", (path, needle)

    assert scan(inst, PERSON, IP_PREFIX) == []
    assert statistics(inst, app_ids) == before
    # the other recipient's mail is untouched
    with inst.store.read() as conn:
        others = conn.execute(
            select(deliveries.c.recipient).where(deliveries.c.recipient == OTHER)
        ).all()
        subjects = sorted(conn.execute(select(messages.c.subject)).scalars())
    assert len(others) == 2 and subjects == ["", "", "For the other one"]
    # the erasure is in the audit log under the hash only
    audit = inst.postbode("privacy", "erase", PERSON, "--json")  # again: nothing left
    assert json.loads(audit.stdout)["counts"]["suppressions"] == 0

    # a new message to the bounced address is still suppressed, not sent
    with TestClient(create_app(inst.settings, inst.store)) as client:
        sent = client.post(
            "/api/v1/messages",
            headers={"Authorization": f"Bearer {traces.news.api_key}"},
            json={"from": "news@news.test", "to": [PERSON], "subject": "Again", "text": "x"},
        )
    assert sent.status_code == 202, sent.text
    delivery_id = uuid.UUID(sent.json()["recipients"][0]["delivery_id"])
    assert wait_for_status(inst, delivery_id) == "suppressed"
