"""The webhook worker: drains the webhook_requests queue — claims due requests with leases, POSTs
signed JSON to each endpoint, logs every attempt, retries with backoff, disables dead endpoints."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
from prometheus_client import Counter
from sqlalchemy import Connection, Row, func, insert, select, update

from postbode import __version__
from postbode.config import Settings
from postbode.endpoints.destinations import (
    EXCERPT_CHARS,
    DestinationPolicy,
    describe_failure,
    excerpt,
    open_session,
)
from postbode.runner.backoff import next_attempt_delay
from postbode.runner.batch import BatchWriter
from postbode.runner.owner import worker_name
from postbode.runner.queue import QueueRunner, RunnerOptions
from postbode.store import claim
from postbode.store.claim import WEBHOOK_REQUESTS
from postbode.store.engine import Store
from postbode.store.retry import is_transient, retrying
from postbode.store.schema import (
    apps,
    events,
    messages,
    utcnow,
    webhook_attempts,
    webhook_requests,
    webhooks,
)
from postbode.store.sealing import key_for

from . import formats
from .manage import disable, masked, secrets_in_force

log = logging.getLogger(__name__)

LEASE = timedelta(minutes=5)  # far above the request timeout: a lease never needs renewing
BATCH_SIZE = 200  # requests claimed per claim at most
BODY_LOG_BYTES = 4 * EXCERPT_CHARS  # read of each response body, for its excerpt
STOP_GRACE_SECONDS = 15.0
USER_AGENT = f"Postbode-Webhooks/{__version__}"

WEBHOOK_ATTEMPTS = Counter(
    "postbode_webhook_attempts_total", "Webhook request attempts, by result.", ["result"]
)
_rng = random.Random()


@dataclass
class Job:
    """One claimed request, ready to send (or already failed without sending)."""

    row: Row[Any]
    hook: Row[Any] | None = None
    body: bytes = b""
    headers: dict[str, str] | None = None
    url: str = ""  # where it goes: the endpoint's URL, credentials moved into a header
    # Set when the request cannot be sent at all (endpoint disabled, event purged).
    fail_reason: str | None = None


@dataclass
class Result:
    """What one attempt gave."""

    job: Job
    started_at: datetime
    duration_ms: int = 0
    status_code: int | None = None
    error: str | None = None
    response_body: str | None = None
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class WebhookWorker:
    """One process's webhook loop: the webhook_requests queue under a queue runner, at most
    `webhook_concurrency` requests in flight, their attempts recorded in batches."""

    queue = WEBHOOK_REQUESTS

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
        self.concurrency = max(1, settings.webhook_concurrency)
        self._given_session = session
        self._session: aiohttp.ClientSession | None = session
        self._recorder: BatchWriter[Result] = BatchWriter(self._record)
        self.runner: QueueRunner[Job] = QueueRunner(
            "webhook_requests",
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
        """Requests were queued: look now instead of at the next poll."""
        self.runner.notify()

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and send until `stop` is set; then finish (or hand back) what is in hand."""
        if self._session is None:
            self._session = open_session(
                self.settings.webhook_timeout,
                self.concurrency,
                DestinationPolicy.from_settings(self.settings),
                user_agent=USER_AGENT,
            )
        try:
            await self.runner.run(stop)
            await self._recorder.flush()
        finally:
            if self._session is not self._given_session:
                await self._session.close()  # waits for its connections to close
            self._session = self._given_session

    # -- the runner's handler -------------------------------------------------------------

    def ids(self, unit: Job) -> list[Any]:
        return [unit.row.id]

    async def handle(self, unit: Job) -> None:
        """Send one request, then record its attempt with others that finished meanwhile."""
        assert self._session is not None, "handle() runs only inside run()"
        result = await self._send(self._session, unit)
        log_attempt(result)
        await self._recorder.submit(result)

    def prepare(self, rows: Sequence[Row[Any]]) -> list[Job]:
        """The body and signed headers of each claimed request."""
        key = key_for(self.store)
        with self.store.read() as conn:
            hooks = {
                h.id: h
                for h in conn.execute(
                    select(webhooks).where(webhooks.c.id.in_({r.webhook_id for r in rows}))
                )
            }
            found = {
                e.id: e
                for e in conn.execute(
                    select(events, apps.c.name.label("app"))
                    .join(apps, apps.c.id == events.c.app_id)
                    .where(events.c.id.in_({r.event_id for r in rows}))
                )
            }
            message_ids = {e.message_id for e in found.values() if e.message_id is not None}
            msgs = (
                {
                    m.id: m
                    for m in conn.execute(select(messages).where(messages.c.id.in_(message_ids)))
                }
                if message_ids
                else {}
            )
        now = utcnow()
        jobs = []
        for row in rows:
            job = Job(row=row, hook=hooks.get(row.webhook_id))
            event = found.get(row.event_id)
            if job.hook is None or not job.hook.enabled:
                job.fail_reason = "endpoint disabled"
            elif event is None:
                job.fail_reason = "event no longer stored"
            else:
                try:
                    # The endpoint's format makes the request: its body, signature headers
                    # (Standard Webhooks, and the provider's own) and where it goes.
                    message = msgs.get(event.message_id)
                    out = formats.render(
                        job.hook._mapping,
                        [(event._mapping, message._mapping if message else None)],
                        secrets_in_force(job.hook, now, key),
                        now,
                    )
                    job.body, job.headers, job.url = out.body, out.headers, out.url
                except Exception:  # a bug: this request fails with the traceback, others go on
                    log.exception("preparing webhook request %s failed", row.id)
                    job.fail_reason = traceback.format_exc(limit=5)
            jobs.append(job)
        return jobs

    # -- sending -----------------------------------------------------------------------------

    async def _send(self, session: aiohttp.ClientSession, job: Job) -> Result:
        result = Result(job=job, started_at=utcnow())
        if job.fail_reason is None and job.hook is not None and job.headers is not None:
            started = time.perf_counter()
            try:
                # The timeout covers the whole exchange: a trickling endpoint cannot hold a slot.
                async with (
                    asyncio.timeout(self.settings.webhook_timeout),
                    session.post(
                        job.url or job.hook.url,
                        data=job.body,
                        headers=job.headers,
                        allow_redirects=False,  # a 3xx is the endpoint's answer, not a detour
                    ) as response,
                ):
                    result.status_code = response.status
                    result.retry_after = _retry_after(response.headers.get("retry-after"))
                    result.response_body = await _read_start(response)
            except TimeoutError:
                result.error = f"timed out after {self.settings.webhook_timeout:g} s"
            except aiohttp.ClientError as exc:
                result.error = describe_failure(exc)
            except Exception as exc:  # a bug or an odd URL: logged as this attempt's error
                log.exception("webhook request %s failed", job.row.id)
                result.error = f"{type(exc).__name__}: {exc}"
            result.duration_ms = int((time.perf_counter() - started) * 1000)
        return result

    # -- recording (in a thread, one transaction per batch of results) -------------------------

    def _record(self, batch: list[Result]) -> list[BaseException | None] | None:
        """One transaction for the batch; should it fail, one per result, so one bad result
        does not lose the others (its own error goes to its handler: the runner parks it)."""
        what = f"recording {len(batch)} webhook attempts"
        try:
            retrying(lambda: self._write(batch), what)
        except Exception as exc:
            if len(batch) == 1 or is_transient(exc):
                return [exc] * len(batch)
            errors: list[BaseException | None] = []
            for result in batch:
                try:
                    retrying(lambda result=result: self._write([result]), what)  # type: ignore[misc]
                    errors.append(None)
                except Exception as one:
                    errors.append(one)
            return errors
        return None

    def _write(self, batch: list[Result]) -> None:
        now = utcnow()
        with self.store.write() as conn:
            delivered = [r for r in batch if r.ok and r.job.fail_reason is None]
            self._record_delivered(conn, delivered, now)
            for result in batch:
                if not (result.ok and result.job.fail_reason is None):
                    self._record_one(conn, result, now)

    def _record_delivered(self, conn: Connection, results: list[Result], now: datetime) -> None:
        """Successes, the common case, a few statements for the whole batch."""
        t = webhook_requests
        by_code: dict[int, list[Result]] = {}
        for r in results:
            by_code.setdefault(r.status_code or 200, []).append(r)
        for code, group in by_code.items():
            held = set(
                conn.execute(
                    update(t)
                    .where(
                        t.c.id.in_([r.job.row.id for r in group]),
                        t.c.status == WEBHOOK_REQUESTS.claimed,
                        t.c.lease_owner == self.owner,
                    )
                    .values(
                        status="delivered",
                        attempts=t.c.attempts + 1,
                        last_status_code=code,
                        last_error=None,
                        delivered_at=now,
                        lease_owner=None,
                        lease_until=None,
                    )
                    .returning(t.c.id)
                ).scalars()
            )
            if len(held) < len(group):
                log.warning("%d webhook leases were lost; not recorded", len(group) - len(held))
            attempts = [
                {
                    "request_id": r.job.row.id,
                    "started_at": r.started_at,
                    "duration_ms": r.duration_ms,
                    "status_code": r.status_code,
                    "error": None,
                    "response_body": r.response_body,
                }
                for r in group
                if r.job.row.id in held
            ]
            if attempts:
                conn.execute(insert(webhook_attempts), attempts)
            WEBHOOK_ATTEMPTS.labels("ok").inc(len(attempts))
        recovered = {
            r.job.hook.id for r in results if r.job.hook is not None and r.job.hook.failing_since
        }
        if recovered:  # a success ends an endpoint's failure clock
            conn.execute(
                update(webhooks).where(webhooks.c.id.in_(recovered)).values(failing_since=None)
            )

    def _record_one(self, conn: Connection, result: Result, now: datetime) -> None:
        """A request not sent, or an attempt that failed: retry later, fail, or disable."""
        job, row = result.job, result.job.row
        hook = job.hook
        if job.fail_reason is not None or hook is None:
            claim.release_in(
                conn,
                WEBHOOK_REQUESTS,
                self.owner,
                row.id,
                status="failed",
                last_error=job.fail_reason,
            )
            WEBHOOK_ATTEMPTS.labels("not_sent").inc()
            return
        attempt_no = row.attempts + 1
        values: dict[str, Any] = {
            "attempts": attempt_no,
            "last_status_code": result.status_code,
            "last_error": result.error,
        }
        disable_reason: str | None = None
        if result.status_code == 410:
            # 410 Gone: the receiver says the endpoint is gone for good.
            values["status"] = "failed"
            disable_reason = "the endpoint answered 410 Gone"
        elif (now - row.created_at).total_seconds() >= self.settings.webhook_retry_window_seconds:
            values["status"] = "failed"
        else:
            delay = next_attempt_delay(
                attempt_no,
                result.retry_after,
                float(self.settings.webhook_retry_cap_seconds),
                _rng,
            )
            values.update(status="pending", next_attempt_at=now + timedelta(seconds=delay))
        if not claim.release_in(conn, WEBHOOK_REQUESTS, self.owner, row.id, **values):
            log.warning("lease on webhook request %s was lost; its attempt is not recorded", row.id)
            return
        conn.execute(
            insert(webhook_attempts).values(
                request_id=row.id,
                started_at=result.started_at,
                duration_ms=result.duration_ms,
                status_code=result.status_code,
                error=result.error,
                response_body=result.response_body,
            )
        )
        WEBHOOK_ATTEMPTS.labels(str(result.status_code or "error")).inc()
        failing_since = conn.execute(
            update(webhooks)
            .where(webhooks.c.id == hook.id)
            .values(failing_since=func.coalesce(webhooks.c.failing_since, now))
            .returning(webhooks.c.failing_since)
        ).scalar()
        if disable_reason is None and failing_since is not None:
            failing_for = (now - failing_since).total_seconds()
            if failing_for >= self.settings.webhook_disable_after_seconds:
                disable_reason = (
                    f"no successful delivery for {failing_for / 86400:.1f} days "
                    f"(last: {result.status_code or result.error})"
                )
        if disable_reason is not None and disable(conn, hook, disable_reason, now):
            log.warning("disabled webhook %s (%s): %s", hook.id, masked(hook.url), disable_reason)


def log_attempt(result: Result) -> None:
    """One structured log line per webhook request attempt (or request failed unsent)."""
    job = result.job
    log.info(
        "webhook.attempt request=%s webhook=%s event=%s url=%s status=%s error=%s "
        "duration_ms=%d attempt=%d",
        job.row.id,
        job.row.webhook_id,
        job.row.event_id,
        job.url or (job.hook.url if job.hook is not None else "-"),  # no URL credentials
        result.status_code if result.status_code is not None else "-",
        json.dumps(result.error or job.fail_reason) if (result.error or job.fail_reason) else "-",
        result.duration_ms,
        job.row.attempts + 1,
    )


async def _read_start(response: aiohttp.ClientResponse) -> str:
    """A short, sanitised excerpt of the response body (decompressed if the endpoint
    compressed it): the first BODY_LOG_BYTES only are read, so a large answer costs nothing
    and the log cannot carry back what an endpoint serves. A connection left with unread
    body is closed, not reused."""
    chunks: list[bytes] = []
    size = 0
    while size < BODY_LOG_BYTES:
        chunk = await response.content.read(BODY_LOG_BYTES - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return excerpt(b"".join(chunks))


def _retry_after(value: str | None) -> float | None:
    """Seconds a Retry-After header asks for (RFC 9110 §10.2.3: seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        at = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if at.tzinfo is None:
        return None
    return max(0.0, (at - utcnow()).total_seconds())
