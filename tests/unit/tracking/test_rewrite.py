"""The tracking rewrite: links and pixel in HTML parts only, transfer encodings honoured, the
MIME structure and every other part kept byte for byte, unsubscribe headers signed by DKIM."""

from __future__ import annotations

import email
import re
import uuid
from email import policy
from email.message import EmailMessage, Message
from html import unescape
from types import SimpleNamespace

import dkim
import pytest

from postbode.config import Settings
from postbode.delivery import dkim as postbode_dkim
from postbode.store.engine import Store
from postbode.tracking import tokens
from postbode.tracking.rewrite import Options, rewrite_html, rewrite_message, track, tracking_key

KEY = tokens.derive_key(b"test")
BASE = "https://t.postbode.test"
DELIVERY = uuid.UUID("01905d2e-0000-7000-8000-00000000abcd")
HTML = """<!doctype html>
<html><head><style>a { color: red }</style></head>
<BODY>
<p>Caf\u00e9 \u2014 your order
<a href="https://shop.test/orders/42?a=1&amp;b=2" class="btn">Order 42</a>.</p>
<p><A HREF='https://shop.test/track'>Track</A> and <a href=https://shop.test/help>help</a></p>
<p><a href="https://shop.test/orders/42?a=1&amp;b=2">again</a></p>
<p><a href="mailto:help@shop.test">mail</a> <a href="tel:+3120123">call</a> <a href="#top">top</a>
<a href="/relative">rel</a> <a data-postbode-notrack href="https://shop.test/secret">mine</a>
<a href="https://shop.test/prefs">Unsubscribe</a> <a href="https://shop.test/unsubscribe?u=1">here</a>
<a href="{{unsubscribe}}">x</a> <a href="https://shop.test/list-unsub">list</a>
<a>no href</a></p>
</body></html>
"""
TRACKED = [
    "https://shop.test/orders/42?a=1&b=2",
    "https://shop.test/track",
    "https://shop.test/help",
    "https://shop.test/orders/42?a=1&b=2",
]


def options(**kw: object) -> Options:
    values: dict = {"delivery_id": DELIVERY, "opens": True, "clicks": True, **kw}
    return Options(BASE, KEY, **values)


def message(html: str = HTML, *, cte: str | None = None, charset: str = "utf-8") -> bytes:
    msg = EmailMessage()
    msg["From"] = "Shop <orders@shop.test>"
    msg["To"] = "alice@dest.test"
    msg["Subject"] = "Your order"
    msg["List-Unsubscribe"] = "<https://shop.test/list-unsub>"
    msg.set_content("Your order 42: https://shop.test/orders/42\n")
    msg.add_alternative(html, subtype="html", cte=cte, charset=charset)
    return msg.as_bytes(policy=policy.SMTP)


def html_part(raw: bytes) -> tuple[Message, str]:
    parsed = email.message_from_bytes(raw, policy=policy.default)
    part = next(p for p in parsed.walk() if p.get_content_type() == "text/html")
    return part, part.get_content()


def links(html: str) -> list[str]:
    return [unescape(h) for h in re.findall(r"""(?i)href\s*=\s*["']?([^"'\s>]+)""", html)]


def structure(raw: bytes) -> list[tuple[str, str | None]]:
    parsed = email.message_from_bytes(raw, policy=policy.compat32)
    return [(p.get_content_type(), p.get_boundary()) for p in parsed.walk()]


@pytest.mark.parametrize("cte", [None, "quoted-printable", "base64", "8bit"])
def test_links_and_pixel_in_every_transfer_encoding(cte: str | None) -> None:
    raw = message(cte=cte)
    out = rewrite_message(raw, options())
    assert structure(out) == structure(raw)
    part, html = html_part(out)
    assert part["Content-Transfer-Encoding"] == html_part(raw)[0]["Content-Transfer-Encoding"]
    found = [h for h in links(html) if h.startswith(BASE + "/t/c/")]
    decoded = [tokens.decode(h.rsplit("/", 1)[1], KEY, "click") for h in found]
    assert [t.url for t in decoded if t] == TRACKED
    assert all(t is not None and t.delivery_id == DELIVERY and t.links == 3 for t in decoded)
    assert [t.link for t in decoded if t] == [0, 1, 2, 0]  # numbered by distinct URL
    # everything else is left alone
    assert [h for h in links(html) if not h.startswith(BASE)] == [
        "mailto:help@shop.test",
        "tel:+3120123",
        "#top",
        "/relative",
        "https://shop.test/secret",
        "https://shop.test/prefs",
        "https://shop.test/unsubscribe?u=1",
        "{{unsubscribe}}",
        "https://shop.test/list-unsub",
    ]
    assert 'class="btn"' in html and "Caf\u00e9 \u2014" in html
    # one pixel, just before </body>
    pixel = re.findall(r'<img src="([^"]+)" width="1" height="1"[^>]*/>\n?</body>', html)
    assert len(pixel) == 1 and tokens.decode(pixel[0].rsplit("/", 1)[1], KEY, "open")
    # the text part and the headers are untouched, byte for byte
    assert out.split(b"\r\n\r\n", 1)[0] == raw.split(b"\r\n\r\n", 1)[0]
    start = raw.index(b"Content-Type: text/plain")
    plain = raw[start : raw.index(b"\r\n--=", start)]
    assert plain in out and plain.endswith(b"Your order 42: https://shop.test/orders/42\r\n")
    for line in out.split(b"\r\n"):
        assert len(line) <= 998


def test_base64_lines_stay_short() -> None:
    out = rewrite_message(message(cte="base64"), options())
    body = out.split(b"Content-Transfer-Encoding: base64\r\n", 1)[1]
    lines = [
        ln for ln in body.split(b"\r\n\r\n", 1)[1].split(b"\r\n") if ln and not ln.startswith(b"--")
    ]
    assert max(len(ln) for ln in lines) <= 76


def test_long_lines_in_7bit_switch_to_quoted_printable() -> None:
    url = "https://shop.test/" + "x" * 900
    raw = (
        b"From: orders@shop.test\r\nTo: a@dest.test\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/html; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
        + f'<html><body><a href="{url}">go</a></body></html>\r\n'.encode()
    )
    out = rewrite_message(raw, options())
    assert max(len(line) for line in out.split(b"\r\n")) <= 998
    parsed = email.message_from_bytes(out, policy=policy.default)
    assert parsed["Content-Transfer-Encoding"] == "quoted-printable"
    assert len(parsed.get_all("Content-Transfer-Encoding")) == 1
    (href,) = [h for h in links(parsed.get_content()) if h.startswith(BASE)]
    assert tokens.decode(href.rsplit("/", 1)[1], KEY).url == url  # type: ignore[union-attr]


def test_latin1_8bit_html_keeps_its_charset() -> None:
    raw = (
        b"From: orders@shop.test\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/html; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        b'<p>Caf\xe9 <a href="https://shop.test/">shop</a></p>\r\n'
    )
    out = rewrite_message(raw, options(opens=False))
    assert b'<p>Caf\xe9 <a href="' + BASE.encode() in out
    assert out.endswith(b"</a></p>\r\n")


def test_no_body_tag_puts_the_pixel_at_the_end() -> None:
    html = rewrite_html("<p>hi</p>", options())
    assert html.startswith("<p>hi</p><img src=") and html.endswith("/>")


def test_opens_only_and_clicks_only() -> None:
    opens = html_part(rewrite_message(message(), options(clicks=False)))[1]
    assert not [h for h in links(opens) if h.startswith(BASE)]
    assert "/t/o/" in opens
    clicks = html_part(rewrite_message(message(), options(opens=False)))[1]
    assert "/t/o/" not in clicks and len([h for h in links(clicks) if h.startswith(BASE)]) == 4


def test_nothing_to_track_changes_nothing() -> None:
    raw = message()
    assert rewrite_message(raw, options(opens=False, clicks=False)) == raw
    plain = b"From: a@shop.test\r\nSubject: s\r\n\r\nno html here, https://shop.test/\r\n"
    assert rewrite_message(plain, options()) == plain


def test_tokens_are_per_delivery() -> None:
    one = rewrite_message(message(), options(delivery_id=uuid.uuid4()))
    two = rewrite_message(message(), options(delivery_id=uuid.uuid4()))
    assert links(html_part(one)[1])[0] != links(html_part(two)[1])[0]


def test_attachments_and_forwarded_messages_are_left_alone() -> None:
    outer = EmailMessage()
    outer["From"] = "orders@shop.test"
    outer["Subject"] = "fwd"
    outer.set_content("see attached")
    outer.add_alternative(
        '<html><body><a href="https://shop.test/">a</a></body></html>', subtype="html"
    )
    outer.add_attachment(
        b'<html><body><a href="https://shop.test/attached">b</a></body></html>',
        maintype="text",
        subtype="html",
        filename="page.html",
    )
    inner = EmailMessage()
    inner["Subject"] = "inner"
    inner.set_content(
        '<html><body><a href="https://shop.test/inner">c</a></body></html>', subtype="html"
    )
    outer.add_attachment(inner)
    raw = outer.as_bytes(policy=policy.SMTP)
    out = rewrite_message(raw, options())
    assert structure(out) == structure(raw)
    assert b"https://shop.test/attached" in out or b"aHR0cHM6Ly9zaG9wLnRlc3QvYXR0YWNoZWQ" in out
    assert b'<a href="https://shop.test/inner">' in out
    assert out.count(b"/t/o/") == 1  # one pixel per message
    parsed = email.message_from_bytes(out, policy=policy.default)
    attached = next(p for p in parsed.walk() if p.get_filename() == "page.html")
    assert (
        attached.get_content()
        == '<html><body><a href="https://shop.test/attached">b</a></body></html>'
    )


def test_preamble_epilogue_and_lf_line_ends_survive() -> None:
    raw = (
        b"From: orders@shop.test\nSubject: s\nMIME-Version: 1.0\n"
        b'Content-Type: multipart/alternative; boundary="b1"\n\n'
        b"This is a preamble.\n--b1\nContent-Type: text/plain\n\nplain\n--b1  \n"
        b"Content-Type: text/html\n\n<html><body><a href='https://shop.test/'>x</a></body></html>\n"
        b"--b1--\nan epilogue\n"
    )
    out = rewrite_message(raw, options())
    assert out.startswith(raw[: raw.index(b"--b1  \n") + 7])
    assert out.endswith(b"</body></html>\n--b1--\nan epilogue\n")
    assert b"\r" not in out
    assert structure(out) == structure(raw)


def test_list_unsubscribe_for_broadcast_signed_by_dkim() -> None:
    raw = message().replace(b"List-Unsubscribe: <https://shop.test/list-unsub>\r\n", b"")
    out = rewrite_message(raw, options(opens=False, clicks=False, unsubscribe=True))
    parsed = email.message_from_bytes(out, policy=policy.default)
    (url,) = re.findall(r"<([^>]+)>", parsed["List-Unsubscribe"])
    assert url.startswith(BASE + "/t/u/")
    assert tokens.decode(url.rsplit("/", 1)[1], KEY, "unsubscribe") is not None
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    private, public = postbode_dkim.generate_keypair(1024)
    signed = postbode_dkim.sign(out, "shop.test", "s1", private)
    header = signed.split(b"\r\n\r\n", 1)[0].decode()
    signed_fields = re.search(
        r"h=([^;]+);", header.replace("\r\n", "").replace(" ", "").replace("\t", "")
    )
    assert signed_fields and {"list-unsubscribe", "list-unsubscribe-post"} <= set(
        signed_fields.group(1).lower().split(":")
    )
    txt = public if isinstance(public, bytes) else public.encode()
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: txt)


def test_a_senders_own_list_unsubscribe_is_kept() -> None:
    raw = message()
    out = rewrite_message(raw, options(opens=False, clicks=False, unsubscribe=True))
    assert out == raw


def test_the_step_tracks_per_message_settings(sqlite_store: Store) -> None:
    settings = Settings(secret_key="k", tracking_url=BASE + "/")
    raw = message()
    job = SimpleNamespace(
        row=SimpleNamespace(id=DELIVERY),
        message=SimpleNamespace(stream="transactional", track_opens=False, track_clicks=False),
        raw=raw,
    )
    track(settings, sqlite_store, job)
    assert job.raw == raw
    job.message.track_clicks = True
    track(settings, sqlite_store, job)
    key = tracking_key(settings, sqlite_store)
    hrefs = [h for h in links(html_part(job.raw)[1]) if h.startswith(BASE + "/t/c/")]
    assert tokens.decode(hrefs[0].rsplit("/", 1)[1], key).url == TRACKED[0]  # type: ignore[union-attr]


def test_the_step_sends_unparseable_mail_untracked(
    sqlite_store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    raw = b"Content-Type: text/html; charset=utf-8\r\n\r\n<a href='https://shop.test/'>x</a>"
    job = SimpleNamespace(
        row=SimpleNamespace(id="not a uuid"),  # the token cannot be made
        message=SimpleNamespace(stream="transactional", track_opens=True, track_clicks=True),
        raw=raw,
    )
    track(Settings(secret_key="k"), sqlite_store, job)
    assert job.raw == raw and "sent untracked" in caplog.text
