"""Bot detection: proxies and scanners by user agent, timing, all links at once; anonymised IPs."""

from __future__ import annotations

import pytest

from postbode.tracking.bots import Verdict, anonymise_ip, classify, user_agent_reason

CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36"
)
IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148"
)


@pytest.mark.parametrize(
    ("user_agent", "reason"),
    [
        ("Mozilla/5.0", "apple_mail_privacy_protection"),
        (
            "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com "
            "GoogleImageProxy)",
            "google_image_proxy",
        ),
        (
            "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html",
            "yahoo_mail_proxy",
        ),
        ("Mozilla/5.0 (compatible; SafeLinks/1.0)", "microsoft_safe_links"),
        ("Mozilla/5.0 (Windows NT 10.0) BingPreview/1.0b", "microsoft_safe_links"),
        ("Barracuda Sentinel (EE)", "barracuda"),
        ("Mozilla/5.0 (compatible; Proofpoint URL Defense)", "proofpoint"),
        ("Mimecast-URL-Protect/1.0", "mimecast"),
        (
            "Mozilla/5.0 (X11; Linux x86_64) HeadlessChrome/126.0.0.0 Safari/537.36",
            "headless_browser",
        ),
        ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", "generic_bot"),
        ("SomeCrawler 1.0", "generic_bot"),
        ("Link Scanner", "generic_bot"),
        ("python-requests/2.32.3", "generic_bot"),
        ("curl/8.5.0", "generic_bot"),
        ("", "no_user_agent"),
    ],
)
def test_known_agents(user_agent: str, reason: str) -> None:
    assert user_agent_reason(user_agent) == reason
    assert classify("click", user_agent, "198.51.100.0", 3600, 10) == Verdict(True, reason)


@pytest.mark.parametrize("user_agent", [CHROME, IPHONE, "Thunderbird/115.0"])
def test_people(user_agent: str) -> None:
    assert classify("open", user_agent, "198.51.100.0", 3600, 10) == Verdict(False)
    assert classify("click", user_agent, "2001:db8:1::", 3600, 10) == Verdict(False)


def test_office_checks_links_but_outlook_opens_are_real() -> None:
    office = "Mozilla/4.0 (compatible; ms-office; MSOffice 16)"
    assert classify("click", office, None, 3600, 10).reason == "microsoft_safe_links"
    assert not classify("open", office, None, 3600, 10).bot


def test_apple_network() -> None:
    assert classify("open", IPHONE, "17.58.100.0", 3600, 10).reason == (
        "apple_mail_privacy_protection"
    )


def test_too_soon_after_delivery() -> None:
    assert classify("click", CHROME, None, 2.5, 10.0) == Verdict(True, "too_soon_after_delivery")
    assert classify("click", CHROME, None, 10.0, 10.0) == Verdict(False)
    assert classify("click", CHROME, None, None, 10.0) == Verdict(False)
    assert classify("click", CHROME, None, 1.0, 0.0) == Verdict(False)  # the rule switched off


def test_every_link_at_once() -> None:
    assert classify("click", CHROME, None, 60, 10, all_links_clicked=True) == Verdict(
        True, "all_links_clicked"
    )


@pytest.mark.parametrize(
    ("ip", "kept"),
    [
        ("203.0.113.77", "203.0.113.0"),
        ("2001:db8:abcd:12:34:56:78:9a", "2001:db8:abcd::"),
        ("::ffff:192.0.2.200", "192.0.2.0"),
        ("fe80::1%eth0", "fe80::"),
        ("not an address", None),
        ("", None),
        (None, None),
    ],
)
def test_anonymise_ip(ip: str | None, kept: str | None) -> None:
    assert anonymise_ip(ip) == kept
