"""Who sent an inbound message: SPF (pyspf), DKIM (dkimpy) and DMARC (dmarc) results, computed
against DNS through the configured nameservers, and the Authentication-Results header (RFC
8601) that sums them up."""

from __future__ import annotations

import contextvars
import email.utils
import ipaddress
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any

import dkim
import dmarc
import dns.exception
import dns.nameserver
import dns.resolver
import spf
from publicsuffix2 import PublicSuffixList

from postbode.delivery.mx import parse_nameservers

log = logging.getLogger(__name__)

DNS_TIMEOUT = 5.0  # seconds per question
SPF_SECONDS = 20.0  # all of one SPF evaluation (RFC 7208 §4.6.4 suggests at least 20 s)
MAX_SIGNATURES = 5  # DKIM-Signature fields verified at most (each may cost a DNS lookup)

_resolver: contextvars.ContextVar[dns.resolver.Resolver] = contextvars.ContextVar(
    "postbode_inbound_resolver"
)
_psl: PublicSuffixList | None = None


def make_resolver(nameservers: str, timeout: float = DNS_TIMEOUT) -> dns.resolver.Resolver:
    """A resolver asking `nameservers` ("ip[:port],…", the dns_nameservers setting; empty:
    the system's), uncached: a check sees what is published now."""
    servers = parse_nameservers(nameservers)
    resolver = dns.resolver.Resolver(configure=not servers)
    if servers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in servers]
    resolver.timeout = timeout
    resolver.lifetime = timeout
    resolver.cache = None
    return resolver


@contextmanager
def using(resolver: dns.resolver.Resolver) -> Iterator[None]:
    token = _resolver.set(resolver)
    try:
        yield
    finally:
        _resolver.reset(token)


def _spf_lookup(
    name: str, qtype: str, strict: bool = True, timeout: float = 30
) -> list[tuple[tuple[str, str], Any]]:
    """pyspf's DNS hook (`spf.DNSLookup`, the name its own tests swap for a zone of their
    own), answered by the resolver of the verification in progress, in the shape pyspf's
    dnspython lookup returns."""
    resolver = _resolver.get()
    answers: list[tuple[tuple[str, str], Any]] = []
    try:
        found = resolver.resolve(
            name, qtype, lifetime=min(timeout, resolver.lifetime), search=False
        )
    except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
        return answers
    except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
        raise spf.TempError(f"DNS {exc}") from None
    for rdata in found:
        if qtype in ("A", "AAAA"):
            answers.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            answers.append(((name, qtype), (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            answers.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            answers.append(((name, qtype), rdata.strings))
    return answers


spf.DNSLookup = _spf_lookup


def _dkim_txt(name: bytes | str, timeout: float = DNS_TIMEOUT) -> bytes | None:
    """dkimpy's dnsfunc: the TXT record at `name`, its strings joined (RFC 6376 §3.6.2.2)."""
    qname = name.decode("ascii", "replace") if isinstance(name, bytes) else name
    try:
        found = _resolver.get().resolve(qname.rstrip("."), "TXT", lifetime=timeout, search=False)
    except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
        return None
    for rdata in found:
        return b"".join(rdata.strings)
    return None


def _txt(name: str) -> list[str] | None:
    """Every TXT record at `name` (strings joined); None when DNS could not say."""
    try:
        found = _resolver.get().resolve(name, "TXT", search=False)
    except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
        return []
    except dns.exception.DNSException:
        return None
    return [b"".join(r.strings).decode("utf-8", "replace") for r in found]


# -- the organizational domain (RFC 7489 §3.2) ---------------------------------------------


class _OrgDomains:
    """The organizational domain of a name: one label below its public suffix, by the Public
    Suffix List; a name whose top label the list does not know (`.test`) has that label as
    its suffix (the list's default rule `*`)."""

    def get_public_suffix(self, domain: str) -> str:
        return org_domain(domain)


def org_domain(domain: str) -> str:
    global _psl
    if _psl is None:
        _psl = PublicSuffixList()
    name = domain.lower().rstrip(".")
    suffix = _psl.get_tld(name, strict=True) or name.rpartition(".")[2]
    labels = name.split(".")
    keep = len(suffix.split(".")) + 1
    return ".".join(labels[-keep:]) if len(labels) >= keep else name


# -- the checks ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sender:
    """What the SMTP conversation said about the sender."""

    ip: str | None
    helo: str | None
    mail_from: str


def check_spf(sender: Sender) -> dict[str, Any]:
    """RFC 7208 check_host() for the MAIL FROM identity (the HELO one for a null sender)."""
    helo = sender.helo or ""
    identity = sender.mail_from or (f"postmaster@{helo}" if helo else "")
    domain = identity.rpartition("@")[2].lower()
    result = {"result": "none", "domain": domain, "detail": ""}
    try:
        ipaddress.ip_address(sender.ip or "")
    except ValueError:
        result["detail"] = "no client address"
        return result
    if not domain:
        result["detail"] = "no sender domain"
        return result
    try:
        outcome, _code, explanation = spf.query(
            i=sender.ip, s=identity, h=helo or domain, querytime=SPF_SECONDS
        ).check()
    except Exception as exc:  # pyspf on a record it cannot read
        return {**result, "result": "permerror", "detail": f"{type(exc).__name__}: {exc}"[:300]}
    return {**result, "result": str(outcome), "detail": str(explanation)[:300]}


def check_dkim(raw: bytes) -> list[dict[str, Any]]:
    """Every DKIM-Signature (up to MAX_SIGNATURES), each verified against the key in DNS."""
    try:
        signer = dkim.DKIM(raw)
        count = sum(1 for name, _ in signer.headers if name.lower() == b"dkim-signature")
    except Exception as exc:
        return [{"result": "permerror", "domain": "", "selector": "", "detail": str(exc)[:300]}]
    results = []
    for idx in range(min(count, MAX_SIGNATURES)):
        item = {"result": "fail", "domain": "", "selector": "", "detail": ""}
        try:
            ok = signer.verify(idx=idx, dnsfunc=_dkim_txt)
            item["result"] = "pass" if ok else "fail"
            if not ok:
                item["detail"] = "signature did not verify"
        except dns.exception.DNSException as exc:
            item.update(result="temperror", detail=f"DNS: {exc}"[:300])
        except dkim.ValidationError as exc:  # the body hash or signature does not match
            item.update(result="fail", detail=str(exc)[:300])
        except dkim.KeyFormatError as exc:
            item.update(result="permerror", detail=f"key: {exc}"[:300])
        except dkim.DKIMException as exc:
            item.update(result="permerror", detail=str(exc)[:300])
        except Exception as exc:  # dkimpy on hostile input
            item.update(result="permerror", detail=f"{type(exc).__name__}: {exc}"[:300])
        fields = getattr(signer, "signature_fields", {}) or {}
        item["domain"] = _ascii(fields.get(b"d", b"")).lower()
        item["selector"] = _ascii(fields.get(b"s", b""))
        results.append(item)
    return results


def _ascii(value: object) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value or "")


def header_from_domain(raw: bytes) -> str | None:
    """The domain of the single RFC5322.From address (RFC 7489 §6.6.1); None without one."""
    try:
        headers = BytesHeaderParser(policy=compat32).parsebytes(raw)
        values = headers.get_all("from") or []
        addresses = [a for _, a in email.utils.getaddresses([str(v) for v in values]) if a]
    except Exception:
        return None
    if len(addresses) != 1 or "@" not in addresses[0]:
        return None
    return addresses[0].rpartition("@")[2].lower().rstrip(".") or None


def check_dmarc(
    from_domain: str | None, spf_result: dict[str, Any], dkim_results: list[dict[str, Any]]
) -> dict[str, Any]:
    """The From domain's policy (or its organizational domain's), and whether an aligned SPF
    or DKIM pass satisfies it, by the dmarc library."""
    result: dict[str, Any] = {
        "result": "none",
        "domain": from_domain or "",
        "policy": None,
        "disposition": None,
        "detail": "",
    }
    if not from_domain:
        return {**result, "result": "permerror", "detail": "not exactly one From address"}
    org = org_domain(from_domain)
    record, used = None, from_domain
    for name in dict.fromkeys([from_domain, org]):
        found = _txt(f"_dmarc.{name}")
        if found is None:
            return {**result, "result": "temperror", "detail": f"DNS failed for _dmarc.{name}"}
        records = [r for r in found if r.startswith("v=DMARC1")]
        if len(records) == 1:
            record, used = records[0], name
            break
        if len(records) > 1:  # RFC 7489 §6.6.3: more than one record is none at all
            break
    if record is None:
        return {**result, "detail": "no DMARC record"}
    checker = dmarc.DMARC(publicsuffix=_OrgDomains())
    try:
        policy = checker.parse_record(
            record, from_domain, org_domain=used if used != from_domain else None
        )
    except dmarc.Error as exc:
        return {**result, "result": "permerror", "detail": f"bad record: {exc}"[:300]}
    spf_auth = None
    if spf_result["domain"]:
        spf_auth = dmarc.SPF(spf_result["domain"], _enum(dmarc.SPFResult, spf_result["result"]))
    dkim_auth = [
        dmarc.DKIM(d["domain"], _enum(dmarc.DKIMResult, d["result"]), d["selector"])
        for d in dkim_results
        if d["domain"]
    ]
    outcome = checker.get_result(
        policy, auth_results=dmarc.AuthResults(spf=spf_auth, dkim=dkim_auth or None)
    )
    return {
        **result,
        "result": outcome.result.value,
        "policy": policy.p.value if policy.p is not None else None,
        "disposition": outcome.disposition.value,
        "detail": f"record at _dmarc.{used}",
    }


def _enum(kind: Any, value: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        return kind("none")


def verify(
    raw: bytes, sender: Sender, resolver: dns.resolver.Resolver, authserv_id: str
) -> dict[str, Any]:
    """SPF, DKIM and DMARC of one message, and the Authentication-Results header value.
    Blocking (DNS): run it in a thread. Never raises."""
    with using(resolver):
        try:
            spf_result = check_spf(sender)
        except Exception as exc:
            log.warning("inbound: SPF check failed", exc_info=True)
            spf_result = {"result": "temperror", "domain": "", "detail": str(exc)[:300]}
        dkim_results = check_dkim(raw)
        try:
            dmarc_result = check_dmarc(header_from_domain(raw), spf_result, dkim_results)
        except Exception as exc:
            log.warning("inbound: DMARC check failed", exc_info=True)
            dmarc_result = {"result": "temperror", "domain": "", "detail": str(exc)[:300]}
    return {
        "spf": spf_result,
        "dkim": dkim_results,
        "dmarc": dmarc_result,
        "header": authentication_results(authserv_id, spf_result, dkim_results, dmarc_result),
    }


def authentication_results(
    authserv_id: str,
    spf_result: dict[str, Any],
    dkim_results: list[dict[str, Any]],
    dmarc_result: dict[str, Any],
) -> str:
    """The Authentication-Results value (RFC 8601 §2.2) for these results."""
    parts = [authserv_id]
    parts.append(f"spf={spf_result['result']} smtp.mailfrom={spf_result['domain'] or 'none'}")
    if not dkim_results:
        parts.append("dkim=none")
    for d in dkim_results:
        parts.append(
            f"dkim={d['result']} header.d={d['domain'] or 'none'} header.s={d['selector']}"
        )
    parts.append(f"dmarc={dmarc_result['result']} header.from={dmarc_result['domain'] or 'none'}")
    return "; ".join(parts)
