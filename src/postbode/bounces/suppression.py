"""The suppression list: addresses an app must not send to, and why."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, bindparam, delete, or_, select
from sqlalchemy.dialects import postgresql, sqlite

from postbode.csvcells import csv_cell, from_csv_cell
from postbode.privacy.hashing import hash_address
from postbode.store.engine import Store
from postbode.store.schema import suppressions, utcnow

STREAMS = ("all", "transactional", "broadcast")
CSV_COLUMNS = ("email", "reason", "stream", "source", "created_at", "expires_at")
MAX_EMAIL = 320
# RFC 5321 §4.5.3.1: local part ≤ 64 octets, domain labels ≤ 63; no spaces, brackets or
# separators that would make one entry two addresses.
_LABEL = r"[^\W_](?:[\w-]{0,61}[^\W_])?"
_EMAIL_RE = re.compile(rf"[^\s@<>()\[\],;:\"\\]{{1,64}}@{_LABEL}(?:\.{_LABEL}){{1,126}}")
_REASON_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")


class SuppressionError(ValueError):
    """An entry that cannot go on the list, naming the field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class Entry:
    """One address to suppress, as an API client or a CSV file gives it."""

    email: str
    reason: str = "manual"
    stream: str = "all"
    expires_at: datetime | None = None


def normalise_email(value: str) -> str:
    """An address as the list keeps it (lower case); SuppressionError when it is not one."""
    email = value.strip().strip("<>").lower().rstrip(".")
    if len(email) > MAX_EMAIL or not _EMAIL_RE.fullmatch(email):
        raise SuppressionError("email", f"not an e-mail address: {value[:100]!r}")
    return email


def make_entry(
    email: str, reason: str | None = None, stream: str | None = None, expires_at: Any = None
) -> Entry:
    """A checked Entry; SuppressionError names the bad field."""
    reason = (reason or "manual").strip().lower()
    if not _REASON_RE.fullmatch(reason):
        raise SuppressionError(
            "reason", "a reason is 1-32 lower-case letters, digits, '_', '.' or '-'"
        )
    stream = (stream or "all").strip().lower()
    if stream not in STREAMS:
        raise SuppressionError("stream", f"stream must be one of {', '.join(STREAMS)}")
    expires: datetime | None = None
    if isinstance(expires_at, datetime):
        expires = expires_at
    elif isinstance(expires_at, str) and expires_at.strip():
        try:
            expires = datetime.fromisoformat(expires_at.strip())
        except ValueError:
            raise SuppressionError("expires_at", "expires_at must be an ISO 8601 time") from None
    if expires is not None and expires.tzinfo is None:
        expires = expires.replace(tzinfo=UTC)
    return Entry(normalise_email(email), reason, stream, expires)


def active(now: datetime | None = None) -> ColumnElement[bool]:
    """Entries in force: without an expiry, or expiring later than `now`."""
    return or_(suppressions.c.expires_at.is_(None), suppressions.c.expires_at > (now or utcnow()))


def _upsert(conn: Connection) -> Any:
    """INSERT that, for an existing (app, email, stream), only ever strengthens the entry:
    an expiring one is replaced by one without expiry or with a later one; a permanent one
    is kept as it is (its first reason stands)."""
    dialect = sqlite if conn.dialect.name == "sqlite" else postgresql
    stmt = dialect.insert(suppressions)
    excluded = stmt.excluded
    return stmt.on_conflict_do_update(
        index_elements=["app_id", "email", "stream"],
        set_={
            "reason": excluded.reason,
            "source": excluded.source,
            "message_id": excluded.message_id,
            "detail": excluded.detail,
            "expires_at": excluded.expires_at,
            "created_at": excluded.created_at,
        },
        where=and_(
            suppressions.c.expires_at.is_not(None),
            or_(excluded.expires_at.is_(None), suppressions.c.expires_at < excluded.expires_at),
        ),
    )


def suppress(
    conn: Connection,
    app_id: int,
    email: str,
    *,
    reason: str,
    source: str,
    stream: str = "all",
    message_id: Any = None,
    detail: str | None = None,
    expires_at: datetime | None = None,
) -> bool:
    """Put an address on the app's list (in the caller's transaction). An existing entry for
    the address and stream is kept unless the new one lasts longer (an expired or expiring
    entry never stops a permanent one). True when the list changed."""
    result = conn.execute(
        _upsert(conn).returning(suppressions.c.id),
        {
            "app_id": app_id,
            "email": email.lower(),
            "stream": stream,
            "reason": reason,
            "source": source,
            "message_id": message_id,
            "detail": (detail or "")[:2000] or None,
            "expires_at": expires_at,
            "created_at": utcnow(),
        },
    )
    return result.first() is not None


def suppress_many(conn: Connection, app_id: int, entries: Iterable[Entry], *, source: str) -> int:
    """Put many entries on the app's list; returns how many were added or strengthened."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    now = utcnow()
    for e in entries:
        # One row per (email, stream): PostgreSQL refuses to upsert one row twice per statement.
        rows[(e.email, e.stream)] = {
            "app_id": app_id,
            "email": e.email,
            "stream": e.stream,
            "reason": e.reason,
            "source": source,
            "message_id": None,
            "detail": None,
            "expires_at": e.expires_at,
            "created_at": now,
        }
    if not rows:
        return 0
    result = conn.execute(_upsert(conn).returning(suppressions.c.id), list(rows.values()))
    return len(result.all())


def is_suppressed(
    conn: Connection,
    app_id: int,
    email: str,
    stream: str,
    now: datetime | None = None,
    *,
    key: bytes | None = None,
) -> bool:
    """Whether mail on `stream` to `email` is suppressed (by an entry for it or for 'all');
    with the address-hashing `key`, an entry erasure left as a hash counts too."""
    wanted = {email.lower()}
    if key is not None:
        wanted.add(hash_address(key, email))
    return (
        conn.execute(
            select(suppressions.c.id).where(
                suppressions.c.app_id == app_id,
                suppressions.c.email.in_(wanted),
                suppressions.c.stream.in_({"all", stream}),
                active(now),
            )
        ).first()
        is not None
    )


def reasons_for(
    conn: Connection,
    pairs: Iterable[tuple[int, str]],
    now: datetime | None = None,
    *,
    key: bytes | None = None,
) -> dict[tuple[int, str, str], tuple[str, str]]:
    """The entries in force for (app, address) pairs, in one query per app:
    {(app, address lower-cased, stream or 'all'): (reason, source)}. With the address-hashing
    `key`, entries erasure left as hashes are found too (under the address asked about)."""
    by_app: dict[int, set[str]] = {}
    for app_id, email in pairs:
        by_app.setdefault(app_id, set()).add(email.lower())
    found: dict[tuple[int, str, str], tuple[str, str]] = {}
    for app_id, emails in by_app.items():
        hashed = {hash_address(key, e): e for e in emails} if key is not None else {}
        rows = conn.execute(
            _IN_FORCE,
            {"app_id": app_id, "emails": list(emails | set(hashed)), "now": now or utcnow()},
        )
        found.update(
            ((app_id, hashed.get(r.email, r.email), r.stream), (r.reason, r.source)) for r in rows
        )
    return found


# reasons_for's read, built once: the sender runs it for every claim it loads.
_IN_FORCE = select(
    suppressions.c.email, suppressions.c.stream, suppressions.c.reason, suppressions.c.source
).where(
    suppressions.c.app_id == bindparam("app_id"),
    suppressions.c.email.in_(bindparam("emails", expanding=True)),
    or_(suppressions.c.expires_at.is_(None), suppressions.c.expires_at > bindparam("now")),
)


def unsuppress(conn: Connection, app_id: int, email: str, stream: str | None = None) -> int:
    """Take an address off the app's list (one stream, or every stream); returns how many."""
    stmt = delete(suppressions).where(
        suppressions.c.app_id == app_id, suppressions.c.email == email.lower()
    )
    if stream is not None:
        stmt = stmt.where(suppressions.c.stream == stream)
    return int(conn.execute(stmt).rowcount)


def _filtered(
    app_id: int, email: str | None, reason: str | None, stream: str | None, now: datetime
) -> Any:
    query = select(suppressions).where(suppressions.c.app_id == app_id, active(now))
    if email is not None:
        query = query.where(suppressions.c.email == email.lower())
    if reason is not None:
        query = query.where(suppressions.c.reason == reason)
    if stream is not None:
        query = query.where(suppressions.c.stream == stream)
    return query


def page(
    conn: Connection,
    app_id: int,
    *,
    email: str | None = None,
    reason: str | None = None,
    stream: str | None = None,
    after: int | None = None,
    limit: int = 100,
) -> tuple[list[dict[str, Any]], int | None]:
    """One page of entries in force, oldest first (keyset on id), and the cursor of the next."""
    query = _filtered(app_id, email, reason, stream, utcnow())
    if after is not None:
        query = query.where(suppressions.c.id > after)
    rows = conn.execute(query.order_by(suppressions.c.id).limit(limit + 1)).mappings().all()
    items = [dict(r) for r in rows[:limit]]
    return items, (items[-1]["id"] if len(rows) > limit else None)


def iter_entries(
    store: Store,
    app_id: int,
    *,
    email: str | None = None,
    reason: str | None = None,
    stream: str | None = None,
    chunk: int = 1000,
) -> Iterator[dict[str, Any]]:
    """Every entry in force, fetched `chunk` rows at a time (a short read transaction each),
    so a list of millions is never in memory at once."""
    after: int | None = None
    while True:
        with store.read() as conn:
            rows, after = page(
                conn, app_id, email=email, reason=reason, stream=stream, after=after, limit=chunk
            )
        yield from rows
        if after is None:
            return


# -- CSV (RFC 4180) ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CsvError:
    """A row of an imported file that was not taken."""

    line: int
    field: str | None
    message: str


def read_csv(text: str, *, max_rows: int = 100_000) -> tuple[list[Entry], list[CsvError]]:
    """Entries from CSV with a header row naming `email` (and optionally `reason`, `stream`,
    `expires_at`; other columns are ignored), and the rows refused, by line number.
    SuppressionError when the file itself is unusable (no header naming email)."""
    entries: list[Entry] = []
    errors: list[CsvError] = []
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff"), newline=""), strict=True)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise SuppressionError("csv", f"line 1: unreadable header: {exc}") from None
    if header is None:
        raise SuppressionError("csv", "the file is empty: expected a header row naming email")
    names = [h.strip().lower() for h in header]
    if "email" not in names:
        raise SuppressionError("csv", "line 1: the header row must name an email column")
    index: dict[str, int] = {
        name: names.index(name)
        for name in ("email", "reason", "stream", "expires_at")
        if name in names
    }

    def cell(row: Sequence[str], name: str) -> str | None:
        i = index.get(name)
        return from_csv_cell(row[i]) if i is not None and i < len(row) else None

    rows = 0
    while True:
        line = reader.line_num + 1  # where this row starts (a quoted field may span lines)
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            errors.append(CsvError(line, None, f"unreadable row: {exc}"))
            break  # the reader cannot resynchronise after a broken quote
        if not any(c.strip() for c in row):
            continue
        rows += 1
        if rows > max_rows:
            errors.append(CsvError(line, None, f"more than {max_rows} rows: the rest was not read"))
            break
        try:
            entries.append(
                make_entry(
                    cell(row, "email") or "",
                    cell(row, "reason"),
                    cell(row, "stream"),
                    cell(row, "expires_at"),
                )
            )
        except SuppressionError as exc:
            errors.append(CsvError(line, exc.field, exc.message))
    return entries, errors


def csv_header() -> str:
    return _csv_line(CSV_COLUMNS)


def csv_row(entry: dict[str, Any]) -> str:
    """One exported entry as a CSV line; the columns of CSV_COLUMNS."""
    return _csv_line(
        [
            ""
            if entry.get(c) is None
            else csv_cell(entry[c].isoformat() if isinstance(entry[c], datetime) else str(entry[c]))
            for c in CSV_COLUMNS
        ]
    )


def _csv_line(values: Sequence[str]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerow(values)
    return out.getvalue()
