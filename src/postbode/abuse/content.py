"""Content scoring with rspamd: a message's score and symbols from rspamd's HTTP /checkv2, and
what Postbode does with them — accept, hold (with the symbols shown) or refuse."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from postbode.config import Settings
from postbode.metrics import CONTENT_SCAN_SECONDS, CONTENT_SCANS

if TYPE_CHECKING:
    import httpx  # loaded when a scan is made: worker processes import this module, never scan

__all__ = [
    "HOLD_PREFIX",
    "ContentScanner",
    "ScanUnavailable",
    "Symbol",
    "Thresholds",
    "Verdict",
    "hold_text",
    "judge",
    "parse_verdict",
    "refuse_text",
]

log = logging.getLogger(__name__)

# A held delivery's last reply and `delivery.held` reason start with this: the queue shows it,
# and an app's release (abuse/release.py) leaves these to be released one by one.
HOLD_PREFIX = "content score"
MAX_SYMBOLS = 60  # symbols kept per message, the highest-scoring first
MAX_OPTIONS = 8  # options kept per symbol
MAX_OPTION_CHARS = 200
MAX_REPLY_BYTES = 1024 * 1024  # rspamd's answer is a few KB; anything larger is not one
SHOWN_SYMBOLS = 5  # in an SMTP reply or hold reason
_SYMBOL_NAME = re.compile(r"[^A-Za-z0-9_.-]")


class ScanUnavailable(Exception):
    """rspamd did not answer (or answered nonsense) and the scanner does not fail open."""


@dataclass(frozen=True)
class Thresholds:
    """At or above `hold` a message is held; at or above `reject` it is refused."""

    hold: float = 6.0
    reject: float = 15.0


@dataclass(frozen=True)
class Symbol:
    name: str
    score: float
    options: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "score": self.score, "options": list(self.options)}


@dataclass(frozen=True)
class Verdict:
    """rspamd's answer about one message: its score, its own action and the symbols that
    fired (highest score first)."""

    score: float
    action: str
    symbols: tuple[Symbol, ...]

    def symbols_json(self) -> list[dict[str, Any]]:
        return [s.as_json() for s in self.symbols]


# -- pure: reading rspamd's answer and judging it ----------------------------------------------


def _number(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) else 0.0


def parse_verdict(data: Any) -> Verdict:
    """A Verdict from /checkv2's JSON (bounded: names cleaned, options cut). Raises
    ValueError for an answer without a score."""
    if not isinstance(data, dict) or "score" not in data:
        raise ValueError("rspamd's answer has no score")
    symbols: list[Symbol] = []
    raw_symbols = data.get("symbols") or {}
    if isinstance(raw_symbols, dict):
        for key, value in raw_symbols.items():
            value = value if isinstance(value, dict) else {}
            name = _SYMBOL_NAME.sub("", str(value.get("name") or key))[:100]
            if not name:
                continue
            options = value.get("options") or []
            if not isinstance(options, list):
                options = [options]
            symbols.append(
                Symbol(
                    name,
                    round(_number(value.get("score")), 3),
                    tuple(str(o)[:MAX_OPTION_CHARS] for o in options[:MAX_OPTIONS]),
                )
            )
    symbols.sort(key=lambda s: (-s.score, s.name))
    return Verdict(
        round(_number(data.get("score")), 3),
        str(data.get("action") or "")[:40],
        tuple(symbols[:MAX_SYMBOLS]),
    )


def judge(score: float, t: Thresholds) -> str:
    """`refuse`, `hold` or `pass`."""
    if score >= t.reject:
        return "refuse"
    if score >= t.hold:
        return "hold"
    return "pass"


def named(verdict: Verdict, limit: int = SHOWN_SYMBOLS) -> str:
    """The symbols that pushed the score up, by name and score (no options: those quote the
    message, and this text goes into SMTP replies and logs)."""
    shown = [s for s in verdict.symbols if s.score > 0][:limit]
    if not shown:  # GTUBE and the like score through the action, not a symbol
        shown = list(verdict.symbols[:1])
    return ", ".join(f"{s.name} {s.score:g}" for s in shown) or "no symbols"


def hold_text(verdict: Verdict, t: Thresholds) -> str:
    """A content-held delivery's reason (queue, message page, `delivery.held`)."""
    return f"{HOLD_PREFIX} {verdict.score:g} (hold at {t.hold:g}): {named(verdict)}"


def refuse_text(verdict: Verdict, t: Thresholds) -> str:
    """The refusal's text after `550 5.7.1` / in the API's JSON error."""
    return (
        f"message refused for its content: score {verdict.score:g} "
        f"(refused at {t.reject:g}): {named(verdict)}"
    )


def figures(verdict: Verdict, t: Thresholds, outcome: str, **more: Any) -> dict[str, Any]:
    """An `app.alert` of kind `content`: what was decided about which message, and why."""
    return {
        "outcome": outcome,  # held | refused
        "score": verdict.score,
        "threshold": t.hold if outcome == "held" else t.reject,
        "symbols": named(verdict),
        **more,
    }


# -- I/O: asking rspamd -------------------------------------------------------------------------


class ContentScanner:
    """Asks rspamd's /checkv2 about messages, with a bounded wait. One per process role (its
    HTTP client keeps connections to rspamd open); judging is the caller's."""

    def __init__(
        self,
        url: str,
        thresholds: Thresholds,
        *,
        timeout: float = 5.0,
        fail_open: bool = True,
        hostname: str = "",
    ) -> None:
        self.url = url.rstrip("/") + "/checkv2"
        self.thresholds = thresholds
        self.timeout = timeout
        self.fail_open = fail_open
        self.hostname = hostname
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ContentScanner | None:
        """The scanner POSTBODE_RSPAMD_URL names, or None when it is unset (nothing scanned)."""
        if not settings.rspamd_url:
            return None
        return cls(
            settings.rspamd_url,
            Thresholds(settings.rspamd_hold_score, settings.rspamd_reject_score),
            timeout=settings.rspamd_timeout,
            fail_open=settings.rspamd_fail_open,
            hostname=settings.smtp_hostname,
        )

    def _client_here(self) -> httpx.AsyncClient:
        import httpx

        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            # A client's connections belong to one loop (tests run several loops in turn).
            self._client = httpx.AsyncClient(timeout=self.timeout, trust_env=False)
            self._loop = loop
        return self._client

    async def scan(
        self,
        raw: bytes,
        *,
        direction: str,
        ip: str | None,
        mail_from: str,
        rcpts: Sequence[str],
        helo: str | None = None,
        user: str | None = None,
        queue_id: str | None = None,
    ) -> Verdict | None:
        """rspamd's verdict on `raw`; None when rspamd did not answer in time or sensibly and
        the scanner fails open (logged, counted as `error`). Raises ScanUnavailable when it
        does not fail open."""
        # rspamd's HTTP protocol: the envelope and connection in request headers.
        headers: list[tuple[str, str]] = [("From", mail_from or "<>")]
        headers += [("Rcpt", r) for r in rcpts]
        if ip:
            headers.append(("IP", ip))
        if helo:
            headers.append(("Helo", helo))
        if user:  # an authenticated submission: rspamd skips the checks meant for inbound mail
            headers.append(("User", user))
        if queue_id:
            headers.append(("Queue-Id", queue_id))
        if self.hostname:
            headers.append(("MTA-Name", self.hostname))
        import httpx

        started = time.perf_counter()
        try:
            reply = await asyncio.wait_for(
                self._client_here().post(self.url, content=raw, headers=headers),
                self.timeout,
            )
            reply.raise_for_status()
            if len(reply.content) > MAX_REPLY_BYTES:
                raise ValueError(f"an answer of {len(reply.content)} bytes")
            verdict = parse_verdict(json.loads(reply.content))
        except (httpx.HTTPError, TimeoutError, ValueError) as exc:
            CONTENT_SCANS.labels(direction, "error").inc()
            what = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
            if not self.fail_open:
                log.warning("content scan: rspamd at %s failed (%s): answered 451", self.url, what)
                raise ScanUnavailable(what) from None
            log.warning(
                "content scan: rspamd at %s failed (%s); message %s accepted unscored",
                self.url,
                what,
                queue_id or "",
            )
            return None
        finally:
            CONTENT_SCAN_SECONDS.observe(time.perf_counter() - started)
        outcome = judge(verdict.score, self.thresholds)
        CONTENT_SCANS.labels(
            direction, {"pass": "clean", "hold": "held", "refuse": "refused"}[outcome]
        ).inc()
        return verdict

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            # RuntimeError: its loop is gone, and nothing is left open to close
            with contextlib.suppress(RuntimeError):
                await client.aclose()
