"""The message log's search: filters, keyset pages on (received_at, id), and bounded scans for
the filters no index serves."""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, func, or_, select

from postbode.csvcells import csv_cell
from postbode.ingest.accept import AcceptError
from postbode.store.engine import Store
from postbode.store.schema import DELIVERY_STATUSES, deliveries, messages
from postbode.web.api.messages import address_forms
from postbode.web.errors import ApiError

PAGE_SIZE = 50
# At most this many messages (newest first, through an index) are looked at per page for the
# filters no index serves (subject, sender, status, metadata, part of an address); a page that
# is not full by then says how far back it looked and offers to go on from there.
SCAN_WINDOW = 20_000
EXACT_CAP = 5_000  # messages of one Message-ID or address read by id; more: by time index
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

    def scanned_filters(self) -> list[str]:
        """The filters applied within the bounded scan (no index serves them)."""
        found = [
            name for name in ("sender", "subject", "status", "metadata") if getattr(self, name)
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
    lower(recipient), which the (app_id, lower(recipient)) index serves."""
    try:
        forms = address_forms(value)
    except (ApiError, AcceptError):
        raise SearchError("recipient", "not an e-mail address") from None
    return list(dict.fromkeys(f.lower() for f in forms))


def _recipient_is(value: str) -> ColumnElement[bool]:
    return func.lower(deliveries.c.recipient).in_(_recipient_forms(value))


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


@dataclass
class Page:
    """One page of the log, newest first."""

    rows: list[dict[str, Any]]
    next_cursor: Cursor | None
    scanned_back_to: datetime | None = None  # set when a bounded scan ended before the page filled


def _newest_first() -> tuple[Any, Any]:
    return messages.c.received_at.desc(), messages.c.id.desc()


def _before(cursor: Cursor) -> ColumnElement[bool]:
    # `received_at <= t` first, so the (app_id, received_at) index bounds the range.
    at = messages.c.received_at
    return and_(at <= cursor.received_at, or_(at < cursor.received_at, messages.c.id < cursor.id))


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
        ids = set(
            conn.execute(
                select(deliveries.c.message_id)
                .where(deliveries.c.app_id == app_id, _recipient_is(q.recipient))
                .limit(EXACT_CAP + 1)
            ).scalars()
        )
        if len(ids) > EXACT_CAP:
            return None
        found = ids if found is None else found & ids
    return found


def _scanned(q: MessageQuery, m: Any) -> list[ColumnElement[bool]]:
    """Conditions checked message by message within the bounded scan (`m`: the columns of
    the scanned messages)."""
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
    per_delivery: list[ColumnElement[bool]] = []
    if q.status:
        # Compared as an expression, so no planner probes by status (thousands of rows each
        # time) instead of by message (a handful): SQLite without ANALYZE would.
        per_delivery.append(deliveries.c.status.concat("") == q.status)
    if q.recipient and not _whole_address(q.recipient):
        per_delivery.append(deliveries.c.recipient.icontains(q.recipient.strip(), autoescape=True))
    elif q.recipient and per_delivery:
        # The index found the address's messages; the state must be that same delivery's,
        # not another recipient's of the message.
        per_delivery.append(_recipient_is(q.recipient))
    if per_delivery:
        conds.append(
            select(deliveries.c.id).where(deliveries.c.message_id == m.id, *per_delivery).exists()
        )
    return conds


def check(q: MessageQuery) -> None:
    """SearchError for a filter that cannot be used."""
    if q.status is not None and q.status not in DELIVERY_STATUSES:
        raise SearchError("status", f"unknown status {q.status!r}")
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
) -> tuple[list[Any], Cursor | None]:
    """Up to `limit` + 1 matches of one app, newest first, through its index; and, when the
    bounded scan ran out before finding that many, where it stopped (its oldest message)."""
    named = _named(conn, q, app_id)
    if named is not None and not named:
        return [], None
    if named is not None and len(named) <= EXACT_CAP:
        conds = [messages.c.id.in_(list(named)), *_bounds(q)]
    else:  # no such filter, or so many messages that the time index finds them fast
        conds = _indexed(q, app_id)
    if cursor is not None:
        conds.append(_before(cursor))
    if not q.scanned_filters():
        query = select(messages).where(*conds).order_by(*_newest_first()).limit(limit + 1)
        return list(conn.execute(query).all()), None
    # The window carries whole rows: one read per message, no join back to the table.
    window_rows = select(messages).where(*conds).order_by(*_newest_first()).limit(window).subquery()
    w = window_rows.c
    rows = conn.execute(
        select(window_rows)
        .where(*_scanned(q, w))
        .order_by(w.received_at.desc(), w.id.desc())
        .limit(limit + 1)
    ).all()
    if len(rows) > limit:
        return list(rows), None
    seen = conn.execute(select(func.count()).select_from(window_rows)).scalar_one()
    if seen < window:
        return list(rows), None  # the scan reached the end of the app's messages
    last = conn.execute(
        select(window_rows.c.received_at, window_rows.c.id)
        .order_by(window_rows.c.received_at.asc(), window_rows.c.id.asc())
        .limit(1)
    ).one()
    return list(rows), Cursor(last.received_at, last.id)


def search(
    conn: Connection,
    q: MessageQuery,
    *,
    cursor: Cursor | None = None,
    limit: int = PAGE_SIZE,
    window: int = SCAN_WINDOW,
) -> Page:
    """One page of messages matching `q`, newest first, with their recipients and statuses.

    Each app is read on its own, in its index's order, and the pages merged: an IN list of
    apps would make the database sort every matching message of the organization. With
    filters no index serves, each app looks at most `window` messages; the page then ends
    where the newest such scan stopped, and its cursor goes on from there."""
    check(q)
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
    if len(rows) > limit:
        return Page(_with_recipients(conn, page), Cursor(*_key(page[-1])))
    if stopped is not None:
        return Page(_with_recipients(conn, page), stopped, stopped.received_at)
    return Page(_with_recipients(conn, page), None)


def _with_recipients(conn: Connection, rows: Sequence[Any]) -> list[dict[str, Any]]:
    by_message: dict[uuid.UUID, list[dict[str, str]]] = {r.id: [] for r in rows}
    if rows:
        for d in conn.execute(
            select(deliveries.c.message_id, deliveries.c.recipient, deliveries.c.status)
            .where(deliveries.c.message_id.in_(list(by_message)))
            .order_by(deliveries.c.recipient, deliveries.c.id)
        ):
            by_message[d.message_id].append({"email": d.recipient, "status": d.status})
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
)


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
