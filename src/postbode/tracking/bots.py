"""Bot detection for opens and clicks: privacy proxies and link scanners by user agent, hits too
soon after delivery, every link clicked at once. Pure functions."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = [
    "ALL_LINKS_SECONDS",
    "USER_AGENT_RULES",
    "Verdict",
    "anonymise_ip",
    "classify",
    "user_agent_reason",
]

ALL_LINKS_SECONDS = 2.0  # every link of a message clicked within this: a scanner

# (reason, pattern, kinds) in order; the first match names the reason. Patterns are matched
# against the lower-cased user agent; a rule applies to the kinds of hit named.
BOTH = frozenset({"open", "click"})
USER_AGENT_RULES: tuple[tuple[str, re.Pattern[str], frozenset[str]], ...] = tuple(
    (reason, re.compile(pattern), kinds)
    for reason, pattern, kinds in (
        # Apple Mail Privacy Protection fetches every image through Apple's proxy, with no
        # more user agent than this.
        ("apple_mail_privacy_protection", r"^mozilla/5\.0$", BOTH),
        ("google_image_proxy", r"googleimageproxy|ggpht\.com", BOTH),
        ("yahoo_mail_proxy", r"yahoomailproxy", BOTH),
        (
            "microsoft_safe_links",
            r"safelinks|bingpreview|microsoftpreview|microsoft-cryptoapi|outlook.*preview",
            BOTH,
        ),
        # Office checks a link before the browser opens it (a HEAD or GET with this user
        # agent); when Outlook fetches images it uses the same agent for a real open.
        ("microsoft_safe_links", r"ms-office|microsoft office|msoffice", frozenset({"click"})),
        ("barracuda", r"barracuda", BOTH),
        ("proofpoint", r"proofpoint|pfpt", BOTH),
        ("mimecast", r"mimecast", BOTH),
        ("headless_browser", r"headlesschrome|phantomjs", BOTH),
        (
            "generic_bot",
            r"bot\b|bot/|crawler|spider|scanner|python-requests|python-urllib|aiohttp"
            r"|httpx|curl/|wget/|go-http-client|java/|libwww|okhttp|node-fetch|axios/",
            BOTH,
        ),
    )
)

# Apple's proxies send opens from Apple's own network (17.0.0.0/8), which survives
# anonymisation of the last octet.
_APPLE_NETWORK = ipaddress.ip_network("17.0.0.0/8")


@dataclass(frozen=True)
class Verdict:
    """Whether a hit came from a machine, and why."""

    bot: bool
    reason: str | None = None


HUMAN = Verdict(False)


def user_agent_reason(user_agent: str, kind: str = "click") -> str | None:
    """The reason a user agent is a known proxy or scanner for this kind of hit, or None."""
    ua = user_agent.strip().lower()
    if not ua:
        return "no_user_agent"
    for reason, pattern, kinds in USER_AGENT_RULES:
        if kind in kinds and pattern.search(ua):
            return reason
    return None


def classify(
    kind: str,
    user_agent: str,
    ip: str | None,
    seconds_since_delivery: float | None,
    window: float,
    *,
    all_links_clicked: bool = False,
) -> Verdict:
    """The verdict on one hit of `kind` (`open` or `click`).

    `seconds_since_delivery` is None when the delivery time is unknown; a hit within `window`
    seconds of delivery is a scanner at the receiving side (no human reads that fast).
    `all_links_clicked`: with this click every link of the message was clicked within
    ALL_LINKS_SECONDS."""
    reason = user_agent_reason(user_agent, kind)
    if reason is not None:
        return Verdict(True, reason)
    if ip is not None:
        try:
            if ipaddress.ip_address(ip) in _APPLE_NETWORK:
                return Verdict(True, "apple_mail_privacy_protection")
        except ValueError:
            pass
    if seconds_since_delivery is not None and seconds_since_delivery < window:
        return Verdict(True, "too_soon_after_delivery")
    if all_links_clicked:
        return Verdict(True, "all_links_clicked")
    return HUMAN


def anonymise_ip(ip: str | None) -> str | None:
    """An address with the host part zeroed before it is stored: IPv4 keeps its /24 (the last
    octet becomes 0), IPv6 its /48 (the last 80 bits become 0). None for what is no address."""
    if not ip:
        return None
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False).network_address)
