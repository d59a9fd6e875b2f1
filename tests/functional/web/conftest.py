"""Peers for the UI tests: one headless Chromium per session, and per test Postbode's pipeline
(SMTP in, worker, an SMTP sink out) with its HTTP app under uvicorn, all on loopback."""

from __future__ import annotations

import smtplib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from argon2 import PasswordHasher
from playwright.sync_api import Browser, Page, sync_playwright

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import Store
from postbode.testing.dns import LoopbackDNS
from postbode.testing.servers import PostbodeInProcess
from postbode.testing.sink import SmtpSink
from postbode.web.app import create_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PASSWORD = "correct horse battery"


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll the store until `predicate` holds (the pipeline writes from other threads)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)


class HttpServer:
    """Postbode's HTTP app under uvicorn, on 127.0.0.1 and a free port, in a thread."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})
        self.thread.start()
        wait_for(lambda: self.server.started)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    """One headless Chromium per test module; each test opens its own context.

    Not per session: Playwright's sync API keeps an event loop running on the main thread
    while it is open, and every other test on this xdist worker that calls asyncio.run()
    would fail with "cannot be called from a running event loop"."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@dataclass
class Postbode:
    """The pipeline and the UI of one test, with an owner, an admin, a viewer and app `shop`."""

    store: Store
    settings: Settings
    pipeline: PostbodeInProcess
    sink: SmtpSink
    http: HttpServer
    shop: tenancy.NewApp
    dns: LoopbackDNS

    @property
    def base(self) -> str:
        return self.http.base

    def send(
        self,
        to: list[str],
        subject: str = "Your order has shipped",
        *,
        html: str | None = None,
        headers: dict[str, str] | None = None,
        sender: str = "Shop <orders@shop.test>",
        app: tenancy.NewApp | None = None,
    ) -> None:
        """Submit a message over SMTP with AUTH, as an application would."""
        msg = EmailMessage()
        msg["From"] = sender
        msg["To"] = ", ".join(to)
        msg["Subject"] = subject
        for name, value in (headers or {}).items():
            msg[name] = value
        msg.set_content("Your order is on its way.\n\nTrack it at https://shop.test/t/42\n")
        if html is not None:
            msg.add_alternative(html, subtype="html")
        creds = app or self.shop
        with smtplib.SMTP(self.pipeline.host, self.pipeline.port) as client:
            client.login(creds.smtp_username, creds.smtp_password)
            client.send_message(msg, to_addrs=to)


@pytest.fixture
def postbode(
    sqlite_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Postbode]:
    # Argon2 at its lowest cost: these tests are about the UI, not password hashing.
    monkeypatch.setattr(
        tenancy, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    )
    store = sqlite_store
    tenancy.create_user(store, "owner@org.test", PASSWORD, admin=True)
    tenancy.create_user(store, "admin@org.test", PASSWORD, role="admin")
    tenancy.create_user(store, "viewer@org.test", PASSWORD, role="viewer")
    shop = tenancy.create_app(store, "shop")
    tenancy.add_domain(store, "shop", "shop.test")
    with SmtpSink(tls=True) as sink, LoopbackDNS() as dns:
        url = store.engine.url.render_as_string(hide_password=False)
        settings = Settings(
            data_dir=tmp_path,
            database_url=url,
            secret_key="browser-test-key",
            smtp_hostname="mta.postbode.test",
            transport_map=f"*={sink.host}:{sink.port}",
            dns_nameservers=dns.nameserver,
        )
        http = HttpServer(create_app(settings, store))
        try:
            with PostbodeInProcess(settings, store) as pipeline:
                yield Postbode(store, settings, pipeline, sink, http, shop, dns)
        finally:
            http.stop()


@dataclass
class Watch:
    """What a page did that it must not: dialogs, page errors, console errors."""

    dialogs: list[str]
    errors: list[str]
    console: list[tuple[str, str, str]]  # type, text, url

    def csp_violations(self, ignore: str = "/preview") -> list[str]:
        """Content-Security-Policy reports from our own pages (the preview frame's blocked
        images and scripts are the point of it)."""
        return [
            text
            for kind, text, url in self.console
            if "Content Security Policy" in text and ignore not in url
        ]


@pytest.fixture
def open_page(chromium: Browser) -> Iterator[Callable[..., tuple[Page, Watch]]]:
    """`open_page(base, email)`: a fresh context signed in as `email` (or signed out)."""
    contexts = []

    def open_(base: str, email: str | None = None, **options: Any) -> tuple[Page, Watch]:
        context = chromium.new_context(**{"viewport": {"width": 1280, "height": 800}, **options})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(10_000)
        watch = Watch([], [], [])

        def on_dialog(dialog: Any) -> None:
            watch.dialogs.append(dialog.message)
            dialog.dismiss()

        page.on("dialog", on_dialog)
        page.on("pageerror", lambda exc: watch.errors.append(str(exc)))
        page.on(
            "console",
            lambda m: watch.console.append((m.type, m.text, m.location.get("url", ""))),
        )
        if email is not None:
            page.goto(f"{base}/login")
            page.fill("input[name=email]", email)
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(f"{base}/dashboard")
        return page, watch

    yield open_
    for context in contexts:
        context.close()
