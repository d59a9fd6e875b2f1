"""The HTTP application: API, web UI, health and metrics, on one FastAPI app."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from postbode import __version__
from postbode.abuse.content import ContentScanner
from postbode.config import Settings
from postbode.ingest.accept import Acceptor
from postbode.metrics import render as render_metrics
from postbode.store.engine import Store
from postbode.tracking.endpoints import fast_path
from postbode.tracking.endpoints import router as tracking_router
from postbode.web.api.abtests import router as abtests_router
from postbode.web.api.compat import mailgun, postmark, sendgrid
from postbode.web.api.docs import router as docs_router
from postbode.web.api.events import router as events_router
from postbode.web.api.manage import router as manage_router
from postbode.web.api.messages import SEND_PATH, body_limit
from postbode.web.api.messages import fast_path as send_fast_path
from postbode.web.api.messages import router as messages_router
from postbode.web.api.privacy import router as privacy_router
from postbode.web.api.queue import router as queue_router
from postbode.web.api.routes import inbound_router, links_router
from postbode.web.api.routes import router as routes_router
from postbode.web.api.stats import router as stats_router
from postbode.web.api.suppressions import MAX_IMPORT_BYTES
from postbode.web.api.suppressions import router as suppressions_router
from postbode.web.api.templates import router as templates_router
from postbode.web.api.webhooks import router as webhooks_router
from postbode.web.errors import install_error_handlers
from postbode.web.limits import BodyLimit
from postbode.web.timing import ServerTiming
from postbode.web.ui import STATIC, static_files
from postbode.web.ui import router as ui_router
from postbode.web.ui.core import MAX_UPLOAD_BYTES, missing_page

log = logging.getLogger(__name__)


def create_app(settings: Settings, store: Store, acceptor: Acceptor | None = None) -> FastAPI:
    """The ASGI app serving Postbode's HTTP side from `store`."""
    own_acceptor = acceptor is None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if own_acceptor:  # one given by the caller is the caller's to close
            await app.state.acceptor.close()

    app = FastAPI(
        lifespan=lifespan,
        title="Postbode",
        version=__version__,
        openapi_url="/api/openapi.json",
        docs_url=None,  # web/api/docs.py serves the vendored Swagger UI there
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.store = store
    app.state.acceptor = acceptor or Acceptor(
        store,
        settings.smtp_hostname,
        allow_unverified=settings.allow_unverified_domains,
        scanner=ContentScanner.from_settings(settings),
    )

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> JSONResponse:
        """200 while the store takes writes (a real, small write each time); 503 when the
        disk is full, the database locked or down. The reason goes to the log, not out."""
        try:
            await run_in_threadpool(store.probe_write)
        except Exception as exc:  # the store is down: say so, don't crash the probe
            log.warning("health probe: the store takes no writes: %s", exc)
            return JSONResponse(
                {"status": "error", "store": "not writable", "version": __version__},
                status_code=503,
            )
        return JSONResponse({"status": "ok", "store": "writable", "version": __version__})

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        page = await run_in_threadpool(render_metrics, store)
        return Response(page, media_type=CONTENT_TYPE_LATEST)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        """Browsers ask for it whatever the page links: the same icon as /static/favicon.svg."""
        return FileResponse(
            STATIC / "favicon.svg",
            media_type="image/svg+xml",
            headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"},
        )

    app.include_router(messages_router)
    app.include_router(suppressions_router)
    app.include_router(events_router)
    app.include_router(webhooks_router)
    app.include_router(tracking_router)
    app.include_router(queue_router)
    app.include_router(stats_router)
    app.include_router(manage_router)
    app.include_router(docs_router)
    app.include_router(postmark.router)
    app.include_router(postmark.root_router)
    app.include_router(sendgrid.router)
    app.include_router(mailgun.router)
    app.include_router(privacy_router)
    app.include_router(routes_router)
    app.include_router(inbound_router)
    app.include_router(links_router)
    app.include_router(templates_router)
    app.include_router(abtests_router)
    app.include_router(ui_router)
    app.mount("/static", static_files(), name="static")
    install_error_handlers(app, missing_page)
    app.add_middleware(BodyLimit, default=settings.http_max_body_bytes, limits=_limits(settings))
    app.add_middleware(ServerTiming)
    return app


def _limits(settings: Settings) -> dict[str, int]:
    """Paths whose bodies may be larger than `http_max_body_bytes`: the send API, uploads."""
    return {
        SEND_PATH: body_limit(settings),
        SEND_PATH + "/batch": body_limit(settings),
        "/api/v1/suppressions/import": MAX_IMPORT_BYTES,
        "/suppressions/import": MAX_UPLOAD_BYTES,
        # The compatible send APIs take messages as large as the native one.
        **dict.fromkeys(compat_send_paths(), body_limit(settings)),
    }


def compat_send_paths() -> list[str]:
    """The compatible APIs' send paths (Mailgun's names its domain: a `*` prefix pattern)."""
    return [
        "/email",
        "/email/batch",
        "/compat/postmark/email",
        "/compat/postmark/email/batch",
        "/compat/sendgrid/v3/mail/send",
        "/compat/mailgun/v3/*",
    ]


def serving_app(
    settings: Settings, store: Store, acceptor: Acceptor
) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The ASGI app a Postbode process serves: `create_app` with its hot paths (tracking
    links, POST /api/v1/messages) answered before FastAPI's router."""
    app = create_app(settings, store, acceptor)
    # The limit again in front of the hot paths, which answer before FastAPI's middleware.
    return BodyLimit(
        send_fast_path(app, fast_path(app)), settings.http_max_body_bytes, _limits(settings)
    )
