"""The demo seeder: weeks of realistic traffic for one app, written fast (`postbode demo seed`)."""

from __future__ import annotations

import gc
import json
import math
import random
import secrets
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, select, update

from postbode import tenancy
from postbode.stats import rollup
from postbode.store.engine import Store
from postbode.store.schema import apps, domains, organizations, utcnow

DEMO_ORG = tenancy.DEFAULT_ORGANIZATION  # where demo apps are made

# Seeded mail keeps its raw content (and full attempt transcripts) for the newest day only;
# older messages are marked raw-purged, as retention would leave them, so a million messages
# take a few hundred MB instead of gigabytes. Their detail pages still show deliveries,
# events and (for deferrals and bounces) attempts.
RAW_DAYS = 1.0
CHUNK_MESSAGES = 10_000  # messages per transaction
MAX_AGE_MS = 3 * 24 * 3600 * 1000  # deliveries expire after three days of deferrals


# -- the traffic, as data -------------------------------------------------------------------------


@dataclass(frozen=True)
class TagProfile:
    """One flow of mail and how its readers behave."""

    tag: str
    stream: str
    share: float  # of all messages
    sender: str  # the local part of the From address
    subjects: tuple[str, ...]  # str.format templates: {first} {other} {order} {invoice} {topic}
    opens: float  # chance a person opens a delivered message
    clicks: float  # chance a person who opened it clicks
    links: tuple[str, ...]  # the paths its links point to
    size: int  # typical message size in bytes
    cc: float = 0.0  # chance of a second recipient


TAGS: tuple[TagProfile, ...] = (
    TagProfile(
        "order-confirmation",
        "transactional",
        0.24,
        "orders",
        ("Your order #{order} is confirmed", "Thanks for your order, {first}! (#{order})"),
        0.58,
        0.14,
        ("/orders/{order}", "/help/shipping"),
        18_000,
    ),
    TagProfile(
        "comment-notification",
        "transactional",
        0.21,
        "notifications",
        ("{other} commented on your post", "{other} replied to you", "{other} mentioned you"),
        0.36,
        0.35,
        ("/posts/{order}#comments",),
        9_000,
    ),
    TagProfile(
        "password-reset",
        "transactional",
        0.13,
        "no-reply",
        ("Reset your password", "Your password reset link"),
        0.66,
        0.8,
        ("/account/reset?token={order}",),
        6_000,
    ),
    TagProfile(
        "welcome",
        "transactional",
        0.08,
        "hello",
        ("Welcome to {brand}, {first}!", "{first}, your {brand} account is ready"),
        0.62,
        0.4,
        ("/start", "/account/profile", "/help"),
        24_000,
    ),
    TagProfile(
        "invoice",
        "transactional",
        0.12,
        "billing",
        ("Invoice INV-{invoice} is ready", "Your {brand} invoice INV-{invoice}"),
        0.48,
        0.2,
        ("/billing/invoices/INV-{invoice}",),
        31_000,
        cc=0.2,
    ),
    TagProfile(
        "newsletter",
        "broadcast",
        0.22,
        "news",
        ("This week at {brand}: {topic}",),
        0.31,
        0.12,
        ("/blog/{order}", "/sale", "/products/new"),
        42_000,
    ),
)


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


NEWSLETTER_TOPICS = (
    "spring collection is here",
    "our biggest sale yet",
    "five tips from our support team",
    "new in the app",
    "what you told us",
    "behind the scenes",
    "free shipping weekend",
    "the year so far",
    "meet the makers",
    "last chance: 30 % off",
)
FIRST_NAMES = _words(
    "Anna Ben Chloe Daan Emma Finn Grace Hugo Iris Jan Kim Lars Mila Noah Olivia Pieter Quinn "
    "Ruth Sam Tess Umar Vera Wout Xena Yara Zoe"
)
LAST_NAMES = ("de Vries", "Jansen", "Bakker", "Smith", "Müller", "Rossi", "Kowalski", "Nguyen")


@dataclass(frozen=True)
class Provider:
    """A mailbox provider seen in the recipient list, and how its servers behave."""

    domain: str
    weight: float
    mx: tuple[str, ...]
    ip: str  # the first three octets of its MX addresses (TEST-NET-3, RFC 5737)
    deferral: str = "421 4.7.0 Try again later, closing connection"
    deferral_rate: float = 0.03  # chance an attempt is deferred
    apple: bool = False  # Apple Mail Privacy Protection fetches images of every message
    scanner: bool = False  # a security gateway clicks every link on arrival
    gone: bool = False  # the domain no longer exists (NXDOMAIN)
    tls: tuple[str, str] | None = ("TLSv1.3", "TLS_AES_256_GCM_SHA384")


PROVIDERS: tuple[Provider, ...] = (
    Provider(
        "gmail.test",
        34,
        ("gmail-smtp-in.l.gmail.test", "alt1.gmail-smtp-in.l.gmail.test"),
        "203.0.113",
        "421 4.7.28 Our system has detected an unusual rate of unsolicited mail originating "
        "from your IP address. To protect our users, mail has been temporarily rate limited.",
        0.02,
    ),
    Provider(
        "outlook.test",
        18,
        ("outlook-test.mail.protection.outlook.test",),
        "203.0.113",
        "451 4.7.650 The mail server [198.51.100.7] has been temporarily rate limited due to "
        "IP reputation.",
        0.04,
        tls=("TLSv1.2", "ECDHE-RSA-AES256-GCM-SHA384"),
    ),
    Provider(
        "yahoo.test",
        8,
        ("mta5.am0.yahoodns.test", "mta6.am0.yahoodns.test"),
        "203.0.113",
        "421 4.7.0 [TSS04] Messages from 198.51.100.7 temporarily deferred due to unexpected "
        "volume or user complaints",
        0.05,
    ),
    Provider("icloud.test", 10, ("mx01.mail.icloud.test",), "203.0.113", apple=True),
    Provider(
        "corp.test",
        12,
        ("mx1.corp.test", "mx2.corp.test"),
        "203.0.113",
        "451 4.7.1 Greylisted, please try again in 300 seconds",
        0.2,
        scanner=True,
        tls=("TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256"),
    ),
    Provider("web.test", 6, ("mx.web.test",), "203.0.113", tls=None),
    Provider("fastmail.test", 4, ("in1-smtp.messagingengine.test",), "203.0.113"),
    Provider("proton.test", 4, ("mail.protonmail.test",), "203.0.113"),
    Provider("example.test", 3.2, ("mx.example.test",), "203.0.113", deferral_rate=0.05),
    Provider("oldmail.test", 0.8, (), "203.0.113", gone=True),
)

# (category, hard, enhanced status, reply); {rcpt} is the recipient.
Bounce = tuple[str, bool, str, str]
HARD_BOUNCE: Bounce = (
    "user_unknown",
    True,
    "5.1.1",
    "550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown in virtual mailbox table",
)
GONE_DOMAIN: Bounce = (
    "domain_invalid",
    True,
    "5.1.2",
    "Host or domain name not found. Name service error for name={domain} type=MX: Host not found",
)
FULL_MAILBOX: Bounce = (
    "mailbox_full",
    False,
    "5.2.2",
    "552 5.2.2 <{rcpt}>: The email account that you tried to reach is over quota",
)
OTHER_BOUNCES: tuple[tuple[int, Bounce], ...] = (  # (weight, bounce)
    (
        5,
        (
            "blocked",
            False,
            "5.7.1",
            "554 5.7.1 Service unavailable; Client host [198.51.100.7] blocked using "
            "zen.spamhaus.test",
        ),
    ),
    (
        2,
        (
            "content_rejected",
            False,
            "5.7.1",
            "550 5.7.1 Message rejected because it looks like spam",
        ),
    ),
    (
        2,
        (
            "mailbox_inactive",
            False,
            "5.2.1",
            "550 5.2.1 The email account that you tried to reach is disabled",
        ),
    ),
    (
        1,
        (
            "message_too_large",
            False,
            "5.3.4",
            "552 5.3.4 Message size exceeds fixed maximum message size",
        ),
    ),
)

# Chances per delivery (the rest is delivered at once or after deferrals).
DEAD, FULL = 1, 2  # kinds of recipient (0: an ordinary mailbox)
DEAD_ADDRESSES = 0.04  # of recipients: gone mailboxes (hard bounce, then suppressed)
FULL_ADDRESSES = 0.008  # of recipients: mailboxes over quota (soft bounces, some days)
OTHER_BOUNCE_RATE = 0.016
HELD_RATE = 0.002
EXPIRE_RATE = 0.003  # deferred until the message expires
COMPLAINT_RATE = {"transactional": 0.0001, "broadcast": 0.0008}
UNSUBSCRIBE_RATE = 0.003  # of delivered broadcast mail
REPEAT_OPEN = 0.25

HOURLY = (  # relative volume by UTC hour of day
    *(0.22, 0.15, 0.11, 0.1, 0.12, 0.2, 0.38, 0.62, 0.86, 1.0, 1.0, 0.96),
    *(0.9, 0.92, 0.9, 0.86, 0.84, 0.86, 0.9, 0.94, 0.88, 0.7, 0.5, 0.32),
)
WEEKDAY = (1.06, 1.1, 1.05, 1.0, 0.94, 0.6, 0.55)  # Monday first

BROWSERS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.5 Safari/605.1.15",
    "Mozilla/5.0 (Linux; Android 14) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:127.0) Gecko/20100101 Firefox/127.0",
)
GMAIL_PROXY = (
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
)
APPLE_PROXY = "Mozilla/5.0"
SCANNER = "Mozilla/5.0 (compatible; Proofpoint URL Defense)"


# -- pure parts ------------------------------------------------------------------------------------


def uuid7(ms: int, rand: int) -> int:
    """A UUIDv7 (RFC 9562 §5.7) as an int, for the instant `ms` (Unix milliseconds), with 74
    bits of `rand`: ids made for past instants sort with the ids Postbode makes live."""
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | (rand >> 62 & 0xFFF) << 64 | rand & (1 << 62) - 1
    return value | 0x7 << 76 | 0x2 << 62


def hourly_weights(start: datetime, hours: int, rng: random.Random) -> list[float]:
    """Relative volume of each hour from `start`: a daily rhythm (quiet nights, a morning
    peak, a smaller evening one), quieter weekends, day-to-day noise, slow growth, and one
    sale day at about two thirds of the way with half again as much mail."""
    day_noise: dict[int, float] = {}
    sale_day = int(hours / 24 * 2 / 3)
    weights = []
    for h in range(hours):
        at = start + timedelta(hours=h)
        day = h // 24
        if day not in day_noise:
            day_noise[day] = rng.uniform(0.85, 1.15) * (1.5 if day == sale_day else 1.0)
        growth = 0.85 + 0.3 * h / max(hours, 1)
        weights.append(HOURLY[at.hour] * WEEKDAY[at.weekday()] * day_noise[day] * growth)
    return weights


def campaign_starts(start: datetime, end: datetime) -> list[datetime]:
    """Newsletter campaigns: Tuesdays and Thursdays at 09:00 UTC within [start, end)."""
    day = start.replace(hour=9, minute=0, second=0, microsecond=0)
    found = []
    while day < end:
        if day >= start and day.weekday() in (1, 3):
            found.append(day)
        day += timedelta(days=1)
    return found


def plan_times(
    count: int, start: datetime, end: datetime, rng: random.Random
) -> list[tuple[int, int, int]]:
    """(received at in Unix ms, index into TAGS, campaign number or -1) for `count`
    messages in [start, end), sorted by time: transactional flows follow the daily rhythm,
    the newsletter goes out in campaigns of about 40 minutes each."""
    start_ms = int(start.timestamp() * 1000)
    end_ms = int(end.timestamp() * 1000)
    hours = max(1, math.ceil((end_ms - start_ms) / 3_600_000))
    campaigns = [c for c in campaign_starts(start, end) if c < end - timedelta(minutes=5)]
    broadcast = [i for i, t in enumerate(TAGS) if t.stream == "broadcast"]
    transactional = [i for i, t in enumerate(TAGS) if t.stream != "broadcast"]
    n_broadcast = round(count * sum(TAGS[i].share for i in broadcast)) if campaigns else 0
    n_transactional = count - n_broadcast
    planned: list[tuple[int, int, int]] = []
    weights = hourly_weights(start, hours, rng)
    tag_weights = [TAGS[i].share for i in transactional]
    hour_of = rng.choices(range(hours), weights=weights, k=n_transactional)
    tag_of = rng.choices(transactional, weights=tag_weights, k=n_transactional)
    for h, tag in zip(hour_of, tag_of, strict=True):
        at = start_ms + h * 3_600_000 + int(rng.random() * 3_600_000)
        if at >= end_ms:
            at = end_ms - 1 - int(rng.random() * 60_000)
        planned.append((at, tag, -1))
    for k, n in enumerate(_split(n_broadcast, len(campaigns))):
        begin = int(campaigns[k].timestamp() * 1000)
        for _ in range(n):
            # Sent as fast as shaping allows: most in the first minutes, a tail after.
            at = begin + int(min(rng.expovariate(1 / 600), 2400) * 1000)
            planned.append((min(at, end_ms - 1), broadcast[0], k))
    planned.sort()
    return planned


def _split(total: int, parts: int) -> list[int]:
    if parts <= 0:
        return []
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


# -- writing rows fast ---------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1)


class _Encoder:
    """Values as the driver takes them, so rows skip SQLAlchemy's per-value processing (about
    45 µs a row, most of a million-message seeding); the formats are those of schema.py."""

    def __init__(self, dialect: str) -> None:
        self.sqlite = dialect == "sqlite"
        self.mark = "?" if self.sqlite else "%s"
        self._days: dict[int, str] = {}

    def ts(self, ms: int) -> Any:
        if self.sqlite:  # UTCDateTime on SQLite: 'YYYY-MM-DD HH:MM:SS.ffffff', UTC
            day, rest = divmod(ms, 86_400_000)
            prefix = self._days.get(day)
            if prefix is None:
                prefix = time.strftime("%Y-%m-%d ", time.gmtime(day * 86_400))
                self._days[day] = prefix
            seconds, frac = divmod(rest, 1000)
            hours, seconds = divmod(seconds, 3600)
            minutes, seconds = divmod(seconds, 60)
            return f"{prefix}{hours:02d}:{minutes:02d}:{seconds:02d}.{frac:03d}000"
        return _EPOCH + timedelta(milliseconds=ms)  # naive UTC, as UTCDateTime binds it

    def uid(self, value: int) -> Any:
        return f"{value:032x}" if self.sqlite else uuid.UUID(int=value)

    def flag(self, value: bool | None) -> Any:
        return None if value is None else (int(value) if self.sqlite else value)

    def insert(self, table: str, columns: Sequence[str], json_columns: Sequence[str] = ()) -> str:
        marks = [
            f"{self.mark}::json" if c in json_columns and not self.sqlite else self.mark
            for c in columns
        ]
        return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(marks)})"


MESSAGE_COLUMNS = _words(
    "id app_id source stream tag metadata message_id_header mail_from from_header subject "
    "size domain_verified track_opens track_clicks received_at raw_purged_at"
)
DELIVERY_COLUMNS = _words(
    "id message_id app_id recipient recipient_domain status attempts next_attempt_at "
    "first_queued_at last_attempt_at verp_token mx last_reply bounce_category "
    "bounce_status hard updated_at"
)
ATTEMPT_COLUMNS = _words(
    "id delivery_id started_at duration_ms outcome mx_host ip port tls_version tls_cipher "
    "reply_code enhanced_status reply_text transcript"
)
EVENT_COLUMNS = _words("id app_id message_id delivery_id recipient type data created_at")
SUPPRESSION_COLUMNS = _words("app_id stream email reason source message_id detail created_at")


@dataclass
class _Chunk:
    """The rows of one transaction."""

    messages: list[tuple[Any, ...]] = field(default_factory=list)
    raw: list[tuple[Any, ...]] = field(default_factory=list)
    deliveries: list[tuple[Any, ...]] = field(default_factory=list)
    attempts: list[tuple[Any, ...]] = field(default_factory=list)
    events: list[tuple[Any, ...]] = field(default_factory=list)
    suppressions: list[tuple[Any, ...]] = field(default_factory=list)
    # (stream, tag, minute in ms, event type) -> [count, bot count], as events.record bumps
    counters: dict[tuple[str, str, int, str], list[int]] = field(default_factory=dict)
    # (stream, tag, minute in ms, category, hard) -> count: bounce_counters
    bounces: dict[tuple[str, str, int, str, bool], int] = field(default_factory=dict)


@dataclass(frozen=True)
class SeedReport:
    """What a seeding wrote, and how long it took."""

    app: str
    app_id: int
    domain: str
    messages: int
    deliveries: int
    events: int
    attempts: int
    counters_merged: int  # minute counter rows merged into hour rows (stats.rollup)
    seconds: float
    statuses: dict[str, int]

    def as_json(self) -> dict[str, Any]:
        return {**self.__dict__, "seconds": round(self.seconds, 1)}


# -- one message's life ----------------------------------------------------------------------------


class _Generator:
    """Makes the rows of each message in time order, remembering what earlier mail did to
    its recipients (a mailbox that bounced hard is suppressed from then on)."""

    def __init__(
        self,
        enc: _Encoder,
        app_id: int,
        domain: str,
        brand: str,
        now_ms: int,
        rng: random.Random,
        pool_size: int,
    ) -> None:
        self.enc = enc
        self.app_id = app_id
        self.domain = domain
        self.brand = brand
        self.now_ms = now_ms
        self.rng = rng
        self.pool_size = pool_size
        self.pool_provider = rng.choices(
            range(len(PROVIDERS)), weights=[p.weight for p in PROVIDERS], k=pool_size
        )
        self.pool_kind = [
            DEAD if r < DEAD_ADDRESSES else FULL if r < DEAD_ADDRESSES + FULL_ADDRESSES else 0
            for r in (rng.random() for _ in range(pool_size))
        ]
        # recipient index -> {stream or "all": suppressed from (ms)}
        self.suppressed: dict[int, dict[str, int]] = {}
        self.seq = rng.getrandbits(40)
        self.statuses: dict[str, int] = {}
        self.counts = {"deliveries": 0, "events": 0, "attempts": 0}
        self.detail_from = now_ms - int(RAW_DAYS * 86_400_000)

    # -- ids and rows --------------------------------------------------------------------

    def new_id(self, ms: int) -> int:
        self.seq += 1
        return uuid7(ms, (self.rng.getrandbits(12) << 62) | (self.seq & (1 << 62) - 1))

    def event(
        self,
        chunk: _Chunk,
        ms: int,
        type: str,
        stream: str,
        tag: str,
        message_id: int,
        delivery_id: int | None,
        recipient: str | None,
        data: dict[str, Any],
        bot: bool = False,
    ) -> None:
        enc = self.enc
        chunk.events.append(
            (
                enc.uid(self.new_id(ms)),
                self.app_id,
                enc.uid(message_id),
                None if delivery_id is None else enc.uid(delivery_id),
                recipient,
                type,
                json.dumps(data),
                enc.ts(ms),
            )
        )
        key = (stream, tag, ms - ms % 60_000, type)
        counter = chunk.counters.get(key)
        if counter is None:
            chunk.counters[key] = [1, int(bot)]
        else:
            counter[0] += 1
            counter[1] += int(bot)
        if type == "delivery.bounced":
            bounce = (
                stream,
                tag,
                key[2],
                data.get("category") or "unknown",
                bool(data.get("hard")),
            )
            chunk.bounces[bounce] = chunk.bounces.get(bounce, 0) + 1
        self.counts["events"] += 1

    def recipient(self) -> int:
        # Some people get much more mail than others: a skewed pick from the pool.
        return int(self.pool_size * self.rng.random() ** 1.7)

    # -- a message -----------------------------------------------------------------------

    def message(self, chunk: _Chunk, received: int, tag_index: int, campaign: int) -> None:
        rng, enc = self.rng, self.enc
        profile = TAGS[tag_index]
        message_id = self.new_id(received)
        people = [self.recipient()]
        if profile.cc and rng.random() < profile.cc:
            other = self.recipient()
            if other != people[0]:
                people.append(other)
        first = FIRST_NAMES[people[0] % len(FIRST_NAMES)]
        order = 100_000 + (message_id >> 64) % 900_000
        values = {
            "brand": self.brand,
            "first": first,
            "other": f"{FIRST_NAMES[(order // 7) % len(FIRST_NAMES)]} "
            f"{LAST_NAMES[order % len(LAST_NAMES)]}",
            "order": order,
            "invoice": f"{datetime.fromtimestamp(received / 1000, UTC).year}-{order % 100_000:05d}",
            "topic": NEWSLETTER_TOPICS[campaign % len(NEWSLETTER_TOPICS)],
        }
        subject = rng.choice(profile.subjects).format(**values)
        sender = f"{profile.sender}@{self.domain}"
        metadata: dict[str, str] = {}
        if profile.tag == "order-confirmation":
            metadata = {"order_id": str(order)}
        elif profile.tag == "invoice":
            metadata = {"invoice": f"INV-{values['invoice']}"}
        elif profile.tag == "newsletter":
            week = datetime.fromtimestamp(received / 1000, UTC).isocalendar()
            metadata = {"campaign": f"{week.year}-w{week.week:02d}-{campaign}"}
        elif profile.tag == "comment-notification":
            metadata = {"post_id": str(order // 3)}
        size = int(profile.size * rng.uniform(0.8, 1.25))
        keep_raw = received >= self.detail_from
        addresses = [self.address(p) for p in people]
        chunk.messages.append(
            (
                enc.uid(message_id),
                self.app_id,
                "api",
                profile.stream,
                profile.tag,
                json.dumps(metadata),
                f"<{uuid.UUID(int=message_id)}@{self.domain}>",
                sender,
                f"{self.brand} <{sender}>",
                subject,
                size,
                enc.flag(True),
                enc.flag(True),
                enc.flag(True),
                enc.ts(received),
                None if keep_raw else enc.ts(self.now_ms),
            )
        )
        if keep_raw:
            raw = _raw_message(self.brand, sender, addresses, subject, profile, values, received)
            chunk.raw.append((enc.uid(message_id), "zlib", zlib.compress(raw, 6)))
        self.event(
            chunk,
            received,
            "message.received",
            profile.stream,
            profile.tag,
            message_id,
            None,
            None,
            {"source": "api", "recipients": len(people)},
        )
        for person, address in zip(people, addresses, strict=True):
            self.delivery(chunk, message_id, received, profile, person, address, values, size)

    def address(self, person: int) -> str:
        return f"user{person}@{PROVIDERS[self.pool_provider[person]].domain}"

    def delivery(
        self,
        chunk: _Chunk,
        message_id: int,
        received: int,
        profile: TagProfile,
        person: int,
        address: str,
        values: dict[str, Any],
        size: int,
    ) -> None:
        """One recipient's delivery, as a checklist of drawn events: suppressed, or queued,
        perhaps held, perhaps deferred (until it expires), then bounced or delivered, then
        read. The row records the state reached by now."""
        d = _Delivery(self, chunk, message_id, received, profile, person, address, size)
        if self.suppressed_at(person, profile.stream, received):
            d.record(received, "delivery.suppressed", {}, status="suppressed")
        else:
            d.record(received, "delivery.queued", {})
            at: int | None = received + int(self.rng.lognormvariate(7.0, 0.8))  # ~1 s later
            at = self.hold_if_drawn(d, at)
            outcome = self.draw_bounce(d)
            if at is not None:
                at = self.defer_if_drawn(d, at, expires=outcome is None and self.draws(EXPIRE_RATE))
            if at is not None and outcome is not None:
                self.bounce(d, at, outcome)
            elif at is not None:
                delivered = self.deliver(d, at)
                if delivered is not None:
                    self.read(d, delivered, values)
        d.finish()

    def draws(self, chance: float) -> bool:
        return self.rng.random() < chance

    def suppressed_at(self, person: int, stream: str, at: int) -> bool:
        entries = self.suppressed.get(person)
        if not entries:
            return False
        return any(since <= at for s, since in entries.items() if s in ("all", stream))

    def hold_if_drawn(self, d: _Delivery, at: int | None) -> int | None:
        """Now and then mail is held for review and released hours later."""
        if at is None or not self.draws(HELD_RATE):
            return at
        if not d.record(
            at,
            "delivery.held",
            {"reason": "held for review: sending spike"},
            status="held",
            reply="held for review: sending spike",  # as the worker keeps a hold's reason
        ):
            return None
        at += int(self.rng.uniform(0.5, 30) * 3_600_000)
        if not d.record(
            at, "delivery.released", {"by": f"admin@{self.domain}"}, status="queued", next=at
        ):
            return None
        return at + 1500

    def draw_bounce(self, d: _Delivery) -> Bounce | None:
        kind = self.pool_kind[d.person]
        if d.provider.gone:
            return GONE_DOMAIN
        if kind == DEAD:
            return HARD_BOUNCE
        if kind == FULL and self.draws(0.6):
            return FULL_MAILBOX
        if self.draws(OTHER_BOUNCE_RATE):
            return self.rng.choices([b for _, b in OTHER_BOUNCES], [w for w, _ in OTHER_BOUNCES])[0]
        return None

    def defer_if_drawn(self, d: _Delivery, at: int, *, expires: bool) -> int | None:
        """Attempts answered 4xx, retried with doubling waits (5 min to 2 h); when `expires`,
        until the message is too old and fails. The time of the next attempt, or None."""
        provider = d.provider
        if provider.gone:
            return at
        deferrals = 0
        if not expires:
            chance = provider.deferral_rate
            while deferrals < 4 and self.draws(chance):
                deferrals, chance = deferrals + 1, 0.3
        wait = 300_000
        while deferrals or expires:
            reply = provider.deferral
            duration = int(self.rng.uniform(150, 1800))
            next_at = at + duration + int(wait * self.rng.uniform(0.8, 1.2))
            attempt = d.row["attempts"] + 1
            data: dict[str, Any] = {"reply": reply, "attempt": attempt, "mx": d.mx}
            if expires and next_at - d.received >= MAX_AGE_MS:
                data.update(reason="expired", last_error=reply)
                if d.record(
                    at + duration,
                    "delivery.failed",
                    data,
                    status="failed",
                    attempts=attempt,
                    last=at,
                    mx=d.mx,
                    reply=reply,
                ):
                    d.attempt(at, duration, "SoftFail", reply)
                return None
            data.update(reason=reply, next_attempt_at=_iso(next_at))
            if not d.record(
                at + duration,
                "delivery.deferred",
                data,
                status="deferred",
                attempts=attempt,
                last=at,
                next=next_at,
                mx=d.mx,
                reply=reply,
            ):
                return None
            d.attempt(at, duration, "SoftFail", reply, always=True)
            at, wait = next_at, min(wait * 2, 7_200_000)
            deferrals -= 0 if expires else 1
        return at

    def bounce(self, d: _Delivery, at: int, bounce: Bounce) -> None:
        """A 5xx (or a domain that is gone); a hard bounce suppresses the address."""
        category, hard, status, text = bounce
        reply = text.format(rcpt=d.address, domain=d.provider.domain)
        duration = int(self.rng.uniform(180, 2500))
        attempt = d.row["attempts"] + 1
        data = {
            "reply": reply,
            "attempt": attempt,
            "mx": d.mx,
            "category": category,
            "hard": hard,
            "source": "smtp",
            "status": status,
        }
        if not d.record(
            at + duration,
            "delivery.bounced",
            data,
            status="bounced",
            attempts=attempt,
            last=at,
            mx=d.mx,
            reply=reply,
            category=category,
            bounce_status=status,
            hard=hard,
        ):
            return
        d.attempt(at, duration, "HardFail", reply, always=True)
        if hard:
            self.suppress(d, "all", category, "bounce", reply, at + duration)

    def deliver(self, d: _Delivery, at: int) -> int | None:
        """A 250; the time it was delivered, or None if that is still to come."""
        duration = int(self.rng.uniform(180, 2500))
        attempt = d.row["attempts"] + 1
        reply = f"250 2.0.0 OK {at // 1000} {self.rng.getrandbits(32):08x} - queued"
        if not d.record(
            at + duration,
            "delivery.delivered",
            {"reply": reply, "attempt": attempt, "mx": d.mx},
            status="delivered",
            attempts=attempt,
            last=at,
            mx=d.mx,
            reply=reply,
        ):
            return None
        d.attempt(at, duration, "Delivered", reply)
        return at + duration

    def read(self, d: _Delivery, delivered: int, values: dict[str, Any]) -> None:
        """Opens and clicks by proxies, scanners and people; a few complaints and
        unsubscribes (which suppress the address)."""
        profile, provider, rng = d.profile, d.provider, self.rng
        links = [f"https://{self.domain}{path.format(**values)}" for path in profile.links]
        if provider.apple and self.draws(0.9):  # the proxy fetches every message's images
            d.hit(
                delivered + int(rng.uniform(5, 600) * 1000),
                "message.opened",
                {
                    "first": False,
                    "bot": True,
                    "bot_reason": "apple_mail_privacy_protection",
                    "user_agent": APPLE_PROXY,
                    "ip": "17.58.63.12",
                },
                bot=True,
            )
        if provider.scanner and self.draws(0.7):  # the gateway follows every link at once
            for k, url in enumerate(links):
                d.hit(
                    delivered + int(rng.uniform(1, 20) * 1000) + k * 150,
                    "message.clicked",
                    {
                        "url": url,
                        "link": k,
                        "bot": True,
                        "bot_reason": "proofpoint",
                        "user_agent": SCANNER,
                        "ip": "192.0.2.44",
                    },
                    bot=True,
                )
        if not self.draws(profile.opens):
            return
        # People read mail minutes to hours later (log-normal, median about 40 minutes);
        # Gmail fetches images through its proxy, which tracking counts as a bot.
        read = delivered + int(min(rng.lognormvariate(7.8, 1.5), 4 * 86400) * 1000)
        proxy = provider.domain == "gmail.test"
        agent = GMAIL_PROXY if proxy else rng.choice(BROWSERS)
        ip = f"192.0.2.{d.person % 250 + 1}"
        opens = [read]
        if self.draws(REPEAT_OPEN):
            opens.append(read + int(rng.uniform(0.5, 48) * 3_600_000))
        for n, at in enumerate(opens):
            d.hit(
                at,
                "message.opened",
                {
                    "first": n == 0 and not proxy,
                    "bot": proxy,
                    "bot_reason": "google_image_proxy" if proxy else None,
                    "user_agent": agent,
                    "ip": ip,
                },
                bot=proxy,
            )
        if links and self.draws(profile.clicks):
            k = rng.randrange(len(links))
            d.hit(
                read + int(rng.uniform(4, 180) * 1000),
                "message.clicked",
                {
                    "url": links[k],
                    "link": k,
                    "bot": False,
                    "bot_reason": None,
                    "user_agent": rng.choice(BROWSERS),
                    "ip": ip,
                },
            )
        if self.draws(COMPLAINT_RATE[profile.stream] / profile.opens):
            at = read + int(rng.uniform(10, 600) * 1000)
            if d.hit(
                at,
                "message.complained",
                {
                    "feedback_type": "abuse",
                    "source": "arf",
                    "reporting_mta": f"feedback.{provider.domain}",
                },
            ):
                self.suppress(
                    d, profile.stream, "complaint", "complaint", "feedback-type: abuse", at
                )
        elif profile.stream == "broadcast" and self.draws(UNSUBSCRIBE_RATE / profile.opens):
            at = read + int(rng.uniform(10, 300) * 1000)
            if d.hit(
                at, "message.unsubscribed", {"source": "one-click", "user_agent": agent, "ip": ip}
            ):
                self.suppress(d, "broadcast", "unsubscribed", "unsubscribe", None, at)

    def suppress(
        self, d: _Delivery, stream: str, reason: str, source: str, detail: str | None, ms: int
    ) -> None:
        """Put the address on the list (as bounces/suppression.py would), from `ms` on."""
        entries = self.suppressed.setdefault(d.person, {})
        if stream in entries:
            return
        entries[stream] = ms
        enc = self.enc
        d.chunk.suppressions.append(
            (
                self.app_id,
                stream,
                d.address,
                reason,
                source,
                enc.uid(d.message_id),
                detail,
                enc.ts(ms),
            )
        )


class _Delivery:
    """One delivery being made up: its events so far, its row's state, its attempts."""

    def __init__(
        self,
        gen: _Generator,
        chunk: _Chunk,
        message_id: int,
        received: int,
        profile: TagProfile,
        person: int,
        address: str,
        size: int,
    ) -> None:
        self.gen, self.chunk, self.profile = gen, chunk, profile
        self.message_id, self.received, self.person = message_id, received, person
        self.address, self.size = address, size
        self.id = gen.new_id(received)
        self.provider = PROVIDERS[gen.pool_provider[person]]
        self.mx = self.provider.mx[0] if self.provider.mx else None
        # Full transcripts for the newest mail (whose raw content is kept too).
        self.detailed = received >= gen.detail_from
        self.row: dict[str, Any] = {
            "status": "queued",
            "attempts": 0,
            "next": received,
            "last": None,
            "mx": None,
            "reply": None,
            "category": None,
            "bounce_status": None,
            "hard": None,
            "updated": received,
        }

    def hit(self, ms: int, type: str, data: dict[str, Any], *, bot: bool = False) -> bool:
        """An event that changes nothing in the row, if it has happened by now."""
        if ms > self.gen.now_ms:
            return False
        p = self.profile
        self.gen.event(
            self.chunk, ms, type, p.stream, p.tag, self.message_id, self.id, self.address, data, bot
        )
        return True

    def record(self, ms: int, type: str, data: dict[str, Any], **changes: Any) -> bool:
        """A change of state with its event, if it has happened by now (False: not yet, and
        nothing after it has either)."""
        if not self.hit(ms, type, data):
            return False
        self.row.update(changes, updated=ms)
        return True

    def attempt(
        self, started: int, duration: int, outcome: str, reply: str, *, always: bool = False
    ) -> None:
        """An attempts row with its SMTP transcript: for recent mail, and `always` for the
        deferrals and bounces a reader wants to see explained."""
        if self.mx is None or not (always or self.detailed):
            return
        gen, enc, tls = self.gen, self.gen.enc, self.provider.tls
        ip = f"{self.provider.ip}.{10 + zlib.crc32(self.mx.encode()) % 200}"
        code, _, rest = reply.partition(" ")
        self.chunk.attempts.append(
            (
                enc.uid(gen.new_id(started)),
                enc.uid(self.id),
                enc.ts(started),
                duration,
                outcome,
                self.mx,
                ip,
                25,
                tls[0] if tls else None,
                tls[1] if tls else None,
                int(code) if code.isdigit() else None,
                rest.split(" ", 1)[0] if rest[:1].isdigit() else None,
                reply,
                _transcript(
                    self.mx,
                    ip,
                    tls,
                    f"bounces@{gen.domain}",
                    self.address,
                    self.size,
                    reply,
                    duration,
                ),
            )
        )
        gen.counts["attempts"] += 1

    def finish(self) -> None:
        """The deliveries row, in the state reached by now."""
        gen, enc, row = self.gen, self.gen.enc, self.row
        waiting = row["status"] in ("queued", "deferred")
        self.chunk.deliveries.append(
            (
                enc.uid(self.id),
                enc.uid(self.message_id),
                gen.app_id,
                self.address,
                self.provider.domain,
                row["status"],
                row["attempts"],
                enc.ts(row["next"] if waiting else row["updated"]),
                enc.ts(self.received),
                None if row["last"] is None else enc.ts(row["last"]),
                f"{gen.rng.getrandbits(96):024x}",
                row["mx"],
                row["reply"],
                row["category"],
                row["bounce_status"],
                enc.flag(row["hard"]),
                enc.ts(row["updated"]),
            )
        )
        gen.statuses[row["status"]] = gen.statuses.get(row["status"], 0) + 1
        gen.counts["deliveries"] += 1


def _transcript(
    mx: str,
    ip: str,
    tls: tuple[str, str] | None,
    mail_from: str,
    rcpt: str,
    size: int,
    reply: str,
    duration: int,
) -> str:
    """A plausible SMTP conversation in the form smtp_sender records (seconds, C/S/*)."""
    step = duration / 1000 / 14
    lines = [
        ("*", f"connecting to {ip} port 25 ({mx})"),
        ("*", "connected"),
        ("S", f"220 {mx} ESMTP ready"),
        ("C", "EHLO postbode.localhost"),
        ("S", f"250-{mx} at your service"),
        ("S", "250-SIZE 52428800"),
        ("S", "250-8BITMIME"),
    ]
    if tls:
        lines += [
            ("S", "250-STARTTLS"),
            ("S", "250 SMTPUTF8"),
            ("C", "STARTTLS"),
            ("S", "220 2.0.0 Ready to start TLS"),
            ("*", f"TLS established: {tls[0]} {tls[1]}"),
            ("C", "EHLO postbode.localhost"),
            ("S", f"250-{mx} at your service"),
            ("S", "250 SMTPUTF8"),
        ]
    else:
        lines.append(("S", "250 SMTPUTF8"))
    lines += [
        ("C", f"MAIL FROM:<{mail_from}> SIZE={size}"),
        ("S", "250 2.1.0 OK"),
        ("C", f"RCPT TO:<{rcpt}>"),
    ]
    if reply.startswith("250"):
        lines += [
            ("S", "250 2.1.5 OK"),
            ("C", "DATA"),
            ("S", "354 Go ahead"),
            ("C", f"<message body, {size} bytes>"),
            ("S", reply),
            ("C", "QUIT"),
            ("S", "221 2.0.0 closing connection"),
        ]
    else:
        lines += [("S", reply), ("C", "QUIT"), ("S", "221 2.0.0 Bye")]
    return "\n".join(f"{i * step:8.3f} {d}: {text}" for i, (d, text) in enumerate(lines))


def _raw_message(
    brand: str,
    sender: str,
    recipients: Sequence[str],
    subject: str,
    profile: TagProfile,
    values: dict[str, Any],
    received: int,
) -> bytes:
    """The message as the API would have built it: text and HTML alternatives."""
    date = datetime.fromtimestamp(received / 1000, UTC).strftime("%a, %d %b %Y %H:%M:%S +0000")
    link = "https://" + sender.rpartition("@")[2] + profile.links[0].format(**values)
    text = (
        f"Hi {values['first']},\n\n{subject}.\n\nOpen it here: {link}\n\n"
        f"Thanks,\nThe {brand} team\n"
    )
    html = (
        f"<html><body><p>Hi {values['first']},</p><p>{subject}.</p>"
        f'<p><a href="{link}">Open it here</a></p><p>Thanks,<br>The {brand} team</p>'
        "</body></html>"
    )
    boundary = f"=_pb_{received:x}"
    head = (
        f"From: {brand} <{sender}>\r\nTo: {', '.join(recipients)}\r\nSubject: {subject}\r\n"
        f"Date: {date}\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n'
    )
    body = (
        f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        f"{text.replace(chr(10), chr(13) + chr(10))}\r\n"
        f"--{boundary}\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n"
        f"--{boundary}--\r\n"
    )
    return (head + body).encode("utf-8")


# -- the seeding -----------------------------------------------------------------------------------


def ensure_demo_app(store: Store, name: str) -> tuple[int, str]:
    """The app named `name` (of the default organisation) and a sending domain of it; a
    missing app is created with a verified domain `<name>.test` and open and click tracking
    on."""
    with store.read() as conn:
        app_id = conn.execute(
            select(apps.c.id)
            .join(organizations, organizations.c.id == apps.c.organization_id)
            .where(apps.c.name == name, organizations.c.name == DEMO_ORG)
        ).scalar()
    if app_id is None:
        app_id = tenancy.create_app(store, name).app_id
        with store.write() as conn:
            conn.execute(
                update(apps).where(apps.c.id == app_id).values(track_opens=True, track_clicks=True)
            )
    with store.read() as conn:
        domain = conn.execute(
            select(domains.c.name).where(domains.c.app_id == app_id).order_by(domains.c.id)
        ).scalar()
    if domain is None:
        slug = name.replace("_", "-").strip("-") or "demo"
        domain = f"{slug}.test"
        with store.read() as conn:
            if tenancy.verified_elsewhere(conn, domain, int(app_id)) is not None:
                domain = f"{slug}-{secrets.token_hex(3)}.test"  # held by another app
        try:
            domain = tenancy.add_domain(store, name, domain, organization=DEMO_ORG)["name"]
        except tenancy.TenancyError:  # claimed by another app of the organisation
            domain = f"{slug}-{secrets.token_hex(3)}.test"
            domain = tenancy.add_domain(store, name, domain, organization=DEMO_ORG)["name"]
        with store.write() as conn:
            conn.execute(
                update(domains)
                .where(domains.c.app_id == app_id, domains.c.name == domain)
                .values(
                    verified_at=utcnow(),
                    dns_checked_at=utcnow(),
                    dns_status=dict.fromkeys(("spf", "dkim", "return_path", "dmarc"), "pass"),
                )
            )
    return int(app_id), str(domain)


def _write(conn: Connection, enc: _Encoder, app_id: int, chunk: _Chunk) -> None:
    def many(sql: str, rows: list[tuple[Any, ...]]) -> None:
        if rows:
            conn.exec_driver_sql(sql, rows)

    many(enc.insert("messages", MESSAGE_COLUMNS, ("metadata",)), chunk.messages)
    many(enc.insert("raw_messages", ("message_id", "compression", "data")), chunk.raw)
    many(enc.insert("deliveries", DELIVERY_COLUMNS), chunk.deliveries)
    many(enc.insert("attempts", ATTEMPT_COLUMNS), chunk.attempts)
    many(enc.insert("events", EVENT_COLUMNS, ("data",)), chunk.events)
    many(
        enc.insert("suppressions", SUPPRESSION_COLUMNS)
        + " ON CONFLICT (app_id, email, stream) DO NOTHING",
        chunk.suppressions,
    )
    many(
        enc.insert(
            "stat_counters",
            ("app_id", "stream", "tag", "bucket", "event_type", "count", "bot_count"),
        )
        + " ON CONFLICT (app_id, stream, tag, template, bucket, event_type) DO UPDATE SET"
        " count = stat_counters.count + excluded.count,"
        " bot_count = stat_counters.bot_count + excluded.bot_count",
        [
            (app_id, stream, tag, enc.ts(minute), kind, n, bots)
            for (stream, tag, minute, kind), (n, bots) in chunk.counters.items()
        ],
    )
    many(
        enc.insert(
            "bounce_counters", ("app_id", "stream", "tag", "bucket", "category", "hard", "count")
        )
        + " ON CONFLICT (app_id, stream, tag, bucket, category, hard) DO UPDATE SET"
        " count = bounce_counters.count + excluded.count",
        [
            (app_id, stream, tag, enc.ts(minute), category, hard, n)
            for (stream, tag, minute, category, hard), n in chunk.bounces.items()
        ],
    )


def seed(
    store: Store,
    *,
    messages: int,
    app: str = "demo",
    days: float = 30,
    now: datetime | None = None,
    rng: random.Random | None = None,
    progress: Callable[[int], None] | None = None,
) -> SeedReport:
    """Fill `app` (created with a domain if missing) with `messages` messages spread over the
    last `days`: six tagged flows, daily and weekly rhythm, deferrals, bounces, suppressions,
    opens and clicks (some by bots), with their events and the counters those events bump.
    Written with executemany in transactions of CHUNK_MESSAGES; `progress` gets each chunk's
    message count."""
    started = time.perf_counter()
    rng = rng or random.Random()
    now = now or utcnow()
    app_id, domain = ensure_demo_app(store, app)
    brand = " ".join(w.capitalize() for w in app.replace("_", "-").split("-")) + " Shop"
    plan = plan_times(messages, now - timedelta(days=days), now, rng)
    enc = _Encoder(store.dialect)
    now_ms = int(now.timestamp() * 1000)
    gen = _Generator(enc, app_id, domain, brand, now_ms, rng, max(200, messages // 3))
    with store.engine.connect() as conn:
        if store.is_sqlite:
            # This connection only (it is discarded afterwards): a bigger page cache for the
            # indexes being filled, and commits that skip the fsync (WAL stays consistent).
            raw = conn.connection.dbapi_connection
            assert raw is not None
            raw.execute("PRAGMA cache_size=-262144")
            raw.execute("PRAGMA synchronous=NORMAL")
        conn = conn.execution_options(postbode_immediate=True)

        def write(chunk: _Chunk, count: int) -> None:
            with conn.begin():
                _write(conn, enc, app_id, chunk)
            if progress is not None:
                progress(count)

        # Millions of short-lived tuples make the cyclic GC rescan everything again and
        # again; nothing made here forms a cycle. One chunk is written (the driver mostly
        # outside the GIL) while the next is generated.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="demo-writer") as writer:
                pending: Future[None] | None = None
                for begin in range(0, len(plan), CHUNK_MESSAGES):
                    part = plan[begin : begin + CHUNK_MESSAGES]
                    chunk = _Chunk()
                    for received, tag_index, campaign in part:
                        gen.message(chunk, received, tag_index, campaign)
                    if pending is not None:
                        pending.result()
                    pending = writer.submit(write, chunk, len(part))
                if pending is not None:
                    pending.result()
        finally:
            if gc_was_enabled:
                gc.enable()
            if store.is_sqlite:
                conn.invalidate()  # never hand the tuned connection to anyone else
    # As a running installation would have them: minute counters only for the last two days.
    compacted = rollup.compact(store, now=now)
    return SeedReport(
        app=app,
        app_id=app_id,
        domain=domain,
        messages=len(plan),
        deliveries=gen.counts["deliveries"],
        events=gen.counts["events"],
        attempts=gen.counts["attempts"],
        counters_merged=compacted,
        seconds=time.perf_counter() - started,
        statuses=dict(sorted(gen.statuses.items(), key=lambda kv: -kv[1])),
    )
