"""The message log's search: filters, keyset pages on (received_at, id), and bounded scans for
the filters no index serves."""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, bindparam, func, or_, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.selectable import Join

from postbode.bounces.classify import CATEGORIES
from postbode.csvcells import csv_cell
from postbode.ingest.accept import AcceptError
from postbode.store.engine import Store
from postbode.store.schema import (
    DELIVERY_STATUSES,
    IN_WALKED_STATUSES,
    WALKED_STATUSES,
    deliveries,
    messages,
)
from postbode.web.api.messages import address_forms
from postbode.web.errors import ApiError

PAGE_SIZE = 50
# At most this many messages (newest first, through an index) are looked at per app and page
# for the filters no index serves (subject, sender, status, metadata, part of an address); a
# page that is not full by then says how far back it looked and offers to go on from there.
# 5,000 keeps such a page and its count under 100 ms with a handful of apps at 10 million
# deliveries (docs/performance.md).
SCAN_WINDOW = 5_000
EXACT_CAP = 5_000  # messages of one Message-ID or address read by id; more: by time index
# An address with more messages than this in an app (and no scanned filter) is paged in
# message-id order on its index instead of sorting all its messages by time (`_by_id`).
ID_WALK_OVER = 500
# States most deliveries end in: a page of them is found among the newest messages at once,
# so they are not looked up through the status index first; nor is a state of more than
# STATE_CAP of an app's deliveries.
COMMON_STATUSES = frozenset({"delivered"})
STATE_CAP = 500
_METADATA_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


class SearchError(ValueError):
    """A filter that cannot be used, naming its field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field, self.message = field, message


@dataclass(frozen=True)
class MessageQuery:
    """What the log is filtered by; every given filter must match."""

    app_ids: tuple[int, ...]
    recipient: str | None = None  # a whole address, any case (index); or part of one (scan)
    sender: str | None = None  # part of the envelope sender or the From header
    subject: str | None = None  # part of the subject, case-insensitive
    tag: str | None = None
    status: str | None = None  # messages with a delivery in this state
    message_id: str | None = None  # the Message-ID header, with or without <>
    metadata: tuple[str, str] | None = None  # key, value
    since: datetime | None = None
    until: datetime | None = None
    reply: str | None = None  # part of a delivery's last reply, case-insensitive
    category: str | None = None  # a delivery's bounce category (bounces/classify.py)
    mx: str | None = None  # part of the MX host a delivery was last tried at

    def scanned_filters(self) -> list[str]:
        """The filters applied within the bounded scan (no index serves them)."""
        found = [
            name
            for name in ("sender", "subject", "status", "metadata", "reply", "category", "mx")
            if getattr(self, name)
        ]
        if self.recipient and not _whole_address(self.recipient):
            found.append("recipient")
        return found


def parse_metadata(value: str | None) -> tuple[str, str] | None:
    """`key=value` from the search form."""
    if value is None or not value.strip():
        return None
    key, sep, wanted = value.strip().partition("=")
    key = key.strip()
    if not sep or not _METADATA_KEY.fullmatch(key):
        raise SearchError("metadata", "write metadata as key=value (key: letters, digits, _ . -)")
    return key, wanted.strip()


def _whole_address(value: str) -> bool:
    local, at, domain = value.strip().rpartition("@")
    return bool(at and local and "." in domain)


def _recipient_forms(value: str) -> list[str]:
    """The address in lower case, its domain in IDNA and Unicode form: compared with
    lower(recipient), which the (app_id, lower(recipient), message_id) index serves."""
    try:
        forms = address_forms(value)
    except (ApiError, AcceptError):
        raise SearchError("recipient", "not an e-mail address") from None
    return list(dict.fromkeys(f.lower() for f in forms))


def _recipient_is(value: str, d: Any = deliveries) -> ColumnElement[bool]:
    return func.lower(d.c.recipient).in_(_recipient_forms(value))


@dataclass(frozen=True)
class Cursor:
    """Where a page ends: the last message's (received_at, id)."""

    received_at: datetime
    id: uuid.UUID

    def encode(self) -> str:
        raw = f"{self.received_at.astimezone(UTC).isoformat()}|{self.id}"
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, value: str | None) -> Cursor | None:
        if not value:
            return None
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
            at, _, ident = raw.partition("|")
            when = datetime.fromisoformat(at)
            return cls(when if when.tzinfo else when.replace(tzinfo=UTC), uuid.UUID(ident))
        except (ValueError, UnicodeError):
            raise SearchError("cursor", "not a cursor from a previous page") from None

    @classmethod
    def at(cls, when: datetime) -> Cursor:
        """Jump to a date: the page of messages received before `when`."""
        return cls(when if when.tzinfo else when.replace(tzinfo=UTC), uuid.UUID(int=0))


@dataclass
class Page:
    """One page of the log, newest first."""

    rows: list[dict[str, Any]]
    next_cursor: Cursor | None  # older matches go on from here
    scanned_back_to: datetime | None = None  # set when a bounded scan ended before the page filled
    newer_cursor: Cursor | None = None  # newer matches may lie beyond this (a "newer" page)


def _newest_first() -> tuple[Any, Any]:
    return messages.c.received_at.desc(), messages.c.id.desc()


def _before(cursor: Cursor) -> ColumnElement[bool]:
    # `received_at <= t` first, so the (app_id, received_at) index bounds the range.
    at = messages.c.received_at
    return and_(at <= cursor.received_at, or_(at < cursor.received_at, messages.c.id < cursor.id))


def _after(cursor: Cursor) -> ColumnElement[bool]:
    at = messages.c.received_at
    return and_(at >= cursor.received_at, or_(at > cursor.received_at, messages.c.id > cursor.id))


def _oldest_first() -> tuple[Any, Any]:
    return messages.c.received_at.asc(), messages.c.id.asc()


def _message_id_forms(value: str) -> list[str]:
    bare = value.strip().strip("<>").strip()
    return [f"<{bare}>", bare]


def _indexed(q: MessageQuery, app_id: int) -> list[ColumnElement[bool]]:
    """Conditions an index serves: app and time (app_id, received_at), tag (app_id, tag,
    received_at), Message-ID (message_id_header), a whole recipient address (deliveries:
    app_id, lower(recipient)))."""
    conds: list[ColumnElement[bool]] = [messages.c.app_id == app_id, *_bounds(q)]
    if q.message_id:
        conds.append(messages.c.message_id_header.in_(_message_id_forms(q.message_id)))
    if q.recipient and _whole_address(q.recipient):
        conds.append(
            messages.c.id.in_(
                select(deliveries.c.message_id).where(
                    deliveries.c.app_id == app_id, _recipient_is(q.recipient)
                )
            )
        )
    return conds


def _bounds(q: MessageQuery) -> list[ColumnElement[bool]]:
    conds: list[ColumnElement[bool]] = []
    if q.since is not None:
        conds.append(messages.c.received_at >= q.since)
    if q.until is not None:
        conds.append(messages.c.received_at < q.until)
    if q.tag:
        conds.append(messages.c.tag == q.tag)
    return conds


def _named(conn: Connection, q: MessageQuery, app_id: int) -> set[uuid.UUID] | None:
    """The app's messages a Message-ID or a whole address names, each read through its own
    index (at most EXACT_CAP + 1); None without such a filter, or when one names more.

    Asked separately because a planner without statistics (SQLite before ANALYZE) may
    rather walk the whole (app_id, received_at) index to save a sort."""
    found: set[uuid.UUID] | None = None
    if q.message_id:
        rows = conn.execute(
            select(messages.c.id, messages.c.app_id)
            .where(messages.c.message_id_header.in_(_message_id_forms(q.message_id)))
            .limit(EXACT_CAP + 1)
        ).all()
        if len(rows) > EXACT_CAP:
            return None  # too many to name (a partial set would intersect wrongly): use the index
        found = {r.id for r in rows if r.app_id == app_id}
    if q.recipient and _whole_address(q.recipient):
        # With nothing scanned, an address with more messages is walked in id order on its
        # index (`_by_id`), and counted on it: a long list of ids costs more than that.
        cap = ID_WALK_OVER if _busy_address(q) else EXACT_CAP
        ids = set(
            conn.execute(
                select(deliveries.c.message_id)
                .where(deliveries.c.app_id == app_id, _recipient_is(q.recipient))
                .limit(cap + 1)
            ).scalars()
        )
        if len(ids) > cap:
            return None
        found = ids if found is None else found & ids
    if q.status and q.status not in COMMON_STATUSES:
        # A state few deliveries are in (deferred, failed, held …): its messages through the
        # (app_id, status, …) index, instead of probing the newest messages one by one. Counted
        # first (on the index alone): a state with more (bounced, thousands) is found fast
        # among the newest messages, and a long list of ids costs more than that.
        in_state = (deliveries.c.app_id == app_id, deliveries.c.status == q.status)
        few = select(deliveries.c.app_id).where(*in_state).limit(STATE_CAP + 1).subquery()
        if conn.execute(select(func.count()).select_from(few)).scalar_one() <= STATE_CAP:
            ids = set(conn.execute(select(deliveries.c.message_id).where(*in_state)).scalars())
            found = ids if found is None else found & ids
    return found


def _scanned(q: MessageQuery, m: Any) -> list[ColumnElement[bool]]:
    """Conditions checked message by message within the bounded scan (`m`: the columns of
    the scanned messages)."""
    conds = _message_conditions(q, m)
    per_delivery = _delivery_conditions(q, whole_recipient=False)
    if per_delivery:
        if q.recipient and _whole_address(q.recipient):
            # The index found the address's messages; the state, reply … must be that same
            # delivery's, not another recipient's of the message.
            per_delivery.append(_recipient_is(q.recipient))
        conds.append(
            select(deliveries.c.id).where(deliveries.c.message_id == m.id, *per_delivery).exists()
        )
    return conds


def _message_conditions(q: MessageQuery, m: Any) -> list[ColumnElement[bool]]:
    """The scanned filters on the message itself: subject, sender, metadata."""
    conds: list[ColumnElement[bool]] = []
    if q.subject:
        conds.append(m.subject.icontains(q.subject.strip(), autoescape=True))
    if q.sender:
        wanted = q.sender.strip()
        conds.append(
            or_(
                m.mail_from.icontains(wanted, autoescape=True),
                m.from_header.icontains(wanted, autoescape=True),
            )
        )
    if q.metadata:
        key, value = q.metadata
        conds.append(m.metadata[key].as_string() == value)
    return conds


_FIRST_ID, _LAST_ID = uuid.UUID(int=0), uuid.UUID(int=(1 << 128) - 1)  # bound an instant
COUNT_BOUND = 1000  # matches counted exactly up to this many; beyond: "more than 1,000"


def _window_edge(conn: Connection, q: MessageQuery, app_id: int, window: int) -> Any:
    """With filters no index serves, the time of the app's `window`-th newest message a page
    would look at (None: no filter needs a window, or the app has fewer)."""
    if not q.scanned_filters():
        return None
    return conn.execute(
        select(messages.c.received_at)
        .where(messages.c.app_id == app_id, *_bounds(q))
        .order_by(messages.c.received_at.desc())
        .offset(window - 1)
        .limit(1)
    ).scalar()


def count_matches(
    conn: Connection, q: MessageQuery, bound: int = COUNT_BOUND, window: int = SCAN_WINDOW
) -> tuple[int, bool]:
    """How many deliveries match `q`, counted up to `bound` + 1 (a result above `bound`
    means "more than `bound`"): the LIMIT keeps a broad search's count cheap. With filters no
    index serves, only each app's newest `window` messages are looked at; the second value
    says whether that limited the count."""
    check(q)
    app_ids = list(dict.fromkeys(q.app_ids))
    if _driver(q) is not None:
        # Walked on the deliveries: each app's count on its index, within its window if any.
        count, limited = 0, False
        for app_id in app_ids:
            if count > bound:
                break
            walk = _plan_walk(conn, q, app_id, None, window)
            if walk is None:
                edge = _window_edge(conn, q, app_id, window)
                within = [messages.c.received_at >= edge] if edge is not None else []
                limited = limited or edge is not None
                count += _count(conn, q, [app_id], bound + 1 - count, within)
            else:
                limited = limited or walk.edge is not None
                count += _walk_count(conn, q, app_id, walk, bound + 1 - count)
        return count, limited
    named = {app_id: _named(conn, q, app_id) for app_id in app_ids}
    if all(found is not None for found in named.values()):
        # Every match is among the few messages each app's index named: counted among them,
        # app by app, with no window.
        count = 0
        for app_id, found in named.items():
            if found and count <= bound:
                count += _count(conn, q, [app_id], bound + 1 - count, [messages.c.id.in_(found)])
        return count, False
    # App by app: one condition on an app and a time range each query can walk an index for
    # (an OR of them made PostgreSQL read every delivery).
    count, limited = 0, False
    for app_id in app_ids:
        if count > bound:
            break
        edge = _window_edge(conn, q, app_id, window)
        within = [messages.c.received_at >= edge] if edge is not None else []
        limited = limited or edge is not None
        count += _count(conn, q, [app_id], bound + 1 - count, within)
    return count, limited


def _count(
    conn: Connection,
    q: MessageQuery,
    app_ids: list[int],
    limit: int,
    extra: list[ColumnElement[bool]],
) -> int:
    """The deliveries of `app_ids` matching `q` and `extra`, counted up to `limit`."""
    conds: list[ColumnElement[bool]] = [
        *extra,
        messages.c.app_id.in_(app_ids),
        *_bounds(q),
        *_message_conditions(q, messages.c),
        *_delivery_conditions(q, whole_recipient=True),
    ]
    if q.message_id:
        conds.append(messages.c.message_id_header.in_(_message_id_forms(q.message_id)))
    if q.recipient and _whole_address(q.recipient):
        # A delivery's app is its message's: said of the delivery too, so that the address is
        # found through the address index (PostgreSQL read every delivery).
        # Only here: without an address, SQLite would then walk the deliveries by app.
        conds.append(deliveries.c.app_id.in_(app_ids))
    matches = (
        select(deliveries.c.id)
        .join(messages, messages.c.id == deliveries.c.message_id)
        .where(*conds)
        .limit(limit)
        .subquery()
    )
    return int(conn.execute(select(func.count()).select_from(matches)).scalar_one())


def _delivery_conditions(
    q: MessageQuery, *, whole_recipient: bool, d: Any = deliveries
) -> list[ColumnElement[bool]]:
    """What one delivery of a message must match: every filter on deliveries holds for the
    same delivery (`whole_recipient`: include a whole address, which an index serves; `d`: the
    deliveries table or an alias of it)."""
    conds: list[ColumnElement[bool]] = []
    if q.status:
        # Compared as an expression, so no planner probes by status (thousands of rows each
        # time) instead of by message (a handful): SQLite without ANALYZE would.
        conds.append(d.c.status.concat("") == q.status)
    if q.category:
        conds.append(d.c.bounce_category.concat("") == q.category)
    if q.reply:
        conds.append(d.c.last_reply.icontains(q.reply.strip(), autoescape=True))
    if q.mx:
        conds.append(d.c.mx.icontains(q.mx.strip().rstrip("."), autoescape=True))
    if q.recipient and not _whole_address(q.recipient):
        conds.append(d.c.recipient.icontains(q.recipient.strip(), autoescape=True))
    elif q.recipient and whole_recipient:
        conds.append(_recipient_is(q.recipient, d))
    return conds


def check(q: MessageQuery) -> None:
    """SearchError for a filter that cannot be used."""
    if q.status is not None and q.status not in DELIVERY_STATUSES:
        raise SearchError("status", f"unknown status {q.status!r}")
    if q.category is not None and q.category not in CATEGORIES:
        raise SearchError("category", f"unknown bounce category {q.category!r}")
    if q.recipient and _whole_address(q.recipient):
        _recipient_forms(q.recipient)
    for f in fields(q):
        value = getattr(q, f.name)
        if isinstance(value, str) and len(value) > 998:
            raise SearchError(f.name, "too long")


def _key(row: Any) -> tuple[datetime, uuid.UUID]:
    return (row.received_at, row.id)


def _search_app(
    conn: Connection,
    q: MessageQuery,
    app_id: int,
    cursor: Cursor | None,
    limit: int,
    window: int,
    newer: bool = False,
) -> tuple[list[Any], Cursor | None]:
    """Up to `limit` + 1 matches of one app, newest first (`newer`: the ones just newer than
    `cursor`, oldest first), through its index; and, when the bounded scan ran out before
    finding that many, where it stopped (the last message it looked at)."""
    walk = _plan_walk(conn, q, app_id, cursor, window, newer)
    if walk is not None:
        return _walk(conn, q, app_id, walk, cursor, limit, newer)
    named = _named(conn, q, app_id)
    if named is not None and not named:
        return [], None
    if named is None and _busy_address(q):
        return _by_id(conn, q, app_id, cursor, limit, newer), None
    if named is not None and len(named) <= EXACT_CAP:
        conds = [messages.c.id.in_(list(named)), *_bounds(q)]
    else:  # no such filter, or so many messages that the time index finds them fast
        conds = _indexed(q, app_id)
    if cursor is not None:
        conds.append(_after(cursor) if newer else _before(cursor))
    order = _oldest_first() if newer else _newest_first()
    if not q.scanned_filters():
        query = select(messages).where(*conds).order_by(*order).limit(limit + 1)
        return list(conn.execute(query).all()), None
    # The window: about the `window` newest messages (oldest, going forward) the indexed
    # conditions select, bounded by the time of the last of them, which the time index gives
    # alone. The scanned conditions are then checked walking that index, which stops at the
    # page's last match: a subquery of the window's rows would be read (and sorted) whole.
    by_time = messages.c.received_at.asc() if newer else messages.c.received_at.desc()
    edge = conn.execute(
        select(messages.c.received_at).where(*conds).order_by(by_time).offset(window - 1).limit(1)
    ).scalar()
    if edge is not None:
        # Every message of that instant is in the window; the next page starts past it.
        conds.append(messages.c.received_at <= edge if newer else messages.c.received_at >= edge)
    rows = conn.execute(
        select(messages).where(*conds, *_scanned(q, messages.c)).order_by(*order).limit(limit + 1)
    ).all()
    if len(rows) > limit or edge is None:
        return list(rows), None  # a full page, or the scan reached the end of the messages
    return list(rows), Cursor(edge, _LAST_ID if newer else _FIRST_ID)


def _busy_address(q: MessageQuery) -> bool:
    """A whole address and nothing scanned: with more than ID_WALK_OVER messages in an app
    (`_named` then names none) its page is walked in message-id order (`_by_id`)."""
    return bool(q.recipient and _whole_address(q.recipient)) and not q.scanned_filters()


def _by_id(
    conn: Connection,
    q: MessageQuery,
    app_id: int,
    cursor: Cursor | None,
    limit: int,
    newer: bool,
) -> list[Any]:
    """Up to `limit` + 1 of an address's messages in one app, newest first (`newer`: the ones
    just newer than `cursor`, oldest first), in message-id order: the ids are UUIDv7 made as
    the message is accepted (store/schema.py `new_id`), so that order is the time order. The
    walk starts on the (app_id, lower(recipient), message_id) index and looks each message up
    by its key, stopping at the page's end; ordering by received_at instead read and sorted all
    of the address's messages (1.6 s for 10,900 at 10 million deliveries)."""
    forms = _recipient_forms(q.recipient or "")
    other = deliveries.alias("other")
    conds: list[ColumnElement[bool]] = [
        deliveries.c.app_id == app_id,
        func.lower(deliveries.c.recipient).in_(forms),
        messages.c.app_id == app_id,
        *_bounds(q),
        # A message with the address twice (in two spellings) once: at its first delivery.
        ~select(other.c.id)
        .where(
            other.c.message_id == deliveries.c.message_id,
            other.c.id < deliveries.c.id,
            func.lower(other.c.recipient).in_(forms),
        )
        .exists(),
    ]
    if q.message_id:
        conds.append(messages.c.message_id_header.in_(_message_id_forms(q.message_id)))
    if cursor is not None:
        if cursor.id in (_FIRST_ID, _LAST_ID):  # a date to jump to, or where a scan stopped
            conds.append(_after(cursor) if newer else _before(cursor))
        else:
            walked = deliveries.c.message_id
            conds.append(walked > cursor.id if newer else walked < cursor.id)
    # Ordered by the index's column (not messages.id): a planner then walks the index and looks
    # each message up, rather than merging it with all of the app's messages.
    order = deliveries.c.message_id.asc() if newer else deliveries.c.message_id.desc()
    query = (
        select(messages)
        .select_from(deliveries.join(messages, messages.c.id == deliveries.c.message_id))
        .where(*conds)
        .order_by(order)
        .limit(limit + 1)
    )
    return list(conn.execute(query))


# -- walks on the deliveries, in message-id order ---------------------------------------------

# A message's id and its received_at are made together at acceptance (ingest/accept.py), so a
# time bound is also an id bound, give or take this: the id bound narrows the index range
# walked, the time condition on the message stays exact.
ID_MARGIN = timedelta(minutes=1)
SPAN_FACTOR = 4  # a window's deliveries walked: at most this many times the window, all apps'


def _id_floor(at: datetime) -> uuid.UUID:
    """The smallest UUIDv7 of `at`'s millisecond (RFC 9562 §5.7: the id's top 48 bits are
    the Unix time in milliseconds)."""
    return uuid.UUID(int=max(int(at.timestamp() * 1000), 0) << 80)


class _DeliveriesFirst(Join):
    """The deliveries joined to their messages, the deliveries read first: SQLite keeps the
    left table of a CROSS JOIN as the outer loop (its manual control of join order), where it
    would rather read the app's messages through their indexes, all of them, and sort them.
    Other databases plan it as any inner join."""

    inherit_cache = True


@compiles(_DeliveriesFirst, "sqlite")
def _cross_join(element: _DeliveriesFirst, compiler: SQLCompiler, **kw: Any) -> str:
    assert element.onclause is not None
    kw["asfrom"] = True
    return (
        f"{compiler.process(element.left, **kw)} CROSS JOIN "
        f"{compiler.process(element.right, **kw)} "
        f"ON {compiler.process(element.onclause, **kw)}"
    )


def _deliveries_then_messages() -> _DeliveriesFirst:
    return _DeliveriesFirst(deliveries, messages, messages.c.id == deliveries.c.message_id)


@dataclass(frozen=True)
class _Walk:
    """An app's matches read from the deliveries in message-id order (newest first), each
    message joined by its key: `driver`, the conditions whose partial index is walked (a
    walked state's, a bounce category's; none: the deliveries of the window's messages, on the
    (message_id, …) index); `edge`: the time of the window's last message (None: no window,
    every match is found)."""

    driver: tuple[Any, ...]  # conditions (a TextClause among them: a partial index's predicate)
    edge: datetime | None = None


def _driver(q: MessageQuery) -> tuple[Any, ...] | None:
    """The deliveries a walk reads for `q` (None: not walked, the messages are)."""
    if (q.recipient and _whole_address(q.recipient)) or q.message_id:
        return None  # their own indexes name the few messages (`_named`)
    # The state or category is written into the statement (both are checked against their
    # closed lists first): PostgreSQL proves a partial index's predicate from a constant only
    # (a prepared statement's parameter may be planned generically).
    if q.category:
        # `=` implies the partial index's predicate (IS NOT NULL) to both databases.
        return (deliveries.c.bounce_category == bindparam(None, q.category, literal_execute=True),)
    if q.status in WALKED_STATUSES:
        state = deliveries.c.status == bindparam(None, q.status, literal_execute=True)
        # SQLite uses a partial index only for a query that has its predicate as a term;
        # PostgreSQL infers it from the state, and estimates the rows better without it.
        return (state, _SqliteOnly(IN_WALKED_STATUSES))
    if q.status is None and (q.reply or q.mx or q.recipient):
        if q.tag or q.subject or q.sender or q.metadata:
            return None  # the tag's own index, or a message condition: the messages are walked
        return ()
    return None


class _SqliteOnly(ColumnElement[bool]):
    """A condition said to SQLite only (elsewhere: TRUE, which planners drop). Only ever a
    constant condition (cached statements hold it as it is)."""

    inherit_cache = True

    def __init__(self, condition: Any) -> None:
        self.condition = condition


@compiles(_SqliteOnly)
def _true_elsewhere(element: _SqliteOnly, compiler: SQLCompiler, **kw: Any) -> str:
    return "1 = 1"


@compiles(_SqliteOnly, "sqlite")
def _said_to_sqlite(element: _SqliteOnly, compiler: SQLCompiler, **kw: Any) -> str:
    return str(compiler.process(element.condition, **kw))


def _covered(q: MessageQuery, walk: Any) -> MessageQuery:
    """`q` without the filter the walk's driver reads through its index (said once: a second,
    as an expression, made PostgreSQL expect a hundredth of the rows it reads)."""
    if not walk.driver:
        return q
    return replace(q, category=None) if q.category else replace(q, status=None)


def _only_driver(q: MessageQuery) -> bool:
    """Every delivery the driver reads matches (within the time bounds)."""
    other_filters = [q.reply, q.mx, q.recipient, q.tag, q.subject, q.sender, q.metadata]
    if q.category:
        other_filters.append(q.status)
    return not any(other_filters)


def _id_bounds(
    q: MessageQuery,
    cursor: Cursor | None,
    newer: bool,
    edge: datetime | None = None,
    *,
    exact: bool = True,
) -> list[ColumnElement[bool]]:
    """The walked ids' range: the time bounds as id bounds (with a margin), the cursor, and
    the window's edge; with the exact conditions on the messages for the time-based ones
    (`exact` False: the id range alone, on the deliveries)."""
    walked = deliveries.c.message_id
    conds: list[ColumnElement[bool]] = []
    if q.since is not None:
        conds.append(walked >= _id_floor(q.since - ID_MARGIN))
    if q.until is not None:
        conds.append(walked < _id_floor(q.until + ID_MARGIN))
    if cursor is not None:
        if cursor.id in (_FIRST_ID, _LAST_ID):  # a date to jump to, or where a scan stopped
            if newer:
                conds += [walked >= _id_floor(cursor.received_at - ID_MARGIN)]
                conds += [_after(cursor)] if exact else []
            else:
                conds += [walked < _id_floor(cursor.received_at + ID_MARGIN)]
                conds += [_before(cursor)] if exact else []
        else:
            conds.append(walked > cursor.id if newer else walked < cursor.id)
    if edge is not None:
        at = messages.c.received_at
        if newer:
            conds += [walked < _id_floor(edge + ID_MARGIN)] + ([at <= edge] if exact else [])
        else:
            conds += [walked >= _id_floor(edge - ID_MARGIN)] + ([at >= edge] if exact else [])
    return conds


def _walk_conditions(
    q: MessageQuery, app_id: int, walk: _Walk, cursor: Cursor | None, newer: bool
) -> tuple[list[ColumnElement[bool]], bool]:
    """A walk's conditions, and whether they need the messages joined."""
    on_messages = [*_bounds(q), *_message_conditions(q, messages.c)]
    ranged = _id_bounds(q, cursor, newer, walk.edge)
    # Without a driver the window's deliveries are read on the (message_id, …) index: the app
    # as an expression, or SQLite reads all of the app's deliveries on an (app_id, …) one.
    app = deliveries.c.app_id if walk.driver else deliveries.c.app_id + 0
    conds = [
        app == app_id,
        *walk.driver,
        *_delivery_conditions(_covered(q, walk), whole_recipient=True),
        *ranged,
        *on_messages,
    ]
    joined = (
        bool(on_messages)
        or walk.edge is not None
        or (cursor is not None and cursor.id in (_FIRST_ID, _LAST_ID))
    )
    return conds, joined


def _driven(conn: Connection, q: MessageQuery, app_id: int, driver: Any, cap: int) -> int:
    """How many deliveries the driver reads within `q`'s bounds, counted up to `cap`
    (on the partial index alone)."""
    ids = _id_bounds(q, None, False)
    few = (
        select(deliveries.c.app_id)
        .where(deliveries.c.app_id == app_id, *driver, *ids)
        .limit(cap)
        .subquery()
    )
    return int(conn.execute(select(func.count()).select_from(few)).scalar_one())


def _plan_walk(
    conn: Connection,
    q: MessageQuery,
    app_id: int,
    cursor: Cursor | None,
    window: int,
    newer: bool = False,
) -> _Walk | None:
    """How an app's matches of `q` are walked on the deliveries, or None: on the messages.

    A state or category walk needs no window when all it reads matches, or when it reads at
    most `window` deliveries in all; otherwise it keeps the log's window (the app's newest
    `window` messages) if the state has at most `window` deliveries in it, and else the
    messages of the window are walked (each probed, at most `window` of them)."""
    driver = _driver(q)
    if driver is None:
        return None
    if driver and _only_driver(q):
        return _Walk(driver)
    edge = _edge(conn, q, app_id, cursor, window, newer)
    inside = _id_bounds(q, cursor, newer, edge, exact=False)
    if driver:
        if edge is None:
            # The app has fewer messages (of the tag, in the time range) than the window:
            # probing them all is exact too, and reads fewer rows than the state's deliveries.
            return None
        # Each delivery walked is joined to its message by key, which costs about twice a
        # message's probe: the state is walked if it has at most half a window of deliveries
        # (all of them, exact), or that many within the window; else the messages are probed.
        window //= 2
        if _driven(conn, q, app_id, driver, window + 1) <= window:
            return _Walk(driver)
        few = select(deliveries.c.app_id).where(deliveries.c.app_id == app_id, *driver, *inside)
    else:
        # The window's deliveries are read on the (message_id, …) index, every app's among
        # them: while they are not many times the window (a quiet app's window spans weeks of
        # a busy one's mail), else the window's messages are probed.
        window *= SPAN_FACTOR
        few = select(deliveries.c.app_id).where(*inside)
    counted = select(func.count()).select_from(few.limit(window + 1).subquery())
    if conn.execute(counted).scalar_one() > window:
        return None
    return _Walk(driver, edge)


def _edge(
    conn: Connection,
    q: MessageQuery,
    app_id: int,
    cursor: Cursor | None,
    window: int,
    newer: bool,
) -> datetime | None:
    """The time of the app's `window`-th message from `cursor` on (newest first, or oldest
    first going `newer`) within `q`'s indexed conditions, on the (app_id[, tag], received_at)
    index alone; None when it has fewer."""
    conds = [messages.c.app_id == app_id, *_bounds(q)]
    if cursor is not None:
        conds.append(_after(cursor) if newer else _before(cursor))
    by_time = messages.c.received_at.asc() if newer else messages.c.received_at.desc()
    found: datetime | None = conn.execute(
        select(messages.c.received_at).where(*conds).order_by(by_time).offset(window - 1).limit(1)
    ).scalar()
    return found


def _walk(
    conn: Connection,
    q: MessageQuery,
    app_id: int,
    walk: _Walk,
    cursor: Cursor | None,
    limit: int,
    newer: bool,
) -> tuple[list[Any], Cursor | None]:
    """Up to `limit` + 1 of the app's matching messages, newest first (`newer`: oldest first,
    just newer than `cursor`), read on the deliveries in message-id order and joined to their
    message by its key, stopping at the page's end; and where the window ended, when it did
    before the page was full."""
    conds, _ = _walk_conditions(q, app_id, walk, cursor, newer)
    other = deliveries.alias("other")
    # A message with two matching deliveries once: at the first of them.
    conds.append(
        ~select(other.c.id)
        .where(
            other.c.message_id == deliveries.c.message_id,
            other.c.id < deliveries.c.id,
            *_delivery_conditions(q, whole_recipient=True, d=other),
        )
        .exists()
    )
    order = deliveries.c.message_id.asc() if newer else deliveries.c.message_id.desc()
    rows = list(
        conn.execute(
            select(messages)
            .select_from(_deliveries_then_messages())
            .where(*conds)
            .order_by(order)
            .limit(limit + 1)
        )
    )
    if len(rows) > limit or walk.edge is None:
        return rows, None
    return rows, Cursor(walk.edge, _LAST_ID if newer else _FIRST_ID)


def _walk_count(conn: Connection, q: MessageQuery, app_id: int, walk: _Walk, limit: int) -> int:
    """The app's deliveries matching `q` within the walk's window, counted up to `limit` (on
    the partial index alone when nothing else is asked of them)."""
    conds, joined = _walk_conditions(q, app_id, walk, None, False)
    matches = select(deliveries.c.id)
    if joined:
        matches = matches.select_from(_deliveries_then_messages())
    sub = matches.where(*conds).limit(limit).subquery()
    return int(conn.execute(select(func.count()).select_from(sub)).scalar_one())


def search(
    conn: Connection,
    q: MessageQuery,
    *,
    cursor: Cursor | None = None,
    limit: int = PAGE_SIZE,
    window: int = SCAN_WINDOW,
    newer_than: Cursor | None = None,
) -> Page:
    """One page of messages matching `q`, newest first, with their recipients and statuses.

    Each app is read on its own, in its index's order, and the pages merged: an IN list of
    apps would make the database sort every matching message of the organization. With
    filters no index serves, each app looks at most `window` messages; the page then ends
    where the newest such scan stopped, and its cursor goes on from there."""
    check(q)
    if newer_than is not None:
        return _newer(conn, q, newer_than, limit, window)
    rows: list[Any] = []
    stopped: Cursor | None = None  # the newest place a scan ended without finding enough
    for app_id in dict.fromkeys(q.app_ids):
        found, stop = _search_app(conn, q, app_id, cursor, limit, window)
        rows.extend(found)
        if stop is not None and (stopped is None or _key(stop) > _key(stopped)):
            stopped = stop
    if stopped is not None:
        # Older matches of the app whose scan stopped there are not known yet.
        rows = [r for r in rows if _key(r) > _key(stopped)]
    rows.sort(key=_key, reverse=True)
    page = rows[:limit]
    # A page that does not start at the newest message may have newer matches before it.
    newer = Cursor(*_key(page[0])) if cursor is not None and page else None
    if len(rows) > limit:
        return Page(_with_recipients(conn, page, q), Cursor(*_key(page[-1])), None, newer)
    if stopped is not None:
        return Page(_with_recipients(conn, page, q), stopped, stopped.received_at, newer)
    return Page(_with_recipients(conn, page, q), None, None, newer)


def _newer(conn: Connection, q: MessageQuery, cursor: Cursor, limit: int, window: int) -> Page:
    """The page of matches just newer than `cursor` (shown newest first, as every page)."""
    rows: list[Any] = []
    stopped: Cursor | None = None  # the oldest place a scan (going forward) ended
    for app_id in dict.fromkeys(q.app_ids):
        found, stop = _search_app(conn, q, app_id, cursor, limit, window, newer=True)
        rows.extend(found)
        if stop is not None and (stopped is None or _key(stop) < _key(stopped)):
            stopped = stop
    if stopped is not None:
        rows = [r for r in rows if _key(r) < _key(stopped)]
    rows.sort(key=_key)
    page = rows[:limit]
    more_newer: Cursor | None = None
    if len(rows) > limit:
        more_newer = Cursor(*_key(page[-1]))
    elif stopped is not None:
        more_newer = stopped
    page.reverse()
    older = Cursor(*_key(page[-1])) if page else cursor
    return Page(_with_recipients(conn, page, q), older, None, more_newer)


def _with_recipients(
    conn: Connection, rows: Sequence[Any], q: MessageQuery | None = None
) -> list[dict[str, Any]]:
    """The page's messages with every recipient (`recipients`) and the deliveries that match
    the query's delivery filters (`deliveries`: all of them when it has none)."""
    by_message: dict[uuid.UUID, list[dict[str, Any]]] = {r.id: [] for r in rows}
    matching: set[uuid.UUID] | None = None
    if rows:
        ids = list(by_message)
        for d in conn.execute(
            select(
                deliveries.c.id,
                deliveries.c.message_id,
                deliveries.c.recipient,
                deliveries.c.status,
                deliveries.c.last_reply,
                deliveries.c.bounce_category,
                deliveries.c.mx,
                deliveries.c.last_attempt_at,
            )
            .where(deliveries.c.message_id.in_(ids))
            .order_by(deliveries.c.recipient, deliveries.c.id)
        ):
            by_message[d.message_id].append(
                {
                    "delivery_id": d.id,
                    "email": d.recipient,
                    "status": d.status,
                    "last_reply": d.last_reply,
                    "bounce_category": d.bounce_category,
                    "mx": d.mx,
                    "last_attempt_at": d.last_attempt_at,
                }
            )
        conds = _delivery_conditions(q, whole_recipient=True) if q is not None else []
        if conds:
            matching = set(
                conn.execute(
                    select(deliveries.c.id).where(deliveries.c.message_id.in_(ids), *conds)
                ).scalars()
            )
    return [
        {
            "id": r.id,
            "app_id": r.app_id,
            "message_id": r.message_id_header,
            "from": r.from_header,
            "mail_from": r.mail_from,
            "subject": r.subject,
            "tag": r.tag,
            "metadata": r.metadata or {},
            "stream": r.stream,
            "source": r.source,
            "received_at": r.received_at,
            "size": r.size,
            "recipients": by_message[r.id],
            "deliveries": [
                d for d in by_message[r.id] if matching is None or d["delivery_id"] in matching
            ],
        }
        for r in rows
    ]


def iterate(store: Store, q: MessageQuery, chunk: int = 500) -> Iterator[dict[str, Any]]:
    """Every matching message, newest first, a chunk per short read transaction (for the CSV
    export: millions of rows are never in memory at once)."""
    cursor: Cursor | None = None
    while True:
        with store.read() as conn:
            page = search(conn, q, cursor=cursor, limit=chunk)
        yield from page.rows
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


CSV_COLUMNS = (
    "id",
    "received_at",
    "message_id",
    "from",
    "mail_from",
    "subject",
    "tag",
    "stream",
    "recipients",
    "statuses",
    "metadata",
    "recipient",
    "status",
    "last_reply",
    "bounce_category",
    "mx",
)


def csv_rows(row: dict[str, Any]) -> Iterator[list[str]]:
    """A message's CSV rows: one per delivery that matched (the message's columns repeated)."""
    message = csv_values(row)
    for d in row["deliveries"]:
        extra = [d["email"], d["status"], d["last_reply"] or "", d["bounce_category"] or ""]
        yield message + [csv_cell(v) for v in (*extra, d["mx"] or "")]


def csv_values(row: dict[str, Any]) -> list[str]:
    values = [
        str(row["id"]),
        row["received_at"].astimezone(UTC).isoformat(),
        row["message_id"],
        row["from"],
        row["mail_from"],
        row["subject"],
        row["tag"] or "",
        row["stream"],
        " ".join(r["email"] for r in row["recipients"]),
        " ".join(r["status"] for r in row["recipients"]),
        " ".join(f"{k}={v}" for k, v in sorted(row["metadata"].items())),
    ]
    return [csv_cell(v) for v in values]
