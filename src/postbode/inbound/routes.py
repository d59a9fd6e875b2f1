"""Inbound routes: which app takes mail for which address, and what happens to it (post, hold,
reject); matching an address to its route, and the routes' store functions.

Matching order, first hit wins (addresses compared without regard to case):

1. the exact address: a route `support+vip@in.shop.test` takes only that address;
2. the mailbox hash: `support+order-42@in.shop.test` goes to a route `support@in.shop.test`,
   passing `order-42` as the mailbox hash ("plus addressing": the part after the first `+`);
3. the catch-all `*@in.shop.test`.

Whatever rule matched, the mailbox hash of an address is the part of its local part after
the first `+` (empty without one), as Postmark's `MailboxHash` is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update

from postbode import tenancy
from postbode.endpoints.destinations import STRICT, DestinationPolicy, UrlRefused, check_url
from postbode.endpoints.signing import generate_secret
from postbode.store.engine import Store
from postbode.store.schema import ROUTE_ACTIONS, ROUTE_FORMATS, domains, routes, utcnow
from postbode.store.sealing import seal

CATCH_ALL = "*"
MAX_LOCAL_PART = 64  # RFC 5321 §4.5.3.1.1


class RouteError(ValueError):
    """A route request that cannot be carried out; names the field and an HTTP status."""

    def __init__(
        self, message: str, *, code: str = "invalid", field: str | None = None, status: int = 422
    ) -> None:
        super().__init__(message)
        self.message, self.code, self.field, self.status = message, code, field, status


@dataclass(frozen=True, slots=True)
class Route:
    """A route as matching needs it."""

    id: int
    app_id: int
    pattern: str
    action: str  # post | hold | reject
    url: str | None
    format: str  # native | postmark

    @classmethod
    def from_row(cls, row: Any) -> Route:
        return cls(row.id, row.app_id, row.pattern, row.action, row.url, row.format)


@dataclass(frozen=True, slots=True)
class Match:
    """The route an address goes to, and the address's mailbox hash."""

    route: Route
    mailbox_hash: str


def split_address(address: str) -> tuple[str, str]:
    """(local part, domain) of an address, the domain in lower case without a final dot."""
    local, _, domain = address.strip().strip("<>").rpartition("@")
    return local, domain.lower().rstrip(".")


def mailbox_hash(local: str) -> str:
    """The part of a local part after the first `+` (empty when there is none)."""
    return local.partition("+")[2]


def match(table: Mapping[str, Route], address: str) -> Match | None:
    """The route for `address` in `table` (routes by lower-cased pattern), in the documented
    order: exact address, then the address without its `+hash`, then `*@domain`."""
    local, domain = split_address(address)
    if not local or not domain:
        return None
    local = local.lower()
    base = local.partition("+")[0]
    for key in (f"{local}@{domain}", f"{base}@{domain}", f"{CATCH_ALL}@{domain}"):
        route = table.get(key)
        if route is not None:
            return Match(route, mailbox_hash(local_original(address)))
    return None


def local_original(address: str) -> str:
    """The local part as the sender wrote it (the mailbox hash keeps its case)."""
    return split_address(address)[0]


def check_pattern(pattern: str) -> tuple[str, str]:
    """A pattern in its stored form, and its domain: `local@domain` or `*@domain`, lower case.
    Raises RouteError."""
    text = pattern.strip().lower()
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise RouteError("the pattern contains control characters", field="match")
    local, sep, domain = text.rpartition("@")
    domain = domain.rstrip(".")
    if not sep or not local or not domain:
        raise RouteError("the pattern must be local@domain or *@domain", field="match")
    if local != CATCH_ALL and (
        CATCH_ALL in local
        or len(local) > MAX_LOCAL_PART
        or any(c.isspace() or ord(c) < 0x21 or c in '<>()[]\\,;:"@' for c in local)
    ):
        raise RouteError(f"{local!r} is not a local part a route can match", field="match")
    return f"{local}@{domain}", domain


def check_route(
    action: str, url: str | None, format: str, policy: DestinationPolicy = STRICT
) -> str | None:
    """The URL to store; raises RouteError for an action, URL or format that does not fit,
    and for a URL whose host the destination policy refuses (loopback, private, link-local
    and reserved addresses, unless the operator allows them: `webhook_allow_private`), as for
    webhooks: the hand-off is a request made on the tenant's behalf."""
    if action not in ROUTE_ACTIONS:
        raise RouteError(f"unknown action {action!r}: use post, hold or reject", field="action")
    if format not in ROUTE_FORMATS:
        raise RouteError(f"unknown format {format!r}: use native or postmark", field="format")
    if url is None or not url.strip():
        if action == "post":
            raise RouteError("a post route needs a URL", field="url")
        return None
    try:
        return check_url(url, policy, purpose="routes post to public addresses")
    except UrlRefused as exc:
        raise RouteError(exc.message, code=exc.code, field="url") from None


# -- the store --------------------------------------------------------------------------------


def public(row: Any) -> dict[str, Any]:
    """A route as the API shows it (never its secret)."""
    data = row._mapping
    return {
        "id": data["id"],
        "match": data["pattern"],
        "action": data["action"],
        "url": data["url"],
        "format": data["format"],
        "enabled": data["enabled"],
        "created_at": data["created_at"],
    }


def create_route(
    store: Store,
    app_id: int,
    pattern: str,
    *,
    url: str | None = None,
    action: str = "post",
    format: str = "native",
    policy: DestinationPolicy = STRICT,
) -> dict[str, Any]:
    """A new route of the app, for a pattern at one of the app's inbound domains, posting
    where `policy` allows; the result carries its signing secret (`whsec_…`), shown once."""
    stored, domain = check_pattern(pattern)
    checked_url = check_route(action, url, format, policy)
    secret = generate_secret()
    sealed = seal(store, secret)
    with store.write() as conn:
        claim = conn.execute(
            select(domains.c.inbound).where(domains.c.name == domain, domains.c.app_id == app_id)
        ).first()
        if claim is None or not claim.inbound:
            raise RouteError(
                f"{domain} is not an inbound domain of this app "
                f"(add it with `postbode domain add {domain} --app NAME --inbound`)",
                field="match",
            )
        if conn.execute(
            select(routes.c.id).where(routes.c.app_id == app_id, routes.c.pattern == stored)
        ).first():
            raise RouteError(
                f"a route for {stored} exists already", code="conflict", field="match", status=409
            )
        route_id = conn.execute(
            insert(routes)
            .values(
                app_id=app_id,
                pattern=stored,
                action=action,
                url=checked_url,
                format=format,
                secret=sealed,
                enabled=True,
                created_at=utcnow(),
            )
            .returning(routes.c.id)
        ).scalar_one()
        row = _get(conn, app_id, route_id)
    return {**public(row), "secret": secret}


def list_routes(store: Store, app_id: int) -> list[dict[str, Any]]:
    with store.read() as conn:
        rows = conn.execute(
            select(routes).where(routes.c.app_id == app_id).order_by(routes.c.pattern)
        ).all()
    return [public(r) for r in rows]


def get_route(store: Store, app_id: int, route_id: int) -> dict[str, Any]:
    with store.read() as conn:
        return public(_get(conn, app_id, route_id))


def update_route(
    store: Store,
    app_id: int,
    route_id: int,
    *,
    policy: DestinationPolicy = STRICT,
    **changes: Any,
) -> dict[str, Any]:
    """Change a route's action, url, format or enabled."""
    with store.write() as conn:
        row = _get(conn, app_id, route_id)
        action = changes.get("action") or row.action
        url = changes.get("url", row.url)
        format = changes.get("format") or row.format
        values: dict[str, Any] = {
            "action": action,
            "url": check_route(action, url, format, policy),
            "format": format,
        }
        if changes.get("enabled") is not None:
            values["enabled"] = bool(changes["enabled"])
        conn.execute(update(routes).where(routes.c.id == route_id).values(**values))
        return public(_get(conn, app_id, route_id))


def delete_route(store: Store, app_id: int, route_id: int) -> None:
    """Remove a route; its messages stay, and those still queued fail (no route to take them)."""
    with store.write() as conn:
        _get(conn, app_id, route_id)
        conn.execute(delete(routes).where(routes.c.id == route_id))


def app_id_by_name(store: Store, name: str, organization: str | int | None = None) -> int:
    """The app called `name` (in `organization`: see tenancy.app_by_name)."""
    try:
        with store.read() as conn:
            return int(tenancy.app_by_name(conn, name, organization)["id"])
    except tenancy.TenancyError as exc:
        raise RouteError(str(exc), code="not_found", field="app", status=404) from None


def route_id_by_pattern(store: Store, app_id: int, pattern: str) -> int:
    stored, _ = check_pattern(pattern)
    with store.read() as conn:
        route_id = conn.execute(
            select(routes.c.id).where(routes.c.app_id == app_id, routes.c.pattern == stored)
        ).scalar()
    if route_id is None:
        raise RouteError(f"no route for {stored}", code="not_found", field="match", status=404)
    return int(route_id)


def load_table(
    conn: Connection, *, allow_unverified: bool
) -> tuple[dict[str, Route], dict[str, int]]:
    """Every enabled route by pattern, and every inbound domain with its app: what the SMTP
    listener matches recipients against. A domain is the app's whose claim holds it
    (tenancy.holders: the verified claim, or in development the only one), and only that
    app's routes at it are in the table: another organisation's claim of the name takes
    none of its mail."""
    inbound = tenancy.domain_holders(conn, allow_unverified=allow_unverified, inbound_only=True)
    table = {
        r.pattern: Route.from_row(r)
        for r in conn.execute(
            select(
                routes.c.id,
                routes.c.app_id,
                routes.c.pattern,
                routes.c.action,
                routes.c.url,
                routes.c.format,
            ).where(routes.c.enabled.is_(True))
        )
        if inbound.get(r.pattern.rpartition("@")[2]) == r.app_id
    }
    return table, inbound


def existing_route_ids(conn: Connection, ids: Iterable[int]) -> set[int]:
    wanted = set(ids)
    if not wanted:
        return set()
    return set(
        conn.execute(
            select(routes.c.id).where(routes.c.id.in_(wanted), routes.c.enabled.is_(True))
        ).scalars()
    )


def _get(conn: Connection, app_id: int, route_id: int) -> Any:
    row = conn.execute(
        select(routes).where(routes.c.id == route_id, routes.c.app_id == app_id)
    ).first()
    if row is None:
        raise RouteError(f"no route {route_id}", code="not_found", status=404)
    return row
