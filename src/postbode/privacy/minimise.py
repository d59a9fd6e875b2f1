"""Data minimisation at the door: what of a tracking hit is kept (a user agent's family, never
the full string; the IP address truncated to its network, see tracking/bots.anonymise_ip)."""

from __future__ import annotations

import functools

from ua_parser import parse_user_agent

UNKNOWN = "Other"


@functools.lru_cache(maxsize=4096)
def user_agent_family(user_agent: str) -> str:
    """The browser or mail client family of a user agent (`Chrome`, `Outlook`, `Mobile
    Safari UI/WKWebView`, `curl` …) without versions or platform, which together with the IP
    address would single a person out; "" for none, `Other` for one not recognised."""
    if not user_agent.strip():
        return ""
    found = parse_user_agent(user_agent)
    return found.family if found is not None and found.family else UNKNOWN
