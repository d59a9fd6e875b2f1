"""The client address comes from forwarding headers only when the peer is a configured proxy:
otherwise anyone on the host could spoof X-Forwarded-For to dodge the sign-in throttle (and
pin it on someone else)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import create_store
from postbode.store.schema import login_attempts
from postbode.testing.process import PostbodeProcess

_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@pytest.mark.parametrize(
    ("trusted", "counted_as"), [("", "127.0.0.1"), ("127.0.0.1", "203.0.113.9")]
)
def test_forwarded_for_counts_only_from_a_trusted_proxy(
    tmp_path: Path, trusted: str, counted_as: str
) -> None:
    store = create_store(Settings(data_dir=tmp_path))
    tenancy.create_user(store, "owner@org.test", "a long password", admin=True)
    env = {"POSTBODE_TRUSTED_PROXIES": trusted} if trusted else {}
    # A generous wait for start-up: a loaded machine takes long to start.
    web = PostbodeProcess(tmp_path, env, command="web").start(timeout=180)
    try:
        with httpx.Client(base_url=web.http_url) as client:
            page = client.get("/login")
            token = _CSRF.search(page.text)
            assert token is not None
            answer = client.post(
                "/login",
                data={"csrf_token": token.group(1), "email": "owner@org.test", "password": "no"},
                headers={"X-Forwarded-For": "203.0.113.9"},
            )
            assert answer.status_code == 401
    finally:
        web.stop()
    with store.read() as conn:
        keys = set(conn.execute(select(login_attempts.c.key)).scalars())
    store.dispose()
    assert keys == {f"ip:{counted_as}", f"pair:owner@org.test|{counted_as}"}
