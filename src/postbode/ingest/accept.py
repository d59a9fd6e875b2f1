"""The one front door for mail: validate, prepare and durably store a message with one delivery
per recipient, group-committed, before anyone is told 250 or 202."""

from __future__ import annotations

import asyncio
import contextlib
import email.message
import email.utils
import functools
import hashlib
import logging
import re
import secrets
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from email import errors
from email.headerregistry import HeaderRegistry
from email.parser import BytesHeaderParser
from email.policy import SMTP as SMTP_POLICY
from typing import Any

from sqlalchemy import Connection, Dialect, bindparam, delete, insert, or_, select

from postbode.abuse import alerts as abuse_alerts
from postbode.abuse import content
from postbode.abuse import held as abuse_held
from postbode.abuse.limits import Gate, Over
from postbode.abuse.spikes import SpikeWatch
from postbode.events.record import Event, PreparedEvents, prepare_record
from postbode.events.types import EventType
from postbode.ingest import mime
from postbode.metrics import (
    ACCEPT_BATCH_SIZE,
    ACCEPT_COMMIT_SECONDS,
    ACCEPTED_MESSAGES,
    ACCEPTED_RECIPIENTS,
    REJECTS,
)
from postbode.store.bulk import BulkInsert, PreparedRows
from postbode.store.engine import Store
from postbode.store.schema import (
    apps,
    claimed_elsewhere,
    deliveries,
    domains,
    idempotency_keys,
    messages,
    new_id,
    raw_messages,
    suppressions,
    utcnow,
)
from postbode.templates.manage import TemplateError
from postbode.templates.send import TemplateCache, parse_model

log = logging.getLogger(__name__)

STREAMS = ("transactional", "broadcast")
MAX_BATCH = 200
# The longest a group commit waits for messages still on their way (see Acceptor.announce).
MAX_COMPANY_WAIT = 0.010
APP_CACHE_SECONDS = 5.0
_IDEMPOTENCY_WINDOW = timedelta(hours=24)
# Headers an SMTP client sets to give Postbode what the API takes as fields; removed before
# the message is stored, so recipients never see them.
CONTROL_PREFIX = "x-postbode-"


class AcceptError(Exception):
    """A message refused for good: SMTP answers 5xx, the API a 4xx naming the field."""

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        field: str | None = None,
        smtp: str = "550 5.6.0",
        status: int = 422,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.field = field
        self.smtp = smtp
        self.status = status

    def smtp_reply(self) -> str:
        return f"{self.smtp} {self.message}"


class RateLimited(AcceptError):
    """Over a sending limit of the app or credential (abuse/limits.py): SMTP answers
    451 4.7.1, the API 429 with Retry-After. Nothing of the message was kept: retry later."""

    def __init__(self, over: Over) -> None:
        super().__init__(
            over.message, reason="rate_limited", field=over.field, smtp="451 4.7.1", status=429
        )
        self.over = over
        self.retry_after = over.retry_after


class TemporaryAcceptError(Exception):
    """The store could not take the message now: SMTP answers 451, the API 503. Nothing of the
    message was kept, so the client's retry is safe."""


class IdempotencyConflict(AcceptError):
    """The Idempotency-Key was used before with a different request body."""


@dataclass
class Submission:
    """A message as a client handed it over."""

    app_id: int
    source: str  # smtp | api
    mail_from: str
    recipients: Sequence[str]
    raw: bytes
    stream: str = "transactional"
    tag: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    track_opens: bool | None = None
    track_clicks: bool | None = None
    client_ip: str | None = None
    client_name: str | None = None  # EHLO name
    idempotency_key: str | None = None
    request_hash: str | None = None  # of the API body, for Idempotency-Key checks
    # Made from a template (templates/): kept on the message for statistics and A/B tests.
    template: str | None = None
    template_version: int | None = None
    ab_test_id: int | None = None
    ab_variant: str | None = None
    # Later than now: the deliveries wait as `scheduled` and are claimed from this instant.
    send_at: datetime | None = None
    credential: str | None = None  # the SMTP username or API key lookup: its sending limits


@dataclass(frozen=True)
class AcceptedRecipient:
    email: str
    delivery_id: uuid.UUID
    status: str  # queued | scheduled | suppressed | held


@dataclass(frozen=True)
class Accepted:
    """The answer to a client: its message id and one delivery per recipient."""

    id: uuid.UUID
    message_id_header: str
    recipients: tuple[AcceptedRecipient, ...]
    replayed: bool = False  # the answer to an earlier request with the same Idempotency-Key

    def as_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "message_id": self.message_id_header,
            "recipients": [
                {"email": r.email, "delivery_id": str(r.delivery_id), "status": r.status}
                for r in self.recipients
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Accepted:
        return cls(
            uuid.UUID(data["id"]),
            data["message_id"],
            tuple(
                AcceptedRecipient(r["email"], uuid.UUID(r["delivery_id"]), r["status"])
                for r in data["recipients"]
            ),
            replayed=True,
        )


@dataclass
class _AppInfo:
    status: str
    track_opens: bool
    track_clicks: bool
    domains: dict[str, bool]  # name -> verified
    loaded_at: float
    tracking_allowed: bool = True  # False: no pixel or click link, whatever a message asks
    # Names of the app's claims that another app's verified claim holds: never sent from,
    # even where unverified domains may send (development).
    held_elsewhere: frozenset[str] = frozenset()


@dataclass
class _Prepared:
    sub: Submission
    id: uuid.UUID
    raw: bytes
    message_id_header: str
    from_header: str
    subject: str
    domain_verified: bool
    track_opens: bool
    track_clicks: bool
    recipients: list[str]
    received_at: datetime
    compressed: bytes  # `raw`, zlib-compressed as it is stored
    # rspamd's verdict (abuse/content.py), when a scanner is configured
    verdict: content.Verdict | None = None
    content_hold: str | None = None  # the reason its deliveries are held for their content
    content_alert: dict[str, Any] | None = None  # the `content` alert's figures


_header_parser = BytesHeaderParser(policy=SMTP_POLICY)


def normalise_address(address: str) -> str:
    """An address as we store it: the domain lower-cased (and IDNA-decoded names kept as given)."""
    address = address.strip().strip("<>")
    local, sep, domain = address.rpartition("@")
    if not sep or not local or not domain:
        raise AcceptError(f"invalid address {address!r}", reason="bad_address", smtp="553 5.1.3")
    return f"{local}@{domain.lower().rstrip('.')}"


def _split_headers(raw: bytes) -> tuple[bytes, bytes]:
    """(header block, rest) of a message; the blank line stays with the rest."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = raw.find(sep)
        if i != -1:
            return raw[: i + len(sep) // 2], raw[i + len(sep) // 2 :]
    return raw, b""


@functools.lru_cache(maxsize=4)
def _date_field_of(second: datetime) -> str:
    return email.utils.format_datetime(second)


def _date_field(now: datetime) -> str:
    """RFC 5322 §3.3 date-time of `now` (to the second, as the format has it), made once a
    second: many messages a second share it."""
    return _date_field_of(now.replace(microsecond=0))


def _to_crlf(data: bytes) -> bytes:
    # RFC 5322 §2.1: lines end in CRLF; bare LF from API or lenient SMTP clients is mended once.
    if b"\n" in data and b"\r\n" not in data:
        return data.replace(b"\n", b"\r\n")
    return data


class Acceptor:
    """Accepts submissions, batching concurrent ones into one transaction (group commit).

    While one batch commits, the next gathers; each caller is answered when its own batch is
    on disk. A failed batch is retried message by message, so one bad message cannot fail the
    others, and whatever still fails gets a temporary error, never 250.

    A batch also waits a moment for company: while SMTP sessions that have begun a mail
    transaction (`announce`) have not handed their message over yet, it waits for them, at
    most as long as the last commit took and `company_wait`. A client that waits for each
    reply comes back with its next message within a few round trips, so at low concurrency
    commits would otherwise hold a few messages each and cost nearly as much as a full one."""

    def __init__(
        self,
        store: Store,
        hostname: str,
        *,
        max_batch: int = MAX_BATCH,
        allow_unverified: bool = False,
        scanner: content.ContentScanner | None = None,
        company_wait: float = MAX_COMPANY_WAIT,
    ) -> None:
        self.store = store
        self.hostname = hostname
        # abuse/content.py: every message scored by rspamd before it is accepted (None: not)
        self.scanner = scanner
        # Settings.allow_unverified_domains: mail from a domain not verified yet is taken.
        self.allow_unverified = allow_unverified
        self.gate = Gate(store)
        self.spikes = SpikeWatch(store)
        self.max_batch = max_batch
        self._apps: dict[int, _AppInfo] = {}
        self._pending: list[tuple[_Prepared, asyncio.Future[Accepted]]] = []
        self._wakeup: asyncio.Event | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Future[Accepted]] = set()
        # Sessions in a mail transaction whose message is not handed over yet (`announce`).
        self._coming: set[object] = set()
        self.company_wait = company_wait
        self._last_commit_seconds = company_wait
        # Called after each commit that queued mail (a worker in this process wakes up).
        self.on_commit: list[Callable[[], None]] = []
        # One committing thread: SQLite has one writer anyway, and on PostgreSQL batches
        # grow while a commit is in flight, which is the point.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="accept-commit")

    # -- preparing ----------------------------------------------------------------------------

    def app_info(self, app_id: int) -> _AppInfo:
        """The app's status, tracking defaults and domains (cached for a few seconds)."""
        info = self._apps.get(app_id)
        if info is None or self._stale(info):
            with self.store.read() as conn:
                app = conn.execute(
                    select(
                        apps.c.status,
                        apps.c.track_opens,
                        apps.c.track_clicks,
                        apps.c.tracking_allowed,
                    ).where(apps.c.id == app_id)
                ).one()
                names = conn.execute(
                    select(
                        domains.c.name, domains.c.verified_at, claimed_elsewhere().label("taken")
                    ).where(domains.c.app_id == app_id)
                ).all()
            info = _AppInfo(
                app.status,
                app.track_opens,
                app.track_clicks,
                {n.name: n.verified_at is not None for n in names},
                time.monotonic(),
                app.tracking_allowed,
                frozenset(n.name for n in names if n.taken),
            )
            self._apps[app_id] = info
        return info

    @staticmethod
    def _stale(info: _AppInfo | None) -> bool:
        return info is None or time.monotonic() - info.loaded_at > APP_CACHE_SECONDS

    def check_sender(self, app_id: int, address: str) -> bool:
        """Whether the app may send from `address`; True means its domain is also verified.
        Raises AcceptError for a domain that is not the app's."""
        domain = address.rpartition("@")[2].lower().rstrip(".")
        verified = self.app_info(app_id).domains.get(domain)
        if verified is None:
            raise AcceptError(
                f"sender domain {domain!r} is not a domain of this app",
                reason="foreign_domain",
                field="from",
                smtp="550 5.7.1",
            )
        return verified

    def check_authors(self, app_id: int, fields: list[bytes]) -> bool:
        """The From and Sender fields of a header block (unfolded fields, as `_unfolded`
        gives them): exactly one From, at most one Sender, every address in them at one of
        the app's domains. Returns whether all those domains are verified; raises
        AcceptError (550 5.7.1) otherwise. The one check for SMTP and every API."""
        authors = author_addresses(fields)
        verified = [self.check_sender(app_id, address) for address in authors]
        held_elsewhere = self.app_info(app_id).held_elsewhere
        for address, ok in zip(authors, verified, strict=True):
            domain = address.rpartition("@")[2].lower().rstrip(".")
            # The same answer whether the records are missing or another organisation holds
            # the name: this app is not told who does.
            if not ok and (not self.allow_unverified or domain in held_elsewhere):
                raise AcceptError(
                    f"sender domain {domain!r} is not verified yet: publish the records "
                    f"`postbode domain list --records` shows, then `postbode domain check "
                    f"{domain}`",
                    reason="unverified_domain",
                    field="from",
                    smtp="550 5.7.1",
                )
        return all(verified)

    def prepare(self, sub: Submission) -> _Prepared:
        """Check a submission and build the message as it will be stored (pure but for the
        cached app lookup). Raises AcceptError."""
        info = self.app_info(sub.app_id)
        if info.status != "active":
            raise AcceptError(
                "app is suspended", reason="app_suspended", smtp="550 5.7.1", status=403
            )
        if sub.stream not in STREAMS:
            raise AcceptError(f"unknown stream {sub.stream!r}", reason="bad_stream", field="stream")
        recipients = list(dict.fromkeys(normalise_address(r) for r in sub.recipients))
        if not recipients:
            raise AcceptError("no recipients", reason="no_recipients", field="to", smtp="554 5.5.1")
        head, body = _split_headers(_to_crlf(sub.raw))
        fields = _unfolded(head)
        wanted = _wanted_fields(head, fields)
        from_header = wanted.get("from", "")
        verified = self.check_authors(sub.app_id, fields)

        # Control headers become fields; they are not kept in the message.
        tag, stream, metadata = sub.tag, sub.stream, dict(sub.metadata)
        track_opens, track_clicks = sub.track_opens, sub.track_clicks
        send_at = sub.send_at
        kept: list[bytes] = []
        for line in fields:
            name, _, value = line.partition(b":")
            lname = name.strip().lower().decode("ascii", "replace")
            if not lname.startswith(CONTROL_PREFIX):
                kept.append(line)
                continue
            # RFC 5322 §2.2.3: unfolding removes the line breaks of a folded field
            text = value.replace(b"\r", b"").replace(b"\n", b"").strip().decode("utf-8", "replace")
            key = lname[len(CONTROL_PREFIX) :]
            if key == "tag":
                tag = text[:100]
            elif key == "stream":
                stream = text
            elif key.startswith("metadata-"):
                metadata[key[len("metadata-") :]] = text
            elif key == "track-opens":
                track_opens = text.lower() in ("1", "true", "yes")
            elif key == "track-clicks":
                track_clicks = text.lower() in ("1", "true", "yes")
            elif key == "send-at" and sub.send_at is None:
                send_at = parse_send_at(text, utcnow(), smtp=True)
        if stream not in STREAMS:
            raise AcceptError(f"unknown stream {stream!r}", reason="bad_stream", field="stream")
        if (stream, tag, metadata, send_at) != (sub.stream, sub.tag, sub.metadata, sub.send_at):
            sub = replace(sub, stream=stream, tag=tag, metadata=metadata, send_at=send_at)

        now = utcnow()
        message_uuid = new_id()
        added: list[bytes] = []
        stamp = _date_field(now)
        received = (
            f"Received: from {sub.client_name or 'api'} ({sub.client_ip or 'unknown'})\r\n"
            f"\tby {self.hostname} (Postbode) with "
            f"{'ESMTPSA' if sub.source == 'smtp' else 'HTTP'} id {message_uuid};\r\n"
            f"\t{stamp}\r\n"
        )
        added.append(received.encode())
        message_id_header = wanted.get("message-id", "").strip()
        if not message_id_header:
            message_id_header = f"<{message_uuid}@{self.hostname}>"
            added.append(f"Message-ID: {message_id_header}\r\n".encode())
        if "date" not in wanted:
            added.append(f"Date: {stamp}\r\n".encode())
        raw = b"".join(added) + b"".join(kept) + body
        return _Prepared(
            sub=sub,
            id=message_uuid,
            raw=raw,
            message_id_header=message_id_header[:998],
            from_header=from_header[:998],
            subject=wanted.get("subject", "")[:998],
            domain_verified=verified,
            track_opens=info.tracking_allowed
            and (info.track_opens if track_opens is None else track_opens),
            track_clicks=info.tracking_allowed
            and (info.track_clicks if track_clicks is None else track_clicks),
            recipients=recipients,
            received_at=now,
            # compressed here, on the way in: the store's write lock is not held for it
            compressed=zlib.compress(raw),
        )

    # -- accepting ----------------------------------------------------------------------------

    def announce(self, session: object) -> None:
        """`session` began a mail transaction: its message may follow soon, and a batch about
        to commit waits a moment for it. Ended by `withdraw` or by `accept(..., session)`."""
        self._coming.add(session)

    @property
    def on_their_way(self) -> int:
        """How many announced messages are not handed over yet."""
        return len(self._coming)

    def withdraw(self, session: object) -> None:
        """`session`'s mail transaction ended without a message (or it was handed over)."""
        if session in self._coming:
            self._coming.discard(session)
            if self._wakeup is not None:
                self._wakeup.set()

    async def accept(self, sub: Submission, session: object | None = None) -> Accepted:
        """Store the message durably and return its ids; raises AcceptError (refused) or
        TemporaryAcceptError (try again). `session`: the one that announced it, if any."""
        try:
            return await self._accept(sub, session)
        finally:
            self.withdraw(session)

    async def _accept(self, sub: Submission, session: object | None) -> Accepted:
        loop = asyncio.get_running_loop()
        if sub.idempotency_key:
            earlier = await loop.run_in_executor(None, self._replay, sub)
            if earlier is not None:
                return earlier
        if self._stale(self._apps.get(sub.app_id)):
            await loop.run_in_executor(None, self.app_info, sub.app_id)
        try:
            if sub.template is None and _names_template(sub.raw):
                sub = await loop.run_in_executor(None, self._render_template, sub)
            if sub.source == "smtp" and mime.names_attachments(sub.raw):
                # The API builds its file names safe; a message from SMTP may hold any.
                raw = await loop.run_in_executor(None, mime.safe_attachment_names, sub.raw)
                sub = replace(sub, raw=raw)
            prepared = self.prepare(sub)
            if self.scanner is not None:
                prepared = await self._score(prepared, self.scanner)
        except AcceptError as exc:
            REJECTS.labels(sub.source, exc.reason).inc()
            raise
        future: asyncio.Future[Accepted] = loop.create_future()
        self._inflight.add(future)
        future.add_done_callback(self._inflight.discard)
        self._pending.append((prepared, future))
        self._coming.discard(session)
        if self._flusher is None or self._flusher.done():
            self._wakeup = asyncio.Event()
            self._flusher = asyncio.create_task(self._flush_forever(), name="accept-flusher")
        assert self._wakeup is not None
        self._wakeup.set()
        return await future

    async def _score(self, p: _Prepared, scanner: content.ContentScanner) -> _Prepared:
        """`p` with rspamd's verdict, held when it scores at the hold threshold; AcceptError
        (550 5.7.1 / 422) at the reject threshold. The message is scored as it will be sent
        (with its Received and Message-ID fields), before anything of it is stored."""
        sub = p.sub
        try:
            verdict = await scanner.scan(
                p.raw,
                direction="outbound",
                ip=sub.client_ip,
                helo=sub.client_name,
                mail_from=sub.mail_from,
                rcpts=p.recipients,
                # Authenticated mail: rspamd judges it as outbound (no SPF/RBL on the client).
                user=f"app-{sub.app_id}",
                queue_id=str(p.id),
            )
        except content.ScanUnavailable:
            REJECTS.labels(sub.source, "content_unavailable").inc()
            raise TemporaryAcceptError(
                "the content scanner is unavailable, try again later"
            ) from None
        if verdict is None:  # rspamd away and failing open: accepted unscored (logged)
            return p
        t = scanner.thresholds
        decision = content.judge(verdict.score, t)
        if decision == "refuse":
            figures = content.figures(
                verdict, t, "refused", message_id_header=p.message_id_header, source=sub.source
            )
            try:
                await asyncio.get_running_loop().run_in_executor(
                    None, self._alert_refused, sub.app_id, figures
                )
            except Exception:  # the refusal stands; the alert is what is lost
                log.exception("could not record the content alert of app %d", sub.app_id)
            log.info(
                "message from app %d refused for its content: score %g: %s",
                sub.app_id,
                verdict.score,
                content.named(verdict),
            )
            raise AcceptError(
                content.refuse_text(verdict, t),
                reason="content_rejected",
                field="content",
                smtp="550 5.7.1",
                status=422,
            )
        if decision == "hold":
            return replace(
                p,
                verdict=verdict,
                content_hold=content.hold_text(verdict, t),
                content_alert=content.figures(
                    verdict, t, "held", message_id=str(p.id), source=sub.source
                ),
            )
        return replace(p, verdict=verdict)

    def _alert_refused(self, app_id: int, figures: dict[str, Any]) -> None:
        abuse_alerts.raise_alert(self.store, app_id, "content", figures)

    def _render_template(self, sub: Submission) -> Submission:
        """The submission with its body made from the template its X-Postbode-Template header
        names, for the model in X-Postbode-Model (JSON); both headers go."""
        return render_submission(self.store, sub)

    def _replay(self, sub: Submission) -> Accepted | None:
        with self.store.read() as conn:
            return _earlier_answer(conn, sub)

    async def _flush_forever(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                await self._await_company()
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                started = loop.time()
                results = await loop.run_in_executor(self._executor, self._commit, batch)
                self._last_commit_seconds = loop.time() - started
                for listener in self.on_commit:
                    listener()
                # Counted once per source and commit: each increment of a metric shared by
                # processes costs a lock and a look at the process id.
                accepted: Counter[str] = Counter()
                recipients: Counter[str] = Counter()
                for (prepared, future), result in zip(batch, results, strict=True):
                    if future.done():  # the client went away; the message is stored anyway
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        accepted[prepared.sub.source] += 1
                        recipients[prepared.sub.source] += len(prepared.recipients)
                        future.set_result(result)
                for source, n in accepted.items():
                    ACCEPTED_MESSAGES.labels(source).inc(n)
                    ACCEPTED_RECIPIENTS.labels(source).inc(recipients[source])

    async def _await_company(self) -> None:
        """Until the sessions that announced a message have handed it over, the batch is
        full, or as long as the last commit took (at most MAX_COMPANY_WAIT) has passed."""
        if not self._coming or len(self._pending) >= self.max_batch:
            return
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(self._last_commit_seconds, self.company_wait)
        while self._coming and len(self._pending) < self.max_batch:
            self._wakeup.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._wakeup.wait()
            except TimeoutError:
                return

    def _commit(
        self, batch: list[tuple[_Prepared, asyncio.Future[Accepted]]]
    ) -> list[Accepted | BaseException]:
        items = [p for p, _ in batch]
        try:  # sending limits (abuse/limits.py): no write at all for apps without one
            over = self.gate.take([(p.sub.app_id, p.sub.credential) for p in items])
        except Exception:
            log.exception("could not count %d messages against sending limits", len(items))
            return [TemporaryAcceptError("the store is unavailable, try again later")] * len(items)
        if not any(over):
            return self._store(items)
        kept = [p for p, o in zip(items, over, strict=True) if o is None]
        stored = iter(self._store(kept) if kept else [])
        answers: list[Accepted | BaseException] = []
        for p, o in zip(items, over, strict=True):
            if o is None:
                answers.append(next(stored))
            else:
                REJECTS.labels(p.sub.source, "rate_limited").inc()
                answers.append(RateLimited(o))
        return answers

    def _store(self, items: list[_Prepared]) -> list[Accepted | BaseException]:
        started = time.perf_counter()
        try:
            # Read before the write transaction, which holds SQLite's one write lock: a
            # suppression that lands meanwhile is as if it landed just after this accept.
            with self.store.read() as conn:
                suppressed = _suppressed(conn, items)
                held = abuse_held.holds(conn, {p.sub.app_id for p in items})
            answers: list[Accepted | BaseException]
            if any(p.sub.idempotency_key for p in items):  # answers depend on the store
                with self.store.write() as conn:
                    answers = list(_store_batch(conn, items, suppressed, held))
            else:
                # Rows made and converted for the driver before the write lock is taken.
                rows = _Rows()
                answers = [rows.add(p, suppressed, held) for p in items]
                ready = rows.prepare(self.store.engine.dialect)
                with self.store.write() as conn:
                    ready.write(conn)
        except Exception:
            if len(items) == 1:
                log.exception("could not store message %s", items[0].id)
                return [TemporaryAcceptError("the store is unavailable, try again later")]
            # One bad message must not fail the others: store them one by one.
            answers = []
            for item in items:
                try:
                    with self.store.write() as conn:
                        answers.extend(
                            _store_batch(
                                conn,
                                [item],
                                _suppressed(conn, [item]),
                                abuse_held.holds(conn, [item.sub.app_id]),
                            )
                        )
                except Exception:
                    log.exception("could not store message %s", item.id)
                    answers.append(TemporaryAcceptError("the store is unavailable, try later"))
        ACCEPT_BATCH_SIZE.observe(len(items))
        ACCEPT_COMMIT_SECONDS.observe(time.perf_counter() - started)
        # abuse/spikes.py: a burst is judged as it comes in, after the commit
        self.spikes.seen(
            p.sub.app_id for p, a in zip(items, answers, strict=True) if isinstance(a, Accepted)
        )
        return answers

    async def close(self) -> None:
        """Finish the batches in hand, then stop."""
        await asyncio.gather(*self._inflight, return_exceptions=True)
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        self._executor.shutdown(wait=True)
        if self.scanner is not None:
            await self.scanner.close()


# A From or Sender value in its plain form, `Name <local@domain>` or `local@domain`: read
# directly. Anything else (comments, several addresses, quoted strings, encoded words) goes
# through the e-mail package's RFC 5322 parser.
_PLAIN_AUTHOR = re.compile(
    r"^(?:[A-Za-z0-9 .'_-]* ?<(?P<angle>[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+)>"
    r"|(?P<bare>[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+))$"
)
_header_registry = HeaderRegistry()
_SHOWN_ADDRESS = re.compile(r"[^\s<>()\[\],;:\"@]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")


def author_addresses(fields: list[bytes]) -> list[str]:
    """Every address in the From field and in the Sender field of a header block, From's
    first. RFC 5322 §3.6: exactly one From (a mailbox list), at most one Sender (a single
    mailbox). Raises AcceptError (550 5.7.1) for anything else, and for a value that the
    parser reads differently from how a lenient mail client may (address-like text outside
    the address), so that what the recipient sees is what was checked."""
    values: dict[str, list[str]] = {"from": [], "sender": []}
    for line in fields:
        name, sep, value = line.partition(b":")
        key = name.strip().lower().decode("ascii", "replace")
        if sep and key in values:
            # RFC 5322 §2.2.3: unfolding removes the line breaks
            text = value.replace(b"\r", b"").replace(b"\n", b"").strip()
            values[key].append(text.decode("utf-8", "replace"))
    if not values["from"]:
        raise AcceptError(
            "the message has no From address", reason="no_from", field="from", smtp="550 5.6.0"
        )
    for key, title, most in (("from", "From", 1), ("sender", "Sender", 1)):
        if len(values[key]) > most:
            raise AcceptError(
                f"the message has {len(values[key])} {title} header fields; RFC 5322 allows one",
                reason=f"several_{key}",
                field="from",
                smtp="550 5.7.1",
            )
    found = _addresses("From", values["from"][0])
    if not found:
        raise AcceptError(
            "the message has no From address", reason="no_from", field="from", smtp="550 5.6.0"
        )
    if values["sender"]:
        sender = _addresses("Sender", values["sender"][0])
        if len(sender) != 1:
            raise AcceptError(
                "the Sender header field must hold exactly one address",
                reason="bad_sender",
                field="from",
                smtp="550 5.7.1",
            )
        found += sender
    return list(dict.fromkeys(found))


def _addresses(title: str, value: str) -> list[str]:
    plain = _PLAIN_AUTHOR.match(value)
    if plain:
        return [plain["angle"] or plain["bare"]]
    malformed = AcceptError(
        f"the {title} header field is malformed: give addresses as "
        "`Name <local@domain>`, separated by commas",
        reason="malformed_from",
        field="from",
        smtp="550 5.7.1",
    )
    try:
        header = _header_registry(title.lower(), value)
    except Exception:
        raise malformed from None
    if any(isinstance(d, errors.InvalidHeaderDefect) for d in header.defects):
        raise malformed
    addresses: list[Any] = list(header.addresses)  # type: ignore[attr-defined]
    if any(not a.domain for a in addresses):
        raise malformed
    parsed = [str(a.addr_spec) for a in addresses]
    # A lenient parser (older mail clients; Python's own getaddresses) must find no other
    # address: comments and display names holding one are where the tricks hide.
    lenient = {a.lower() for _, a in email.utils.getaddresses([value]) if "@" in a}
    if not lenient <= {a.lower() for a in parsed}:
        raise malformed
    # What a mail client may show as the author: an address in a display name or comment
    # ("ceo@other.test" <a@own.test>, encoded or not) must be the app's too.
    shown = [value, *(str(a.display_name) for a in addresses)]
    return parsed + [m[0] for text in shown for m in _SHOWN_ADDRESS.finditer(text)]


def _unfolded(head: bytes) -> list[bytes]:
    """Header fields of a header block, each with its continuation lines (RFC 5322 §2.2.3)."""
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif line.strip():
            fields.append(line)
    return fields


# The header fields `prepare` reads, by their lower-cased names.
_WANTED = {b"from": "from", b"subject": "subject", b"message-id": "message-id", b"date": "date"}


def _wanted_fields(head: bytes, fields: list[bytes]) -> dict[str, str]:
    """The first From, Subject, Message-ID and Date of a header block, as text: unfolded, and
    with RFC 2047 encoded words decoded. Plain ASCII values (nearly all of them) are read
    directly; others go through the e-mail package's parser, which knows every encoding."""
    found: dict[str, str] = {}
    for line in fields:
        name, sep, value = line.partition(b":")
        key = _WANTED.get(name.strip().lower())
        if not sep or key is None or key in found:
            continue
        if not value.isascii() or b"=?" in value:
            headers = _header_parser.parsebytes(head + b"\r\n")
            return {
                key: str(headers[key] or "")
                for key in _WANTED.values()
                if headers.get(key) is not None
            }
        # RFC 5322 §2.2.3: unfolding removes the line breaks, not the white space around them
        text = value.replace(b"\r", b"").replace(b"\n", b"").lstrip(b" \t").decode("ascii")
        found[key] = " ".join(text.split()) if key == "from" else text
    return found


def _earlier_answer(conn: Connection, sub: Submission) -> Accepted | None:
    row = conn.execute(
        select(idempotency_keys.c.body_hash, idempotency_keys.c.response).where(
            idempotency_keys.c.app_id == sub.app_id,
            idempotency_keys.c.key == sub.idempotency_key,
            idempotency_keys.c.created_at > utcnow() - _IDEMPOTENCY_WINDOW,
        )
    ).first()
    if row is None:
        return None
    if row.body_hash != sub.request_hash:
        raise _conflict()
    return Accepted.from_json(row.response)


def _conflict() -> IdempotencyConflict:
    return IdempotencyConflict(
        "this Idempotency-Key was used with a different request",
        reason="idempotency_conflict",
        field="Idempotency-Key",
        status=409,
    )


# Built once: constructing the statement (its IN clause and cache key) per commit cost more
# CPU than running it.
_SUPPRESSED = select(suppressions.c.email, suppressions.c.stream).where(
    suppressions.c.app_id == bindparam("app_id"),
    suppressions.c.email.in_(bindparam("emails", expanding=True)),
    or_(suppressions.c.expires_at.is_(None), suppressions.c.expires_at > bindparam("now")),
)


def _suppressed(conn: Connection, items: Sequence[_Prepared]) -> set[tuple[int, str, str]]:
    """(app, address, stream) of every recipient in the batch that is on a suppression list."""
    found: set[tuple[int, str, str]] = set()
    by_app: dict[int, set[str]] = {}
    for p in items:
        by_app.setdefault(p.sub.app_id, set()).update(r.lower() for r in p.recipients)
    now = utcnow()
    for app_id, addresses in by_app.items():
        rows = conn.execute(
            _SUPPRESSED, {"app_id": app_id, "emails": sorted(addresses), "now": now}
        )
        found.update((app_id, r.email, r.stream) for r in rows)
    return found


@dataclass
class _Rows:
    """The rows a batch of messages adds: messages, raw messages, deliveries and events."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    raw: list[dict[str, Any]] = field(default_factory=list)
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    alerts: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # content holds

    def add(
        self, p: _Prepared, suppressed: set[tuple[int, str, str]], held: dict[int, str]
    ) -> Accepted:
        """Add one message's rows; returns the answer its client gets once they are stored.
        `held`: the hold reasons of held apps (abuse/hold.py), whose new mail waits as `held`."""
        sub = p.sub
        hold_reason = held.get(sub.app_id)
        self.messages.append(
            {
                "id": p.id,
                "app_id": sub.app_id,
                "source": sub.source,
                "stream": sub.stream,
                "tag": sub.tag,
                "metadata": sub.metadata,
                "message_id_header": p.message_id_header,
                "mail_from": sub.mail_from,
                "from_header": p.from_header,
                "subject": p.subject,
                "size": len(p.raw),
                "domain_verified": p.domain_verified,
                "track_opens": p.track_opens,
                "track_clicks": p.track_clicks,
                "received_at": p.received_at,
                "template": sub.template,
                "template_version": sub.template_version,
                "ab_test_id": sub.ab_test_id,
                "ab_variant": sub.ab_variant,
                "send_at": sub.send_at,
                "spam_score": p.verdict.score if p.verdict is not None else None,
                "spam_symbols": p.verdict.symbols_json() if p.verdict is not None else None,
            }
        )
        if p.content_alert is not None:
            self.alerts.append((sub.app_id, p.content_alert))
        self.raw.append({"message_id": p.id, "compression": "zlib", "data": p.compressed})
        common: dict[str, Any] = {
            "app_id": sub.app_id,
            "stream": sub.stream,
            "tag": sub.tag,
            "template": sub.template,
            "message_id": p.id,
        }
        self.events.append(
            Event(
                type=EventType.MESSAGE_RECEIVED,
                at=p.received_at,
                data={"source": sub.source, "recipients": len(p.recipients)},
                **common,
            )
        )
        accepted: list[AcceptedRecipient] = []
        scheduled = sub.send_at is not None and sub.send_at > p.received_at
        due = sub.send_at if scheduled and sub.send_at is not None else p.received_at
        for rcpt in p.recipients:
            key = rcpt.lower()
            is_suppressed = (sub.app_id, key, "all") in suppressed or (
                sub.app_id,
                key,
                sub.stream,
            ) in suppressed
            # A held app's scheduled mail stays scheduled: the worker holds it when it is due.
            # Mail held for its content waits for a person whenever it was due.
            reason = None
            if is_suppressed:
                status, event_type = "suppressed", EventType.DELIVERY_SUPPRESSED
            elif p.content_hold is not None:
                status, event_type = "held", EventType.DELIVERY_HELD
                reason = p.content_hold
            elif scheduled:
                status, event_type = "scheduled", EventType.DELIVERY_QUEUED
            elif hold_reason is not None:
                status, event_type = "held", EventType.DELIVERY_HELD
                reason = abuse_held.reply_text(hold_reason)
            else:
                status, event_type = "queued", EventType.DELIVERY_QUEUED
            delivery_id = new_id()
            self.deliveries.append(
                {
                    "id": delivery_id,
                    "message_id": p.id,
                    "app_id": sub.app_id,
                    "recipient": rcpt,
                    "recipient_domain": rcpt.rpartition("@")[2],
                    "status": status,
                    "attempts": 0,
                    "next_attempt_at": due,
                    "first_queued_at": due,
                    "verp_token": secrets.token_hex(12),
                    "updated_at": p.received_at,
                    "last_reply": reason,
                }
            )
            self.events.append(
                Event(
                    type=event_type,
                    at=p.received_at,
                    delivery_id=delivery_id,
                    recipient=rcpt,
                    data={"send_at": due.isoformat()}
                    if status == "scheduled"
                    else {"reason": reason}
                    if reason is not None
                    else {},
                    **common,
                )
            )
            accepted.append(AcceptedRecipient(rcpt, delivery_id, status))
        return Accepted(p.id, p.message_id_header, tuple(accepted))

    def prepare(self, dialect: Dialect) -> _ReadyRows:
        return _ReadyRows(
            [
                insert.prepare(dialect, rows)
                for insert, rows in (
                    (_INSERT_MESSAGES, self.messages),
                    (_INSERT_RAW, self.raw),
                    (_INSERT_DELIVERIES, self.deliveries),
                )
            ],
            prepare_record(dialect, self.events),
            self.alerts,
        )


_INSERT_MESSAGES = BulkInsert(messages)
_INSERT_RAW = BulkInsert(raw_messages)
_INSERT_DELIVERIES = BulkInsert(deliveries)


@dataclass(frozen=True)
class _ReadyRows:
    """A batch's rows in the driver's values: what is left to do is to write them."""

    inserts: list[PreparedRows]
    events: PreparedEvents
    alerts: list[tuple[int, dict[str, Any]]]

    def write(self, conn: Connection) -> None:
        for prepared in self.inserts:
            BulkInsert.execute(conn, prepared)
        self.events.write(conn)
        # A message held for its content: the app's people hear of it (abuse/alerts.py, at
        # most one `content` alert per app and hour), in the transaction that stores it.
        for app_id, figures in self.alerts:
            abuse_alerts.raise_alert_in(conn, app_id, "content", figures)


def _store_batch(
    conn: Connection,
    items: Sequence[_Prepared],
    suppressed: set[tuple[int, str, str]],
    held: dict[int, str],
) -> list[Accepted | IdempotencyConflict]:
    """Write the batch's messages, deliveries and events in `conn`'s transaction, answering
    requests with an Idempotency-Key used before with the earlier answer (or a conflict);
    `suppressed` holds the batch's recipients on suppression lists (see `_suppressed`)."""
    # The same Idempotency-Key twice in one batch: the second gets the first's answer.
    batch_keys: dict[tuple[int, str], tuple[str | None, Accepted]] = {}
    rows = _Rows()
    answers: list[Accepted | IdempotencyConflict] = []
    for p in items:
        sub = p.sub
        if sub.idempotency_key:
            idem = (sub.app_id, sub.idempotency_key)
            try:
                earlier = _earlier_answer(conn, sub)
                if earlier is None and idem in batch_keys:
                    first_hash, first_answer = batch_keys[idem]
                    if first_hash != sub.request_hash:
                        raise _conflict()
                    earlier = replace(first_answer, replayed=True)
            except IdempotencyConflict as conflict:
                answers.append(conflict)
                continue
            if earlier is not None:
                answers.append(earlier)
                continue
        answer = rows.add(p, suppressed, held)
        if sub.idempotency_key:
            batch_keys[(sub.app_id, sub.idempotency_key)] = (sub.request_hash, answer)
            conn.execute(  # a key older than the window may be used again
                delete(idempotency_keys).where(
                    idempotency_keys.c.app_id == sub.app_id,
                    idempotency_keys.c.key == sub.idempotency_key,
                )
            )
            conn.execute(
                insert(idempotency_keys).values(
                    app_id=sub.app_id,
                    key=sub.idempotency_key,
                    body_hash=sub.request_hash or "",
                    response=answer.as_json(),
                )
            )
        answers.append(answer)
    rows.prepare(conn.dialect).write(conn)
    return answers


def request_hash(body: bytes) -> str:
    """The fingerprint of an API request body, for Idempotency-Key checks."""
    return hashlib.sha256(body).hexdigest()


# -- sends made from templates and sends for later ------------------------------------------------

MAX_SCHEDULE = timedelta(days=30)


def parse_send_at(value: str, now: datetime, *, smtp: bool = False) -> datetime:
    """An RFC 3339 instant at most 30 days ahead (a past one means now); AcceptError if not."""
    try:
        at = datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise AcceptError(
            "send_at is an RFC 3339 time such as 2026-12-24T18:00:00Z",
            reason="bad_send_at",
            field="send_at",
            smtp="501 5.5.4" if smtp else "550 5.6.0",
        ) from None
    return check_send_at(at, now)


def check_send_at(at: datetime, now: datetime) -> datetime:
    if at.tzinfo is None:
        raise AcceptError(
            "send_at needs a time zone (Z or an offset)", reason="bad_send_at", field="send_at"
        )
    at = at.astimezone(now.tzinfo)
    if at - now > MAX_SCHEDULE:
        raise AcceptError("send_at is at most 30 days ahead", reason="bad_send_at", field="send_at")
    return at


_TEMPLATE_HEADER = CONTROL_PREFIX.encode() + b"template"


def _names_template(raw: bytes) -> bool:
    head, _ = _split_headers(raw[:65536])
    return _TEMPLATE_HEADER in head.lower()


# Header fields a template's rendering replaces (the body's and the subject).
_REPLACED = ("subject", "content-type", "content-transfer-encoding", "mime-version")


def render_submission(store: Store, sub: Submission) -> Submission:
    """`sub` (an SMTP message naming a template in X-Postbode-Template) with its subject and
    body rendered from the template for the model in X-Postbode-Model; the message's other
    header fields are kept. Raises AcceptError naming what is wrong."""
    head, _ = _split_headers(_to_crlf(sub.raw))
    parsed = _header_parser.parsebytes(head + b"\r\n")
    alias = str(parsed.get("x-postbode-template", "")).strip()
    model_text = str(parsed.get("x-postbode-model", "") or "")
    recipients = list(sub.recipients)
    try:
        model = parse_model(model_text, field="X-Postbode-Model")
        made = TemplateCache(store, sub.app_id).make(
            alias, model, recipients[0] if recipients else ""
        )
    except TemplateError as exc:
        raise AcceptError(
            f"template {alias!r}: {exc.message}",
            reason="template",
            field=exc.field,
            smtp="550 5.6.0",
        ) from None
    out = email.message.EmailMessage(policy=SMTP_POLICY)
    try:
        for name, value in parsed.items():
            lname = name.lower()
            if lname in _REPLACED or lname in ("x-postbode-template", "x-postbode-model"):
                continue
            out[name] = value
        out["Subject"] = made.rendered.subject
        out.set_content(made.rendered.text)
        if made.rendered.html is not None:
            out.add_alternative(made.rendered.html, subtype="html")
        raw = out.as_bytes()
    except (ValueError, TypeError, LookupError) as exc:  # a header the rebuild cannot keep
        raise AcceptError(
            f"the message cannot be rebuilt from the template: {exc}",
            reason="template",
            smtp="550 5.6.0",
        ) from None
    return replace(
        sub,
        raw=raw,
        template=made.template,
        template_version=made.version,
        ab_test_id=made.ab_test_id,
        ab_variant=made.ab_variant,
    )
