"""Sending limits end to end: the 101st message of a minute with --per-minute 100 gets
451 4.7.1 over SMTP and 429 with Retry-After over HTTP (native and compatible APIs), and two
listener processes together accept no more than the limit."""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from pathlib import Path

import httpx
from sqlalchemy import func, select

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import Store
from postbode.store.schema import messages
from postbode.testing.process import PostbodeProcess
from postbode.testing.servers import HttpPostbode

LIMIT = 100
MAIL = {"from": "orders@shop.test", "to": ["a@dest.test"], "subject": "Hi", "text": "Hello"}


def fresh_minute(needed: float = 25.0) -> None:
    """Wait for the next minute if this one has less than `needed` seconds left: limits count
    in fixed windows, and the test must run inside one."""
    left = 60 - time.time() % 60
    if left < needed:
        time.sleep(left + 0.2)


def stored(store: Store) -> int:
    with store.read() as conn:
        return int(conn.execute(select(func.count()).select_from(messages)).scalar_one())


def order(i: int) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "orders@shop.test"
    msg["To"] = "a@dest.test"
    msg["Subject"] = f"order {i}"
    msg.set_content("Your order has shipped.")
    return msg


def test_the_101st_message_is_refused_for_now(settings: Settings, store: Store) -> None:
    shop = tenancy.create_app(store, "shop")
    tenancy.add_domain(store, "shop", "shop.test")
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "postbode",
            "app",
            "limits",
            "shop",
            "--per-minute",
            str(LIMIT),
            "--json",
        ],
        env={
            "POSTBODE_DATABASE_URL": settings.database_url or "",
            "PATH": "/usr/bin:/bin",
            "POSTBODE_DATA_DIR": str(settings.data_dir),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["per_minute"] == LIMIT
    fresh_minute()
    with HttpPostbode(settings, store) as postbode:
        with smtplib.SMTP(postbode.host, postbode.port, timeout=30) as client:
            client.login(shop.smtp_username, shop.smtp_password)
            for i in range(LIMIT):
                client.send_message(order(i))
            try:
                client.send_message(order(LIMIT))
                raise AssertionError("the 101st message was accepted")
            except smtplib.SMTPDataError as exc:
                assert exc.smtp_code == 451
                text = exc.smtp_error.decode()
                assert text.startswith("4.7.1") and "100 messages per minute" in text
        key = {"Authorization": f"Bearer {shop.api_key}"}
        refused = httpx.post(f"{postbode.http_url}/api/v1/messages", json=MAIL, headers=key)
        assert refused.status_code == 429, refused.text
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        error = refused.json()["error"]
        assert (error["code"], error["field"]) == ("rate_limited", "per_minute")
        assert "100 messages per minute" in error["message"]
        postmark = httpx.post(
            f"{postbode.http_url}/email",
            json={
                "From": "orders@shop.test",
                "To": "a@dest.test",
                "Subject": "Hi",
                "TextBody": "Hello",
            },
            headers={"X-Postmark-Server-Token": shop.api_key, "Accept": "application/json"},
        )
        assert postmark.status_code == 429, postmark.text
        assert postmark.json()["ErrorCode"] == 429 and "retry-after" in postmark.headers
        sendgrid = httpx.post(
            f"{postbode.http_url}/compat/sendgrid/v3/mail/send",
            json={
                "from": {"email": "orders@shop.test"},
                "personalizations": [{"to": [{"email": "a@dest.test"}]}],
                "subject": "Hi",
                "content": [{"type": "text/plain", "value": "Hello"}],
            },
            headers=key,
        )
        assert sendgrid.status_code == 429 and "retry-after" in sendgrid.headers
    assert stored(store) == LIMIT  # what was refused was not kept; what was accepted was


def test_two_listener_processes_together_accept_at_most_the_limit(
    settings: Settings, store: Store, tmp_path: Path
) -> None:
    shop = tenancy.create_app(store, "shop")
    tenancy.add_domain(store, "shop", "shop.test")
    with store.write() as conn:
        from postbode.abuse import limits

        limits.set_limits(conn, shop.app_id, {"per_minute": LIMIT})
    env = {"POSTBODE_DATABASE_URL": settings.database_url or ""}
    nodes = [PostbodeProcess(tmp_path / f"node{n}", env, command="listen") for n in (1, 2)]
    try:
        for node in nodes:
            node.start()
            node.wait_healthy()
        fresh_minute(40.0)
        key = {"Authorization": f"Bearer {shop.api_key}"}

        def send(url: str) -> int:
            with httpx.Client(timeout=30) as client:
                return client.post(f"{url}/api/v1/messages", json=MAIL, headers=key).status_code

        urls = [nodes[i % 2].http_url for i in range(2 * 80)]
        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(send, urls))
    finally:
        for node in nodes:
            node.kill()
    assert sorted(set(codes)) == [202, 429], codes
    assert codes.count(202) == LIMIT
    assert stored(store) == LIMIT
