"""Inbound mail over SMTP: the listener's LocalMailbox for the apps' inbound domains — refuses
addresses no route takes (and `reject` routes) at RCPT, and stores each message durably,
group-committed with its `inbound.received` event, before answering 250."""

from __future__ import annotations

import asyncio
import email.header
import email.utils
import logging
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any

from sqlalchemy import insert

from postbode.abuse import content
from postbode.config import Settings
from postbode.events.record import Event, record
from postbode.events.types import EventType
from postbode.inbound.routes import Match, Route, existing_route_ids, load_table, match
from postbode.ingest.smtp_server import Client
from postbode.metrics import REJECTS
from postbode.runner.batch import BatchWriter
from postbode.store.engine import Store
from postbode.store.retry import retrying
from postbode.store.schema import inbound_messages, new_id, utcnow

log = logging.getLogger(__name__)

REFRESH_SECONDS = 2.0  # routes and inbound domains are read again this often
RELOAD_MIN_SECONDS = 0.5  # an address no route takes re-reads them at most this often
MAX_HEADER_BYTES = 256 * 1024  # a header section larger than this is refused
MAX_HEADER_FIELDS = 1000  # as are more header fields than this
_header_parser = BytesHeaderParser(policy=compat32)


class RoutesChanged(Exception):
    """A recipient's route went away between RCPT and the end of DATA."""


@dataclass
class _Arrival:
    """One message as the listener handed it over, with the routes its recipients matched."""

    mail_from: str
    rcpts: list[tuple[str, Match]]
    data: bytes
    client: Client | None
    ids: list[Any]
    verdict: content.Verdict | None = None
    content_hold: str | None = None  # held for its content, whatever its routes say


def check_message(data: bytes) -> str | None:
    """The SMTP reply refusing a message before it is stored, or None. Cheap, bounded
    checks only: what the parser copes with (broken MIME, NUL bytes, 8-bit headers) is
    stored and handed off with warnings."""
    if not data.strip():
        return "554 5.6.0 Empty message"
    head = _header_block(data)
    if head is None:
        # RFC 3463 §3.4: X.3.4 message too big for system (here: its header section).
        return f"552 5.3.4 Header section larger than {MAX_HEADER_BYTES} bytes"
    fields = sum(1 for line in head.splitlines() if line[:1] not in (b" ", b"\t", b""))
    if fields > MAX_HEADER_FIELDS:
        return f"552 5.3.4 More than {MAX_HEADER_FIELDS} header fields"
    return None


def _header_block(data: bytes) -> bytes | None:
    """The header section of a message (None: longer than MAX_HEADER_BYTES)."""
    window = data[: MAX_HEADER_BYTES + 4]
    ends = [i for i in (window.find(b"\r\n\r\n"), window.find(b"\n\n")) if i != -1]
    if ends:
        return window[: min(ends)]
    return window if len(data) <= MAX_HEADER_BYTES else None


def _text(value: object, limit: int = 998) -> str:
    """A header value fit for a text column: unfolded, no NUL, no surrogates, bounded."""
    if value is None:
        return ""
    if not isinstance(value, str):
        value = str(value)
    text = " ".join(value.replace("\x00", "\ufffd").split())
    return text.encode("utf-8", "replace").decode("utf-8")[:limit]


def summary(head: bytes) -> dict[str, str]:
    """From, Subject and Message-ID of a header block, decoded (RFC 2047), for the log."""
    try:
        msg = _header_parser.parsebytes(head + b"\r\n\r\n")
        found = {}
        for name in ("from", "subject", "message-id"):
            raw = msg.get(name) or ""
            found[name] = _text(str(email.header.make_header(email.header.decode_header(raw))))
    except Exception:  # broken encodings: the raw header, made storable
        found = {}
        for line in head.split(b"\n"):
            key, _, value = line.partition(b":")
            name = key.strip().lower().decode("ascii", "replace")
            if name in ("from", "subject", "message-id") and name not in found:
                found[name] = _text(value.decode("utf-8", "replace"))
    return found


class InboundIntake:
    """The LocalMailbox for the apps' inbound domains.

    Routes and inbound domains are read into memory (again every REFRESH_SECONDS, and at
    once, at most every RELOAD_MIN_SECONDS, when an address matches nothing), so RCPT costs
    no query. Messages are stored by a BatchWriter: those arriving while a transaction
    commits share the next one (group commit), and each is answered once it is on disk."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        on_commit: list[Callable[[], None]] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.hostname = settings.smtp_hostname
        # Called after each commit that queued messages (wakes a worker in this process).
        self.on_commit: list[Callable[[], None]] = on_commit if on_commit is not None else []
        self._table: dict[str, Route] = {}
        self._domains: dict[str, int] = {}
        self._loaded = float("-inf")
        self._refreshing: asyncio.Task[None] | None = None
        self._writer: BatchWriter[_Arrival] = BatchWriter(self._write)
        # abuse/content.py: inbound mail is scored by rspamd too, when one is configured
        self.scanner = content.ContentScanner.from_settings(settings)

    # -- the route table -----------------------------------------------------------------

    def load(self) -> None:
        """Read the routes and inbound domains now (blocking)."""
        with self.store.read() as conn:
            table, domains = load_table(
                conn, allow_unverified=self.settings.allow_unverified_domains
            )
        self._table, self._domains, self._loaded = table, domains, time.monotonic()

    async def refresh(self) -> None:
        await asyncio.to_thread(self.load)

    def _refresh_soon(self) -> None:
        stale = time.monotonic() - self._loaded > REFRESH_SECONDS
        if stale and (self._refreshing is None or self._refreshing.done()):
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh_quietly())

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except Exception:  # the store is away: the table in hand serves meanwhile
            log.exception("inbound: could not read the routes")

    # -- LocalMailbox --------------------------------------------------------------------

    def owns(self, address: str) -> bool:
        """Whether the address is at an inbound domain (from memory, no I/O)."""
        self._refresh_soon()
        return address.rpartition("@")[2].lower().rstrip(".>") in self._domains

    async def check_recipient(self, address: str) -> str | None:
        found = match(self._table, address)
        if found is None and time.monotonic() - self._loaded > RELOAD_MIN_SECONDS:
            await self.refresh()
            found = match(self._table, address)
        if found is None:
            REJECTS.labels("smtp", "inbound_no_route").inc()
            return "550 5.1.1 No such recipient here"
        if found.route.action == "reject":
            REJECTS.labels("smtp", "inbound_rejected").inc()
            return "550 5.1.1 Recipient address rejected"
        return None

    async def receive(
        self, mail_from: str, rcpt_tos: Sequence[str], data: bytes, client: Client | None = None
    ) -> str:
        refusal = check_message(data)
        if refusal is not None:
            REJECTS.labels("smtp", "inbound_malformed").inc()
            log.info("inbound: message from <%s> refused: %s", mail_from, refusal)
            return refusal
        rcpts: list[tuple[str, Match]] = []
        for rcpt in dict.fromkeys(rcpt_tos):
            found = match(self._table, rcpt)
            if found is None or found.route.action == "reject":
                return "451 4.3.0 Routes changed while the message arrived, try again"
            rcpts.append((rcpt, found))
        arrival = _Arrival(mail_from, rcpts, data, client, [new_id() for _ in rcpts])
        if self.scanner is not None:
            refusal = await self._score(arrival, self.scanner)
            if refusal is not None:
                return refusal
        try:
            await self._writer.submit(arrival)
        except RoutesChanged:
            return "451 4.3.0 Routes changed while the message arrived, try again"
        except Exception:
            log.exception("inbound: could not store a message from <%s>", mail_from)
            return "451 4.3.0 Could not store the message now, try again later"
        for listener in self.on_commit:
            listener()
        return f"250 2.0.0 Ok: queued as {arrival.ids[0]}"

    async def _score(self, arrival: _Arrival, scanner: content.ContentScanner) -> str | None:
        """Score the arrival with rspamd (as mail from outside: no User); the SMTP reply
        refusing it at the reject score, else None (held at the hold score)."""
        client = arrival.client
        try:
            verdict = await scanner.scan(
                arrival.data,
                direction="inbound",
                ip=client.ip if client else None,
                helo=client.helo if client else None,
                mail_from=arrival.mail_from,
                rcpts=[r for r, _ in arrival.rcpts],
                queue_id=str(arrival.ids[0]),
            )
        except content.ScanUnavailable:
            REJECTS.labels("smtp", "inbound_content_unavailable").inc()
            return "451 4.3.0 The content scanner is unavailable, try again later"
        if verdict is None:
            return None
        arrival.verdict = verdict
        decision = content.judge(verdict.score, scanner.thresholds)
        if decision == "refuse":
            REJECTS.labels("smtp", "inbound_content").inc()
            log.info(
                "inbound: message from <%s> refused for its content: score %g: %s",
                arrival.mail_from,
                verdict.score,
                content.named(verdict),
            )
            return f"550 5.7.1 {content.refuse_text(verdict, scanner.thresholds)}"
        if decision == "hold":
            arrival.content_hold = content.hold_text(verdict, scanner.thresholds)
        return None

    async def close(self) -> None:
        await self._writer.flush()
        if self.scanner is not None:
            await self.scanner.close()

    # -- storing (in a thread) -------------------------------------------------------------

    def _write(self, batch: list[_Arrival]) -> list[BaseException | None]:
        """One transaction for the batch; should it fail, one each, so that one bad message
        does not fail the others."""
        prepared = [self._rows(a) for a in batch]
        try:
            return retrying(lambda: self._insert(batch, prepared), "storing inbound mail")
        except Exception as exc:
            if len(batch) == 1:
                return [exc]
            errors: list[BaseException | None] = []
            for i in range(len(batch)):
                try:
                    errors += self._insert([batch[i]], [prepared[i]])
                except Exception as one:
                    errors.append(one)
            return errors

    def _rows(self, arrival: _Arrival) -> tuple[list[dict[str, Any]], list[Event]]:
        """An arrival's rows and events: one per recipient, the message stored with a trace
        header (RFC 5321 §4.4) and compressed once for all of them."""
        now = utcnow()
        client = arrival.client
        head = _header_block(arrival.data) or b""
        fields = summary(head)
        helo = _text(client.helo if client else "", 255) or "unknown"
        ip = client.ip if client else "unknown"
        with_ = "ESMTPS" if client is not None and client.tls else "ESMTP"
        received = (
            f"Received: from {helo} ({ip})\r\n\tby {self.hostname} (Postbode) with {with_} "
            f"id {arrival.ids[0]};\r\n\t{email.utils.format_datetime(now)}\r\n"
        ).encode()
        raw = received + arrival.data
        compressed = zlib.compress(raw)
        rows: list[dict[str, Any]] = []
        events: list[Event] = []
        for inbound_id, (rcpt, found) in zip(arrival.ids, arrival.rcpts, strict=True):
            route = found.route
            rows.append(
                {
                    "id": inbound_id,
                    "app_id": route.app_id,
                    "route_id": route.id,
                    "action": "hold"
                    if route.action == "hold" or arrival.content_hold is not None
                    else "post",
                    "mail_from": _text(arrival.mail_from, 320),
                    "rcpt_to": _text(rcpt, 320),
                    "mailbox_hash": _text(found.mailbox_hash, 320),
                    "from_header": fields.get("from", ""),
                    "subject": fields.get("subject", ""),
                    "message_id_header": fields.get("message-id") or None,
                    "size": len(raw),
                    "client_ip": ip[:45],
                    "helo": helo,
                    "raw": compressed,
                    "spam_score": arrival.verdict.score if arrival.verdict else None,
                    "spam_symbols": arrival.verdict.symbols_json() if arrival.verdict else None,
                    # why it is held (shown until it is released to its route)
                    "last_error": arrival.content_hold,
                    "status": "pending",
                    "attempts": 0,
                    "next_attempt_at": now,
                    "received_at": now,
                    "queued_at": now,
                }
            )
            events.append(
                Event(
                    app_id=route.app_id,
                    type=EventType.INBOUND_RECEIVED,
                    at=now,
                    recipient=_text(rcpt, 320),
                    data={
                        "inbound_id": str(inbound_id),
                        "route_id": route.id,
                        "match": route.pattern,
                        "action": route.action,
                        "mail_from": _text(arrival.mail_from, 320),
                        "rcpt_to": _text(rcpt, 320),
                        "from": fields.get("from", ""),
                        "subject": fields.get("subject", ""),
                        "mailbox_hash": found.mailbox_hash,
                        "size": len(raw),
                        **(
                            {"spam_score": arrival.verdict.score}
                            if arrival.verdict is not None
                            else {}
                        ),
                        **(
                            {"held_for": arrival.content_hold}
                            if arrival.content_hold is not None
                            else {}
                        ),
                    },
                )
            )
        return rows, events

    def _insert(
        self,
        batch: list[_Arrival],
        prepared: list[tuple[list[dict[str, Any]], list[Event]]],
    ) -> list[BaseException | None]:
        errors: list[BaseException | None] = []
        rows: list[dict[str, Any]] = []
        events: list[Event] = []
        with self.store.write() as conn:
            # A route removed since RCPT: that message is answered 451, not stored orphaned.
            alive = existing_route_ids(conn, {m.route.id for a in batch for _, m in a.rcpts})
            for arrival, (its_rows, its_events) in zip(batch, prepared, strict=True):
                if all(m.route.id in alive for _, m in arrival.rcpts):
                    rows += its_rows
                    events += its_events
                    errors.append(None)
                else:
                    errors.append(RoutesChanged())
            if rows:
                conn.execute(insert(inbound_messages), rows)
                record(conn, events)
        return errors
