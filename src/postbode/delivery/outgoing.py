"""The outgoing processor: for a batch of deliveries to one domain, a checklist of steps, each
returning or recording an outcome: end_if_suppressed, check_app_active, fail_if_expired,
wait_if_rate_limited, sign, resolve_route, send, record."""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import random
import traceback
import uuid
import zlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Row, bindparam, insert, select

from postbode.abuse.held import reply_text
from postbode.bounces import suppression
from postbode.bounces.classify import Classification, classify, load_rules
from postbode.bounces.effects import after_smtp_bounce
from postbode.config import Settings
from postbode.delivery import dkim
from postbode.delivery.backoff import retry_hint
from postbode.delivery.mx import DnsFailure, DnsHardFail, MxLookup, Target
from postbode.delivery.outcomes import Delivered, HardFail, Held, Outcome, Reply, SoftFail
from postbode.delivery.shaping import Shaper, Wait, is_throttling
from postbode.delivery.smtp_sender import Attempt, SmtpSession, SmtpTimeouts, TlsPolicy
from postbode.events.record import Event, PreparedEvents, prepare_record, record
from postbode.events.types import EventType
from postbode.metrics import DELIVERIES, IN_FLIGHT, SHAPING_WAITS
from postbode.privacy.hashing import address_key
from postbode.runner.backoff import next_attempt_delay
from postbode.store.bulk import BulkInsert, PreparedRows
from postbode.store.claim import DELIVERIES as DELIVERY_QUEUE
from postbode.store.claim import release_in, release_many
from postbode.store.engine import Store
from postbode.store.retry import is_transient, retrying
from postbode.store.schema import (
    SYSTEM_SOURCE,
    apps,
    attempts,
    claimed_elsewhere,
    domains,
    messages,
    raw_messages,
    utcnow,
)
from postbode.tracking.rewrite import track

log = logging.getLogger(__name__)
_rng = random.Random()


@dataclass
class Job:
    """One claimed delivery and everything needed to send it."""

    row: Row[Any]
    message: Row[Any]  # the columns of its messages row that _LOAD_MESSAGES reads
    raw: bytes = b""
    app_status: str = "active"
    hold_reason: str | None = None  # the app is held (abuse/hold.py): not sent until released
    max_age: float = 0.0
    outcome: Outcome | None = None
    attempt: Attempt | None = None
    note: str = ""  # why, when no SMTP reply explains the outcome
    classification: Classification | None = None
    events: list[Event] = field(default_factory=list)
    slot: float = 0.0  # when shaping lets it go (on the shaper's clock)
    wait: Wait | None = None  # not attempted: waiting for a shaping slot until wait.until
    # suppressed since it was queued: (reason, source) of the entry; ended without an attempt
    suppressed: tuple[str, str] | None = None
    # the From domain's DKIM key row (domain, selector, private key), None when it has none
    signing_key: Any = None

    @property
    def id(self) -> uuid.UUID:
        return self.row.id  # type: ignore[no-any-return]

    @property
    def recipient(self) -> str:
        return self.row.recipient  # type: ignore[no-any-return]


class Outgoing:
    """Sends batches of deliveries and records what happened."""

    def __init__(self, settings: Settings, store: Store, resolver: MxLookup, owner: str) -> None:
        self.settings = settings
        self.store = store
        self.resolver = resolver
        self.owner = owner
        self.timeouts = SmtpTimeouts.from_settings(settings)
        # the operator's bounce rules decide synchronous rejects as they decide DSNs
        self.rules = load_rules(settings.bounce_rules_path)
        self.tls = TlsPolicy.parse(settings.tls_policy)
        self.shaper = Shaper.from_settings(settings, store, holder=owner)

    # -- loading (in a thread) ---------------------------------------------------------------

    def load(self, rows: Sequence[Row[Any]]) -> list[Job]:
        """The jobs for claimed rows: their messages, raw content and app settings."""
        message_ids = {r.message_id for r in rows}
        app_ids = {r.app_id for r in rows}
        hash_key = address_key(self.store)  # erased addresses stay suppressed as hashes
        with self.store.read() as conn:
            ids = {"ids": list(message_ids)}
            msgs: dict[uuid.UUID, Any] = {m.id: m for m in conn.execute(_LOAD_MESSAGES, ids)}
            raws = dict(conn.execute(_LOAD_RAWS, ids).all())
            app_rows = {a.id: a for a in conn.execute(_LOAD_APPS, {"app_ids": list(app_ids)})}
            # Checked before every attempt, not only at accept: an address suppressed while
            # its delivery waited for a retry must not be mailed again.
            entries = suppression.reasons_for(
                conn, {(r.app_id, r.recipient) for r in rows}, key=hash_key
            )
            # In the same read: a thread hop and a transaction less per connection's worth.
            keys = self._signing_keys(
                conn, {_from_domain(m.mail_from, m.from_header) for m in msgs.values()}, app_ids
            )
        jobs = []
        for row in rows:
            app = app_rows[row.app_id]
            raw = raws.get(row.message_id)
            message = msgs[row.message_id]
            key = row.recipient.lower()
            jobs.append(
                Job(
                    row=row,
                    message=message,
                    raw=zlib.decompress(raw) if raw is not None else b"",
                    app_status=app.status,
                    # Postbode's own alert mail goes out: it tells people about the hold.
                    hold_reason=app.hold_reason if message.source != SYSTEM_SOURCE else None,
                    max_age=float(
                        app.max_message_age_seconds or self.settings.max_message_age_seconds
                    ),
                    suppressed=entries.get((row.app_id, key, "all"))
                    or entries.get((row.app_id, key, message.stream)),
                    signing_key=keys.get(
                        (row.app_id, _from_domain(message.mail_from, message.from_header))
                    ),
                )
            )
        return jobs

    @staticmethod
    def _signing_keys(
        conn: Connection, names: set[str], app_ids: set[int]
    ) -> dict[tuple[int, str], Any]:
        """The DKIM keys of these From domains, by (app, domain): each app's own claim of the
        name, unless another app's claim of it is verified (then the app's mail goes unsigned:
        the name is not its to sign for)."""
        rows = conn.execute(_SIGNING_KEYS, {"names": list(names), "app_ids": list(app_ids)}).all()
        return {(r.app_id, r.name): r for r in rows}

    # -- the checklist ----------------------------------------------------------------------

    async def process(self, domain: str, jobs: list[Job]) -> None:
        """Deliver `jobs` (all to `domain`, claimed by this worker) and record the outcomes."""
        pending = [
            j
            for j in jobs
            if not self.end_if_suppressed(j)
            and not self.check_app_active(j)
            and not self.fail_if_expired(j)
        ]
        pending = await self.wait_if_rate_limited(domain, pending)
        if pending:
            for job in pending:
                track(self.settings, self.store, job)  # tracking/rewrite.py: before signing
                self.sign(job)
            targets = await self.resolve_route(domain, pending)
            if targets is not None:
                await self.send(targets, [j for j in pending if j.outcome is None])
        await asyncio.to_thread(self.record, jobs)

    def end_if_suppressed(self, job: Job) -> bool:
        """The address went on the app's suppression list while this delivery waited."""
        return job.suppressed is not None

    def check_app_active(self, job: Job) -> bool:
        if job.app_status != "active":
            job.outcome = Held(reason=f"app is {job.app_status}")
            return True
        if job.hold_reason is not None:
            job.outcome = Held(reason=reply_text(job.hold_reason))
            return True
        return False

    def fail_if_expired(self, job: Job) -> bool:
        age = (utcnow() - job.row.first_queued_at).total_seconds()
        if job.row.attempts > 0 and age >= job.max_age:
            job.outcome = HardFail(reply=None, reason="expired")
            job.note = f"expired: not delivered within {job.max_age / 3600:g} h"
            return True
        return False

    async def wait_if_rate_limited(self, domain: str, jobs: list[Job]) -> list[Job]:
        """The jobs that may go within the shaper's max wait (each with its slot); the others
        are released to wait for theirs, so no lease is held while a destination is busy. A
        delivery back from such a wait keeps the slot it was released with."""
        if not jobs:
            return jobs
        booked: dict[Hashable, tuple[float, str]] = {
            j.id: slot for j in jobs if (slot := _booked_slot(j.row)) is not None
        }
        if self.shaper.configured(domain).rate_per_minute <= 0:
            # No rate limit: admit books nothing and lets every one go now, so it needs no
            # trip to a thread (configured() reads only the rules, in memory).
            go: dict[Hashable, float] = dict.fromkeys((j.id for j in jobs), self.shaper.clock())
            waits: dict[Hashable, Wait] = {}
        else:
            go, waits = await asyncio.to_thread(
                self.shaper.admit, domain, [j.id for j in jobs], booked
            )
        for job in jobs:
            if job.id in waits:
                job.wait = waits[job.id]
            else:
                job.slot = go[job.id]
        return [j for j in jobs if j.wait is None]

    def sign(self, job: Job) -> None:
        """DKIM-sign with the From domain's key; unsigned (and noted) when it has none."""
        domain = _from_domain(job.message.mail_from, job.message.from_header)
        key = job.signing_key
        if key is None:
            job.note = f"unsigned: no DKIM key for {domain}"
            return
        try:
            job.raw = dkim.sign(job.raw, key.name, key.dkim_selector, key.dkim_private_key.encode())
        except dkim.DkimError as exc:
            job.note = f"unsigned: {exc}"

    async def resolve_route(self, domain: str, jobs: list[Job]) -> list[Target] | None:
        try:
            return await self.resolver.resolve(domain)
        except DnsFailure as fail:
            reply = Reply(550 if fail.permanent else 451, fail.status, fail.reason)
            for job in jobs:
                job.outcome = (
                    HardFail(reply=reply, reason=fail.reason)
                    if isinstance(fail, DnsHardFail)
                    else SoftFail(reply=reply, retry_after=None, reason=fail.reason)
                )
                job.note = f"DNS: {fail}"
            return None

    async def send(self, targets: list[Target], jobs: list[Job]) -> None:
        """Over one connection per target, falling back to the next target while the session
        itself fails (connection refused, 4xx greeting, TLS trouble). Each job goes at its
        shaping slot, over a connection the MX host's limit allows; after a throttling reply
        (421, "too many connections" …) the destination is slowed down and the jobs not yet
        tried wait for slots at the lowered rate instead of trying further hosts now."""
        remaining = list(jobs)
        domain = remaining[0].row.recipient_domain if remaining else ""
        throttled = False
        IN_FLIGHT.labels(domain).inc(len(remaining))
        try:
            for target in targets:
                if not remaining or throttled:
                    break
                if not await self.shaper.acquire_connection(domain, target.host):
                    wait = await asyncio.to_thread(self.shaper.connection_wait, domain, target.host)
                    for job in remaining:
                        if job.outcome is None:
                            job.wait = wait
                    break
                try:
                    throttled = await self._send_on(target, domain, remaining)
                finally:
                    await self.shaper.release_connection(target.host)
            if throttled:
                untried = [j for j in remaining if j.outcome is None and j.wait is None]
                waits = await asyncio.to_thread(self.shaper.defer, domain, [j.id for j in untried])
                for job in untried:
                    job.wait = waits[job.id]
        finally:
            IN_FLIGHT.labels(domain).dec(len(jobs))

    async def _send_on(self, target: Target, domain: str, remaining: list[Job]) -> bool:
        """Send what remains over one session to `target`, taking the jobs it settles out of
        `remaining`; True when the remote answered with a throttling reply."""
        async with SmtpSession(
            target.host,
            target.ip,
            target.port,
            self.settings.smtp_hostname,
            self.tls.mode_for(domain),
            self.timeouts,
        ) as session:
            for job in list(remaining):
                await self.shaper.pace(job.slot)
                result = await session.send(self.return_path(job), [job.recipient], job.raw)
                job.outcome = result.outcomes[job.recipient]
                job.attempt = result.attempt
                if result.session_error is None or result.message_sent:
                    # Once the content went out the first host may have it: this
                    # attempt's outcome stands, never another MX (RFC 1047).
                    remaining.remove(job)
                outcome = job.outcome
                if isinstance(outcome, SoftFail) and outcome.reply and is_throttling(outcome.reply):
                    await asyncio.to_thread(self.shaper.throttled, domain, outcome.reply)
                    return True
                if session.failure is not None:
                    break  # next target for what is left
        return False

    def return_path(self, job: Job) -> str:
        """VERP: a per-delivery token, so a later bounce finds its delivery."""
        return f"{job.row.verp_token}@{self.settings.return_path_domain}"

    # -- recording (in a thread, one transaction per batch) --------------------------------

    def record(self, jobs: list[Job]) -> None:
        """Record every job's outcome in one transaction: each table written with one
        statement for the batch, the counters bumped last. Should that fail, the outcomes are
        recorded one by one, each in a savepoint, so a bug recording one delivery loses only
        that one (parked with its traceback) and the batch's other outcomes, mail the MX
        already took, still commit."""
        now = utcnow()
        plans: list[_Plan] = []
        broken: list[tuple[Job, str]] = []
        for job in jobs:
            try:
                plans.append(self._plan(job, now))
            except Exception:  # a bug: park this delivery where the UI shows it
                log.exception("recording delivery %s failed", job.id)
                broken.append((job, traceback.format_exc(limit=5)))
        # The mail may already be at the MX: a store that is away for a moment (a restart, a
        # dropped connection) is waited for rather than the outcome lost.
        recorded = retrying(
            lambda: self._write(plans, broken), f"recording {len(jobs)} delivery outcomes"
        )
        for plan in recorded:
            if plan.event is not None:
                log_attempt(plan)
            if plan.event is None and plan.job.wait is not None:
                SHAPING_WAITS.labels(plan.job.row.recipient_domain, plan.job.wait.limit).inc()
            elif plan.outcome:  # an attempt's outcome (a suppression made no attempt)
                DELIVERIES.labels(plan.outcome).inc()

    def _write(self, plans: list[_Plan], broken: list[tuple[Job, str]]) -> list[_Plan]:
        """One transaction for the outcomes; returns the plans recorded (a lost lease's are
        not). Plans that fail one by one are parked with their traceback."""
        recorded: list[_Plan] = []
        parked = list(broken)
        ready = (
            self._prepare_batch(plans)
            if len(plans) > 1 and not _counts_soft_bounces(plans)
            else None
        )
        with self.store.write() as conn:
            if ready is not None and self._write_batch(conn, plans, ready):
                recorded = plans
            else:
                for plan in plans:
                    try:
                        with conn.begin_nested():
                            if self._write_one(conn, plan):
                                recorded.append(plan)
                    except Exception as exc:
                        if is_transient(exc):
                            raise  # the whole transaction is tried again
                        log.exception("recording delivery %s failed", plan.job.id)
                        parked.append((plan.job, traceback.format_exc(limit=5)))
            for job, error in parked:
                release_in(conn, DELIVERY_QUEUE, self.owner, job.id, status="held", error=error)
        return recorded

    def _prepare_batch(self, plans: list[_Plan]) -> tuple[PreparedRows, PreparedEvents]:
        """The batch's attempts and events converted for the driver, before the write
        transaction (on SQLite its lock is then held for the statements alone)."""
        dialect = self.store.engine.dialect
        return (
            _ATTEMPT_ROWS.prepare(dialect, [p.attempt for p in plans if p.attempt is not None]),
            prepare_record(dialect, [p.event for p in plans if p.event is not None]),
        )

    def _write_batch(
        self, conn: Connection, plans: list[_Plan], ready: tuple[PreparedRows, PreparedEvents]
    ) -> bool:
        """All the plans with one statement per table, in a savepoint; False (and nothing
        written) when a lease was lost or a statement failed."""
        attempt_rows, events = ready
        try:
            with conn.begin_nested():
                released = release_many(
                    conn, DELIVERY_QUEUE, self.owner, [(p.job.id, p.values) for p in plans]
                )
                if released != len(plans):
                    raise _LeaseLost
                BulkInsert.execute(conn, attempt_rows)
                events.write_events(conn)
                for plan in plans:
                    self._after_bounce(conn, plan)
                events.write_counters(conn)  # last: the hot counter rows stay locked briefly
        except _LeaseLost:
            return False  # one by one, to tell which lease was lost
        except Exception as exc:
            if is_transient(exc):
                raise  # the whole transaction is tried again
            log.warning("recording %d outcomes at once failed (%s); one by one", len(plans), exc)
            return False
        return True

    def _write_one(self, conn: Connection, plan: _Plan) -> bool:
        """One plan; False when its lease was lost (and so nothing was recorded)."""
        job = plan.job
        if not release_in(conn, DELIVERY_QUEUE, self.owner, job.id, **plan.values):
            what = "shaping wait" if plan.event is None else "outcome"
            log.warning("lease on delivery %s was lost; its %s is not recorded", job.id, what)
            return False
        if plan.attempt is not None:
            conn.execute(_INSERT_ATTEMPTS, [plan.attempt])
        if plan.event is not None:
            record(conn, plan.event)
        self._after_bounce(conn, plan)
        return True

    def _after_bounce(self, conn: Connection, plan: _Plan) -> None:
        job = plan.job
        if plan.bounce_detail is not None and job.classification is not None:
            after_smtp_bounce(
                conn, job.row, job.classification, plan.bounce_detail, self.settings, plan.now
            )

    def _plan(self, job: Job, now: datetime) -> _Plan:
        """What recording `job` writes: the delivery's new columns, its attempt and event."""
        if job.suppressed is not None:
            return self._plan_suppressed(job, job.suppressed, now)
        if job.outcome is None and job.wait is not None:
            return self._plan_wait(job, job.wait, now)
        outcome = job.outcome or SoftFail(reply=None, retry_after=None, reason="not attempted")
        row, msg = job.row, job.message
        attempt_no = row.attempts + 1
        reply = outcome.reply if not isinstance(outcome, Held) else None
        if reply is not None:
            reply_text: str | None = str(reply)
        elif job.note.startswith("expired:"):
            reply_text = job.note
        else:
            # Decided without a reply (dropped, timed out, TLS refused, SMTPUTF8 missing, app
            # suspended): the reason is all the queue view and an operator have to go on.
            reason = "" if isinstance(outcome, Delivered) else outcome.reason
            reply_text = reason or job.note or None
        values: dict[str, Any] = {
            "attempts": attempt_no if job.attempt is not None else row.attempts,
            "last_attempt_at": now,
            "last_reply": reply_text,
            "updated_at": now,
        }
        if job.attempt is not None:
            values["mx"] = job.attempt.mx_host
        data: dict[str, Any] = {"reply": reply_text, "attempt": attempt_no}
        if job.attempt is not None:
            data["mx"] = job.attempt.mx_host
        if job.note:
            data["note"] = job.note
        bounce_detail: str | None = None

        if isinstance(outcome, Delivered):
            values["status"] = "delivered"
            event = EventType.DELIVERY_DELIVERED
        elif isinstance(outcome, Held):
            values["status"] = "held"
            event = EventType.DELIVERY_HELD
            data["reason"] = outcome.reason
        elif isinstance(outcome, SoftFail):
            delay = next_attempt_delay(
                attempt_no,
                outcome.retry_after or (retry_hint(reply_text or "")),
                float(self.settings.retry_cap_seconds),
                _rng,
            )
            next_at = now + timedelta(seconds=delay)
            if (next_at - row.first_queued_at).total_seconds() >= job.max_age:
                values["status"] = "failed"
                event = EventType.DELIVERY_FAILED
                data["reason"] = "expired"
                data["last_error"] = outcome.reason
            else:
                values["status"] = "deferred"
                values["next_attempt_at"] = next_at
                event = EventType.DELIVERY_DEFERRED
                data["reason"] = outcome.reason
                data["next_attempt_at"] = next_at.isoformat()
        else:  # HardFail
            if outcome.reason == "expired":
                values["status"] = "failed"
                event = EventType.DELIVERY_FAILED
                data["reason"] = "expired"
            else:
                found = classify(
                    reply.enhanced_status if reply else None,
                    reply.code if reply else None,
                    reply_text or outcome.reason,
                    rules=self.rules,
                    stage=outcome.stage,
                )
                job.classification = found
                values.update(
                    status="bounced",
                    bounce_category=found.category,
                    bounce_status=reply.enhanced_status if reply else None,
                    hard=found.hard,
                )
                event = EventType.DELIVERY_BOUNCED
                data.update(category=found.category, hard=found.hard, source="smtp")
                if reply and reply.enhanced_status:
                    data["status"] = reply.enhanced_status
                bounce_detail = reply_text or ""
        attempt_row: dict[str, Any] | None = None
        if job.attempt is not None:
            a = job.attempt
            final = a.final_reply
            attempt_row = {
                "delivery_id": row.id,
                "started_at": a.started_at,
                "duration_ms": int(a.duration * 1000),
                "outcome": type(outcome).__name__,
                "mx_host": a.mx_host,
                "ip": a.ip,
                "port": a.port,
                "tls_version": a.tls_version,
                "tls_cipher": a.tls_cipher,
                "reply_code": final.code if final else None,
                "enhanced_status": final.enhanced_status if final else None,
                "reply_text": str(final) if final else reply_text,
                "transcript": a.transcript_text(),
            }
        return _Plan(
            job=job,
            now=now,
            values=values,
            attempt=attempt_row,
            event=Event(
                type=event,
                at=now,
                data=data,
                app_id=row.app_id,
                stream=msg.stream,
                tag=msg.tag,
                template=msg.template,
                message_id=row.message_id,
                delivery_id=row.id,
                recipient=row.recipient,
            ),
            bounce_detail=bounce_detail,
            outcome=type(outcome).__name__,
        )

    def _plan_suppressed(self, job: Job, entry: tuple[str, str], now: datetime) -> _Plan:
        """Ended as suppressed, without an attempt: the address was suppressed after the
        delivery was queued (a bounce, complaint or unsubscribe from another message)."""
        reason, source = entry
        row = job.row
        return _Plan(
            job=job,
            now=now,
            values={
                "status": "suppressed",
                "last_reply": f"suppressed: {reason}",
                "updated_at": now,
            },
            event=Event(
                type=EventType.DELIVERY_SUPPRESSED,
                at=now,
                data={"reason": reason, "source": source, "when": "before_attempt"},
                app_id=row.app_id,
                stream=job.message.stream,
                tag=job.message.tag,
                template=job.message.template,
                message_id=row.message_id,
                delivery_id=row.id,
                recipient=row.recipient,
            ),
        )

    def _plan_wait(self, job: Job, wait: Wait, now: datetime) -> _Plan:
        """Back to the queue until its shaping slot: deferred, the reason in last_reply.

        No attempt was made and nothing happened to the message, so no attempt row and no
        event: a busy destination would otherwise fill the event log, the statistics and every
        webhook with one `delivery.deferred` per delivery per wait. The queue view shows the
        wait (status, next_attempt_at, last_reply), and postbode_shaping_waits_total counts it.
        """
        values = {
            "status": "deferred",
            "next_attempt_at": wait.until,
            "last_reply": wait.reason,
            "updated_at": now,
        }
        return _Plan(job=job, now=now, values=values)


attempt_log = logging.getLogger("postbode.delivery.attempts")


def log_attempt(plan: _Plan) -> None:
    """One structured line (key=value) per delivery attempt recorded, or per delivery ended
    without one (suppressed, held, expired): what an operator greps and a log shipper parses."""
    job, attempt = plan.job, plan.attempt
    reply = (
        job.outcome.reply if job.outcome is not None and not isinstance(job.outcome, Held) else None
    )
    attempt_log.info(
        "delivery.attempt delivery=%s app=%s domain=%s mx=%s outcome=%s status=%s code=%s "
        "enhanced=%s duration_ms=%s attempt=%d",
        job.id,
        job.row.app_id,
        job.row.recipient_domain,
        attempt["mx_host"] if attempt else "-",
        plan.outcome or "-",
        plan.values.get("status", "-"),
        reply.code if reply is not None else "-",
        (reply.enhanced_status or "-") if reply is not None else "-",
        attempt["duration_ms"] if attempt else "-",
        job.row.attempts + (1 if attempt else 0),
    )


def _booked_slot(row: Row[Any]) -> tuple[float, str] | None:
    """(slot, the wait's reason) for a delivery released to wait for a rate slot
    (`_plan_wait`): its next attempt is the slot."""
    reason = row.last_reply or ""
    if not reason.startswith("waiting: rate limit") or row.next_attempt_at is None:
        return None
    return row.next_attempt_at.timestamp(), reason


def _counts_soft_bounces(plans: list[_Plan]) -> bool:
    """Whether a plan is a soft bounce: whether it suppresses the address depends on how many
    of its deliveries bounced so far, counted from the deliveries rows, so those are recorded
    one by one, each seeing the ones before it (and not the batch's later ones) as before."""
    return any(
        p.bounce_detail is not None
        and p.job.classification is not None
        and not p.job.classification.hard
        for p in plans
    )


class _LeaseLost(Exception):
    """A batch's lease was lost on some delivery (expired and claimed by another worker)."""


@dataclass
class _Plan:
    """What recording one job writes (worked out before the write transaction opens)."""

    job: Job
    now: datetime
    values: dict[str, Any]  # the deliveries row's new columns
    attempt: dict[str, Any] | None = None  # the attempts row
    event: Event | None = None  # None for a shaping wait: no event, no attempt
    bounce_detail: str | None = None  # set for a bounce: suppress as a DSN would
    outcome: str = ""  # Delivered | SoftFail | HardFail | Held, for the metric


_INSERT_ATTEMPTS = insert(attempts)
_ATTEMPT_ROWS = BulkInsert(attempts)

# The load's statements, built once: building them (and their cache keys) for every
# connection's worth of deliveries cost more than running them.
# The columns of a message the steps read (not its metadata or spam symbols, JSON to decode).
_LOAD_MESSAGES = select(
    messages.c.id,
    messages.c.source,
    messages.c.stream,
    messages.c.tag,
    messages.c.template,
    messages.c.mail_from,
    messages.c.from_header,
    messages.c.track_opens,
    messages.c.track_clicks,
).where(messages.c.id.in_(bindparam("ids", expanding=True)))
_LOAD_RAWS = select(raw_messages.c.message_id, raw_messages.c.data).where(
    raw_messages.c.message_id.in_(bindparam("ids", expanding=True))
)
_LOAD_APPS = select(
    apps.c.id, apps.c.status, apps.c.hold_reason, apps.c.max_message_age_seconds
).where(apps.c.id.in_(bindparam("app_ids", expanding=True)))
_SIGNING_KEYS = select(
    domains.c.app_id,
    domains.c.name,
    domains.c.dkim_selector,
    domains.c.dkim_private_key,
    domains.c.dns_status,
).where(
    domains.c.name.in_(bindparam("names", expanding=True)),
    domains.c.app_id.in_(bindparam("app_ids", expanding=True)),
    ~claimed_elsewhere(),
)


@functools.lru_cache(maxsize=1024)  # an app sends from a few addresses, over and over
def _from_domain(mail_from: str, from_header: str) -> str:
    addresses = [a for _, a in email.utils.getaddresses([from_header]) if a]
    address = addresses[0] if addresses else mail_from
    return address.rpartition("@")[2].lower().rstrip(".")
