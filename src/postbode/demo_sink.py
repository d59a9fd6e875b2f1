"""The demo sink: a local catch-all SMTP server with a page listing what arrived (`postbode demo
sink`), so a newcomer's first delivery succeeds without DNS, a real mailbox or the internet."""

from __future__ import annotations

import asyncio
import email
import email.policy
import html
import itertools
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

import uvicorn
from aiosmtpd.smtp import SMTP, Envelope, Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

KEEP = 500  # messages kept (the oldest are forgotten): a demo, not a mailbox
MAX_MESSAGE_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True)
class Caught:
    number: int
    at: datetime
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes

    @property
    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed

    def summary(self) -> dict[str, Any]:
        msg = self.message
        return {
            "number": self.number,
            "at": self.at.isoformat(),
            "mail_from": self.mail_from,
            "rcpt_tos": list(self.rcpt_tos),
            "from": str(msg.get("From", "")),
            "subject": str(msg.get("Subject", "")),
            "dkim_signed": "DKIM-Signature" in msg,
            "size": len(self.data),
        }


class Catcher:
    """aiosmtpd handler: accepts every message for every recipient and keeps the last KEEP."""

    def __init__(self) -> None:
        self.caught: deque[Caught] = deque(maxlen=KEEP)
        self._numbers = itertools.count(1)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        self.caught.append(
            Caught(
                next(self._numbers),
                datetime.now(UTC),
                envelope.mail_from or "",
                tuple(envelope.rcpt_tos),
                content,
            )
        )
        return "250 2.0.0 Caught by the Postbode demo sink"

    def find(self, number: int) -> Caught | None:
        return next((c for c in self.caught if c.number == number), None)


_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>
body{{font:15px/1.4 system-ui,sans-serif;margin:1.5rem;max-width:70rem}}
table{{border-collapse:collapse;width:100%}}td,th{{text-align:left;padding:.35rem .5rem;
border-bottom:1px solid #ddd;overflow-wrap:anywhere}}pre{{white-space:pre-wrap;
overflow-wrap:anywhere;background:#f6f6f6;padding:1rem}}
</style></head><body>{body}</body></html>"""


def _page(title: str, body: str) -> HTMLResponse:
    return HTMLResponse(
        _PAGE.format(title=html.escape(title), body=body),
        headers={"content-security-policy": "default-src 'none'; style-src 'unsafe-inline'"},
    )


def web_app(catcher: Catcher, smtp_address: str) -> Starlette:
    """The sink's page: what arrived, newest first; each message's headers and text."""

    async def index(request: Request) -> Response:
        rows = "".join(
            "<tr><td>{at}</td><td>{to}</td><td>{frm}</td><td><a href='/messages/{n}'>{subject}"
            "</a></td><td>{dkim}</td></tr>".format(
                at=html.escape(s["at"][:19].replace("T", " ")),
                to=html.escape(", ".join(s["rcpt_tos"])),
                frm=html.escape(s["from"] or s["mail_from"]),
                n=s["number"],
                subject=html.escape(s["subject"] or "(no subject)"),
                dkim="signed" if s["dkim_signed"] else "unsigned",
            )
            for s in (c.summary() for c in reversed(catcher.caught))
        )
        body = (
            f"<h1>Postbode demo sink</h1><p>Every message sent to SMTP {html.escape(smtp_address)}"
            f" lands here (the last {KEEP}). Nothing leaves this machine.</p>"
            + (
                "<table><tr><th>Received (UTC)</th><th>To</th><th>From</th><th>Subject</th>"
                f"<th>DKIM</th></tr>{rows}</table>"
                if rows
                else "<p>Nothing yet.</p>"
            )
        )
        return _page("Postbode demo sink", body)

    async def show(request: Request) -> Response:
        caught = catcher.find(int(request.path_params["number"]))
        if caught is None:
            return _page("Not here", "<p>No such message (the sink keeps the last ones).</p>")
        msg = caught.message
        text_part = msg.get_body(("plain", "html"))
        text = text_part.get_content() if text_part is not None else ""
        headers = "".join(f"{k}: {v}\n" for k, v in msg.items())
        body = (
            f"<p><a href='/'>All messages</a></p><h1>{html.escape(str(msg.get('Subject', '')))}"
            f"</h1><h2>Headers</h2><pre>{html.escape(headers)}</pre>"
            f"<h2>Content</h2><pre>{html.escape(str(text))}</pre>"
        )
        return _page(str(msg.get("Subject", "message")), body)

    async def listing(request: Request) -> Response:
        return JSONResponse([c.summary() for c in reversed(catcher.caught)])

    return Starlette(
        routes=[
            Route("/", index),
            Route("/messages/{number:int}", show),
            Route("/messages.json", listing),
        ]
    )


async def run(smtp_host: str, smtp_port: int, http_host: str, http_port: int) -> None:
    """Serve SMTP and the page until cancelled (Ctrl-C)."""
    catcher = Catcher()
    loop = asyncio.get_running_loop()
    smtp = await loop.create_server(
        lambda: SMTP(
            catcher,
            hostname="demo-sink.postbode.localhost",
            ident="Postbode demo sink",
            data_size_limit=MAX_MESSAGE_BYTES,
            enable_SMTPUTF8=True,
        ),
        smtp_host,
        smtp_port,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            web_app(catcher, f"{smtp_host}:{smtp_port}"),
            host=http_host,
            port=http_port,
            log_level="warning",
        )
    )
    try:
        await server.serve()
    finally:
        smtp.close()
        await smtp.wait_closed()
