"""The tracking endpoints /t/o (open pixel), /t/c (click redirect) and /t/u (unsubscribe), and the
recorder that turns hits into events in group-committed batches."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from html import escape
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import HTMLResponse
from sqlalchemy import Connection, select
from starlette.concurrency import run_in_threadpool
from starlette.routing import Route

from postbode.bounces.suppression import suppress
from postbode.config import Settings
from postbode.events.record import Event, record
from postbode.events.types import EventType
from postbode.privacy.minimise import user_agent_family
from postbode.store.engine import Store
from postbode.store.schema import apps, deliveries, events, messages, suppressions, utcnow
from postbode.tracking import bots, tokens
from postbode.tracking.rewrite import tracking_key
from postbode.tracking.tokens import Token

log = logging.getLogger(__name__)

# A 1x1 transparent GIF (43 bytes).
PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
# RFC 9111 §5.2.2: no cache may keep the pixel or the redirect, so every open and click
# reaches us (and nothing personal lingers in shared caches).
NO_CACHE = {
    "Cache-Control": "no-store, no-cache, must-revalidate, max-age=0, private",
    "Pragma": "no-cache",
    "Expires": "0",
}
MAX_BATCH = 1000  # hits written per transaction at most
MAX_PENDING = 100_000  # hits waiting at most; beyond, hits are dropped (and logged)
MAX_USER_AGENT = 512


@dataclass(frozen=True)
class Hit:
    """One open or click as it arrived, the address already anonymised."""

    kind: Literal["open", "click"]
    token: Token
    user_agent: str
    ip: str | None
    at: datetime


# -- recording -------------------------------------------------------------------------------------


def write_hits(
    conn: Connection, hits: Sequence[Hit], window: float, click_window: float = 0.0
) -> list[Event]:
    """Record `message.opened` / `message.clicked` events for hits (in `conn`'s transaction),
    each judged for bots; returns the events. Hits on deliveries no longer stored are dropped.

    A click on a link the same recipient clicked (and had counted) less than `click_window`
    seconds before is a repeat: recorded as a raw hit (`repeat: true`) that is neither
    counted nor sent to webhooks, so a reload or a double click is one click."""
    ids = {h.token.delivery_id for h in hits}
    found = {
        row.id: row
        for row in conn.execute(
            select(
                deliveries.c.id,
                deliveries.c.app_id,
                deliveries.c.message_id,
                deliveries.c.recipient,
                deliveries.c.status,
                deliveries.c.last_attempt_at,
                messages.c.stream,
                messages.c.tag,
                messages.c.template,
            )
            .join(messages, messages.c.id == deliveries.c.message_id)
            .join(apps, apps.c.id == deliveries.c.app_id)
            # an app that turned tracking off records no hits, even on links sent before
            .where(deliveries.c.id.in_(ids), apps.c.tracking_allowed.is_(True))
        )
    }
    # The first open is the first one by a person: earlier opens by people rule it out.
    opens = {h.token.delivery_id for h in hits if h.kind == "open"}
    opened = (
        {
            row.delivery_id
            for row in conn.execute(
                select(events.c.delivery_id, events.c.data).where(
                    events.c.delivery_id.in_(opens),
                    events.c.type == str(EventType.MESSAGE_OPENED),
                )
            )
            if not (row.data or {}).get("bot")
        }
        if opens
        else set()
    )
    # Links of each delivery clicked lately, to see every link clicked within seconds.
    oldest = min(h.at for h in hits) - timedelta(seconds=bots.ALL_LINKS_SECONDS)
    recent: dict[Any, list[tuple[datetime, int]]] = {}
    multi = {h.token.delivery_id for h in hits if h.kind == "click" and h.token.links > 1}
    if multi:
        for row in conn.execute(
            select(events.c.delivery_id, events.c.created_at, events.c.data).where(
                events.c.delivery_id.in_(multi),
                events.c.type == str(EventType.MESSAGE_CLICKED),
                events.c.created_at >= oldest,
            )
        ):
            link = (row.data or {}).get("link")
            if isinstance(link, int):
                recent.setdefault(row.delivery_id, []).append((row.created_at, link))
    counted_clicks = _counted_clicks(conn, hits, click_window)
    batch: list[Event] = []
    for hit in hits:
        d = found.get(hit.token.delivery_id)
        if d is None:
            continue
        since: float | None = None
        if d.status == "sending":
            since = 0.0  # still being recorded as delivered: as soon as it can be
        elif d.last_attempt_at is not None:
            since = (hit.at - d.last_attempt_at).total_seconds()
        all_links = False
        if hit.kind == "click" and hit.token.links > 1:
            clicks = recent.setdefault(d.id, [])
            clicks.append((hit.at, hit.token.link))
            lately = {
                link
                for at, link in clicks
                if (hit.at - at).total_seconds() <= bots.ALL_LINKS_SECONDS
            }
            all_links = len(lately) >= hit.token.links
        verdict = bots.classify(
            hit.kind, hit.user_agent, hit.ip, since, window, all_links_clicked=all_links
        )
        data: dict[str, Any] = {}
        counted = True
        if hit.kind == "open":
            first = not verdict.bot and d.id not in opened
            if first:
                opened.add(d.id)
            data["first"] = first
        else:
            data.update(url=hit.token.url, link=hit.token.link)
            times = counted_clicks.setdefault((d.id, hit.token.link), [])
            counted = not any(0 <= (hit.at - at).total_seconds() < click_window for at in times)
            if counted:
                times.append(hit.at)
            else:
                data["repeat"] = True
        data.update(
            bot=verdict.bot,
            bot_reason=verdict.reason,
            user_agent=user_agent_family(hit.user_agent),  # judged on all of it, kept coarse
            ip=hit.ip,
        )
        batch.append(
            Event(
                app_id=d.app_id,
                type=EventType.MESSAGE_OPENED if hit.kind == "open" else EventType.MESSAGE_CLICKED,
                stream=d.stream,
                tag=d.tag,
                template=d.template,
                message_id=d.message_id,
                delivery_id=d.id,
                recipient=d.recipient,
                data=data,
                bot=verdict.bot,
                at=hit.at,
                counted=counted,
            )
        )
    record(conn, batch)
    return batch


def _counted_clicks(
    conn: Connection, hits: Sequence[Hit], click_window: float
) -> dict[tuple[Any, int], list[datetime]]:
    """When each (delivery, link) of the click hits was last counted, within the window (the
    store's events, so every process and node sees the same)."""
    clicks = [h for h in hits if h.kind == "click"]
    found: dict[tuple[Any, int], list[datetime]] = {}
    if not clicks or click_window <= 0:
        return found
    since = min(h.at for h in clicks) - timedelta(seconds=click_window)
    for row in conn.execute(
        select(events.c.delivery_id, events.c.created_at, events.c.data).where(
            events.c.delivery_id.in_({h.token.delivery_id for h in clicks}),
            events.c.type == str(EventType.MESSAGE_CLICKED),
            events.c.created_at >= since,
        )
    ):
        data = row.data or {}
        if isinstance(data.get("link"), int) and not data.get("repeat"):
            found.setdefault((row.delivery_id, data["link"]), []).append(row.created_at)
    return found


class HitRecorder:
    """Writes hits after the answer went out, batching concurrent ones into one transaction
    (group commit), so a burst of clicks costs a few commits, not one each. A crash can lose
    the hits of the last few milliseconds: tracking is statistics, not mail."""

    def __init__(self, settings: Settings, store: Store, key: bytes) -> None:
        self.settings = settings
        self.store = store
        self.key = key
        self._pending: list[Hit] = []
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._flusher: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tracking-commit")

    def add(self, hit: Hit) -> None:
        if len(self._pending) >= MAX_PENDING:
            log.warning(
                "tracking backlog full: dropped a %s of %s", hit.kind, hit.token.delivery_id
            )
            return
        self._pending.append(hit)
        self._idle.clear()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_forever(), name="tracking-recorder")
        self._wakeup.set()

    async def flush(self) -> None:
        """Until every hit added so far is written."""
        await self._idle.wait()

    async def _flush_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = self._pending[:MAX_BATCH]
                del self._pending[:MAX_BATCH]
                try:
                    await loop.run_in_executor(self._executor, self._commit, batch)
                except Exception:
                    log.exception("recording %d tracking hits failed", len(batch))
            if not self._pending:
                self._idle.set()

    def _commit(self, batch: list[Hit]) -> None:
        with self.store.write() as conn:
            write_hits(
                conn,
                batch,
                self.settings.tracking_bot_window_seconds,
                self.settings.tracking_click_window_seconds,
            )

    async def close(self) -> None:
        """Write what is pending, then stop."""
        if self._pending:
            await self.flush()
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        self._executor.shutdown(wait=True)


async def _start(app: FastAPI) -> HitRecorder:
    recorder: HitRecorder | None = getattr(app.state, "tracking", None)
    if recorder is None:
        settings: Settings = app.state.settings
        store: Store = app.state.store
        key = await run_in_threadpool(tracking_key, settings, store)
        recorder = getattr(app.state, "tracking", None) or HitRecorder(settings, store, key)
        app.state.tracking = recorder
    return recorder


def _page(title: str, text: str, extra: str = "") -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title></head>"
        '<body style="font-family:sans-serif;max-width:32em;margin:4em auto;padding:0 1em">'
        f"<h1>{escape(title)}</h1><p>{escape(text)}</p>{extra}</body></html>"
    )


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    recorder = await _start(app)
    try:
        yield
    finally:
        await recorder.close()
        app.state.tracking = None


router = APIRouter(tags=["tracking"], include_in_schema=False, lifespan=lifespan)


def _client(request: Request) -> tuple[str, str | None]:
    user_agent = request.headers.get("user-agent", "")[:MAX_USER_AGENT]
    return user_agent, bots.anonymise_ip(request.client.host if request.client else None)


# -- opens and clicks ------------------------------------------------------------------------------
# The two hot paths are bare ASGI endpoints: FastAPI's request and response machinery cost
# several times the work itself (see docs/performance.md).

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_NO_CACHE = [(k.lower().encode(), v.encode()) for k, v in NO_CACHE.items()]
_NOT_FOUND = _page("Link not found", "This link is not valid.").encode()


class _Hits:
    """GET /t/o/{token} (the pixel) or GET|HEAD /t/c/{token} (the redirect), as bare ASGI."""

    def __init__(self, kind: Literal["open", "click"]) -> None:
        self.kind = kind

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = scope["app"]
        recorder: HitRecorder | None = getattr(app.state, "tracking", None)
        if recorder is None:
            recorder = await _start(app)
        found = tokens.decode(scope["path_params"]["token"], recorder.key, self.kind)
        head = scope["method"] == "HEAD"
        if self.kind == "open":
            # The pixel, always (a broken image helps no one); only a genuine token counts.
            status, headers, body = 200, [(b"content-type", b"image/gif")], PIXEL
        else:
            location = _location(found.url) if found is not None and found.url else None
            if found is None or location is None:
                # Not a token we signed: never a redirect (no open redirect).
                found = None
                status, headers = 404, [(b"content-type", b"text/html; charset=utf-8")]
                body = _NOT_FOUND
            else:
                status, headers, body = 302, [(b"location", location.encode("ascii"))], b""
        if found is not None and not head:  # a HEAD is a link check, not a click
            recorder.add(Hit(self.kind, found, *_client_of(scope), utcnow()))
        headers += [(b"content-length", str(len(body)).encode()), *_NO_CACHE]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else body})


def _client_of(scope: Scope) -> tuple[str, str | None]:
    user_agent = b""
    for name, value in scope["headers"]:
        if name == b"user-agent":
            user_agent = value
            break
    client = scope.get("client")
    ip = bots.anonymise_ip(client[0]) if client else None
    return user_agent[:MAX_USER_AGENT].decode("latin-1"), ip


_OPEN, _CLICK = _Hits("open"), _Hits("click")
router.routes.append(Route("/t/o/{token}", _OPEN, methods=["GET", "HEAD"]))
router.routes.append(Route("/t/c/{token}", _CLICK, methods=["GET", "HEAD"]))


def fast_path(app: FastAPI) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """`app` with GET / HEAD of /t/o/{token} and /t/c/{token} answered before FastAPI's
    router and middleware, which cost more than the redirect itself; everything else (the
    lifespan too) goes to `app`. For the process serving tracking links."""

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if (
            scope["type"] == "http"
            and scope["method"] in ("GET", "HEAD")
            and path[:5] in ("/t/o/", "/t/c/")
            and "/" not in path[5:]
        ):
            scope["app"] = app
            scope["path_params"] = {"token": path[5:]}
            await (_OPEN if path[3] == "o" else _CLICK)(scope, receive, send)
            return
        await app(scope, receive, send)

    return serve


def _location(url: str) -> str | None:
    """The URL as a Location header carries it (RFC 9110 §10.2.2: a URI, so non-ASCII is
    percent-encoded and the host IDNA-encoded); None for anything but http(s)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        netloc = parts.netloc
        if not host.isascii():
            netloc = netloc.replace(host, host.encode("idna").decode("ascii"))
    except (ValueError, UnicodeError):
        return None
    if parts.scheme.lower() not in ("http", "https") or not netloc:
        return None
    safe = "/?#[]@!$&'()*+,;=:%~"
    location = urlunsplit(
        (
            parts.scheme,
            netloc,
            quote(parts.path, safe=safe),
            quote(parts.query, safe=safe),
            quote(parts.fragment, safe=safe),
        )
    )
    # A header value holds no control characters (RFC 9110 §5.5): no header injection.
    return location if location.isascii() and location.isprintable() else None


# -- unsubscribe (RFC 8058) ------------------------------------------------------------------------


def unsubscribe(
    store: Store, token: Token, user_agent: str, ip: str | None, source: str
) -> bool | None:
    """Suppress the delivery's address for the broadcast stream and record
    `message.unsubscribed` (once); None when the delivery is not stored."""
    with store.write() as conn:
        d = conn.execute(
            select(
                deliveries.c.id,
                deliveries.c.app_id,
                deliveries.c.message_id,
                deliveries.c.recipient,
                messages.c.stream,
                messages.c.tag,
                messages.c.template,
            )
            .join(messages, messages.c.id == deliveries.c.message_id)
            .where(deliveries.c.id == token.delivery_id)
        ).first()
        if d is None:
            return None
        already = conn.execute(
            select(suppressions.c.id).where(
                suppressions.c.app_id == d.app_id,
                suppressions.c.email == d.recipient.lower(),
                suppressions.c.stream == "broadcast",
            )
        ).first()
        if already is not None:
            return False
        suppress(
            conn,
            d.app_id,
            d.recipient,
            reason="unsubscribed",
            source="unsubscribe",
            stream="broadcast",
            message_id=d.message_id,
        )
        record(
            conn,
            Event(
                app_id=d.app_id,
                type=EventType.MESSAGE_UNSUBSCRIBED,
                stream=d.stream,
                tag=d.tag,
                template=d.template,
                message_id=d.message_id,
                delivery_id=d.id,
                recipient=d.recipient,
                # what an opt-out needs: which delivery and how (no IP, no user agent)
                data={"source": source},
            ),
        )
    return True


@router.get("/t/u/{token}")
async def unsubscribe_page(token: str, request: Request) -> Response:
    """A confirmation page with a POST form: a GET never unsubscribes, since link scanners
    fetch every URL they see (RFC 8058 §1)."""
    recorder = await _start(request.app)
    if tokens.decode(token, recorder.key, "unsubscribe") is None:
        return HTMLResponse(_page("Link not found", "This link is not valid."), 404, NO_CACHE)
    form = (
        f'<form method="post" action="{escape(str(request.url.path))}">'
        '<input type="hidden" name="confirm" value="1">'
        '<button type="submit">Unsubscribe</button></form>'
    )
    return HTMLResponse(
        _page("Unsubscribe", "Stop receiving these e-mails?", form), headers=NO_CACHE
    )


@router.post("/t/u/{token}")
async def unsubscribe_post(token: str, request: Request) -> Response:
    """One-click unsubscribe (RFC 8058 §3.2: a POST with `List-Unsubscribe=One-Click`) or
    the confirmation form's POST; either unsubscribes at once, and again is harmless."""
    recorder = await _start(request.app)
    found = tokens.decode(token, recorder.key, "unsubscribe")
    if found is None:
        return HTMLResponse(_page("Link not found", "This link is not valid."), 404, NO_CACHE)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > 1024:
            break
    source = "one-click" if b"List-Unsubscribe=One-Click" in body else "page"
    user_agent, ip = _client(request)
    done = await run_in_threadpool(unsubscribe, recorder.store, found, user_agent, ip, source)
    if done is None:
        return HTMLResponse(_page("Link not found", "This link is not valid."), 404, NO_CACHE)
    return HTMLResponse(
        _page("Unsubscribed", "You will not receive these e-mails any more."), headers=NO_CACHE
    )
