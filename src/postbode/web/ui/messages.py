"""The message log (search, CSV export) and one message in full: recipients, timeline, attempts
with transcripts, bounce, headers, sandboxed HTML preview, raw source; retry, cancel, release,
suppress."""

from __future__ import annotations

import csv
import email
import email.policy
import io
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage, Message
from typing import Any, cast

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from postbode.bounces import suppression
from postbode.bounces.classify import CATEGORIES
from postbode.delivery import manage
from postbode.privacy.audit import EXPORT_CSV, VIEW_MESSAGE, VIEW_RAW
from postbode.store.engine import Store
from postbode.store.schema import DELIVERY_STATUSES, deliveries, messages, raw_messages
from postbode.web.api.messages import load_message
from postbode.web.errors import ApiError
from postbode.web.ui import search
from postbode.web.ui.core import (
    RANGES,
    CanChange,
    SignedIn,
    UiError,
    UiRoute,
    Viewer,
    audit,
    audit_now,
    parse_time,
    redirect,
    render,
    store_of,
    templates,
    url,
)

router = APIRouter(route_class=UiRoute, include_in_schema=False)

FILTERS = (
    "recipient",
    "sender",
    "subject",
    "tag",
    "status",
    "message_id",
    "metadata",
    "reply",
    "category",
    "mx",
)
MAX_PREVIEW_HEADERS = 200

PREVIEW_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:{remote}; "
    "font-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'self'; sandbox"
)
RAW_CSP = "default-src 'none'; sandbox"


# -- the log ----------------------------------------------------------------------------------


def _query(request: Request, viewer: Viewer) -> tuple[search.MessageQuery, dict[str, str]]:
    """The search of this request, and the form values to show again."""
    params = request.query_params
    form = {name: params.get(name, "").strip()[:998] for name in (*FILTERS, "since", "until")}
    form["range"] = params.get("range", "")
    since, until = parse_time(form["since"]), parse_time(form["until"])
    if form["range"] in RANGES and since is None:
        since = datetime.now(UTC) - RANGES[form["range"]]
    try:
        query = search.MessageQuery(
            app_ids=tuple(viewer.app_ids),
            recipient=form["recipient"] or None,
            sender=form["sender"] or None,
            subject=form["subject"] or None,
            tag=form["tag"] or None,
            status=form["status"] or None,
            message_id=form["message_id"] or None,
            metadata=search.parse_metadata(form["metadata"]),
            since=since,
            until=until,
            reply=form["reply"] or None,
            category=form["category"] or None,
            mx=form["mx"] or None,
        )
        search.check(query)
    except search.SearchError as exc:
        raise UiError(400, f"{exc.field}: {exc.message}") from None
    return query, form


@router.get("/messages")
async def message_log(
    request: Request,
    viewer: SignedIn,
    cursor: str | None = None,
    newer: str | None = None,
    at: str | None = None,
) -> Response:
    query, form = _query(request, viewer)
    try:
        after = search.Cursor.decode(cursor)
        before = search.Cursor.decode(newer)
    except search.SearchError as exc:
        raise UiError(400, exc.message) from None
    jump = parse_time(at or "")
    if at and jump is None:
        raise UiError(400, "at: not a date and time (YYYY-MM-DDTHH:MM, UTC)")
    if jump is not None and after is None and before is None:
        after = search.Cursor.at(jump)
    store = store_of(request)

    def run() -> tuple[search.Page, tuple[int, bool]]:
        with store.read() as conn:
            found = search.search(conn, query, cursor=after, newer_than=before)
            return found, search.count_matches(conn, query)

    page, (count, count_limited) = await run_in_threadpool(run)
    filters = {k: v for k, v in form.items() if v}
    names = {a.id: a.name for a in viewer.apps}
    return render(
        request,
        "messages.html",
        {
            "page": page,
            "form": form,
            "filters": filters,
            "statuses": DELIVERY_STATUSES,
            "ranges": list(RANGES),
            "app_names": names,
            "next_url": url("/messages", viewer, **filters, cursor=page.next_cursor.encode())
            if page.next_cursor
            else None,
            "newer_url": url("/messages", viewer, **filters, newer=page.newer_cursor.encode())
            if page.newer_cursor
            else None,
            "count": count,
            "count_limited": count_limited,
            "scan_window": search.SCAN_WINDOW,
            "count_bound": search.COUNT_BOUND,
            "categories": CATEGORIES,
            "at": at or "",
            "export_url": url("/messages/export.csv", viewer, **filters),
            "scanned": query.scanned_filters(),
        },
    )


@router.get("/messages/export.csv")
async def export_messages(request: Request, viewer: SignedIn) -> Response:
    query, form = _query(request, viewer)
    store = store_of(request)
    filters = {k: v for k, v in form.items() if v}
    await run_in_threadpool(audit_now, store, viewer, request, EXPORT_CSV, "messages", filters)

    def lines() -> Iterator[str]:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(search.CSV_COLUMNS)
        for row in search.iterate(store, query):
            writer.writerows(search.csv_rows(row))
            if out.tell() > 64 * 1024:
                yield out.getvalue()
                out.seek(0)
                out.truncate()
        yield out.getvalue()

    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return StreamingResponse(
        lines(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="messages-{stamp}.csv"'},
    )


# -- one message ------------------------------------------------------------------------------


@dataclass
class Parsed:
    """What the detail page shows of a message's source."""

    headers: list[tuple[str, str]] = field(default_factory=list)
    text: str | None = None
    html: str | None = None
    attachments: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


def _part_text(part: Message) -> str:
    try:
        content = part.get_content()  # type: ignore[attr-defined]
        if isinstance(content, str):
            return content
    except (LookupError, ValueError, AttributeError, AssertionError):
        pass
    payload = part.get_payload(decode=True)
    data = payload if isinstance(payload, bytes) else b""
    charset = part.get_content_charset() or "utf-8"
    try:
        return data.decode(charset, "replace")
    except LookupError:
        return data.decode("utf-8", "replace")


def parse_source(raw: bytes) -> Parsed:
    """Headers, text and HTML parts and the attachments of a raw message; a message the
    parser cannot read is shown as far as it went, with the reason."""
    parsed = Parsed()
    try:
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        for name, value in list(msg.items())[:MAX_PREVIEW_HEADERS]:
            try:
                parsed.headers.append((name, str(value)))
            except Exception:  # a header the modern parser cannot render: show it raw
                parsed.headers.append((name, repr(value)))
        assert isinstance(msg, EmailMessage)
        html = msg.get_body(preferencelist=("html",))
        text = msg.get_body(preferencelist=("plain",))
        parsed.html = _part_text(html) if html is not None else None
        parsed.text = _part_text(text) if text is not None else None
        for part in msg.walk():
            if part.is_multipart() or part in (html, text):
                continue
            filename = part.get_filename()
            if filename or part.get_content_disposition() in ("attachment", "inline"):
                payload = part.get_payload(decode=True)
                parsed.attachments.append(
                    {
                        "filename": filename or "(no name)",
                        "content_type": part.get_content_type(),
                        "size": len(payload) if isinstance(payload, bytes) else 0,
                        "disposition": part.get_content_disposition() or "",
                    }
                )
    except Exception as exc:  # hostile or broken MIME must not break the page
        parsed.error = f"{type(exc).__name__}: {exc}"[:500]
    return parsed


def _owned_app(store: Store, viewer: Viewer, message_id: uuid.UUID) -> int:
    """The app of a message in the viewer's organization; 404 page otherwise."""
    with store.read() as conn:
        app_id = conn.execute(select(messages.c.app_id).where(messages.c.id == message_id)).scalar()
    if app_id is None or viewer.app_by_id(int(app_id)) is None:
        raise UiError(404, f"No message {message_id}.")
    return int(app_id)


def _raw(store: Store, message_id: uuid.UUID) -> bytes | None:
    with store.read() as conn:
        row = conn.execute(
            select(raw_messages.c.data).where(raw_messages.c.message_id == message_id)
        ).first()
    return zlib.decompress(row.data) if row is not None else None


def _detail(store: Store, viewer: Viewer, message_id: uuid.UUID) -> dict[str, Any]:
    app_id = _owned_app(store, viewer, message_id)
    with store.read() as conn:
        try:
            detail = load_message(conn, app_id, message_id)
        except ApiError:
            raise UiError(404, f"No message {message_id}.") from None
        purged = conn.execute(
            select(messages.c.raw_purged_at).where(messages.c.id == message_id)
        ).scalar()
    raw = _raw(store, message_id)
    detail["app_id"] = app_id
    detail["raw_purged_at"] = purged
    detail["content_score"] = detail.get("content")  # rspamd's verdict, if scanned
    detail["content"] = parse_source(raw) if raw is not None else None
    detail["bounces"] = [e for e in detail["events"] if e["type"] == "delivery.bounced"]
    by_delivery: dict[Any, list[dict[str, Any]]] = {}
    for attempt in detail["attempts"]:
        by_delivery.setdefault(attempt["delivery_id"], []).append(attempt)
    detail["attempts_by_delivery"] = by_delivery
    detail["attempt_groups"] = group_attempts(detail["attempts"])
    return detail


@dataclass
class AttemptGroup:
    """Consecutive attempts of one delivery that went the same way (e.g. 40 greylistings),
    shown as one: the newest in full, with the count and the time span."""

    attempts: list[dict[str, Any]]  # newest first

    @property
    def newest(self) -> dict[str, Any]:
        return self.attempts[0]

    @property
    def count(self) -> int:
        return len(self.attempts)

    @property
    def first_at(self) -> datetime:
        started: datetime = self.attempts[-1]["started_at"]
        return started

    @property
    def last_at(self) -> datetime:
        started: datetime = self.attempts[0]["started_at"]
        return started


def _same_way(a: dict[str, Any]) -> tuple[Any, ...]:
    return (
        a["delivery_id"],
        a["outcome"],
        a["mx_host"],
        a["reply_code"],
        a["enhanced_status"],
        (a["reply_text"] or "").strip().lower(),
    )


def group_attempts(attempts: list[dict[str, Any]]) -> list[AttemptGroup]:
    """Attempts newest first, consecutive ones of a delivery with the same outcome, MX host
    and reply collapsed into one group (`attempts` as load_message gives them, oldest first)."""
    groups: list[AttemptGroup] = []
    last: dict[Any, AttemptGroup] = {}  # per delivery: its newest group so far
    for attempt in sorted(attempts, key=lambda a: a["started_at"], reverse=True):
        # Walking back in time: an attempt joins its delivery's group while it went the same way.
        group = last.get(attempt["delivery_id"])
        if group is not None and _same_way(group.attempts[-1]) == _same_way(attempt):
            group.attempts.append(attempt)
            continue
        group = AttemptGroup([attempt])
        last[attempt["delivery_id"]] = group
        groups.append(group)
    return groups


def transcript_lines(text: str | None) -> list[tuple[str, bool]]:
    """The transcript's lines, each with whether it is the server refusing (a 4xx or 5xx
    reply: RFC 5321 §4.2.1), to be highlighted."""
    lines = []
    for line in (text or "").splitlines():
        _, sep, said = line.partition(" S: ")
        code = said.lstrip()[:1]
        lines.append((line, bool(sep) and code in ("4", "5")))
    return lines


templates.globals["transcript_lines"] = transcript_lines


@router.get("/messages/{message_id}")
async def message_detail(request: Request, viewer: SignedIn, message_id: uuid.UUID) -> Response:
    store = store_of(request)
    detail = await run_in_threadpool(_detail, store, viewer, message_id)
    viewer.app = viewer.app_by_id(detail["app_id"])
    # content, headers, attempts and transcripts are personal data: who looked is recorded
    app_name = viewer.app.name if viewer.app else ""
    await run_in_threadpool(
        audit_now, store, viewer, request, VIEW_MESSAGE, str(message_id), {"app": app_name}
    )
    return render(
        request,
        "message.html",
        {
            "m": detail,
            "actions": manage.ACTIONS,
            "streams": suppression.STREAMS,
            "remote": request.query_params.get("remote") == "1",
        },
    )


@router.get("/messages/{message_id}/preview")
async def message_preview(request: Request, viewer: SignedIn, message_id: uuid.UUID) -> Response:
    """The HTML part, for the page's sandboxed iframe: no scripts, no plugins, no forms, no
    same-origin; remote images only after the user asks (`?remote=1`)."""
    store = store_of(request)

    def load() -> str | None:
        _owned_app(store, viewer, message_id)
        raw = _raw(store, message_id)
        return parse_source(raw).html if raw is not None else None

    html = await run_in_threadpool(load)
    remote = request.query_params.get("remote") == "1"
    # A target-only <base>: links open nowhere (the sandbox allows no popups) instead of
    # navigating the frame to a sender's site.
    body = '<!doctype html><base target="_blank">' + (
        html or "<p>This message has no HTML part.</p>"
    )
    return Response(
        body,
        media_type="text/html; charset=utf-8",
        headers={
            "Content-Security-Policy": PREVIEW_CSP.format(remote=" https: http:" if remote else ""),
            "X-Frame-Options": "SAMEORIGIN",
            "Referrer-Policy": "no-referrer",
        },
    )


@router.get("/messages/{message_id}/raw")
async def message_raw(request: Request, viewer: SignedIn, message_id: uuid.UUID) -> Response:
    store = store_of(request)

    def load() -> bytes | None:
        _owned_app(store, viewer, message_id)
        return _raw(store, message_id)

    raw = await run_in_threadpool(load)
    if raw is None:
        raise UiError(404, "The raw source of this message was purged by the retention policy.")
    await run_in_threadpool(audit_now, store, viewer, request, VIEW_RAW, str(message_id))
    return Response(
        raw,
        media_type="message/rfc822",
        headers={
            "Content-Disposition": f'attachment; filename="{message_id}.eml"',
            "Content-Security-Policy": RAW_CSP,
        },
    )


@router.post("/messages/{message_id}/deliveries/{delivery_id}/{action}")
async def change_delivery(
    request: Request,
    viewer: CanChange,
    message_id: uuid.UUID,
    delivery_id: uuid.UUID,
    action: str,
) -> Response:
    if action not in manage.ACTIONS:
        raise UiError(404, f"No action {action!r}.")
    act = cast(manage.ActionName, action)
    store = store_of(request)
    app_id = await run_in_threadpool(_owned_app, store, viewer, message_id)
    back = url(f"/messages/{message_id}", None)
    try:
        before = await run_in_threadpool(manage.get_delivery, store, app_id, delivery_id)
        if before["message_id"] != message_id:
            raise manage.NotFound(f"no delivery {delivery_id}")
        await run_in_threadpool(
            manage.change_one,
            store,
            app_id,
            delivery_id,
            act,
            by=viewer.email,
        )
    except manage.ManageError as exc:
        return redirect(request, back, exc.message, "error")
    await run_in_threadpool(
        audit_now,
        store,
        viewer,
        request,
        f"delivery.{action}",
        str(delivery_id),
        {
            "recipient": before["recipient"],
            "message_id": str(message_id),
            "previous_status": before["status"],
        },
    )
    verb = {"retry": "queued for a retry now", "cancel": "cancelled", "release": "released"}
    return redirect(request, back, f"Delivery to {before['recipient']} {verb[action]}.")


@router.post("/messages/{message_id}/cancel")
async def cancel_message(request: Request, viewer: CanChange, message_id: uuid.UUID) -> Response:
    """Every delivery of the message not sent yet, cancelled (as POST
    /api/v1/messages/{id}/cancel)."""
    store = store_of(request)
    app_id = await run_in_threadpool(_owned_app, store, viewer, message_id)
    back = url(f"/messages/{message_id}", None)

    def run() -> int:
        changed = manage.cancel_message(store, app_id, message_id, by=viewer.email)
        with store.write() as conn:
            audit(conn, viewer, request, "message.cancel", str(message_id), {"changed": changed})
        return changed

    changed = await run_in_threadpool(run)
    if not changed:
        return redirect(request, back, "Nothing to cancel: every delivery was sent or ended.")
    noun = "delivery" if changed == 1 else "deliveries"
    return redirect(request, back, f"Message cancelled: {changed} {noun} will not be sent.")


@router.post("/messages/{message_id}/suppress")
async def suppress_recipient(
    request: Request, viewer: CanChange, message_id: uuid.UUID
) -> Response:
    form = await request.form()
    wanted = str(form.get("email", ""))
    stream = str(form.get("stream", "all"))
    store = store_of(request)
    app_id = await run_in_threadpool(_owned_app, store, viewer, message_id)
    back = url(f"/messages/{message_id}", None)
    try:
        entry = suppression.make_entry(wanted, "manual", stream)
    except suppression.SuppressionError as exc:
        return redirect(request, back, exc.message, "error")

    def run() -> bool:
        with store.read() as conn:
            recipients = {
                str(r).lower()
                for r in conn.execute(
                    select(deliveries.c.recipient).where(deliveries.c.message_id == message_id)
                ).scalars()
            }
        if entry.email not in recipients:
            raise UiError(422, "Only a recipient of this message can be suppressed from here.")
        with store.write() as conn:
            changed = suppression.suppress(
                conn,
                app_id,
                entry.email,
                reason="manual",
                source="manual",
                stream=entry.stream,
                message_id=message_id,
                detail=f"added from message {message_id} by {viewer.email}",
            )
            audit(
                conn,
                viewer,
                request,
                "suppression.add",
                entry.email,
                {"stream": entry.stream, "app_id": app_id, "message_id": str(message_id)},
            )
        return changed

    changed = await run_in_threadpool(run)
    note = "is now suppressed" if changed else "was already suppressed"
    return redirect(request, back, f"{entry.email} {note} ({entry.stream}).")
