"""Inbound as an operator sets it up: `postbode domain add … --inbound`, `postbode route add …
--json`, then `postbode serve` takes mail for the route and its worker hands it to the app."""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path

from standardwebhooks.webhooks import Webhook

from postbode.testing.process import PostbodeProcess

from .conftest import Endpoint

ALLOW_LOOPBACK = {"POSTBODE_WEBHOOK_ALLOW_PRIVATE": "127.0.0.0/8"}


def postbode(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # the app's endpoint is on loopback: the operator allows it, as for webhooks
    env = {**os.environ, "POSTBODE_DATA_DIR": str(data_dir), **ALLOW_LOOPBACK}
    env.pop("POSTBODE_DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "postbode", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_routes_and_serve_hand_inbound_mail_to_the_app(
    tmp_path: Path, endpoint: Endpoint
) -> None:
    assert postbode(tmp_path, "app", "create", "shop").returncode == 0
    domain = postbode(
        tmp_path, "domain", "add", "in.shop.test", "--app", "shop", "--inbound", "--json"
    )
    assert domain.returncode == 0, domain.stderr
    records = json.loads(domain.stdout)["records"]
    assert records[0] == {
        "purpose": "inbound",
        "type": "MX",
        "name": "in.shop.test",
        "value": "10 postbode.localhost.",
    }
    added = postbode(
        tmp_path, "route", "add", "--app", "shop", "--match", "support@in.shop.test",
        "--url", endpoint.url, "--format", "postmark", "--json",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    route = json.loads(added.stdout)
    assert route["secret"].startswith("whsec_")
    assert (route["app"], route["match"], route["action"], route["format"]) == (
        "shop",
        "support@in.shop.test",
        "post",
        "postmark",
    )
    rejected = postbode(
        tmp_path, "route", "add", "--app", "shop", "--match", "noreply@in.shop.test",
        "--action", "reject", "--json",
    )  # fmt: skip
    assert rejected.returncode == 0, rejected.stderr
    listed = json.loads(postbode(tmp_path, "route", "list", "--app", "shop", "--json").stdout)
    assert [r["match"] for r in listed] == ["noreply@in.shop.test", "support@in.shop.test"]
    wrong = postbode(
        tmp_path, "route", "add", "--app", "shop", "--match", "a@else.test", "--url", endpoint.url
    )
    assert wrong.returncode != 0 and "not an inbound domain" in wrong.stderr

    server = PostbodeProcess(tmp_path, {"POSTBODE_WORKERS": "1", **ALLOW_LOOPBACK})
    server.start()
    try:
        msg = EmailMessage()
        msg["From"] = "Alice <alice@sender.test>"
        msg["To"] = "support+42@in.shop.test"
        msg["Subject"] = "Order 42"
        msg.set_content("Where is it?")
        with smtplib.SMTP("127.0.0.1", server.smtp_port, local_hostname="mta.sender.test") as c:
            c.ehlo()
            c.mail("alice@sender.test")
            assert c.rcpt("noreply@in.shop.test")[0] == 550
            c.rset()
            assert c.send_message(msg) == {}
        request = endpoint.wait_for(1)[0]
    finally:
        server.stop()
    data = Webhook(route["secret"]).verify(request.body, request.headers)
    assert data["MailboxHash"] == "42" and data["Subject"] == "Order 42"
    assert data["TextBody"] == "Where is it?\n"

    removed = postbode(
        tmp_path, "route", "remove", "--app", "shop", "--match", "noreply@in.shop.test"
    )
    assert removed.returncode == 0, removed.stderr
    listed = json.loads(postbode(tmp_path, "route", "list", "--app", "shop", "--json").stdout)
    assert [r["match"] for r in listed] == ["support@in.shop.test"]
