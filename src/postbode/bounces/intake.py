"""The return path: bounces and complaints arriving by SMTP, matched to their deliveries."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, func, select

from postbode import tenancy
from postbode.bounces.classify import Rules, load_rules
from postbode.bounces.effects import (
    SoftBouncePolicy,
    Target,
    apply_complaint,
    apply_dsn,
    clean_text,
    target_query,
)
from postbode.bounces.parse import BounceRecord, BounceReport, parse
from postbode.config import Settings
from postbode.store.engine import Store
from postbode.store.schema import deliveries, messages, utcnow

log = logging.getLogger(__name__)

# VERP tokens are secrets.token_hex(12); anything of another shape is no token of ours.
TOKEN_RE = re.compile(r"[0-9A-Za-z_-]{8,40}")
# Bare addresses of the return-path domains that take mail without a token: postmaster
# (RFC 5321 §4.5.1 requires it), abuse (RFC 2142 §2, where feedback loops send ARF reports)
# and bounces (for bounces forwarded by hand). A report sent there acts only through a token
# it carries in the original message's Return-Path (feedback loops return the message as
# delivered, Return-Path and all); matched by Message-ID alone it is only noted.
BARE_LOCAL_PARTS = frozenset({"postmaster", "abuse", "bounces"})
# RFC 5322 §3.6.7: the Return-Path a final delivery adds, in a returned original message.
RETURN_PATH_RE = re.compile(rb"(?im)^Return-Path:[ \t]*<?([^\s<>@]{1,64})@([^\s<>]{1,255})>?")
RETURN_PATH_SEARCH_BYTES = 1_000_000
PARSE_TIMEOUT = 10.0  # seconds; parse() is linear in its bounded input, this is a backstop
PARSE_CONCURRENCY = 4  # bounces parsed at once: CPU work, off the event loop
DOMAIN_CACHE_SECONDS = 60.0
DOMAIN_RELOAD_MIN_SECONDS = 2.0  # an unknown domain re-reads the list at most this often
MAX_TARGET_RECIPIENTS = 10  # envelope recipients of one report looked at
MAX_MESSAGE_ID = 998


@dataclass(frozen=True, slots=True)
class _Rcpt:
    local: str
    domain: str
    app_id: int | None  # the app whose pb-bounces.<domain> this is; None: the main domain


class BounceIntake:
    """The LocalMailbox for the return-path domain and each app's `pb-bounces.<domain>`:
    refuses unknown VERP tokens at RCPT, parses what arrives (RFC 3464 DSNs, RFC 5965 ARF,
    vendor formats), and applies it to the delivery it is about. It sends no mail, ever:
    a bounce is never answered with a bounce (RFC 3834 §2)."""

    def __init__(self, settings: Settings, store: Store, *, rules: Rules | None = None) -> None:
        self.settings = settings
        self.store = store
        self.rules = rules if rules is not None else load_rules(settings.bounce_rules_path)
        self.policy = SoftBouncePolicy.from_settings(settings)
        self.return_path_domain = _domain_of(settings.return_path_domain)
        self.max_size = settings.bounce_max_message_size
        self.parse_timeout = PARSE_TIMEOUT
        self._label = tenancy.RETURN_PATH_LABEL + "."
        self._domains: dict[str, int] = {}
        self._domains_loaded = float("-inf")
        self._parsing: asyncio.Semaphore | None = None

    # -- LocalMailbox ---------------------------------------------------------------------

    def owns(self, address: str) -> bool:
        """The return-path domain and any pb-bounces.<domain>; whether <domain> is one of an
        app's is checked at RCPT (check_recipient), since this check does no I/O."""
        domain = _domain_of(address.rpartition("@")[2])
        return domain == self.return_path_domain or (
            domain.startswith(self._label) and "." in domain[len(self._label) :]
        )

    async def check_recipient(self, address: str) -> str | None:
        rcpt = await self._rcpt(address)
        if rcpt is None:
            return "550 5.1.2 Unknown return-path domain"
        if rcpt.local.lower() in BARE_LOCAL_PARTS:
            return None
        if not TOKEN_RE.fullmatch(rcpt.local):
            return "550 5.1.1 Unknown return path"
        app_id = await asyncio.to_thread(self._token_app, rcpt.local)
        if app_id is None or (rcpt.app_id is not None and app_id != rcpt.app_id):
            return "550 5.1.1 Unknown return path"
        return None

    async def receive(
        self, mail_from: str, rcpt_tos: Sequence[str], data: bytes, client: object = None
    ) -> str:
        if len(data) > self.max_size:
            log.info("return path: %d-byte report from <%s> refused", len(data), mail_from)
            # RFC 3463 §3.4: X.3.4 message too big for system.
            return f"552 5.3.4 Bounce too large: at most {self.max_size} bytes are accepted"
        try:
            report = await self._parse(data)
        except TimeoutError:
            log.warning("return path: report from <%s> not parsed in time", mail_from)
            return "554 5.6.0 Report could not be parsed in bounded time"
        if report.kind not in ("bounce", "complaint"):
            # Auto-replies (RFC 3834), success DSNs and anything else: taken and dropped, so
            # the sender gets no bounce of its own; only the log remembers.
            log.info(
                "return path: %s from <%s> to %s dropped", report.kind, mail_from, rcpt_tos[:1]
            )
            return f"250 2.0.0 Ok: {report.kind.replace('_', ' ')} dropped"
        rcpts = [r for r in [await self._rcpt(a) for a in rcpt_tos[:MAX_TARGET_RECIPIENTS]] if r]
        rcpts += await self._returned_paths(data)
        try:
            results = await asyncio.to_thread(self.apply, rcpts, report)
        except Exception:
            log.exception("return path: could not record a %s from <%s>", report.kind, mail_from)
            return "451 4.3.0 Could not record the report now, try again later"
        log.info(
            "return path: %s from <%s> to %s: %s", report.kind, mail_from, rcpt_tos[:1], results
        )
        if not results:
            return f"250 2.0.0 Ok: {report.kind} matches no delivery, dropped"
        if all(r.endswith(":noted") for r in results):
            return (
                f"250 2.0.0 Ok: {report.kind} noted; without a return-path token it changes nothing"
            )
        return f"250 2.0.0 Ok: {report.kind} recorded"

    # -- parsing --------------------------------------------------------------------------

    async def _parse(self, data: bytes) -> BounceReport:
        """parse() in a thread, bounded in time. parse() bounds its own input (MAX_INPUT,
        MAX_DEPTH, MAX_PARTS); the timeout only stops waiting for one that runs away, and
        such a thread keeps its slot until it ends, so at most PARSE_CONCURRENCY run at once.
        Raises TimeoutError."""
        if self._parsing is None:
            self._parsing = asyncio.Semaphore(PARSE_CONCURRENCY)
        slots = self._parsing
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.parse_timeout
        await asyncio.wait_for(slots.acquire(), self.parse_timeout)
        try:
            future = loop.run_in_executor(None, parse, data, self.rules)
        except BaseException:
            slots.release()
            raise
        future.add_done_callback(lambda _: slots.release())
        return await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline - loop.time()))

    # -- matching (in a thread) -------------------------------------------------------------

    def apply(self, rcpts: Sequence[_Rcpt], report: BounceReport) -> list[str]:
        """Apply the report to the deliveries its VERP tokens name, in one transaction;
        results as "<delivery id>:<outcome>". Without a token, deliveries its Message-ID and
        failed recipient name are only noted ("<id>:noted"): every recipient of a message
        sees its Message-ID, so such a report could come from any of them, about any other."""
        now = utcnow()
        results: list[str] = []
        with self.store.write() as conn:
            for target, rec in self._by_token(conn, rcpts, report):
                if report.kind == "complaint":
                    outcome = apply_complaint(conn, target, report, now)
                else:
                    outcome = apply_dsn(conn, target, rec, self.policy, now)
                results.append(f"{target.id}:{outcome}")
            if results:
                return results
            for target, rec in self._by_message_id_only(conn, rcpts, report):
                log.info(
                    "return path: %s about delivery %s <%s> matched by Message-ID only: "
                    "noted, not applied",
                    report.kind,
                    target.id,
                    rec.recipient,
                )
                results.append(f"{target.id}:noted")
        return results

    def _by_token(
        self, conn: Connection, rcpts: Sequence[_Rcpt], report: BounceReport
    ) -> list[tuple[Target, BounceRecord]]:
        """The deliveries whose VERP tokens the report was sent to (or carries in a returned
        Return-Path): a token is known only to the delivery's recipient and its MTAs."""
        found: dict[uuid.UUID, tuple[Target, BounceRecord]] = {}
        records = _records(report)
        for rcpt in rcpts:
            if rcpt.local.lower() in BARE_LOCAL_PARTS or not TOKEN_RE.fullmatch(rcpt.local):
                continue
            row = (
                conn.execute(
                    target_query().where(
                        deliveries.c.verp_token.in_({rcpt.local, rcpt.local.lower()})
                    )
                )
                .mappings()
                .first()
            )
            if row is None or (rcpt.app_id is not None and row["app_id"] != rcpt.app_id):
                continue
            target = Target.from_row(row)
            found[target.id] = (target, _record_for(records, target.recipient))
        return list(found.values())

    def _by_message_id_only(
        self, conn: Connection, rcpts: Sequence[_Rcpt], report: BounceReport
    ) -> list[tuple[Target, BounceRecord]]:
        """Without a token (a report to a bare address, a bounce forwarded by hand): the
        deliveries the returned original's Message-ID and the failed recipient name."""
        found: dict[uuid.UUID, tuple[Target, BounceRecord]] = {}
        mid = (report.original_message_id or "").strip()
        if not mid or len(mid) > MAX_MESSAGE_ID or clean_text(mid) != mid:
            return []  # no Message-ID, or none a message of ours could have
        apps = {r.app_id for r in rcpts}
        for rec in _records(report):
            for target in self._by_message_id(conn, mid, rec.recipient, apps):
                found.setdefault(target.id, (target, rec))
        return list(found.values())

    def _by_message_id(
        self, conn: Connection, mid: str, recipient: str | None, apps: set[int | None]
    ) -> list[Target]:
        query = target_query().where(messages.c.message_id_header == mid)
        if None not in apps:  # only pb-bounces.<domain> addresses: that app's messages
            query = query.where(deliveries.c.app_id.in_(apps))
        if recipient:
            query = query.where(func.lower(deliveries.c.recipient) == recipient.lower())
        rows = conn.execute(query.limit(2)).mappings().all()
        if recipient is None and len(rows) != 1:
            return []  # no recipient named: only a message with one delivery is unambiguous
        return [Target.from_row(r) for r in rows]

    async def _returned_paths(self, data: bytes) -> list[_Rcpt]:
        """Return-Path addresses of ours in the report (the original message as delivered,
        which feedback loops return), as if the report had been sent to them."""
        found: list[_Rcpt] = []
        for m in RETURN_PATH_RE.finditer(data, 0, RETURN_PATH_SEARCH_BYTES):
            address = f"{m[1].decode('ascii', 'replace')}@{m[2].decode('ascii', 'replace')}"
            if self.owns(address):
                rcpt = await self._rcpt(address)
                if rcpt is not None and rcpt not in found:
                    found.append(rcpt)
            if len(found) >= MAX_TARGET_RECIPIENTS:
                break
        return found

    def _token_app(self, token: str) -> int | None:
        with self.store.read() as conn:
            app_id = conn.execute(
                select(deliveries.c.app_id).where(
                    deliveries.c.verp_token.in_({token, token.lower()})
                )
            ).scalar()
        return None if app_id is None else int(app_id)

    # -- domains ----------------------------------------------------------------------------

    async def _rcpt(self, address: str) -> _Rcpt | None:
        """The parts of a recipient of ours; None for a pb-bounces.<domain> of no app."""
        local, _, domain = address.strip("<>").rpartition("@")
        domain = _domain_of(domain)
        if domain == self.return_path_domain:
            return _Rcpt(local, domain, None)
        app_id = await self._domain_app(domain[len(self._label) :])
        return None if app_id is None else _Rcpt(local, domain, app_id)

    async def _domain_app(self, name: str) -> int | None:
        age = time.monotonic() - self._domains_loaded
        if age > DOMAIN_CACHE_SECONDS or (
            name not in self._domains and age > DOMAIN_RELOAD_MIN_SECONDS
        ):
            self._domains = await asyncio.to_thread(self._load_domains)
            self._domains_loaded = time.monotonic()
        return self._domains.get(name)

    def _load_domains(self) -> dict[str, int]:
        """{name: app} of the names whose pb-bounces.<name> take bounces: the app holding each
        (the verified claim). Also the only claim of a name nobody verified, even where
        unverified domains do not send: mail sent before a domain's records went missing
        still has its bounces come back, and only a delivery's own VERP token acts on it."""
        with self.store.read() as conn:
            return tenancy.domain_holders(conn, allow_unverified=True)


def _domain_of(value: str) -> str:
    return value.strip().strip("<>").lower().rstrip(".")


def _records(report: BounceReport) -> Sequence[BounceRecord]:
    return report.records or (BounceRecord(None, None, None, "", "unknown", False),)


def _record_for(records: Sequence[BounceRecord], recipient: str) -> BounceRecord:
    """The record about `recipient`, else the first (a forwarded address fails under another
    name: RFC 3464 §2.3.2 Final-Recipient is the address after forwarding)."""
    want = recipient.lower()
    return next((r for r in records if (r.recipient or "").lower() == want), records[0])
