"""A domain sends only once verified (its DKIM and SPF records found in DNS): before that, mail
from it is refused over SMTP and the API, unless the operator allows unverified domains
(`allow_unverified_domains`, for development)."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator

import pytest
from argon2 import PasswordHasher
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from postbode import tenancy
from postbode.config import Settings
from postbode.ingest.accept import Acceptor
from postbode.store.engine import Store
from postbode.store.schema import domains, messages, utcnow
from postbode.testing.servers import SmtpListener
from postbode.web.app import create_app

RAW = b"From: Shop <orders@shop.test>\r\nTo: alice@dest.test\r\nSubject: Hi\r\n\r\nHello.\r\n"


@pytest.fixture(autouse=True)
def _fast_tenancy(monkeypatch: pytest.MonkeyPatch) -> None:
    key = tenancy.generate_dkim_key(1024)
    monkeypatch.setattr(tenancy, "generate_dkim_key", lambda bits=2048: key)
    monkeypatch.setattr(
        tenancy, "_hasher", PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
    )


@pytest.fixture
def strict(settings: Settings) -> Settings:
    return settings.model_copy(update={"allow_unverified_domains": False})


@pytest.fixture
def shop(store: Store) -> tenancy.NewApp:
    app = tenancy.create_app(store, "shop")
    tenancy.add_domain(store, "shop", "shop.test")
    return app


def verify(store: Store, name: str) -> None:
    """What the DNS check records once it found the domain's records."""
    with store.write() as conn:
        conn.execute(update(domains).where(domains.c.name == name).values(verified_at=utcnow()))


def stored(store: Store) -> int:
    with store.read() as conn:
        return int(conn.execute(select(func.count()).select_from(messages)).scalar_one())


def smtp_send(server: SmtpListener, app: tenancy.NewApp) -> tuple[int, str]:
    with smtplib.SMTP(server.host, server.port, timeout=30) as client:
        client.login(app.smtp_username, app.smtp_password)
        try:
            client.sendmail("orders@shop.test", ["alice@dest.test"], RAW)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error.decode()
    return 250, ""


@pytest.fixture
def api(strict: Settings, store: Store) -> Iterator[TestClient]:
    acceptor = Acceptor(store, strict.smtp_hostname, allow_unverified=False)
    with TestClient(create_app(strict, store, acceptor)) as client:
        yield client
        assert client.portal is not None
        client.portal.call(acceptor.close)


def test_an_unverified_domain_does_not_send_over_smtp(
    strict: Settings, store: Store, shop: tenancy.NewApp
) -> None:
    with SmtpListener(strict, store) as server:
        code, text = smtp_send(server, shop)
        assert code == 550 and text.startswith("5.7.1 sender domain 'shop.test' is not verified")
        assert stored(store) == 0
    verify(store, "shop.test")
    with SmtpListener(strict, store) as server:  # a new listener: no cached app domains
        assert smtp_send(server, shop) == (250, "")
    assert stored(store) == 1


def test_an_unverified_domain_does_not_send_over_the_api(
    api: TestClient, store: Store, shop: tenancy.NewApp
) -> None:
    body = {"from": "orders@shop.test", "to": ["alice@dest.test"], "subject": "Hi", "text": "x"}
    headers = {"Authorization": f"Bearer {shop.api_key}"}
    answer = api.post("/api/v1/messages", json=body, headers=headers)
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert (error["code"], error["field"]) == ("unverified_domain", "from")
    assert stored(store) == 0


def test_development_may_allow_unverified_domains(
    settings: Settings, store: Store, shop: tenancy.NewApp
) -> None:
    assert settings.allow_unverified_domains  # the tests' environment allows them
    with SmtpListener(settings, store) as server:
        assert smtp_send(server, shop) == (250, "")


def test_the_default_refuses_unverified_domains() -> None:
    assert Settings.model_fields["allow_unverified_domains"].default is False
