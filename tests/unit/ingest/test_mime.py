"""Building API messages: MIME structure, encodings, addresses, and no header injection."""

from __future__ import annotations

import base64
import email
from email.message import EmailMessage
from email.policy import SMTP

import pytest

from postbode.ingest.mime import (
    Attachment,
    Draft,
    Mailbox,
    MimeError,
    base64_size,
    build,
    check_header,
    check_line,
    parse_content_type,
    parse_mailbox,
)

SHOP = Mailbox("orders", "shop.test", "Shop")
ALICE = Mailbox("alice", "dest.test")


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=SMTP)
    assert isinstance(msg, EmailMessage)
    return msg


def test_text_only_is_a_single_part() -> None:
    raw = build(Draft(sender=SHOP, subject="Hi", to=[ALICE], text="Hello\nthere"))
    msg = parse(raw)
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content() == "Hello\r\nthere\r\n"
    assert raw.count(b"\r\n") == raw.count(b"\n")  # RFC 5322 §2.1: CRLF only
    assert str(msg["From"]) == "Shop <orders@shop.test>"


def test_text_and_html_with_attachments() -> None:
    pdf = b"%PDF-1.4 \x00\xff" * 100
    raw = build(
        Draft(
            sender=SHOP,
            subject="Your invoice",
            to=[ALICE],
            cc=[Mailbox("bob", "dest.test", "Doe, Bob")],
            reply_to=Mailbox("help", "shop.test"),
            text="See attached.",
            html="<p>See attached.</p>",
            headers=[("X-Order", "42"), ("List-Unsubscribe", "<https://shop.test/u/1>")],
            attachments=[
                Attachment("invoice.pdf", "application", "pdf", pdf),
                Attachment("invite.ics", "text", "calendar", b"BEGIN:VCALENDAR", {"method": "x"}),
            ],
        )
    )
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/mixed"
    body, invoice, invite = msg.iter_parts()
    assert body.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in body.iter_parts()] == ["text/plain", "text/html"]
    assert invoice.get_filename() == "invoice.pdf"
    assert invoice.get_content() == pdf
    assert invite.get_content_type() == "text/calendar"
    assert invite.get_param("method") == "x"
    assert str(msg["Cc"]) == '"Doe, Bob" <bob@dest.test>'
    assert str(msg["Reply-To"]) == "help@shop.test"
    assert msg["X-Order"] == "42"
    assert msg["Bcc"] is None


def test_bcc_only_says_undisclosed_recipients() -> None:
    raw = build(Draft(sender=SHOP, subject="Hi", text="x"))
    assert b"\r\nTo: undisclosed-recipients:;\r\n" in raw


def test_html_only() -> None:
    msg = parse(build(Draft(sender=SHOP, subject="Hi", to=[ALICE], html="<b>Hi</b>")))
    assert msg.get_content_type() == "text/html"


def test_utf8_subject_and_names_are_encoded_and_bodies_7bit() -> None:
    raw = build(
        Draft(
            sender=Mailbox("orders", "shop.test", "Bücherstube Köln"),
            subject="Ihre Bestellung, danke schön",
            to=[Mailbox("x", "xn--bcher-kva.test", "Zoë")],
            text="Grüße " * 40,
        )
    )
    assert raw.isascii()  # RFC 2047 words and quoted-printable: no 8BITMIME needed
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78
    msg = parse(raw)
    assert str(msg["Subject"]) == "Ihre Bestellung, danke schön"
    assert msg["From"].addresses[0].display_name == "Bücherstube Köln"
    assert msg["To"].addresses[0].display_name == "Zoë"
    assert msg.get_content().startswith("Grüße Grüße")


def test_non_ascii_local_part_writes_utf8_headers() -> None:
    # RFC 6532: such an address cannot be RFC 2047-encoded; the message needs SMTPUTF8 anyway.
    raw = build(Draft(sender=SHOP, subject="Grüße", to=[Mailbox("jörg", "dest.test")], text="x"))
    assert "To: jörg@dest.test\r\n".encode() in raw
    assert "Subject: Grüße\r\n".encode() in raw


def test_long_header_values_are_folded_within_the_line_limit() -> None:
    raw = build(
        Draft(
            sender=SHOP,
            subject="word " * 190,
            to=[ALICE] * 40,
            text="x",
            headers=[("X-Token", "t" * 998)],
        )
    )
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 998  # RFC 5322 §2.1.1
    assert parse(raw)["X-Token"] == "t" * 998


@pytest.mark.parametrize(
    "value",
    [
        "Alice <alice@dest.test>",
        '"Doe, Alice" <alice@dest.test>',
        "  alice@dest.test ",
        "<alice@dest.test>",
        "Zoë Ça <alice@dest.test>",
    ],
)
def test_parse_mailbox(value: str) -> None:
    box = parse_mailbox(value)
    assert box.address == "alice@dest.test"
    assert box.display_name in ("Alice", "Doe, Alice", "", "Zoë Ça")


def test_parse_mailbox_keeps_idn_as_ascii_and_unicode_local_parts() -> None:
    assert parse_mailbox("x@bücher.test").address == "x@xn--bcher-kva.test"
    assert parse_mailbox("jörg@bücher.test").needs_smtputf8


@pytest.mark.parametrize(
    "value",
    [
        "nope",
        "a@b",
        "a@localhost",
        "a@b.invalid",
        "a@dest.test, b@dest.test",
        "a@dest.test\r\nBcc: x@evil.test",
        "=?utf-8?q?x=0D=0ABcc:_x@evil.test?= <a@dest.test>",
        "a b@dest.test",
        "a@dest.test>",
    ],
)
def test_parse_mailbox_refuses(value: str) -> None:
    with pytest.raises(MimeError):
        parse_mailbox(value)


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("Bcc", "reserved_header"),
        ("bcc", "reserved_header"),
        ("Content-Type", "reserved_header"),
        ("Message-ID", "reserved_header"),
        ("X-Postbode-Tag", "reserved_header"),
        ("Resent-Bcc", "reserved_header"),
        ("DKIM-Signature", "reserved_header"),
        ("X Foo", "invalid_header_name"),
        ("X-Foo:", "invalid_header_name"),
        ("X-Föö", "invalid_header_name"),
        ("", "invalid_header_name"),
        ("X-" + "a" * 80, "invalid_header_name"),
    ],
)
def test_check_header_refuses_names(name: str, code: str) -> None:
    with pytest.raises(MimeError) as caught:
        check_header(name, "x")
    assert caught.value.code == code


@pytest.mark.parametrize("name", ["X-Foo", "List-Unsubscribe", "In-Reply-To", "References"])
def test_check_header_allows(name: str) -> None:
    check_header(name, "value with ünïcode")


@pytest.mark.parametrize(
    "value",
    [
        "a\r\nBcc: x@evil.test",
        "a\nb",
        "a\rb",
        "a\x00b",
        "a\x1bb",
        # RFC 2047 words that decode to a line break: the stdlib would write them out raw.
        "=?utf-8?q?a=0D=0ABcc:_x@evil.test?=",
        "x=?utf-8?b?" + base64.b64encode(b"a\r\nBcc: x@evil.test").decode() + "?=y",
    ],
)
def test_check_line_refuses_injection(value: str) -> None:
    with pytest.raises(MimeError):
        check_line(value)


def test_build_refuses_what_the_stdlib_would_inject() -> None:
    # The last guard: even a value that skipped the checks cannot become a second field.
    evil = "=?utf-8?q?a=0D=0ABcc:_x@evil.test?="
    for draft in (
        Draft(sender=Mailbox("a", "shop.test", evil), subject="x", to=[ALICE], text="x"),
        Draft(sender=SHOP, subject=evil, to=[ALICE], text="x"),
        Draft(sender=SHOP, subject="x", to=[ALICE], text="x", headers=[("X-A", evil)]),
        Draft(
            sender=SHOP,
            subject="x",
            to=[ALICE],
            text="x",
            attachments=[Attachment(evil, "application", "pdf", b"x")],
        ),
    ):
        with pytest.raises(MimeError) as caught:
            build(draft)
        assert caught.value.code == "header_injection"


def test_parse_content_type() -> None:
    assert parse_content_type("application/pdf") == ("application", "pdf", {})
    assert parse_content_type('Text/Calendar; method=REQUEST; name="a \\"b\\".ics"') == (
        "text",
        "calendar",
        {"method": "REQUEST", "name": 'a "b".ics'},
    )
    for bad in ("pdf", "text/", "a/b; x", "message/rfc822", "multipart/mixed", "a/b\r\nX: y"):
        with pytest.raises(MimeError):
            parse_content_type(bad)


def test_base64_size_matches_what_the_generator_writes() -> None:
    for n in (0, 1, 56, 57, 58, 1000, 100_000):
        data = b"\xff" * n
        msg = EmailMessage(policy=SMTP)
        msg.set_content(data, "application", "octet-stream")
        body = msg.as_bytes().split(b"\r\n\r\n", 1)[1]
        assert base64_size(n) == len(body)
