"""A store at scale for benchmarks and tests: N deliveries over days for several apps (COPY on
PostgreSQL, executemany on SQLite), their events, attempts and the counters the dashboard reads
(benchmarks/seed_scale.py is its command line).

`postbode demo seed` (postbode.demo) models one app's mail in detail (every open, click and
retry as rows) at about 170 µs of CPU per message; this seeder takes its traffic shape (the
daily and weekly rhythm, the mailbox providers, UUIDv7 ids) and writes the rows the log and the
dashboard read, at a few µs each: a message with one recipient (6 % have a second), the message
and outcome events, attempts for every deferral, bounce and failure and for the newest day's
deliveries, and counter rows already at the resolution stats.rollup would leave them (opens and
clicks as counters only). Secondary indexes are dropped while the rows go in and built again
afterwards, as one would load a database; PostgreSQL's foreign-key triggers are off for the
load (`session_replication_role = replica`): the rows are made consistent.

The traffic: four apps of unequal size, each with its tags; recipients drawn with a skew (some
people get far more mail), their domains from the big providers plus a Zipf-distributed long
tail; ~93 % delivered, ~3 % bounced, ~1.5 % suppressed, some failed (expired) and, in the last
three days, deferred; and one dip: in the hour just ended the shop's order-confirmation mail
fell to a tenth of its usual volume and most of what was sent bounced (a blocklisting), which
stats.anomalies raises as `volume_drop` and the dashboard marks.
"""

from __future__ import annotations

import bisect
import functools
import gc
import json
import multiprocessing
import os
import random
import time
from array import array
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import make_url

from postbode.demo import PROVIDERS, ensure_demo_app, hourly_weights, uuid7
from postbode.stats import anomalies, rollup
from postbode.store.engine import Store
from postbode.store.schema import utcnow

DAY_MS = 86_400_000
HOUR_MS = 3_600_000

# (app, share of messages, [(tag, stream, share within the app, sender, subject)])
APPS: tuple[tuple[str, float, tuple[tuple[str, str, float, str, str], ...]], ...] = (
    (
        "shop",
        0.45,
        (
            ("order-confirmation", "transactional", 0.30, "orders", "Your order #{n} is confirmed"),
            ("shipping-update", "transactional", 0.22, "orders", "Order #{n} has shipped"),
            ("password-reset", "transactional", 0.12, "no-reply", "Reset your password"),
            ("welcome", "transactional", 0.08, "hello", "Welcome to Shop, {first}!"),
            ("invoice", "transactional", 0.10, "billing", "Invoice INV-{n} is ready"),
            ("newsletter", "broadcast", 0.18, "news", "This week at Shop: deals {n}"),
        ),
    ),
    (
        "forum",
        0.30,
        (
            ("comment-notification", "transactional", 0.55, "notify", "{first} replied to you"),
            ("password-reset", "transactional", 0.10, "no-reply", "Your password reset link"),
            ("digest", "broadcast", 0.35, "digest", "Your weekly digest ({n} new posts)"),
        ),
    ),
    (
        "billing",
        0.15,
        (
            ("invoice", "transactional", 0.50, "invoices", "Invoice INV-{n}"),
            ("receipt", "transactional", 0.40, "receipts", "Receipt for payment {n}"),
            ("dunning", "transactional", 0.10, "billing", "Payment failed for INV-{n}"),
        ),
    ),
    (
        "crm",
        0.10,
        (
            ("promo", "broadcast", 0.7, "offers", "{first}, {n}% off this weekend"),
            ("survey", "broadcast", 0.3, "survey", "How did we do, {first}?"),
        ),
    ),
)
DIP_APP, DIP_TAG = "shop", "order-confirmation"
DIP_VOLUME = 1 / 10  # of the usual volume in the hour just ended …
DIP_BOUNCED = 0.7  # … and this share of it bounced
DIP_REPLY = (
    "550 5.7.1 Service unavailable, client host [198.51.100.7] blocked using "
    "zen.spamhaus.test; https://www.spamhaus.test/query/ip/198.51.100.7"
)
FIRST = ("Anna", "Bram", "Chen", "Daan", "Eva", "Femke", "Giulia", "Hugo", "Ines", "Jan", "Kai")

SUPPRESSED = 0.015
BOUNCED = 0.03
FAILED = 0.003  # deferred until expiry
DEFERRED_NOW = 0.006  # of deliveries in the last three days: still deferred
DEFERRED_FIRST = 0.02  # of delivered: one deferral before
CC = 0.06
OPENS, CLICKS = 0.4, 0.1  # of delivered; counters only
LONG_TAIL = 5000  # domains besides the big providers (Zipf weights 1/k)
LONG_TAIL_SHARE = 0.3
# (category, hard, reply); {rcpt} the address
BOUNCES: tuple[tuple[str, bool, str, float], ...] = (
    ("user_unknown", True, "550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown", 0.55),
    ("mailbox_full", False, "552 5.2.2 <{rcpt}>: Mailbox full, quota exceeded", 0.15),
    (
        "mailbox_inactive",
        True,
        "550 5.2.1 The email account that you tried to reach is disabled",
        0.1,
    ),
    ("blocked", False, "554 5.7.1 Message rejected due to local policy", 0.1),
    (
        "content_rejected",
        False,
        "550 5.7.350 Remote server returned message detected as spam",
        0.05,
    ),
    ("domain_invalid", True, "550 5.1.2 Host or domain name not found", 0.05),
)
DEFERRALS = (
    "421 4.7.0 Try again later, closing connection",
    "451 4.7.1 Greylisted, please try again in 300 seconds",
    "421 4.7.28 Our system has detected an unusual rate of unsolicited mail",
    "452 4.2.2 The email account that you tried to reach is over quota",
)

MESSAGE_COLUMNS = [
    "id",
    "app_id",
    "source",
    "stream",
    "tag",
    "metadata",
    "message_id_header",
    "mail_from",
    "from_header",
    "subject",
    "size",
    "domain_verified",
    "track_opens",
    "track_clicks",
    "received_at",
    "raw_purged_at",
]
DELIVERY_COLUMNS = [
    "id",
    "message_id",
    "app_id",
    "recipient",
    "recipient_domain",
    "status",
    "attempts",
    "next_attempt_at",
    "first_queued_at",
    "last_attempt_at",
    "verp_token",
    "mx",
    "last_reply",
    "bounce_category",
    "bounce_status",
    "hard",
    "updated_at",
]
ATTEMPT_COLUMNS = [
    "id",
    "delivery_id",
    "started_at",
    "duration_ms",
    "outcome",
    "mx_host",
    "ip",
    "port",
    "tls_version",
    "tls_cipher",
    "reply_code",
    "enhanced_status",
    "reply_text",
    "transcript",
]
EVENT_COLUMNS = [
    "id",
    "app_id",
    "message_id",
    "delivery_id",
    "recipient",
    "type",
    "data",
    "created_at",
]
TABLES = ("messages", "deliveries", "attempts", "events")
COLUMNS = dict(
    zip(TABLES, (MESSAGE_COLUMNS, DELIVERY_COLUMNS, ATTEMPT_COLUMNS, EVENT_COLUMNS), strict=False)
)


def _ts(ms: int, _minutes: dict[int, str] = {}) -> str:  # noqa: B006 - a cache
    """UTC text both dialects read: SQLite's stored form, PostgreSQL's timestamp input."""
    minute, rest = divmod(ms, 60_000)
    prefix = _minutes.get(minute)
    if prefix is None:
        prefix = _minutes[minute] = time.strftime("%Y-%m-%d %H:%M:", time.gmtime(minute * 60))
    seconds, frac = divmod(rest, 1000)
    return f"{prefix}{seconds:02d}.{frac:03d}000"


@dataclass
class Chunk:
    rows: dict[str, list[tuple[Any, ...]]] = field(default_factory=lambda: {t: [] for t in TABLES})


@dataclass
class Totals:
    messages: int = 0
    deliveries: int = 0
    events: int = 0
    attempts: int = 0
    statuses: dict[str, int] = field(default_factory=dict)


_LEVELS_MS = [
    (int(age.total_seconds() * 1000), int(size.total_seconds() * 1000))
    for age, size in rollup.LEVELS
]


BounceKey = tuple[int, str, str, int, str, bool]  # app, stream, tag, bucket (ms), category, hard


def counter_size_ms(age_ms: int) -> int:
    """The bucket a counter row of this age has once stats.rollup compacted it."""
    size = 60_000
    for age, merged in _LEVELS_MS:
        if age_ms >= age:
            size = merged
    return size


class Generator:
    def __init__(
        self,
        rng: random.Random,
        apps: dict[str, tuple[int, str]],
        start_ms: int,
        now_ms: int,
        deliveries: int,
    ) -> None:
        self.rng = rng
        self.now_ms = now_ms
        self.start_ms = start_ms
        self.flows: list[tuple[int, str, str, str, str, str]] = []  # app_id, domain, tag, …
        weights: list[float] = []
        for name, share, tags in APPS:
            app_id, domain = apps[name]
            for tag, stream, tag_share, sender, subject in tags:
                self.flows.append((app_id, domain, tag, stream, sender, subject))
                weights.append(share * tag_share)
        self.flow_cum = list(_cumulative(weights))
        self.dip_flow = next(
            i for i, f in enumerate(self.flows) if f[0] == apps[DIP_APP][0] and f[2] == DIP_TAG
        )
        domains = [p.domain for p in PROVIDERS if not p.gone]
        dweights = [p.weight for p in PROVIDERS if not p.gone]
        big = sum(dweights)
        tail = [1 / k for k in range(1, LONG_TAIL + 1)]
        scale = big * LONG_TAIL_SHARE / (1 - LONG_TAIL_SHARE) / sum(tail)
        domains += [f"mail{k}.example" for k in range(1, LONG_TAIL + 1)]
        dweights += [w * scale for w in tail]
        self.domains = domains
        self.mx = [f"mx.{d}" for d in domains]
        domain_cum = list(_cumulative(dweights))
        # People: a pool a third the size of the deliveries, each with a fixed domain.
        self.pool = max(1000, deliveries // 3)
        people = random.Random(deliveries)  # the same people in every loading process
        self.person_domain = array(
            "i", (bisect.bisect(domain_cum, people.random()) for _ in range(self.pool))
        )
        self.seq = rng.getrandbits(40)
        self.counters: dict[tuple[int, str, str, int, str], list[int]] = {}
        self.bounces: dict[BounceKey, int] = {}  # bounce_counters, as events.record bumps them
        self.totals = Totals()
        self.bounce_cum = list(_cumulative([b[3] for b in BOUNCES]))
        self.dip_hour = (now_ms // HOUR_MS - 1) * HOUR_MS

    def new_id(self, ms: int) -> str:
        self.seq += 1
        value = uuid7(ms, (self.rng.getrandbits(12) << 62) | (self.seq & (1 << 62) - 1))
        return f"{value:032x}"

    def count(self, app_id: int, stream: str, tag: str, ms: int, kind: str, n: int = 1) -> None:
        size = counter_size_ms(self.now_ms - ms)
        key = (app_id, stream, tag, ms - ms % size, kind)
        cell = self.counters.get(key)
        if cell is None:
            self.counters[key] = [n, 0]
        else:
            cell[0] += n

    def hour(self, chunk: Chunk, hour_ms: int, n: int) -> None:
        rng = self.rng
        flows = [bisect.bisect(self.flow_cum, rng.random()) for _ in range(n)]
        if hour_ms == self.dip_hour:
            flows = [f for f in flows if f != self.dip_flow or rng.random() < DIP_VOLUME]
        end = min(hour_ms + HOUR_MS, self.now_ms)
        times = sorted(hour_ms + int(rng.random() * (end - hour_ms)) for _ in flows)
        for at, flow in zip(times, flows, strict=True):
            self.message(chunk, at, flow, dip=hour_ms == self.dip_hour and flow == self.dip_flow)

    def message(self, chunk: Chunk, at: int, flow: int, dip: bool) -> None:
        rng = self.rng
        app_id, domain, tag, stream, sender, subject_form = self.flows[flow]
        mid = self.new_id(at)
        n = rng.randrange(10_000, 999_999)
        first = FIRST[n % len(FIRST)]
        subject = subject_form.format(n=n, first=first)
        ts = _ts(at)
        metadata = f'{{"order_id": "{n}"}}' if tag == "order-confirmation" else "{}"
        chunk.rows["messages"].append(
            (
                mid,
                app_id,
                "api",
                stream,
                tag,
                metadata,
                f"<{mid}@{domain}>",
                f"{sender}@{domain}",
                f"{sender.capitalize()} <{sender}@{domain}>",
                subject,
                2000 + n % 40_000,
                1,
                0,
                0,
                ts,
                ts,
            )
        )
        self.totals.messages += 1
        self.event(chunk, at, app_id, mid, None, None, "message.received", "{}")
        self.count(app_id, stream, tag, at, "message.received")
        self.delivery(chunk, at, app_id, stream, tag, mid, dip)
        if rng.random() < CC:
            self.delivery(chunk, at, app_id, stream, tag, mid, dip)

    def event(
        self,
        chunk: Chunk,
        at: int,
        app_id: int,
        mid: str,
        did: str | None,
        rcpt: str | None,
        kind: str,
        data: str,
    ) -> None:
        chunk.rows["events"].append((self.new_id(at), app_id, mid, did, rcpt, kind, data, _ts(at)))
        self.totals.events += 1

    def attempt(self, chunk: Chunk, did: str, at: int, outcome: str, mx: str, reply: str) -> None:
        code, _, rest = reply.partition(" ")
        enhanced = rest.split(" ", 1)[0] if rest[:1].isdigit() else None
        chunk.rows["attempts"].append(
            (
                self.new_id(at),
                did,
                _ts(at),
                180 + at % 2000,
                outcome,
                mx,
                "203.0.113.25",
                25,
                "TLSv1.3",
                "TLS_AES_256_GCM_SHA384",
                int(code),
                enhanced,
                reply,
                "",
            )
        )
        self.totals.attempts += 1

    def delivery(
        self, chunk: Chunk, at: int, app_id: int, stream: str, tag: str, mid: str, dip: bool
    ) -> None:
        rng = self.rng
        person = int(self.pool * rng.random() ** 2.5)  # skewed: low numbers get much more mail
        d = self.person_domain[person]
        rdomain = self.domains[d]
        rcpt = f"user{person}@{rdomain}"
        mx = self.mx[d]
        did = self.new_id(at)
        age = self.now_ms - at
        r = rng.random()
        sent = at + 400 + int(rng.random() * 3000)
        if sent > self.now_ms:  # just received: still queued
            status, kind, reply, category, hard = "queued", None, None, None, None
        elif dip and rng.random() < DIP_BOUNCED:
            status, kind, reply, category, hard = (
                "bounced",
                "delivery.bounced",
                DIP_REPLY,
                "blocked",
                False,
            )
        elif r < SUPPRESSED:
            status, kind, reply, category, hard = (
                "suppressed",
                "delivery.suppressed",
                None,
                None,
                None,
            )
        elif r < SUPPRESSED + BOUNCED:
            category, hard, form, _ = BOUNCES[bisect.bisect(self.bounce_cum, rng.random())]
            status, kind, reply = "bounced", "delivery.bounced", form.format(rcpt=rcpt)
        elif r < SUPPRESSED + BOUNCED + FAILED and age > 3 * DAY_MS:
            status, kind, category, hard = "failed", "delivery.failed", "expired", None
            reply = DEFERRALS[int(r * 1e6) % len(DEFERRALS)]
        elif r < SUPPRESSED + BOUNCED + FAILED + DEFERRED_NOW and age < 3 * DAY_MS:
            status, kind, category, hard = "deferred", "delivery.deferred", None, None
            reply = DEFERRALS[int(r * 1e6) % len(DEFERRALS)]
        else:
            status, kind, category, hard = "delivered", "delivery.delivered", None, None
            reply = f"250 2.0.0 OK {sent // 1000} {did[-8:]} - queued as {did[:10]}"
        self.totals.statuses[status] = self.totals.statuses.get(status, 0) + 1
        self.totals.deliveries += 1
        attempts = 0
        if status == "delivered" and rng.random() < DEFERRED_FIRST:
            first_reply = DEFERRALS[did.__hash__() % len(DEFERRALS)]
            self.attempt(chunk, did, sent, "SoftFail", mx, first_reply)
            self.event(
                chunk,
                sent,
                app_id,
                mid,
                did,
                rcpt,
                "delivery.deferred",
                json.dumps({"reply": first_reply, "attempt": 1, "mx": mx}),
            )
            self.count(app_id, stream, tag, sent, "delivery.deferred")
            attempts, sent = 1, sent + 300_000 + int(rng.random() * 600_000)
            sent = min(sent, self.now_ms)
        if kind is not None and kind != "delivery.suppressed":
            attempts += 1
            outcome = {"delivered": "Delivered", "bounced": "HardFail"}.get(status, "SoftFail")
            if status != "delivered" or age < DAY_MS:
                self.attempt(chunk, did, sent, outcome, mx, reply or "")
        if kind is not None:
            data: dict[str, Any] = {}
            if reply is not None:
                data = {"reply": reply, "attempt": attempts, "mx": mx}
            if status == "bounced":
                data.update(
                    category=category, hard=hard, source="smtp", status=(reply or "").split(" ")[1]
                )
            self.event(chunk, sent, app_id, mid, did, rcpt, kind, json.dumps(data))
            self.count(app_id, stream, tag, sent, kind)
            if status == "bounced":
                size = counter_size_ms(self.now_ms - sent)
                bkey = (app_id, stream, tag, sent - sent % size, category or "unknown", bool(hard))
                self.bounces[bkey] = self.bounces.get(bkey, 0) + 1
            if status == "delivered" and rng.random() < OPENS:
                opened = min(sent + int(rng.expovariate(1 / 3_600_000)), self.now_ms)
                self.count(app_id, stream, tag, opened, "message.opened")
                if rng.random() < CLICKS / OPENS:
                    self.count(app_id, stream, tag, opened + 20_000, "message.clicked")
        next_at = sent + 600_000 if status == "deferred" else sent
        chunk.rows["deliveries"].append(
            (
                did,
                mid,
                app_id,
                rcpt,
                rdomain,
                status,
                attempts,
                _ts(min(next_at, self.now_ms + 600_000)),
                _ts(at),
                _ts(sent) if attempts else None,
                did,
                None if status in ("queued", "suppressed") else mx,
                reply,
                category,
                reply.split(" ")[1] if status == "bounced" and reply else None,
                None if hard is None else int(hard),
                _ts(max(at, min(sent, self.now_ms))),
            )
        )


def _cumulative(weights: Iterable[float]) -> Iterable[float]:
    weights = list(weights)
    total, run = sum(weights), 0.0
    for w in weights:
        run += w
        yield run / total


# -- writing ------------------------------------------------------------------------------------


def _copy_text(rows: Sequence[tuple[Any, ...]]) -> bytes:
    """COPY's text format; the seeded values hold no tab, newline or backslash."""
    return "".join(
        "\t".join("\\N" if v is None else str(v) for v in row) + "\n" for row in rows
    ).encode()


class Writer:
    """Rows into one dialect's store, fast."""

    def __init__(self, url: str) -> None:
        self.pg = url.startswith("postgresql")
        self.indexes: list[tuple[str, str]] = []
        if self.pg:
            import psycopg

            dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
            self.conn: Any = psycopg.connect(dsn)
            self.conn.execute("SET session_replication_role = replica")
            self.conn.execute("SET synchronous_commit = off")
        else:
            import sqlite3

            self.conn = sqlite3.connect(
                str(make_url(url).database), isolation_level=None, check_same_thread=False
            )
            self.conn.execute("PRAGMA synchronous=OFF")
            self.conn.execute("PRAGMA cache_size=-524288")

    def drop_indexes(self) -> None:
        """Secondary indexes of the loaded tables, remembered and dropped (not those that
        back a primary key or a unique constraint)."""
        if self.pg:
            rows = self.conn.execute(
                "SELECT i.indexname, i.indexdef FROM pg_indexes i "
                "WHERE i.schemaname = current_schema() AND i.tablename = ANY(%s) "
                "AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)",
                (list(TABLES),),
            ).fetchall()
        else:
            rows = self.conn.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
                f"AND tbl_name IN ({', '.join('?' * len(TABLES))})",
                TABLES,
            ).fetchall()
        self.indexes = [(str(n), str(s)) for n, s in rows]
        for name, _ in self.indexes:
            self.conn.execute(f'DROP INDEX "{name}"')
        if self.pg:
            self.conn.commit()

    def write(self, chunk: Chunk) -> None:
        if self.pg:
            with self.conn.cursor() as cur:
                for table in TABLES:
                    rows = chunk.rows[table]
                    if rows:
                        with cur.copy(
                            f"COPY {table} ({', '.join(COLUMNS[table])}) FROM STDIN"
                        ) as cp:
                            cp.write(_copy_text(rows))
            self.conn.commit()
        else:
            self.conn.execute("BEGIN")
            for table in TABLES:
                rows = chunk.rows[table]
                if rows:
                    cols = COLUMNS[table]
                    marks = ", ".join("?" * len(cols))
                    self.conn.executemany(
                        f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({marks})", rows
                    )
            self.conn.execute("COMMIT")

    def build_indexes(self, say: Callable[[str], None]) -> None:
        if self.pg:
            self.conn.execute("SET maintenance_work_mem = '1GB'")
            self.conn.execute("SET max_parallel_maintenance_workers = 2")
        for name, sql in self.indexes:
            started = time.perf_counter()
            self.conn.execute(sql)
            if self.pg:
                self.conn.commit()
            say(f"  index {name}: {time.perf_counter() - started:.1f} s")

    def counters(self, rows: list[tuple[Any, ...]]) -> None:
        sql = (
            "INSERT INTO stat_counters (app_id, stream, tag, bucket, event_type, count, bot_count) "
            "VALUES ({m}) ON CONFLICT (app_id, stream, tag, template, bucket, event_type) "
            "DO UPDATE SET count = stat_counters.count + excluded.count"
        )
        self._executemany(sql, rows)

    def bounce_counters(self, rows: list[tuple[Any, ...]]) -> None:
        sql = (
            "INSERT INTO bounce_counters (app_id, stream, tag, bucket, category, hard, count) "
            "VALUES ({m})"
        )
        self._executemany(sql, rows)

    def _executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """`sql` (its values as `{m}`) for every row, in one transaction."""
        marks = ", ".join(["%s" if self.pg else "?"] * len(rows[0])) if rows else ""
        if self.pg:
            with self.conn.cursor() as cur:
                cur.executemany(sql.format(m=marks), rows)
            self.conn.commit()
        else:
            self.conn.execute("BEGIN")
            self.conn.executemany(sql.format(m=marks), rows)
            self.conn.execute("COMMIT")

    def analyze(self) -> None:
        if self.pg:
            self.conn.autocommit = True
            for table in (*TABLES, "stat_counters", "bounce_counters"):
                self.conn.execute(f"VACUUM (ANALYZE) {table}")
            self.conn.autocommit = False
        else:
            self.conn.execute("ANALYZE")

    def close(self) -> None:
        self.conn.close()


def _quiet(line: str) -> None:
    pass


def load_part(
    url: str,
    seed: int,
    hours: list[tuple[int, int]],
    *,
    apps: dict[str, tuple[int, str]],
    start_ms: int,
    now_ms: int,
    rows: int,
    verbose: bool,
) -> tuple[dict[tuple[int, str, str, int, str], list[int]], dict[BounceKey, int], Totals]:
    """Make and write the rows of `hours` ([(hour number, messages)]) over a connection of
    its own; the counters (and bounce counters) they bump and what was written."""
    gen = Generator(random.Random(seed), apps, start_ms, now_ms, rows)
    writer = Writer(url)
    started = time.perf_counter()
    gc_was = gc.isenabled()
    gc.disable()
    try:
        with ThreadPoolExecutor(1) as pool:  # one chunk is written while the next is made
            pending: Future[None] | None = None
            chunk = Chunk()
            for i, (h, n) in enumerate(hours):
                gen.hour(chunk, start_ms + h * HOUR_MS, n)
                if len(chunk.rows["messages"]) >= 50_000 or i == len(hours) - 1:
                    if pending is not None:
                        pending.result()
                    pending = pool.submit(writer.write, chunk)
                    chunk = Chunk()
                    if verbose and (i * 10 // len(hours)) != ((i - 1) * 10 // len(hours)):
                        print(
                            f"  {os.getpid()}: {gen.totals.deliveries:>11,} deliveries "
                            f"({time.perf_counter() - started:.0f} s)",
                            flush=True,
                        )
            if pending is not None:
                pending.result()
    finally:
        if gc_was:
            gc.enable()
        writer.close()
    return gen.counters, gen.bounces, gen.totals


def seed(
    store: Store,
    rows: int,
    days: int,
    rng: random.Random,
    say: Callable[[str], None] = _quiet,
    *,
    now: datetime | None = None,
    flat: bool = False,
) -> dict[str, Any]:
    """Write `rows` deliveries over the last `days` into an empty store (apps created as
    needed) and return what was written. `flat`: the same volume every hour (no daily
    rhythm), so a small seeding still has enough mail in the hour just ended for its dip."""
    phases: dict[str, float] = {}
    started = time.perf_counter()
    now = now or utcnow()
    apps = {name: ensure_demo_app(store, name) for name, _, _ in APPS}
    now_ms = int(now.timestamp() * 1000)
    start_ms = (now_ms - days * DAY_MS) // HOUR_MS * HOUR_MS  # whole clock hours
    start = datetime.fromtimestamp(start_ms / 1000, UTC)
    hours = -(-(now_ms - start_ms) // HOUR_MS)
    messages_wanted = round(rows / (1 + CC))
    weights = [1.0] * hours if flat else hourly_weights(start, hours, rng)
    weights[-1] *= (now_ms - (start_ms + (hours - 1) * HOUR_MS)) / HOUR_MS  # the hour so far
    total = sum(weights)
    per_hour: list[int] = []
    carried, given = 0.0, 0
    for w in weights:  # rounded so that the hours add up to the total
        carried += messages_wanted * w / total
        per_hour.append(round(carried) - given)
        given += per_hour[-1]
    url = store.engine.url.render_as_string(hide_password=False)
    writer = Writer(url)
    writer.drop_indexes()
    phases["setup"] = time.perf_counter() - started
    mark = time.perf_counter()
    # PostgreSQL takes the rows of several loading processes at once (one per core); SQLite
    # has one writer.
    workers = max(1, min(os.cpu_count() or 1, 4)) if writer.pg else 1
    hours_of = [
        [(h, n) for h, n in enumerate(per_hour) if h % workers == w] for w in range(workers)
    ]
    part = functools.partial(
        load_part,
        url,
        apps=apps,
        start_ms=start_ms,
        now_ms=now_ms,
        rows=rows,
        verbose=say is not _quiet,
    )
    seeds = [rng.getrandbits(64) for _ in range(workers)]
    if workers == 1:
        results = [part(seeds[0], hours_of[0])]
    else:
        fork = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=fork) as pool:
            results = list(pool.map(part, seeds, hours_of))
    phases["rows"] = time.perf_counter() - mark
    totals = Totals()
    counters: dict[tuple[int, str, str, int, str], list[int]] = {}
    bounces: dict[BounceKey, int] = {}
    for counted, bounced, t in results:
        for bkey, n in bounced.items():
            bounces[bkey] = bounces.get(bkey, 0) + n
        for key, (n, bots) in counted.items():
            cell = counters.setdefault(key, [0, 0])
            cell[0] += n
            cell[1] += bots
        totals.messages += t.messages
        totals.deliveries += t.deliveries
        totals.events += t.events
        totals.attempts += t.attempts
        for status, n in t.statuses.items():
            totals.statuses[status] = totals.statuses.get(status, 0) + n
    mark = time.perf_counter()
    writer.counters(
        [
            (app_id, stream, tag, _ts(bucket), kind, n, bots)
            for (app_id, stream, tag, bucket, kind), (n, bots) in counters.items()
        ]
    )
    writer.bounce_counters(
        [
            (a, stream, tag, _ts(bucket), c, hard, n)
            for (a, stream, tag, bucket, c, hard), n in bounces.items()
        ]
    )
    phases["counters"] = time.perf_counter() - mark
    mark = time.perf_counter()
    writer.build_indexes(say)
    phases["indexes"] = time.perf_counter() - mark
    mark = time.perf_counter()
    writer.analyze()
    phases["analyze"] = time.perf_counter() - mark
    writer.close()
    mark = time.perf_counter()
    rollup.compact(store, now=now)  # sets its watermarks; the rows are already at its levels
    found = anomalies.check(store, now=now)
    phases["rollup_and_anomalies"] = time.perf_counter() - mark
    t = totals
    return {
        "url": store.engine.url.render_as_string(hide_password=True),
        "dialect": store.dialect,
        "now": now.isoformat(),
        "days": days,
        "messages": t.messages,
        "deliveries": t.deliveries,
        "events": t.events,
        "attempts": t.attempts,
        "counter_rows": len(counters),
        "statuses": dict(sorted(t.statuses.items(), key=lambda kv: -kv[1])),
        "apps": {name: app_id for name, (app_id, _) in apps.items()},
        "dip": {"app": DIP_APP, "tag": DIP_TAG, "hour": _ts((now_ms // HOUR_MS - 1) * HOUR_MS)},
        "loading_processes": workers,
        "alerts": [(f.kind, f.tag) for f in found],
        "seconds": round(time.perf_counter() - started, 1),
        "phases": {k: round(v, 1) for k, v in phases.items()},
    }
