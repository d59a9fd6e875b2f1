"""Every queue runner and periodic task of this build: the one list worker processes start and
`postbode worker --list` prints. Pipeline packages provide the handlers; this module only
names them and their schedules."""

from __future__ import annotations

import asyncio
from typing import Any

from postbode.config import Settings
from postbode.runner.periodic import PeriodicTask
from postbode.runner.registry import Registry, Runnable, RunnerSpec
from postbode.store import claim
from postbode.store.engine import Store

SWEEP_EVERY_SECONDS = 30.0  # the longest a dead worker's rows wait past their lease
COMPACT_STATISTICS_EVERY_SECONDS = 300.0
RETENTION_EVERY_SECONDS = 60.0
REPORTS_EVERY_SECONDS = 900.0  # a period's report goes out within a quarter of an hour
ANOMALIES_EVERY_SECONDS = 300.0  # the hour just ended is judged within minutes of its end
PURGE_SEND_COUNTERS_EVERY_SECONDS = 3600.0  # also how soon an app that stores no bodies loses one


def registry(settings: Settings) -> Registry:
    reg = Registry()

    def deliveries(store: Store) -> Runnable:
        from postbode.delivery.worker import DeliveryWorker

        return DeliveryWorker(settings, store)

    def webhook_requests(store: Store) -> Runnable:
        from .webhooks.deliver import WebhookWorker

        return WebhookWorker(settings, store)

    def inbound_messages(store: Store) -> Runnable:
        from postbode.inbound.deliver import InboundWorker

        return InboundWorker(settings, store)

    reg.add_runner(
        RunnerSpec(
            "deliveries",
            "Sends queued mail to the recipients' MX hosts (DKIM, shaping, retries).",
            deliveries,
        )
    )
    reg.add_runner(
        RunnerSpec(
            "webhook_requests",
            "POSTs signed events to the apps' webhook endpoints (retries, disabling).",
            webhook_requests,
        )
    )

    reg.add_runner(
        RunnerSpec(
            "inbound_messages",
            "Verifies inbound mail (SPF, DKIM, DMARC) and POSTs it signed to its route's URL "
            "(retries, hold).",
            inbound_messages,
        )
    )

    for queue, every in (
        (claim.DELIVERIES, min(SWEEP_EVERY_SECONDS, settings.delivery_lease_seconds / 3)),
        (claim.WEBHOOK_REQUESTS, SWEEP_EVERY_SECONDS),
        (claim.INBOUND, SWEEP_EVERY_SECONDS),
    ):
        reg.add_task(
            PeriodicTask(
                f"sweep.{queue.table.name}",
                every,
                _sweeper(queue),
                f"Returns {queue.table.name} whose lease expired (a dead worker's) to the queue.",
            )
        )
    reg.add_task(
        PeriodicTask(
            "stats.compact",
            COMPACT_STATISTICS_EVERY_SECONDS,
            _compact_statistics,
            "Merges aged statistics rows into coarser buckets, so long charts read few rows.",
        )
    )
    reg.add_task(
        PeriodicTask(
            "privacy.retention",
            RETENTION_EVERY_SECONDS,
            _retention,
            "Enforces retention: bodies past the body window (at once for apps that store "
            "none), addresses hashed past the metadata window, old logs and audit records.",
        )
    )
    reg.add_task(
        PeriodicTask(
            "domains.dns_check",
            float(settings.dns_check_every_seconds),
            lambda store: _check_domains(store, settings),
            "Looks up every domain's SPF, DKIM, return-path (CNAME, and the return-path "
            "domain's MX) and DMARC records, and an inbound domain's MX, again; a change is a "
            "domain.dns_changed event.",
            delay_first=True,
        )
    )
    reg.add_task(
        PeriodicTask(
            "abuse.spikes",
            settings.abuse_spike_check_every_seconds,
            lambda store: _check_spikes(store, settings),
            "Holds and alerts apps (or tags) sending far above their baseline for the hour of "
            "the week (a leaked key, an abused form).",
        )
    )
    reg.add_task(
        PeriodicTask(
            "abuse.rates",
            settings.abuse_check_every_seconds,
            lambda store: _check_rates(store, settings),
            "Holds and alerts apps over the hard-bounce rate, the complaint rate or with a "
            "list-bombing pattern (unknown never-seen addresses at one domain).",
        )
    )
    reg.add_task(
        PeriodicTask(
            "stats.anomalies",
            ANOMALIES_EVERY_SECONDS,
            _check_anomalies,
            "Compares each app's and tag's volume and delivery rate in the hour just ended "
            "with its usual level for that hour; raises app.alert (volume_drop, volume_spike, "
            "delivery_rate_drop).",
            delay_first=True,
        )
    )
    reg.add_task(
        PeriodicTask(
            "stats.reports",
            REPORTS_EVERY_SECONDS,
            lambda store: _send_reports(store, settings),
            "E-mails the weekly and monthly reports to the users who asked for them, once "
            "per period, through Postbode itself.",
            delay_first=True,
        )
    )
    reg.add_task(
        PeriodicTask(
            "abuse.send_counters",
            PURGE_SEND_COUNTERS_EVERY_SECONDS,
            _purge_send_counters,
            "Deletes the sending-limit counters of windows that ended two days ago.",
            delay_first=True,
        )
    )
    return reg


def _check_spikes(store: Store, settings: Settings) -> int:
    from postbode.abuse.spikes import check_spikes

    return len(check_spikes(store, settings))


def _check_rates(store: Store, settings: Settings) -> int:
    from postbode.abuse.guards import check_rates

    return len(check_rates(store, settings))


def _send_reports(store: Store, settings: Settings) -> int:
    from postbode.stats.reports import send_due

    return send_due(store, settings.alert_sender or f"postbode@{settings.smtp_hostname}")


def _check_anomalies(store: Store) -> int:
    from postbode.stats.anomalies import check

    return len(check(store))


def _purge_send_counters(store: Store) -> int:
    from postbode.abuse.limits import purge_counters

    return purge_counters(store)


def _sweeper(queue: claim.Queue) -> Any:
    def sweep(store: Store) -> int:
        return claim.sweep(store, queue)

    return sweep


def _compact_statistics(store: Store) -> None:
    from postbode.stats.rollup import compact

    compact(store)


def _retention(store: Store) -> None:
    from postbode.privacy.retention import purge

    purge(store)


def _check_domains(store: Store, settings: Settings) -> None:
    from postbode import dnscheck

    asyncio.run(dnscheck.check_all(store, settings))
