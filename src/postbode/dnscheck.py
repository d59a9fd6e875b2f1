"""Live DNS check of a sending domain's records (SPF, DKIM, return path and the return-path
domain's MX, DMARC; an inbound domain's MX), stored on the domain with a domain.dns_changed
event when a record's status changes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from postbode import tenancy
from postbode.config import Settings
from postbode.delivery.mx import parse_nameservers
from postbode.events.record import Event, record
from postbode.events.types import EventType
from postbode.store.engine import Store
from postbode.store.schema import apps, domains, organizations, utcnow

log = logging.getLogger(__name__)

Status = Literal["pass", "missing", "wrong"]
PURPOSES = ("spf", "dkim", "return_path", "return_path_mx", "dmarc")
VERIFYING = ("dkim", "return_path")  # both pass: the domain is verified


# -- what DNS said --------------------------------------------------------------------------


@dataclass(frozen=True)
class Lookup:
    """The answer to one question: record values (TXT strings joined, CNAME targets without
    the final dot, lower case), or an error when DNS could not say (SERVFAIL, timeout)."""

    values: tuple[str, ...] = ()
    error: str | None = None


class DnsReader:
    """Asks DNS for TXT and CNAME records through the configured nameservers, uncached (a
    check must see what is published now, not what was a while ago)."""

    def __init__(self, nameservers: str = "", timeout: float = 5.0) -> None:
        """`nameservers`: "ip[:port],…" as the dns_nameservers setting (empty: the system's)."""
        servers = parse_nameservers(nameservers)
        self._resolver = dns.asyncresolver.Resolver(configure=not servers)
        if servers:
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(ip, port) for ip, port in servers
            ]
        self._resolver.timeout = timeout
        self._resolver.lifetime = timeout
        self._resolver.cache = None

    @classmethod
    def from_settings(cls, settings: Settings, timeout: float = 5.0) -> DnsReader:
        return cls(settings.dns_nameservers, timeout)

    async def lookup(self, name: str, rtype: str) -> Lookup:
        """The `rtype` records at `name`; NXDOMAIN and NODATA are an empty answer."""
        try:
            answer = await self._resolver.resolve(
                name, rtype, search=False, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN:
            return Lookup()
        except dns.exception.Timeout:
            return Lookup(error=f"no answer for {name} {rtype} in time")
        except dns.resolver.NoNameservers:
            return Lookup(error=f"no nameserver answered {name} {rtype} (SERVFAIL or REFUSED)")
        except dns.exception.DNSException as exc:
            return Lookup(error=f"{name} {rtype}: {exc}")
        if answer.rrset is None:
            return Lookup()
        if rtype == "TXT":
            # RFC 7208 §3.3 and RFC 6376 §3.6.2.2: a record's strings are joined without spaces.
            values = [b"".join(r.strings).decode("utf-8", "replace") for r in answer.rrset]
        else:
            values = [r.to_text().rstrip(".").lower() for r in answer.rrset]
        return Lookup(tuple(values))


# -- judging the answers (pure) ------------------------------------------------------------


@dataclass(frozen=True)
class RecordCheck:
    """One record: what should be published, what was found, and the verdict."""

    purpose: str  # spf | dkim | return_path | dmarc
    type: str
    name: str
    expected: str
    status: Status
    found: tuple[str, ...]
    detail: str
    error: str | None = None  # DNS failed: `status` is the last known one, kept

    def as_json(self) -> dict[str, Any]:
        return {**self.__dict__, "found": list(self.found)}


Verdict = tuple[Status, str]


def _spf_terms(record: str) -> list[str]:
    """The mechanisms that count: RFC 7208 §5.1 never tests those after "all"."""
    terms = []
    for term in record.split()[1:]:
        bare = term.lower().lstrip("+")
        terms.append(bare)
        if bare.lstrip("-~?") == "all":
            break
    return terms


def check_spf(expected: str, values: Sequence[str]) -> Verdict:
    """The one SPF record (RFC 7208 §4.5) holds the mechanism we publish (e.g. `a:host`)."""
    records = [v for v in values if v.lower() == "v=spf1" or v.lower().startswith("v=spf1 ")]
    if not records:
        return "missing", "no SPF record (TXT v=spf1 …)"
    if len(records) > 1:
        return "wrong", "more than one SPF record: receivers treat that as an error (RFC 7208 §4.5)"
    wanted = [t for t in _spf_terms(expected) if t.lstrip("-~?") != "all"]
    found = _spf_terms(records[0])
    absent = [t for t in wanted if t not in found]
    if absent:
        return "wrong", f"the SPF record does not authorise {' '.join(absent)} (before any all)"
    return "pass", f"SPF authorises {' '.join(wanted)}"


def _dkim_tags(value: str) -> dict[str, str]:
    """RFC 6376 §3.2 tag=value list; white space is not significant in the key."""
    tags = {}
    for part in value.split(";"):
        name, sep, tag_value = part.partition("=")
        if sep:
            tags[name.strip().lower()] = "".join(tag_value.split())
    return tags


def check_dkim(expected: str, values: Sequence[str]) -> Verdict:
    """The selector's one key record carries this domain's public key (p=)."""
    keys = [
        tags
        for tags in map(_dkim_tags, values)
        if "p" in tags and tags.get("v", "DKIM1") == "DKIM1"
    ]
    if not keys:
        return "missing", "no DKIM key record at the selector"
    want = _dkim_tags(expected).get("p", "")
    if len(keys) > 1:
        return "wrong", "several key records at the selector: verifiers may pick either"
    if keys[0]["p"] == "":
        return "wrong", "the published key is revoked (empty p=)"
    if keys[0]["p"] != want:
        return "wrong", "the published key is not this domain's signing key"
    return "pass", "the published key matches the signing key"


def check_return_path(expected: str, values: Sequence[str]) -> Verdict:
    """The return-path name is a CNAME of Postbode's return-path domain."""
    want = expected.rstrip(".").lower()
    if not values:
        return "missing", f"no CNAME (it should point at {want})"
    if want not in values:
        return "wrong", f"points at {', '.join(values)}, not {want}"
    return "pass", f"points at {want}"


def check_mx(expected: str, values: Sequence[str]) -> Verdict:
    """An inbound domain's (or the return-path domain's) MX names Postbode's SMTP host (RFC
    5321 §5.1; the preference is the operator's choice). A null MX (RFC 7505) takes no mail
    at all."""
    want = expected.split()[-1].rstrip(".").lower()
    hosts = [v.split()[-1].rstrip(".").lower() for v in values if v.split()]
    if not hosts:
        return "missing", f"no MX record (it should name {want})"
    if hosts == [""] or all(h in ("", ".") for h in hosts):
        return "wrong", f"a null MX: this domain takes no mail (it should name {want})"
    if want not in hosts:
        return "wrong", f"the MX names {', '.join(hosts)}, not {want}"
    if len(set(hosts)) > 1:
        return "pass", f"names {want} (beside {', '.join(sorted(set(hosts) - {want}))})"
    return "pass", f"names {want}"


def check_dmarc(expected: str, values: Sequence[str]) -> Verdict:
    """One DMARC record exists (RFC 7489 §6.6.3: several mean none)."""
    records = [v for v in values if v.replace(" ", "").upper().startswith("V=DMARC1")]
    if not records:
        return (
            ("wrong", "TXT records found, none a DMARC record")
            if values
            else (
                "missing",
                "no DMARC record (TXT v=DMARC1 …)",
            )
        )
    if len(records) > 1:
        return "wrong", "more than one DMARC record: receivers ignore them all (RFC 7489 §6.6.3)"
    policy = _dkim_tags(records[0]).get("p", "")
    return "pass", f"DMARC record found (policy p={policy or '?'})"


def _status(value: str) -> Status:
    if value == "pass":
        return "pass"
    return "wrong" if value == "wrong" else "missing"


CHECKS: dict[str, Callable[[str, Sequence[str]], Verdict]] = {
    "spf": check_spf,
    "dkim": check_dkim,
    "dkim_previous": check_dkim,  # a rotated-out key, published while its grace period lasts
    "return_path": check_return_path,
    "return_path_mx": check_mx,  # where bounces arrive: the return-path domain's MX
    "dmarc": check_dmarc,
    "inbound": check_mx,  # only for domains that take mail for the app's routes
}


def evaluate(
    expected: Sequence[Mapping[str, str]],
    lookups: Sequence[Lookup],
    previous: Mapping[str, str],
) -> list[RecordCheck]:
    """The verdict per record (`expected` as tenancy.dns_records gives them, `lookups` in the
    same order). A record DNS could not answer keeps its previous status (or "missing" if it
    never had one), with the error: a DNS hiccup must not undo a verified domain."""
    checks = []
    for want, found in zip(expected, lookups, strict=True):
        purpose = want["purpose"]
        if found.error is not None:
            status = _status(previous.get(purpose, "missing"))
            detail = f"DNS error: {found.error}; the last known status is kept"
        else:
            status, detail = CHECKS[purpose](want["value"], found.values)
        checks.append(
            RecordCheck(
                purpose,
                want["type"],
                want["name"],
                want["value"],
                status,
                found.values,
                detail,
                found.error,
            )
        )
    return checks


def statuses(checks: Sequence[RecordCheck]) -> dict[str, str]:
    """{purpose: status}, as stored in domains.dns_status."""
    return {c.purpose: c.status for c in checks}


def verified_at(
    checks: Sequence[RecordCheck], current: datetime | None, now: datetime
) -> datetime | None:
    """When the domain counts as verified: since `current` (or now) while DKIM and the return
    path pass; None once DNS definitely says one is missing or wrong; unchanged while DNS
    cannot tell."""
    by_purpose = {c.purpose: c for c in checks}
    needed = [by_purpose[p] for p in VERIFYING if p in by_purpose]
    if len(needed) == len(VERIFYING) and all(c.status == "pass" for c in needed):
        return current or now
    if any(c.status != "pass" and c.error is None for c in needed):
        return None
    return current


# -- the check ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DomainCheck:
    """The outcome of checking one domain, as stored."""

    domain: str
    app_id: int
    checked_at: datetime
    records: list[RecordCheck]
    verified_at: datetime | None
    changed: bool  # a record's status differs from the stored one (an event was written)

    @property
    def verified(self) -> bool:
        return self.verified_at is not None

    @property
    def all_pass(self) -> bool:
        return all(c.status == "pass" for c in self.records)

    def as_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "checked_at": self.checked_at,
            "verified": self.verified,
            "verified_at": self.verified_at,
            "changed": self.changed,
            "records": [c.as_json() for c in self.records],
        }


def _load(store: Store, name: str, app_id: int | None) -> dict[str, Any]:
    """The claim of `name` by `app_id`; without an app, the only claim of the name (the
    operator's command line: several claims need the app named)."""
    query = select(domains).where(domains.c.name == name)
    if app_id is not None:
        query = query.where(domains.c.app_id == app_id)
    with store.read() as conn:
        rows = conn.execute(query.order_by(domains.c.id)).mappings().all()
        if len(rows) > 1:
            claims = conn.execute(
                select(apps.c.name.label("app"), organizations.c.name.label("org"))
                .join(domains, domains.c.app_id == apps.c.id)
                .join(organizations, organizations.c.id == apps.c.organization_id)
                .where(domains.c.name == name)
                .order_by(domains.c.id)
            ).all()
            listed = ", ".join(f"{c.app} ({c.org})" for c in claims)
            raise tenancy.TenancyError(
                f"several apps claim {name!r}: {listed}; name one with --app (and --org)"
            )
    if not rows:
        raise tenancy.TenancyError(f"no domain {name!r}")
    return dict(rows[0])


def _save(
    store: Store, row: dict[str, Any], checks: list[RecordCheck], now: datetime
) -> DomainCheck:
    """Store the verdicts; a change of any record's status writes a domain.dns_changed event
    in the same transaction. A claim becomes verified only while no other claim of the name
    is (the store's unique index holds that across nodes too): otherwise it stays pending,
    answered like any claim whose records are not there yet, and the operator's log names
    the conflict."""
    try:
        return _save_once(store, row, checks, now, may_verify=True)
    except IntegrityError:  # another node verified another claim of the name meanwhile
        return _save_once(store, row, checks, now, may_verify=False)


def _save_once(
    store: Store,
    row: dict[str, Any],
    checks: list[RecordCheck],
    now: datetime,
    *,
    may_verify: bool,
) -> DomainCheck:
    after = statuses(checks)
    with store.write() as conn:
        current = conn.execute(
            select(domains.c.dns_status, domains.c.verified_at).where(domains.c.id == row["id"])
        ).one()
        before = dict(current.dns_status or {})
        since = verified_at(checks, current.verified_at, now)
        if since is not None and current.verified_at is None:
            holder = tenancy.verified_elsewhere(conn, row["name"], row["app_id"])
            if holder is not None or not may_verify:
                log.warning(
                    "domain %s: the claim of app %s passes its DNS check, but the name is held "
                    "by the verified claim of app %s of organization %s; it stays unverified",
                    row["name"],
                    row["app_id"],
                    holder["app"] if holder else "(another)",
                    holder["organization"] if holder else "(another)",
                )
                since = None
        changed = before != after
        conn.execute(
            update(domains)
            .where(domains.c.id == row["id"])
            .values(dns_status=after, dns_checked_at=now, verified_at=since)
        )
        if changed:
            record(
                conn,
                Event(
                    app_id=row["app_id"],
                    type=EventType.DOMAIN_DNS_CHANGED,
                    at=now,
                    data={
                        "domain": row["name"],
                        "before": before,
                        "after": after,
                        "verified": since is not None,
                    },
                ),
            )
    return DomainCheck(row["name"], row["app_id"], now, checks, since, changed)


async def check_domain(
    store: Store,
    settings: Settings,
    name: str,
    *,
    app_id: int | None = None,
    reader: DnsReader | None = None,
    now: datetime | None = None,
) -> DomainCheck:
    """Look up the records of `app_id`'s claim of the domain now (and its MX when it takes
    inbound mail), judge them against what Postbode asks that claim to publish (its own DKIM
    selector and key), and store the result (dns_status, dns_checked_at, verified_at).
    Without `app_id`, the name's only claim. Raises TenancyError for a domain Postbode does
    not know (or, without an app, one several apps claim)."""
    ascii_name = name.strip().rstrip(".").lower()
    with contextlib.suppress(UnicodeError):  # not a name we could have stored: _load says so
        ascii_name = ascii_name.encode("idna").decode("ascii")
    row = await asyncio.to_thread(_load, store, ascii_name, app_id)
    expected = tenancy.dns_records(row, settings.smtp_hostname, settings.return_path_domain)
    if row.get("inbound"):
        expected = tenancy.inbound_records(row, settings.smtp_hostname) + expected
    reader = reader or DnsReader.from_settings(settings)
    lookups = await asyncio.gather(*(reader.lookup(r["name"], r["type"]) for r in expected))
    checks = evaluate(expected, lookups, row.get("dns_status") or {})
    return await asyncio.to_thread(_save, store, row, checks, now or utcnow())


async def check_all(
    store: Store, settings: Settings, *, reader: DnsReader | None = None
) -> list[DomainCheck]:
    """Check every domain, one after the other (for a periodic duty)."""
    with store.read() as conn:
        claims = conn.execute(
            select(domains.c.name, domains.c.app_id).order_by(domains.c.name, domains.c.id)
        ).all()
    reader = reader or DnsReader.from_settings(settings)
    return [
        await check_domain(store, settings, c.name, app_id=c.app_id, reader=reader) for c in claims
    ]
