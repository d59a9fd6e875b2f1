"""The inbound worker: drains the inbound_messages queue — verifies each message once (SPF,
DKIM, DMARC), parses it into its route's format, POSTs it signed (Standard Webhooks) to the
route's URL, logs every attempt, retries with backoff for a day; `hold` routes keep it."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import random
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import aiohttp
from prometheus_client import Counter
from sqlalchemy import Row, insert, select, update

from postbode import __version__
from postbode.config import Settings
from postbode.endpoints.destinations import (
    EXCERPT_CHARS,
    DestinationPolicy,
    describe_failure,
    excerpt,
    open_session,
)
from postbode.endpoints.signing import signed_headers
from postbode.events.record import Event, record
from postbode.events.types import EventType
from postbode.inbound.links import AttachmentLinks
from postbode.inbound.parse import FORMATS, Envelope, parse
from postbode.inbound.verify import Sender, make_resolver, verify
from postbode.runner.backoff import next_attempt_delay
from postbode.runner.owner import worker_name
from postbode.runner.queue import QueueRunner, RunnerOptions
from postbode.store import claim
from postbode.store.claim import INBOUND
from postbode.store.engine import Store
from postbode.store.retry import retrying
from postbode.store.schema import inbound_attempts, inbound_messages, routes, utcnow
from postbode.store.sealing import unseal

log = logging.getLogger(__name__)

LEASE = timedelta(minutes=10)  # renewed by the runner while a large message is in hand
BATCH_SIZE = 50
BODY_LOG_BYTES = 4 * EXCERPT_CHARS  # read of each response body, for its excerpt
STOP_GRACE_SECONDS = 30.0
USER_AGENT = f"Postbode-Inbound/{__version__}"

INBOUND_ATTEMPTS = Counter(
    "postbode_inbound_attempts_total", "Inbound hand-off attempts, by result.", ["result"]
)
_rng = random.Random()


@dataclass
class Job:
    """One claimed inbound message and its route (None: the route is gone or disabled)."""

    row: Row[Any]
    route: Row[Any] | None


@dataclass
class Outcome:
    """What handling one message came to."""

    job: Job
    verification: dict[str, Any] | None = None  # newly computed: stored with the outcome
    held: bool = False
    fail_reason: str | None = None  # not sent, and never will be
    url: str = ""
    started_at: datetime | None = None
    duration_ms: int = 0
    status_code: int | None = None
    error: str | None = None
    response_body: str | None = None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class InboundWorker:
    """One process's inbound loop: the inbound_messages queue under a queue runner."""

    queue = INBOUND

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        owner: str | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        """`session`, if given, is used for every request and never closed (its owner's)."""
        self.settings = settings
        self.store = store
        self.owner = owner or worker_name()
        self.concurrency = max(1, settings.inbound_concurrency)
        self.resolver = make_resolver(settings.dns_nameservers)
        self._links: AttachmentLinks | None = None
        self._given_session = session
        self._session = session
        self.runner: QueueRunner[Job] = QueueRunner(
            "inbound_messages",
            store,
            self,
            RunnerOptions(
                concurrency=self.concurrency,
                batch_size=BATCH_SIZE,
                lease=LEASE,
                poll_seconds=settings.runner_poll_seconds,
                stop_grace_seconds=STOP_GRACE_SECONDS,
            ),
            owner=self.owner,
        )

    def notify(self) -> None:
        self.runner.notify()

    async def run(self, stop: asyncio.Event) -> None:
        if self._session is None:
            # The same guard as webhooks: only where the operator's policy allows, checked
            # again at connect time, after DNS (a name may have come to resolve inward).
            self._session = open_session(
                self.settings.inbound_timeout,
                self.concurrency,
                DestinationPolicy.from_settings(self.settings),
                user_agent=USER_AGENT,
            )
        try:
            await self.runner.run(stop)
        finally:
            if self._session is not self._given_session:
                await self._session.close()
            self._session = self._given_session

    # -- the runner's handler -------------------------------------------------------------

    def prepare(self, rows: Sequence[Row[Any]]) -> list[Job]:
        route_ids = {r.route_id for r in rows if r.route_id is not None}
        with self.store.read() as conn:
            found = (
                {r.id: r for r in conn.execute(select(routes).where(routes.c.id.in_(route_ids)))}
                if route_ids
                else {}
            )
        jobs = []
        for row in rows:
            route = found.get(row.route_id)
            jobs.append(Job(row, route if route is not None and route.enabled else None))
        return jobs

    def ids(self, unit: Job) -> list[Any]:
        return [unit.row.id]

    async def handle(self, unit: Job) -> None:
        outcome = await asyncio.to_thread(self._build, unit)
        if isinstance(outcome, tuple):
            built, body, headers = outcome
            assert self._session is not None, "handle() runs only inside run()"
            await self._post(self._session, built, body, headers)
            outcome = built
        log_attempt(outcome)
        await asyncio.to_thread(
            retrying, lambda: self._record(outcome), "recording an inbound hand-off"
        )

    # -- building the request (in a thread) --------------------------------------------------

    def _build(self, job: Job) -> Outcome | tuple[Outcome, bytes, dict[str, str]]:
        row, route = job.row, job.route
        outcome = Outcome(job)
        if route is None:
            outcome.fail_reason = "the route was removed or disabled"
            return outcome
        raw = zlib.decompress(row.raw)
        verification = row.verification
        if verification is None:
            verification = verify(
                raw,
                Sender(row.client_ip, row.helo, row.mail_from),
                self.resolver,
                self.settings.smtp_hostname,
            )
            outcome.verification = verification
        if row.action == "hold":
            outcome.held = True
            return outcome
        if not route.url:
            outcome.fail_reason = "the route has no URL to post to"
            return outcome
        parsed = parse(raw)
        envelope = Envelope(
            id=str(row.id),
            mail_from=row.mail_from,
            rcpt_to=row.rcpt_to,
            mailbox_hash=row.mailbox_hash,
            received_at=row.received_at.isoformat(),
            client_ip=row.client_ip,
            helo=row.helo,
            route_id=route.id,
            match=route.pattern,
        )
        links = self._attachment_links()
        payload = FORMATS.get(route.format, FORMATS["native"])(
            parsed,
            envelope,
            verification,
            inline_limit=self.settings.inbound_attachment_inline_bytes,
            link=lambda index: links.url(row.id, index),
        )
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        # Standard Webhooks: the message id is the same on every retry, for idempotency.
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            **signed_headers([unseal(self.store, route.secret)], str(row.id), body),
        }
        outcome.url = route.url
        return outcome, body, headers

    def _attachment_links(self) -> AttachmentLinks:
        if self._links is None:
            self._links = AttachmentLinks.from_settings(self.settings, self.store)
        return self._links

    # -- sending ------------------------------------------------------------------------------

    async def _post(
        self,
        session: aiohttp.ClientSession,
        outcome: Outcome,
        body: bytes,
        headers: dict[str, str],
    ) -> None:
        outcome.started_at = utcnow()
        started = time.perf_counter()
        timeout = self.settings.inbound_timeout
        try:
            async with (
                asyncio.timeout(timeout),
                # A file-like body: aiohttp streams it rather than copy megabytes on the loop.
                session.post(
                    outcome.url, data=io.BytesIO(body), headers=headers, allow_redirects=False
                ) as response,
            ):
                outcome.status_code = response.status
                outcome.response_body = await _read_start(response)
        except TimeoutError:
            outcome.error = f"timed out after {timeout:g} s"
        except aiohttp.ClientError as exc:
            outcome.error = describe_failure(exc)
        except Exception as exc:  # an odd URL or a bug: this attempt's error, not a crash
            log.exception("inbound hand-off of %s failed", outcome.job.row.id)
            outcome.error = f"{type(exc).__name__}: {exc}"
        outcome.duration_ms = int((time.perf_counter() - started) * 1000)

    # -- recording (in a thread) ----------------------------------------------------------------

    def _record(self, outcome: Outcome) -> None:
        row = outcome.job.row
        now = utcnow()
        values: dict[str, Any] = {}
        if outcome.verification is not None:
            values["verification"] = outcome.verification
        event: Event | None = None
        common = {"inbound_id": str(row.id), "route_id": row.route_id}
        if outcome.held:
            values["status"] = "held"
        elif outcome.fail_reason is not None:
            values.update(status="failed", last_error=outcome.fail_reason)
            event = _event(row, EventType.INBOUND_FAILED, now, reason=outcome.fail_reason, **common)
        else:
            attempt_no = row.attempts + 1
            values.update(
                attempts=attempt_no,
                last_status_code=outcome.status_code,
                last_error=outcome.error,
            )
            if outcome.ok:
                values.update(status="delivered", delivered_at=now, last_error=None)
                event = _event(
                    row,
                    EventType.INBOUND_DELIVERED,
                    now,
                    url=outcome.url,
                    status_code=outcome.status_code,
                    attempts=attempt_no,
                    **common,
                )
            elif (
                now - row.queued_at
            ).total_seconds() >= self.settings.inbound_retry_window_seconds:
                reason = f"no 2xx answer in {attempt_no} attempts (last: {_last(outcome)})"
                values.update(status="failed")
                event = _event(row, EventType.INBOUND_FAILED, now, reason=reason, **common)
            else:
                delay = next_attempt_delay(
                    attempt_no, None, float(self.settings.inbound_retry_cap_seconds), _rng
                )
                values.update(status="pending", next_attempt_at=now + timedelta(seconds=delay))
        with self.store.write() as conn:
            if not claim.release_in(conn, INBOUND, self.owner, row.id, **values):
                log.warning("lease on inbound message %s was lost; not recorded", row.id)
                return
            if outcome.started_at is not None:
                conn.execute(
                    insert(inbound_attempts).values(
                        inbound_id=row.id,
                        started_at=outcome.started_at,
                        duration_ms=outcome.duration_ms,
                        url=outcome.url,
                        status_code=outcome.status_code,
                        error=outcome.error,
                        response_body=outcome.response_body,
                    )
                )
            if event is not None:
                record(conn, event)
        INBOUND_ATTEMPTS.labels(_result_label(outcome)).inc()


def _event(row: Row[Any], type: EventType, at: datetime, **data: Any) -> Event:
    return Event(app_id=row.app_id, type=type, at=at, recipient=row.rcpt_to, data=data)


def _last(outcome: Outcome) -> str:
    return str(outcome.status_code) if outcome.status_code is not None else str(outcome.error)


def _result_label(outcome: Outcome) -> str:
    if outcome.held:
        return "held"
    if outcome.fail_reason is not None:
        return "not_sent"
    return str(outcome.status_code or "error")


def log_attempt(outcome: Outcome) -> None:
    """One structured log line per hand-off attempt (or message held or failed unsent)."""
    row = outcome.job.row
    log.info(
        "inbound.attempt id=%s route=%s url=%s status=%s error=%s held=%s duration_ms=%d",
        row.id,
        row.route_id,
        outcome.url or "-",
        outcome.status_code if outcome.status_code is not None else "-",
        json.dumps(outcome.error or outcome.fail_reason)
        if (outcome.error or outcome.fail_reason)
        else "-",
        outcome.held,
        outcome.duration_ms,
    )


async def _read_start(response: aiohttp.ClientResponse) -> str:
    """A short, sanitised excerpt of the response body, as webhooks keep: the first
    BODY_LOG_BYTES only are read (the rest never is)."""
    chunks: list[bytes] = []
    size = 0
    while size < BODY_LOG_BYTES:
        chunk = await response.content.read(BODY_LOG_BYTES - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return excerpt(b"".join(chunks))


def requeue(conn: Any, inbound_id: Any, *, action: str | None = None) -> bool:
    """Put a held, delivered or failed message back in the queue, due now (release, replay);
    False when it is queued or in hand already."""
    now = utcnow()
    values: dict[str, Any] = {
        "status": "pending",
        "next_attempt_at": now,
        "queued_at": now,
        "last_error": None,
    }
    if action is not None:
        values["action"] = action
    t = inbound_messages
    result = conn.execute(
        update(t)
        .where(t.c.id == inbound_id, t.c.status.in_(("held", "delivered", "failed")))
        .values(**values)
    )
    return bool(result.rowcount == 1)
