"""SMTP AUTH tells a guesser nothing and costs little: an unknown user name takes the same
argon2 check as a wrong password, and failures are counted in the store (by every listener
on every node) per client address, per user name and in all, and checked before hashing."""

from __future__ import annotations

import contextlib
import smtplib
from collections.abc import Iterator
from typing import Any

import pytest
from argon2 import PasswordHasher

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import Store
from postbode.testing.servers import SmtpListener


class CountingHasher(PasswordHasher):
    """argon2 itself, counting the password checks (the costly work a guess makes us do)."""

    checks = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        CountingHasher.checks += 1
        return super().verify(hash, password)


@pytest.fixture(autouse=True)
def hasher(monkeypatch: pytest.MonkeyPatch) -> type[CountingHasher]:
    CountingHasher.checks = 0
    monkeypatch.setattr(tenancy, "_hasher", CountingHasher())
    return CountingHasher


@pytest.fixture
def shop(store: Store) -> tenancy.NewApp:
    return tenancy.create_app(store, "shop")


@contextlib.contextmanager
def listening(settings: Settings, store: Store, **limits: Any) -> Iterator[SmtpListener]:
    with SmtpListener(settings.model_copy(update=limits), store) as server:
        yield server


def auth(server: SmtpListener, user: str, password: str, source: str = "127.0.0.1") -> int:
    """The reply code to AUTH PLAIN (smtplib raises for anything but 235)."""
    client = smtplib.SMTP(timeout=30, source_address=(source, 0))
    try:
        client.connect(server.host, server.port)
        client.ehlo("app.test")
        client.user, client.password = user, password
        try:
            client.auth("PLAIN", client.auth_plain)  # once (login() tries every mechanism)
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code
        except smtplib.SMTPServerDisconnected:
            return 421
        return 235
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            client.close()


def test_an_unknown_user_costs_the_same_check_as_a_wrong_password(
    settings: Settings, store: Store, shop: tenancy.NewApp, hasher: type[CountingHasher]
) -> None:
    with listening(settings, store) as server:
        assert auth(server, shop.smtp_username, "wrong") == 535
        assert hasher.checks == 1
        assert auth(server, "no-such-user", "wrong") == 535
        assert hasher.checks == 2
        assert auth(server, shop.smtp_username, shop.smtp_password) == 235


def test_failures_per_address_are_shared_by_every_listener_and_stop_hashing(
    settings: Settings, store: Store, shop: tenancy.NewApp, hasher: type[CountingHasher]
) -> None:
    # Two listeners on one store: two processes, or two nodes.
    with (
        listening(settings, store, smtp_auth_max_failures=3) as one,
        listening(settings, store, smtp_auth_max_failures=3) as two,
    ):
        assert [auth(one, "a", "x"), auth(two, "b", "x"), auth(one, "c", "x")] == [535] * 3
        checks = hasher.checks
        assert auth(two, shop.smtp_username, shop.smtp_password) == 421
        assert auth(one, "d", "x") == 421
        assert hasher.checks == checks  # turned away before any hashing
        # Another address is not concerned.
        assert auth(two, shop.smtp_username, shop.smtp_password, "127.0.0.2") == 235


def test_failures_per_user_name_from_many_addresses_are_capped(
    settings: Settings, store: Store, shop: tenancy.NewApp, hasher: type[CountingHasher]
) -> None:
    with listening(settings, store, smtp_auth_max_failures_per_user=3) as server:
        assert auth(server, shop.smtp_username, shop.smtp_password) == 235  # the app, earlier
        for i in range(3):
            assert auth(server, shop.smtp_username, "guess", f"127.0.1.{i + 1}") == 535
        checks = hasher.checks
        assert auth(server, shop.smtp_username, "guess", "127.0.1.9") == 454
        assert auth(server, "no-such-user", "guess", "127.0.1.9") == 535  # other names go on
        assert hasher.checks == checks + 1
        # The app's own password, verified lately, costs no hash and still logs in.
        assert auth(server, shop.smtp_username, shop.smtp_password, "127.0.1.9") == 235


def test_a_ceiling_on_all_failures_stops_hashing_for_everyone(
    settings: Settings, store: Store, shop: tenancy.NewApp, hasher: type[CountingHasher]
) -> None:
    with listening(settings, store, smtp_auth_max_failures_total=4) as server:
        for i in range(4):
            assert auth(server, f"user{i}", "guess", f"127.0.2.{i + 1}") == 535
        checks = hasher.checks
        assert auth(server, "user9", "guess", "127.0.2.9") == 454
        assert auth(server, shop.smtp_username, shop.smtp_password, "127.0.2.9") == 454
        assert hasher.checks == checks
