"""Statistics read from stat_counters and bounce_counters: zero-filled series, summaries and
rates, tags, bounce reasons, the queue right now, and A/B comparison of two tags."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Integer,
    Select,
    String,
    cast,
    func,
    literal_column,
    select,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from postbode.events.types import EventType
from postbode.store.engine import Store
from postbode.store.schema import apps, bounce_counters, deliveries, stat_counters, utcnow

RangeName = Literal["1h", "24h", "7d", "30d"]
RANGES: dict[str, timedelta] = {
    "1h": timedelta(hours=1),
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
}
# Bucket sizes a chart may use, finest first: the resolutions stats.rollup keeps counters at
# as they age (so 6 h is left out, and 30 days are shown by the day, a week by the hour).
BUCKET_SIZES: tuple[timedelta, ...] = (
    timedelta(minutes=1),
    timedelta(minutes=15),
    timedelta(hours=1),
    timedelta(days=1),
)
MAX_POINTS = 200  # a chart never gets more buckets than this (but for spans beyond 200 days)
MAX_SPAN = timedelta(days=400)
SIGNIFICANCE_LEVEL = 0.05

DELIVERED = str(EventType.DELIVERY_DELIVERED)
BOUNCED = str(EventType.DELIVERY_BOUNCED)
FAILED = str(EventType.DELIVERY_FAILED)
QUEUED = str(EventType.DELIVERY_QUEUED)
SUPPRESSED = str(EventType.DELIVERY_SUPPRESSED)
OPENED = str(EventType.MESSAGE_OPENED)
CLICKED = str(EventType.MESSAGE_CLICKED)
COMPLAINED = str(EventType.MESSAGE_COMPLAINED)

# What a chart shows when no types are asked for: the life of a delivery and what people do.
SERIES_TYPES: tuple[str, ...] = (
    QUEUED,
    DELIVERED,
    str(EventType.DELIVERY_DEFERRED),
    BOUNCED,
    FAILED,
    SUPPRESSED,
    str(EventType.DELIVERY_HELD),
    OPENED,
    CLICKED,
    COMPLAINED,
    str(EventType.MESSAGE_UNSUBSCRIBED),
)
PENDING_STATUSES = ("queued", "sending", "deferred", "held")


class StatsError(ValueError):
    """A window or filter that cannot be answered (names the parameter at fault)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


# -- buckets (pure) ---------------------------------------------------------------------------


def bucket_size(span: timedelta) -> timedelta:
    """The finest of BUCKET_SIZES that shows `span` in at most MAX_POINTS buckets:
    1 h → 1 min, 24 h → 15 min, 7 d → 1 h, 30 d → 1 d."""
    for size in BUCKET_SIZES:
        if span <= size * MAX_POINTS:
            return size
    return BUCKET_SIZES[-1]


def bucket_floor(at: datetime, size: timedelta) -> datetime:
    """The start of the bucket holding `at`: buckets are aligned on the Unix epoch, in UTC
    (so a day bucket is a UTC day)."""
    if at.tzinfo is None:
        raise ValueError("naive datetime given to bucket_floor")
    seconds = int(size.total_seconds())
    epoch = math.floor(at.timestamp())
    return datetime.fromtimestamp(epoch - epoch % seconds, UTC)


@dataclass(frozen=True)
class Window:
    """The time a statistic covers, [since, until), and the bucket size of its series."""

    since: datetime
    until: datetime
    size: timedelta

    @property
    def buckets(self) -> list[datetime]:
        """The start of every bucket, oldest first (the first may begin before `since`)."""
        starts = []
        at = bucket_floor(self.since, self.size)
        while at < self.until:
            starts.append(at)
            at += self.size
        return starts

    def index(self, at: datetime) -> int:
        """The position of `at`'s bucket in `buckets`."""
        origin = bucket_floor(self.since, self.size)
        return int((at - origin) // self.size)


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _minute(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0)


def window(
    range: str | None = None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    now: datetime | None = None,
) -> Window:
    """The window of a named range ending with the current bucket (24h: the 96 quarter hours
    up to and including the one running now), or of since/until (minute precision, naive
    times taken as UTC; `until` defaults to now). Raises StatsError."""
    now = _utc(now or utcnow())
    if range is not None:
        if since is not None or until is not None:
            raise StatsError("give a range or since/until, not both", "range")
        if range not in RANGES:
            raise StatsError(f"range must be one of {', '.join(RANGES)}", "range")
        span = RANGES[range]
        size = bucket_size(span)
        end = bucket_floor(now, size) + size
        return Window(end - span, end, size)
    if since is None:
        return window("24h", now=now)
    start = _minute(_utc(since))
    end = _minute(_utc(until)) if until is not None else now
    if end <= start:
        raise StatsError("until must be later than since", "until")
    if end - start > MAX_SPAN:
        raise StatsError(f"a window spans at most {MAX_SPAN.days} days", "since")
    return Window(start, end, bucket_size(end - start))


# -- rates and significance (pure) -------------------------------------------------------------


def _ratio(part: int, whole: int) -> float | None:
    return None if whole <= 0 else min(part, whole) / whole


@dataclass(frozen=True)
class Rates:
    """Rates over a window, each None when its denominator is zero.

    Counted by event time, not per message: a delivery deferred today and delivered tomorrow
    counts tomorrow. delivery_rate = delivered / (delivered + bounced + failed); bounce_rate
    = bounced / the same; open_rate and click_rate = opens (or clicks) by people, not bots,
    / delivered, capped at 1 (counters count every open, so a reader who opens twice counts
    twice: "unique-ish"); complaint_rate = complaints / delivered."""

    delivery_rate: float | None
    bounce_rate: float | None
    open_rate: float | None
    click_rate: float | None
    complaint_rate: float | None


def rates(totals: Mapping[str, int], bots: Mapping[str, int]) -> Rates:
    """The rates of event counts (`totals` include bots; `bots` is the bot part)."""
    delivered = totals.get(DELIVERED, 0)
    settled = delivered + totals.get(BOUNCED, 0) + totals.get(FAILED, 0)
    return Rates(
        delivery_rate=_ratio(delivered, settled),
        bounce_rate=_ratio(totals.get(BOUNCED, 0), settled),
        open_rate=_ratio(totals.get(OPENED, 0) - bots.get(OPENED, 0), delivered),
        click_rate=_ratio(totals.get(CLICKED, 0) - bots.get(CLICKED, 0), delivered),
        complaint_rate=_ratio(totals.get(COMPLAINED, 0), delivered),
    )


def proportions(totals: Mapping[str, int], bots: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """Each rate as (successes, trials), the form a significance test needs."""
    delivered = totals.get(DELIVERED, 0)
    settled = delivered + totals.get(BOUNCED, 0) + totals.get(FAILED, 0)
    human_opens = totals.get(OPENED, 0) - bots.get(OPENED, 0)
    human_clicks = totals.get(CLICKED, 0) - bots.get(CLICKED, 0)
    return {
        "delivery_rate": (delivered, settled),
        "bounce_rate": (totals.get(BOUNCED, 0), settled),
        "open_rate": (min(human_opens, delivered), delivered),
        "click_rate": (min(human_clicks, delivered), delivered),
        "complaint_rate": (min(totals.get(COMPLAINED, 0), delivered), delivered),
    }


@dataclass(frozen=True)
class ZTest:
    """A two-proportion z-test: z, its two-sided p-value, and whether normal approximation holds."""

    z: float
    p_value: float
    approximate: bool  # fewer than 5 successes or failures on a side: treat with care

    @property
    def significant(self) -> bool:
        return self.p_value < SIGNIFICANCE_LEVEL


def two_proportion_z(x1: int, n1: int, x2: int, n2: int) -> ZTest | None:
    """Whether x1/n1 and x2/n2 differ (pooled two-proportion z-test); None when a side has no
    trials or the pooled proportion is 0 or 1 (no variance: nothing to test)."""
    if n1 <= 0 or n2 <= 0:
        return None
    pooled = (x1 + x2) / (n1 + n2)
    variance = pooled * (1 - pooled) * (1 / n1 + 1 / n2)
    if variance <= 0:
        return None
    z = (x1 / n1 - x2 / n2) / math.sqrt(variance)
    p_value = math.erfc(abs(z) / math.sqrt(2))
    approximate = min(x1, n1 - x1, x2, n2 - x2) < 5
    return ZTest(z, p_value, approximate)


def _percent(value: float) -> str:
    return f"{value * 100:.1f} %"


def significance_note(metric: str, a: tuple[int, int], b: tuple[int, int]) -> str:
    """One sentence saying how A and B differ in `metric` and whether that could be chance."""
    name = metric.replace("_", " ")
    if a[1] <= 0 or b[1] <= 0:
        return f"{name}: not enough data yet"
    ra, rb = a[0] / a[1], b[0] / b[1]
    head = f"{name}: A {_percent(ra)} vs B {_percent(rb)}"
    test = two_proportion_z(*a, *b)
    if test is None:
        return f"{head}; no difference"
    diff = (ra - rb) * 100
    verdict = (
        f"{'A' if diff > 0 else 'B'} is higher by {abs(diff):.1f} points, "
        f"significant at the {int((1 - SIGNIFICANCE_LEVEL) * 100)} % level "
        f"(p = {test.p_value:.3g})"
        if test.significant
        else f"the difference may be chance (p = {test.p_value:.2g}); keep testing"
    )
    if test.approximate:
        verdict += " (small counts: the test is only a rough guide)"
    return f"{head}; {verdict}"


# -- reading the counters ------------------------------------------------------------------------


class _EpochSeconds(FunctionElement[int]):
    """Seconds since the Unix epoch of a UTCDateTime column, on either dialect."""

    type = BigInteger()
    name = "epoch_seconds"
    inherit_cache = True


@compiles(_EpochSeconds, "sqlite")
def _epoch_sqlite(element: _EpochSeconds, compiler: SQLCompiler, **kw: Any) -> str:
    # Stored as 'YYYY-MM-DD HH:MM:SS.ffffff' in UTC.
    return f"CAST(strftime('%s', {compiler.process(element.clauses, **kw)}) AS INTEGER)"


@compiles(_EpochSeconds, "postgresql")
def _epoch_postgresql(element: _EpochSeconds, compiler: SQLCompiler, **kw: Any) -> str:
    # A timestamp without time zone holding UTC: its epoch is taken as UTC.
    return f"CAST(EXTRACT(EPOCH FROM {compiler.process(element.clauses, **kw)}) AS BIGINT)"


def _bucket_key(dialect: str, win: Window) -> tuple[ColumnElement[Any], Callable[[Any], int]]:
    """An SQL expression naming each counter row's bucket, and the function from its value
    to the bucket's position in the window. On SQLite, where times are text, the buckets
    that align with the clock are prefixes of it (a day is 'YYYY-MM-DD'), several times
    cheaper to compute over a million rows than parsing every time."""
    col = stat_counters.c.bucket
    size = int(win.size.total_seconds())
    origin = int(bucket_floor(win.since, win.size).timestamp())

    def position(at: datetime) -> int:
        return (int(at.timestamp()) - origin) // size

    if dialect == "sqlite" and size in (86_400, 3600):
        width = 10 if size == 86_400 else 13
        pad = "T00:00" if size == 86_400 else ":00"
        return func.substr(col, 1, width, type_=String), lambda key: position(
            datetime.fromisoformat(f"{key}{pad}").replace(tzinfo=UTC)
        )
    if dialect == "sqlite" and size < 3600 and 3600 % size == 0 and size % 60 == 0:
        step = size // 60  # 'YYYY-MM-DD HH:' and the minute // step
        # Parenthesised: SQLite's || binds tighter than /.
        slot = (cast(func.substr(col, 15, 2, type_=String), Integer) // step).self_group()
        part = func.substr(col, 1, 14, type_=String).concat(slot)

        def minutes(key: Any) -> int:
            hour, _, slot = str(key).rpartition(":")
            at = datetime.fromisoformat(f"{hour}:00").replace(tzinfo=UTC)
            return position(at + timedelta(minutes=int(slot) * step))

        return part, minutes
    # Elsewhere: whole seconds since the epoch, divided in SQL (literal integers, so the
    # expression is the same wherever it appears).
    epoch = _EpochSeconds(col) - literal_column(str(origin), BigInteger)
    return epoch // literal_column(str(size), BigInteger), int


def _app_ids(conn: Connection, app_ids: Sequence[int] | None) -> list[int]:
    """The apps asked for; None means every app (listed, so the app_id indexes serve)."""
    if app_ids is not None:
        return list(app_ids)
    return [int(i) for i in conn.execute(select(apps.c.id)).scalars()]


@dataclass(frozen=True)
class _Cell:
    index: int
    tag: str
    type: str
    count: int
    bots: int


def _scan(
    conn: Connection,
    app_ids: Sequence[int] | None,
    win: Window,
    *,
    tag: str | None = None,
    stream: str | None = None,
    by_bucket: bool = True,
    by_tag: bool = False,
    tags: Sequence[str] | None = None,
    template: str | None = None,
    by_template: bool = False,
) -> list[_Cell]:
    """Counter sums per ([bucket of the window,] [tag,] event type), summed in SQL: the rows
    returned are bounded by buckets x tags x types, whatever the traffic. `by_template`:
    per template instead of per tag (each cell's `tag` is the template's alias; mail made
    from none left out)."""
    ids = _app_ids(conn, app_ids)
    if not ids:
        return []
    if by_bucket:
        key, index_of = _bucket_key(conn.dialect.name, win)
    else:
        key, index_of = literal_column("0"), int
    index = key.label("idx")
    if by_template:
        tag_col: ColumnElement[Any] = stat_counters.c.template
    elif by_tag:
        tag_col = stat_counters.c.tag
    else:
        tag_col = literal_column("''")
    query: Select[Any] = (
        select(
            index,
            tag_col.label("tag"),
            stat_counters.c.event_type,
            func.sum(stat_counters.c.count).label("n"),
            func.sum(stat_counters.c.bot_count).label("bots"),
        )
        .where(
            stat_counters.c.app_id.in_(ids),
            stat_counters.c.bucket >= win.since,
            stat_counters.c.bucket < win.until,
        )
        .group_by(
            *(["idx"] if by_bucket else []),
            # The column, not its label: SQLite would take "tag" as the column of that name.
            *([tag_col] if by_tag or by_template else []),
            stat_counters.c.event_type,
        )
    )
    if tag is not None:
        query = query.where(stat_counters.c.tag == tag)
    if tags is not None:
        query = query.where(stat_counters.c.tag.in_(list(tags)))
    if template is not None:
        query = query.where(stat_counters.c.template == template)
    elif by_template:
        query = query.where(stat_counters.c.template != "")
    if stream is not None:
        query = query.where(stat_counters.c.stream == stream)
    return [
        _Cell(index_of(r.idx), str(r.tag), str(r.event_type), int(r.n or 0), int(r.bots or 0))
        for r in conn.execute(query)
    ]


def _scan_template(
    conn: Connection,
    app_ids: Sequence[int] | None,
    win: Window,
    template: str | None,
    *,
    stream: str | None = None,
    by_bucket: bool = True,
) -> list[_Cell]:
    """As `_scan`, for the mail made from one template (None: from any template, each cell's
    `tag` naming its template): the counters' `template` dimension, summed over tags."""
    return _scan(
        conn,
        app_ids,
        win,
        stream=stream,
        by_bucket=by_bucket,
        template=template,
        by_template=template is None,
    )


# -- series and summary --------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """Counts per bucket, zero-filled: counts[type][i] is bucket i's total (people and bots),
    bots[type][i] its bot part (non-zero only for opens and clicks)."""

    window: Window
    buckets: list[datetime]
    counts: dict[str, list[int]]
    bots: dict[str, list[int]]

    def as_json(self) -> dict[str, Any]:
        return {
            "since": self.window.since,
            "until": self.window.until,
            "bucket_seconds": int(self.window.size.total_seconds()),
            "buckets": self.buckets,
            "counts": self.counts,
            "bots": self.bots,
        }


def sent_of(totals: dict[str, int]) -> int:
    """Recipients taken in: queued for delivery, or suppressed on the way in."""
    return totals.get(QUEUED, 0) + totals.get(SUPPRESSED, 0)


class _Counted:
    """Totals per event type (people and bots; `bots` holds the bot part) and their rates,
    as a summary and a tag's figures both have them."""

    totals: dict[str, int]
    bots: dict[str, int]
    rates: Rates

    @property
    def sent(self) -> int:
        """Recipients taken in: queued for delivery, or suppressed on the way in."""
        return sent_of(self.totals)

    def counts_json(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "totals": self.totals,
            "bots": self.bots,
            "rates": self.rates.__dict__,
        }


@dataclass(frozen=True)
class Summary(_Counted):
    """Totals per event type over a window (people and bots; `bots` holds the bot part), and
    the rates they give."""

    since: datetime
    until: datetime
    totals: dict[str, int]
    bots: dict[str, int]
    rates: Rates

    @property
    def human(self) -> dict[str, int]:
        return {t: n - self.bots.get(t, 0) for t, n in self.totals.items()}

    def as_json(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "until": self.until,
            **self.counts_json(),
            "human": self.human,
        }


def series_of(win: Window, cells: Iterable[_Cell], types: Sequence[str] | None = None) -> Series:
    """The zero-filled series of scanned cells (pure): every type asked for (SERIES_TYPES
    by default) has one count per bucket; types seen but not asked for are left out."""
    buckets = win.buckets
    wanted = list(types) if types is not None else list(SERIES_TYPES)
    counts = {t: [0] * len(buckets) for t in wanted}
    bots = {t: [0] * len(buckets) for t in wanted}
    for cell in cells:
        if cell.type in counts and 0 <= cell.index < len(buckets):
            counts[cell.type][cell.index] += cell.count
            bots[cell.type][cell.index] += cell.bots
    return Series(win, buckets, counts, bots)


def summary_of(win: Window, cells: Iterable[_Cell]) -> Summary:
    """Totals and rates of scanned cells (pure)."""
    totals: dict[str, int] = {}
    bots: dict[str, int] = {}
    for cell in cells:
        totals[cell.type] = totals.get(cell.type, 0) + cell.count
        if cell.bots:
            bots[cell.type] = bots.get(cell.type, 0) + cell.bots
    return Summary(win.since, win.until, totals, bots, rates(totals, bots))


def _check_types(types: Sequence[str] | None) -> list[str] | None:
    if types is None:
        return None
    known = {str(t) for t in EventType}
    unknown = [t for t in types if t not in known]
    if unknown:
        raise StatsError(f"unknown event type {unknown[0]!r}", "types")
    return list(dict.fromkeys(types))


def series(
    store: Store,
    app_ids: Sequence[int] | None,
    range: str | None = None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    types: Sequence[str] | None = None,
    tag: str | None = None,
    stream: str | None = None,
    now: datetime | None = None,
) -> Series:
    """Counts per bucket of `types` (default SERIES_TYPES) for the apps (None: every app),
    zero-filled, over a named range or since/until. `tag=None` is every tag, `tag=""` the
    untagged mail. Raises StatsError."""
    wanted = _check_types(types)
    win = window(range, since=since, until=until, now=now)
    with store.read() as conn:
        cells = _scan(conn, app_ids, win, tag=tag, stream=stream)
    return series_of(win, cells, wanted)


def summary(
    store: Store,
    app_ids: Sequence[int] | None,
    range: str | None = None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    tag: str | None = None,
    stream: str | None = None,
    now: datetime | None = None,
) -> Summary:
    """Totals per event type and the rates over a window (see Rates for the definitions)."""
    win = window(range, since=since, until=until, now=now)
    with store.read() as conn:
        cells = _scan(conn, app_ids, win, tag=tag, stream=stream)
    return summary_of(win, cells)


def series_and_summary(
    store: Store,
    app_ids: Sequence[int] | None,
    range: str | None = None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    types: Sequence[str] | None = None,
    tag: str | None = None,
    stream: str | None = None,
    now: datetime | None = None,
    template: str | None = None,
) -> tuple[Series, Summary]:
    """series() and summary() from one scan of the counters (of one tag's or one
    `template`'s)."""
    wanted = _check_types(types)
    win = window(range, since=since, until=until, now=now)
    with store.read() as conn:
        if template is not None:
            if tag is not None:
                raise StatsError("give tag or template, not both", "tag")
            cells = _scan_template(conn, app_ids, win, template, stream=stream)
        else:
            cells = _scan(conn, app_ids, win, tag=tag, stream=stream)
    return series_of(win, cells, wanted), summary_of(win, cells)


# -- tags and A/B comparison ---------------------------------------------------------------------


@dataclass(frozen=True)
class TagStats(_Counted):
    """One tag's totals and rates over a window (`tag` "" is untagged mail)."""

    tag: str
    totals: dict[str, int]
    bots: dict[str, int]
    rates: Rates

    def as_json(self) -> dict[str, Any]:
        return {"tag": self.tag, **self.counts_json()}


def tag_stats_of(cells: Iterable[_Cell]) -> dict[str, TagStats]:
    """Per-tag totals and rates of cells scanned by tag (pure)."""
    totals: dict[str, dict[str, int]] = {}
    bots: dict[str, dict[str, int]] = {}
    for cell in cells:
        t = totals.setdefault(cell.tag, {})
        t[cell.type] = t.get(cell.type, 0) + cell.count
        if cell.bots:
            b = bots.setdefault(cell.tag, {})
            b[cell.type] = b.get(cell.type, 0) + cell.bots
    return {
        tag: TagStats(tag, t, bots.get(tag, {}), rates(t, bots.get(tag, {})))
        for tag, t in totals.items()
    }


def top_tags(
    store: Store,
    app_ids: Sequence[int] | None,
    range: str | None = None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    stream: str | None = None,
    limit: int = 10,
    now: datetime | None = None,
) -> list[TagStats]:
    """The tags that sent most in the window, with their rates, most first."""
    win = window(range, since=since, until=until, now=now)
    with store.read() as conn:
        cells = _scan(conn, app_ids, win, stream=stream, by_bucket=False, by_tag=True)
    found = sorted(tag_stats_of(cells).values(), key=lambda s: (-s.sent, s.tag))
    return found[:limit]


@dataclass(frozen=True)
class Significance:
    """A and B compared on one rate."""

    metric: str
    a: tuple[int, int]  # (successes, trials)
    b: tuple[int, int]
    test: ZTest | None
    note: str

    def as_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "a_rate": _ratio(*self.a),
            "b_rate": _ratio(*self.b),
            "z": None if self.test is None else round(self.test.z, 4),
            "p_value": None if self.test is None else self.test.p_value,
            "significant": bool(self.test and self.test.significant),
            "note": self.note,
        }


@dataclass(frozen=True)
class Comparison:
    """Two tags side by side, with a significance test per rate."""

    a: TagStats
    b: TagStats
    tests: list[Significance] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "a": self.a.as_json(),
            "b": self.b.as_json(),
            "tests": [t.as_json() for t in self.tests],
        }


COMPARED_RATES = ("delivery_rate", "open_rate", "click_rate", "bounce_rate", "complaint_rate")


def compare_of(a: TagStats, b: TagStats) -> Comparison:
    """The comparison of two tags' stats (pure)."""
    pa, pb = proportions(a.totals, a.bots), proportions(b.totals, b.bots)
    tests = [
        Significance(
            metric,
            pa[metric],
            pb[metric],
            two_proportion_z(*pa[metric], *pb[metric]),
            significance_note(metric, pa[metric], pb[metric]),
        )
        for metric in COMPARED_RATES
    ]
    return Comparison(a, b, tests)


def compare(
    store: Store,
    app_ids: Sequence[int] | None,
    a: str,
    b: str,
    range: str | None = None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    stream: str | None = None,
    now: datetime | None = None,
) -> Comparison:
    """An A/B test of two tags: their totals and rates side by side, and for each rate a
    two-proportion z-test saying whether the difference may be chance."""
    win = window(range, since=since, until=until, now=now)
    with store.read() as conn:
        cells = _scan(conn, app_ids, win, stream=stream, by_bucket=False, by_tag=True, tags=[a, b])
    found = tag_stats_of(cells)
    empty = Rates(None, None, None, None, None)
    return compare_of(
        found.get(a, TagStats(a, {}, {}, empty)), found.get(b, TagStats(b, {}, {}, empty))
    )


# -- bounce reasons, from their counters ---------------------------------------------------------


@dataclass(frozen=True)
class BounceReason:
    """A bounce category (bounces/rules.toml) and how often it was seen in the window."""

    category: str
    count: int
    hard: int  # of which hard bounces
    share: float  # of all bounces in the window


def top_bounce_reasons(
    store: Store,
    app_ids: Sequence[int] | None,
    range: str | None = None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    tag: str | None = None,
    stream: str | None = None,
    limit: int = 10,
    now: datetime | None = None,
) -> list[BounceReason]:
    """Bounce categories of the window, most frequent first: the bounce_counters rows the
    delivery.bounced events bumped (by app, stream, tag, minute, category and hardness), at
    the resolution the window's buckets have after compaction, as every chart reads."""
    win = window(range, since=since, until=until, now=now)
    with store.read() as conn:
        ids = _app_ids(conn, app_ids)
        if not ids:
            return []
        c = bounce_counters.c
        query = (
            select(c.category, c.hard, func.sum(c.count).label("n"))
            .where(c.app_id.in_(ids), c.bucket >= win.since, c.bucket < win.until)
            .group_by(c.category, c.hard)
        )
        if tag is not None:
            query = query.where(c.tag == tag)
        if stream is not None:
            query = query.where(c.stream == stream)
        rows = conn.execute(query).all()
    return bounce_reasons_of([(str(r.category), bool(r.hard), int(r.n)) for r in rows], limit)


def bounce_reasons_of(rows: Iterable[tuple[str, bool, int]], limit: int) -> list[BounceReason]:
    """(category, hard, count) rows folded per category, most first (pure)."""
    counts: dict[str, list[int]] = {}
    for category, hard, n in rows:
        entry = counts.setdefault(category, [0, 0])
        entry[0] += n
        entry[1] += n if hard else 0
    total = sum(c for c, _ in counts.values())
    found = [
        BounceReason(category, n, hard_n, n / total) for category, (n, hard_n) in counts.items()
    ]
    found.sort(key=lambda r: (-r.count, r.category))
    return found[:limit]


# -- the queue now --------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueNow:
    """Deliveries waiting right now, by status, and how long the oldest have waited."""

    depth: dict[str, int]  # queued, sending, deferred, held: always all four
    oldest_queued_age: timedelta | None
    oldest_deferred_age: timedelta | None

    def as_json(self) -> dict[str, Any]:
        def seconds(age: timedelta | None) -> float | None:
            return None if age is None else age.total_seconds()

        return {
            "depth": self.depth,
            "oldest_queued_seconds": seconds(self.oldest_queued_age),
            "oldest_deferred_seconds": seconds(self.oldest_deferred_age),
        }


def queue_now(
    store: Store, app_ids: Sequence[int] | None, *, now: datetime | None = None
) -> QueueNow:
    """The apps' waiting deliveries by status (counted on the (app_id, status, …) index) and
    the age of the oldest queued and oldest deferred one, since it was first queued."""
    now = _utc(now or utcnow())
    with store.read() as conn:
        ids = _app_ids(conn, app_ids)
        depth = dict.fromkeys(PENDING_STATUSES, 0)
        oldest: dict[str, datetime] = {}
        if ids:
            for status, n in conn.execute(
                select(deliveries.c.status, func.count())
                .where(deliveries.c.app_id.in_(ids), deliveries.c.status.in_(PENDING_STATUSES))
                .group_by(deliveries.c.status)
            ):
                depth[str(status)] = int(n)
            for status in ("queued", "deferred"):
                if depth[status]:
                    at = conn.execute(
                        select(func.min(deliveries.c.first_queued_at)).where(
                            deliveries.c.app_id.in_(ids), deliveries.c.status == status
                        )
                    ).scalar()
                    if at is not None:
                        oldest[status] = at
    return QueueNow(
        depth,
        now - oldest["queued"] if "queued" in oldest else None,
        now - oldest["deferred"] if "deferred" in oldest else None,
    )


# -- everything a dashboard shows ------------------------------------------------------------------


def template_stats(
    store: Store,
    app_ids: Sequence[int] | None,
    range: str | None = None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    stream: str | None = None,
    now: datetime | None = None,
) -> list[TagStats]:
    """Every template that sent in the window with its totals and rates (each TagStats'
    `tag` is the template's alias), most sent first: counted as `series_and_summary(...,
    template=)` counts one, in one scan of the counters."""
    win = window(range, since=since, until=until, now=now)
    with store.read() as conn:
        cells = _scan_template(conn, app_ids, win, None, stream=stream, by_bucket=False)
    return sorted(tag_stats_of(cells).values(), key=lambda s: (-s.sent, s.tag))


@dataclass(frozen=True)
class Dashboard:
    series: Series
    summary: Summary
    tags: list[TagStats]
    bounce_reasons: list[BounceReason]
    queue: QueueNow


def dashboard(
    store: Store,
    app_ids: Sequence[int] | None,
    range: str | None = "24h",
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    types: Sequence[str] | None = None,
    stream: str | None = None,
    tag_limit: int = 10,
    now: datetime | None = None,
) -> Dashboard:
    """What a dashboard shows, from two scans of the counters (by bucket and type for the
    chart and totals, by tag and type for the tags) plus the bounce counters of the window and
    the queue's index. One scan by bucket, tag and type would return buckets x tags x types
    rows (18,000 for a week of hours with 14 tags), and making them into Python objects cost
    more than both scans together."""
    wanted = _check_types(types)
    if since is not None:
        range = None
    win = window(range, since=since, until=until, now=now)
    with store.read() as conn:
        cells = _scan(conn, app_ids, win, stream=stream)
        by_tag = _scan(conn, app_ids, win, stream=stream, by_bucket=False, by_tag=True)
    tags = sorted(tag_stats_of(by_tag).values(), key=lambda s: (-s.sent, s.tag))[:tag_limit]
    reasons = top_bounce_reasons(
        store, app_ids, since=win.since, until=win.until, stream=stream, now=now
    )
    return Dashboard(
        series_of(win, cells, wanted),
        summary_of(win, cells),
        tags,
        reasons,
        queue_now(store, app_ids, now=now),
    )
