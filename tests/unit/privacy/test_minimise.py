"""Tracking minimisation: user agents kept as a family, no tracking at all for an app that
turned it off (whatever a message asks for, and for links sent before)."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import pytest
from argon2 import PasswordHasher
from sqlalchemy import select, update

from postbode import tenancy
from postbode.config import Settings
from postbode.privacy.minimise import user_agent_family
from postbode.store.engine import Store
from postbode.store.schema import apps, deliveries, events, messages, utcnow
from postbode.tracking.endpoints import Hit, write_hits
from postbode.tracking.tokens import Token
from postbode.web.app import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


@functools.cache
def _dkim_key(generate: Any = tenancy.generate_dkim_key) -> tuple[str, str]:
    return generate(1024)  # type: ignore[no-any-return]


@pytest.fixture(autouse=True)
def _fast_tenancy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tenancy, "generate_dkim_key", _dkim_key)
    monkeypatch.setattr(
        tenancy, "_hasher", PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
    )


@pytest.mark.parametrize(
    ("user_agent", "family"),
    [
        (
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
            "Chrome/120.0.0.0 Safari/537.36",
            "Chrome",
        ),
        ("Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17029; Pro)", "Outlook"),
        ("curl/8.4.0", "curl"),
        ("", ""),
        ("something nobody knows", "Other"),
    ],
)
def test_a_user_agent_is_kept_as_its_family(user_agent: str, family: str) -> None:
    assert user_agent_family(user_agent) == family


def test_an_app_with_tracking_off_tracks_nothing(store: Store, settings: Settings) -> None:
    shop = tenancy.create_app(store, "shop")
    tenancy.add_domain(store, "shop", "shop.test")
    body = {
        "from": "orders@shop.test",
        "to": ["ann@x.test"],
        "subject": "Hi",
        "html": '<p><a href="https://shop.test/">x</a></p>',
        "track_opens": True,
        "track_clicks": True,
    }
    with TestClient(create_app(settings, store)) as client:
        auth = {"Authorization": f"Bearer {shop.api_key}"}
        before = client.post("/api/v1/messages", json=body, headers=auth)
        with store.write() as conn:
            conn.execute(
                update(apps).where(apps.c.id == shop.app_id).values(tracking_allowed=False)
            )
        client.app.state.acceptor._apps.clear()  # the app cache: as after its few seconds
        after = client.post("/api/v1/messages", json=body, headers=auth)
    assert before.status_code == after.status_code == 202
    with store.read() as conn:
        flags = {
            str(r.id): (r.track_opens, r.track_clicks)
            for r in conn.execute(
                select(messages.c.id, messages.c.track_opens, messages.c.track_clicks)
            )
        }
        sent = conn.execute(select(deliveries.c.id)).scalars().all()
    assert flags == {before.json()["id"]: (True, True), after.json()["id"]: (False, False)}
    # hits on links sent while it was on are not recorded either
    with store.write() as conn:
        recorded = write_hits(
            conn, [Hit("open", Token("open", d), "Mozilla/5.0", None, utcnow()) for d in sent], 0
        )
        assert recorded == []
        assert (
            conn.execute(select(events.c.id).where(events.c.type == "message.opened")).all() == []
        )
