"""What every command checks before it starts: each setting read and parsed, so a bad one
stops the command at once with one line naming it, not a traceback or a crash loop later."""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Callable, Iterator
from typing import Any

from pydantic import ValidationError

from postbode.config import Settings

__all__ = ["BadSetting", "check", "load", "read"]

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class BadSetting(Exception):
    """A setting that cannot work; str() is one line naming it and what is wrong."""


def env_name(field: str) -> str:
    return f"POSTBODE_{field.upper()}"


def read() -> Settings:
    """The settings from the environment and the TOML file, each of the right type and in
    range (not yet `check`ed). Raises BadSetting."""
    try:
        return Settings()
    except ValidationError as exc:
        raise BadSetting(_describe(exc)) from None
    except (OSError, ValueError) as exc:  # the TOML file named by POSTBODE_CONFIG
        raise BadSetting(f"POSTBODE_CONFIG: {_one_line(exc)}") from None


def load() -> Settings:
    """The settings, read and checked. Raises BadSetting."""
    settings = read()
    check(settings)
    return settings


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "settings"
        value = error.get("input")
        shown = f" (got {value!r})" if isinstance(value, str | int | float) else ""
        problems.append(f"{env_name(field)}: {error['msg'].lower()}{shown}")
    return "; ".join(problems)


def check(settings: Settings) -> None:
    """Parse every setting whose type alone does not say it is right. Raises BadSetting."""
    problems = [f"{env_name(name)}: {problem}" for name, problem in _problems(settings)]
    if problems:
        raise BadSetting("; ".join(problems))


def _problems(settings: Settings) -> Iterator[tuple[str, str]]:
    # Imported here: the parsers live with the code that uses them, and a command that only
    # prints its help should not pay for them.
    from postbode.bounces.classify import load_rules
    from postbode.delivery.mx import parse_nameservers, parse_transport_map
    from postbode.delivery.shaping import parse_rules
    from postbode.delivery.smtp_sender import TlsPolicy
    from postbode.endpoints.destinations import DestinationPolicy

    parsers: list[tuple[str, Callable[[], Any]]] = [
        ("transport_map", lambda: parse_transport_map(settings.transport_map)),
        ("dns_nameservers", lambda: parse_nameservers(settings.dns_nameservers)),
        ("tls_policy", lambda: TlsPolicy.parse(settings.tls_policy)),
        ("shaping_rules", lambda: parse_rules(settings.shaping_rules)),
        ("webhook_allow_private", lambda: DestinationPolicy.parse(settings.webhook_allow_private)),
        ("trusted_proxies", lambda: _networks(settings.trusted_proxies)),
        ("bounce_rules_path", lambda: load_rules(settings.bounce_rules_path)),
    ]
    for name, parse in parsers:
        try:
            parse()
        except (ValueError, OSError, KeyError, TypeError) as exc:
            yield name, _one_line(exc)
    if settings.log_level.lower() not in LOG_LEVELS:
        yield "log_level", f"{settings.log_level!r} is not one of {', '.join(LOG_LEVELS)}"
    url = settings.sqlalchemy_url
    if not url.startswith(("sqlite:", "postgresql")):
        yield "database_url", "is neither sqlite:… nor postgresql://…"
    for name in ("tracking_url", "inbound_attachment_url"):
        value = getattr(settings, name)
        if not value.startswith(("http://", "https://")):
            yield name, f"{value!r} is not an http:// or https:// URL"
    if settings.rspamd_url and not settings.rspamd_url.startswith(("http://", "https://")):
        yield "rspamd_url", f"{settings.rspamd_url!r} is not an http:// or https:// URL"
    if settings.rspamd_reject_score <= settings.rspamd_hold_score:
        yield (
            "rspamd_reject_score",
            f"{settings.rspamd_reject_score} is not above rspamd_hold_score "
            f"({settings.rspamd_hold_score})",
        )
    if settings.listeners > 1 and 0 in (settings.http_port, settings.smtp_port):
        yield "listeners", "more than one listener needs fixed ports (not 0)"
    yield from _tls_problems(settings)


def _networks(text: str) -> None:
    for entry in filter(None, (e.strip() for e in text.split(","))):
        if entry == "*":
            continue
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ValueError(f"{entry!r} is not an address or CIDR") from None


def _tls_problems(settings: Settings) -> Iterator[tuple[str, str]]:
    cert, key = settings.smtp_tls_cert, settings.smtp_tls_key
    if cert is None and key is None:
        return
    if cert is None or key is None:
        missing = "smtp_tls_cert" if cert is None else "smtp_tls_key"
        yield missing, "smtp_tls_cert and smtp_tls_key are set together"
        return
    for name, path in (("smtp_tls_cert", cert), ("smtp_tls_key", key)):
        if not path.is_file():
            yield name, f"{str(path)!r} is not a readable file"
            return
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        yield "smtp_tls_cert", f"{str(cert)!r} with its key does not load ({_one_line(exc)})"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())
