"""1,000 messages scheduled a little ahead, across a `kill -9` of the server and a restart:
none is sent before its send_at, all are sent within 30 s after it, and the 100 cancelled
ones are never sent. (A horizon of ~25 s stands in for the minute: the same code path.)"""

from __future__ import annotations

import os
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from sqlalchemy import select

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import create_store
from postbode.store.schema import attempts, deliveries
from postbode.testing.process import PostbodeProcess
from postbode.testing.sink import SmtpSink

HORIZON = 25  # seconds from now to send_at
COUNT = 1000
CANCELLED = 100


def test_scheduled_mail_goes_on_time_across_a_kill_9(tmp_path: Path) -> None:
    store = create_store(Settings(data_dir=tmp_path))
    app = tenancy.create_app(store, "shop")
    tenancy.add_domain(store, "shop", "shop.test")
    store.dispose()
    with SmtpSink() as sink:
        env = {"POSTBODE_TRANSPORT_MAP": f"dest.test={sink.host}:{sink.port}"}
        server = PostbodeProcess(tmp_path, env, new_session=True).start()
        try:
            send_at, cancelled = _schedule(server, app)
            # kill -9 before send_at, then start again: the schedule lives in the store
            time.sleep(max(0.0, (send_at - datetime.now(UTC)).total_seconds() - 10))
            assert sink.messages == []
        finally:
            assert server.proc is not None
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()
        restarted = PostbodeProcess(tmp_path, env, new_session=True).start()
        try:
            received = sink.wait_for_sync(COUNT - CANCELLED, timeout=HORIZON + 60)
        finally:
            assert restarted.stop() == 0, restarted.log()
        assert len(received) == COUNT - CANCELLED
    _check(tmp_path, send_at, cancelled)


def _schedule(server: PostbodeProcess, app: tenancy.NewApp) -> tuple[datetime, list[str]]:
    """1,000 messages for send_at, 100 of them cancelled: (send_at, the cancelled ids)."""
    send_at = (datetime.now(UTC) + timedelta(seconds=HORIZON)).replace(microsecond=0)
    with httpx.Client(
        base_url=server.http_url,
        headers={"Authorization": f"Bearer {app.api_key}"},
        timeout=60,
    ) as http:
        ids: list[str] = []
        for batch in range(COUNT // 500):
            answer = http.post(
                "/api/v1/messages/batch",
                json={
                    "message": {
                        "from": "orders@shop.test",
                        "subject": "later",
                        "text": "on time",
                        "send_at": send_at.isoformat(),
                    },
                    "recipients": [{"to": f"r{batch * 500 + i}@dest.test"} for i in range(500)],
                },
            ).json()
            assert answer["accepted"] == 500, answer
            ids += [r["recipients"][0]["delivery_id"] for r in answer["data"]]
        assert {d["status"] for d in http.get("/api/v1/deliveries").json()["data"]} == {"scheduled"}
        cancelled = ids[::10]
        assert len(cancelled) == CANCELLED
        changed = http.post("/api/v1/deliveries/cancel", json={"ids": cancelled}).json()
        assert changed["changed"] == CANCELLED
    return send_at, cancelled


def _check(tmp_path: Path, send_at: datetime, cancelled: list[str]) -> None:
    store = create_store(Settings(data_dir=tmp_path))
    try:
        with store.read() as conn:
            rows = conn.execute(
                select(deliveries.c.id, deliveries.c.status, attempts.c.started_at).join(
                    attempts, attempts.c.delivery_id == deliveries.c.id, isouter=True
                )
            ).all()
    finally:
        store.dispose()
    cancelled_set = set(cancelled)
    sent = [r for r in rows if r.started_at is not None]
    assert not [r for r in sent if str(r.id) in cancelled_set]
    assert {str(r.id) for r in rows if r.status == "cancelled"} == cancelled_set
    assert len({r.id for r in sent if r.status == "delivered"}) == COUNT - CANCELLED
    first = min(r.started_at for r in sent)
    last = max(r.started_at for r in sent)
    print(
        f"first attempt {(first - send_at).total_seconds():+.2f} s, "
        f"last {(last - send_at).total_seconds():+.2f} s from send_at"
    )
    assert first >= send_at, "sent early"
    assert last <= send_at + timedelta(seconds=30), "sent late"
