"""The wake-ups of a process's roles: a commit wakes the runners of the queues it wrote."""

from __future__ import annotations

import asyncio

from postbode import tenancy
from postbode.config import Settings
from postbode.endpoints.destinations import DestinationPolicy
from postbode.ingest.accept import Submission
from postbode.roles import Runtime, serve_roles
from postbode.store.engine import Store
from postbode.webhooks.manage import create_webhook

RAW = b"From: Shop <orders@shop.test>\r\nTo: a@dest.test\r\nSubject: Your order\r\n\r\nThanks!\r\n"


def _accept_woke(store: Store, app_id: int) -> list[str]:
    """The queues a message's accept commit woke the runners of."""
    woken: list[str] = []

    async def run() -> None:
        rt = Runtime(Settings(allow_unverified_domains=True, smtp_hostname="pb.test"), store)
        rt.route = woken.append
        try:
            await rt.acceptor.accept(
                Submission(
                    app_id=app_id,
                    source="smtp",
                    mail_from="orders@shop.test",
                    recipients=["a@dest.test"],
                    raw=RAW,
                    client_ip="127.0.0.1",
                    client_name="cms",
                )
            )
        finally:
            await rt.close()

    asyncio.run(run())
    return woken


def test_an_accept_wakes_the_webhook_runner_only_when_it_queued_webhook_requests(
    store: Store,
) -> None:
    shop = tenancy.create_app(store, "shop")
    tenancy.add_domain(store, "shop", "shop.test")
    other = tenancy.create_app(store, "other")
    # Another app's endpoint, and one of this app's for events an accept does not make.
    allow = DestinationPolicy.parse("127.0.0.0/8")
    create_webhook(store, other.app_id, "http://127.0.0.1:9/hook", policy=allow)
    create_webhook(store, shop.app_id, "http://127.0.0.1:9/hook", ["message.opened"], policy=allow)
    assert _accept_woke(store, shop.app_id) == ["deliveries"]

    create_webhook(store, shop.app_id, "http://127.0.0.1:9/hook", ["delivery.queued"], policy=allow)
    assert _accept_woke(store, shop.app_id) == ["deliveries", "webhook_requests"]


def test_serve_runs_the_queues_itself_unless_its_worker_processes_are_always_on() -> None:
    assert serve_roles(Settings()) == ["web", "smtp", "worker", "processes"]
    assert serve_roles(Settings(workers=0)) == ["web", "smtp", "worker"]
    assert serve_roles(Settings(worker_idle_seconds=0)) == ["web", "smtp", "processes"]
