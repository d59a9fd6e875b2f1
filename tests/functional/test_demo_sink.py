"""A newcomer's first delivery: `postbode demo sink` catches it, with no DNS and no internet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from postbode.testing.process import PostbodeProcess, free_port


def wait_answering(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "the demo sink exited"
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_the_quick_start_delivers_into_the_demo_sink(tmp_path: Path) -> None:
    smtp_port, http_port = free_port(), free_port()
    sink = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "postbode",
            "demo",
            "sink",
            "--smtp",
            f"127.0.0.1:{smtp_port}",
            "--http",
            f"127.0.0.1:{http_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    page = f"http://127.0.0.1:{http_port}"
    try:
        wait_answering(page, sink)
        env = {"POSTBODE_TRANSPORT_MAP": f"*=127.0.0.1:{smtp_port}"}
        with PostbodeProcess(tmp_path / "data", env) as postbode:
            command = [sys.executable, "-m", "postbode"]
            penv = {**os.environ, **postbode.env}
            created = json.loads(
                subprocess.run(
                    [*command, "app", "create", "shop", "--json"],
                    env=penv,
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
            )
            subprocess.run(
                [*command, "domain", "add", "shop.test", "--app", "shop"],
                env=penv,
                check=True,
                capture_output=True,
            )
            answer = httpx.post(
                f"{postbode.http_url}/api/v1/messages",
                headers={"Authorization": f"Bearer {created['api_key']}"},
                json={
                    "from": "Shop <orders@shop.test>",
                    "to": ["alice@example.test"],
                    "subject": "Your order <b>1042</b>",
                    "text": "Thanks!",
                },
            )
            assert answer.status_code == 202, answer.text
            deadline = time.monotonic() + 30
            while not (caught := httpx.get(f"{page}/messages.json").json()):
                assert time.monotonic() < deadline, "nothing reached the demo sink"
                time.sleep(0.1)
        [message] = caught
        assert message["rcpt_tos"] == ["alice@example.test"]
        assert message["subject"] == "Your order <b>1042</b>"
        assert message["dkim_signed"], "Postbode signs with the domain's key"
        listing = httpx.get(page).text
        assert "Your order &lt;b&gt;1042&lt;/b&gt;" in listing  # escaped, not markup
        shown = httpx.get(f"{page}/messages/{message['number']}").text
        assert "Thanks!" in shown and "DKIM-Signature" in shown
    finally:
        sink.terminate()
        sink.wait(10)
