"""Parsing inbound mail into its payloads: bodies, charsets, addresses, attachments, the reply
alone, Postmark's field names; hostile input never raises (a corpus and a fuzzer)."""

from __future__ import annotations

import base64
import json
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postbode.inbound.intake import check_message, summary
from postbode.inbound.parse import (
    MAX_PARTS,
    Envelope,
    native_payload,
    parse,
    postmark_payload,
    stripped_reply,
)
from postbode.testing.hostile_mail import corpus

ENVELOPE = Envelope(
    id="0190",
    mail_from="bounces@sender.test",
    rcpt_to="support+t-1@in.shop.test",
    mailbox_hash="t-1",
    received_at="2026-12-07T12:00:00+00:00",
    client_ip="127.0.0.1",
    helo="mta.sender.test",
    route_id=1,
    match="support@in.shop.test",
)


def payloads(raw: bytes, inline_limit: int = 10_000_000) -> tuple[dict, dict]:  # type: ignore[type-arg]
    parsed = parse(raw)
    native = native_payload(parsed, ENVELOPE, None, inline_limit=inline_limit, link=None)
    postmark = postmark_payload(parsed, ENVELOPE, None, inline_limit=inline_limit, link=None)
    json.dumps(native), json.dumps(postmark)  # always serialisable
    return native, postmark


def test_bodies_addresses_and_attachments_are_decoded() -> None:
    msg = EmailMessage()
    msg["From"] = "=?utf-8?q?J=C3=B6rg?= <jorg@sender.test>"
    msg["To"] = "Support <support+t-1@in.shop.test>, other@in.shop.test"
    msg["Reply-To"] = "replies@sender.test"
    msg["Subject"] = "Grüße — 📦"
    msg.set_content("Ça va?\n", charset="iso-8859-1")
    msg.add_alternative("<p>Ça va?</p>", subtype="html", charset="utf-8")
    msg.add_attachment(b"a,b\n1,2\n", maintype="text", subtype="csv", filename="données.csv")
    native, postmark = payloads(msg.as_bytes(policy=SMTP_POLICY))
    assert native["from"] == {"email": "jorg@sender.test", "name": "Jörg"}
    assert [t["email"] for t in native["to"]] == ["support+t-1@in.shop.test", "other@in.shop.test"]
    assert native["reply_to"] == [{"email": "replies@sender.test", "name": ""}]
    assert native["subject"] == "Grüße — 📦"
    assert native["text"] == "Ça va?\n" and native["html"] == "<p>Ça va?</p>\n"
    [csv] = native["attachments"]
    assert (csv["filename"], csv["content_type"], csv["size"]) == ("données.csv", "text/csv", 8)
    assert base64.b64decode(csv["content"]) == b"a,b\n1,2\n"
    assert postmark["FromFull"] == {"Email": "jorg@sender.test", "Name": "Jörg", "MailboxHash": ""}
    assert postmark["ToFull"][0] == {
        "Email": "support+t-1@in.shop.test",
        "Name": "Support",
        "MailboxHash": "t-1",
    }
    assert postmark["MailboxHash"] == "t-1" and postmark["OriginalRecipient"] == ENVELOPE.rcpt_to
    assert postmark["ReplyTo"] == "replies@sender.test"
    assert postmark["Attachments"] == [
        {
            "Name": "données.csv",
            "Content": base64.b64encode(b"a,b\n1,2\n").decode(),
            "ContentType": "text/csv",
            "ContentLength": 8,
            "ContentID": "",
        }
    ]


def test_attachments_over_the_limit_become_links() -> None:
    msg = EmailMessage()
    msg["Subject"] = "big"
    msg.set_content("see attached")
    msg.add_attachment(bytes(5000), maintype="application", subtype="octet-stream", filename="z")
    parsed = parse(msg.as_bytes())
    native = native_payload(
        parsed, ENVELOPE, None, inline_limit=1000, link=lambda i: f"https://pb.example/a/{i}"
    )
    assert native["attachments"][0]["content"] is None
    assert native["attachments"][0]["url"] == "https://pb.example/a/0"
    postmark = postmark_payload(
        parsed, ENVELOPE, None, inline_limit=1000, link=lambda i: f"https://pb.example/a/{i}"
    )
    assert postmark["Attachments"][0]["Content"] == ""
    assert postmark["Attachments"][0]["ContentUrl"] == "https://pb.example/a/0"


def test_the_reply_is_separated_from_quotes_and_signature() -> None:
    text = (
        "Sounds good.\n- bring the receipt\n- and the box\n\n-- \nAlice\n\n"
        "On Mon, 7 Dec 2026 at 10:00, Shop <orders@shop.test> wrote:\n> old text\n"
    )
    assert stripped_reply(text) == "Sounds good.\n- bring the receipt\n- and the box"
    german = "Danke!\n\nAm 07.12.2026 um 10:00 schrieb Shop <a@b.test>:\n> alt\n"
    assert stripped_reply(german) == "Danke!"
    french = "Merci!\n\nLe lun. 7 déc. 2026 à 10:00, Shop <a@b.test> a écrit :\n> vieux\n"
    assert stripped_reply(french) == "Merci!"
    assert stripped_reply("") == ""


def test_every_message_of_the_hostile_corpus_is_stored_or_refused_with_a_reason() -> None:
    outcomes = {}
    for name, raw in corpus():
        refusal = check_message(raw)
        if refusal is not None:
            assert refusal[:3] in ("552", "554") and len(refusal) > 10
            outcomes[name] = "refused"
            continue
        summary(raw.split(b"\r\n\r\n")[0])
        native, _ = payloads(raw)
        outcomes[name] = "stored"
        for text in (native["text"], native["html"], native["subject"]):
            assert "\x00" not in text
    assert outcomes["huge header section (300 KB)"] == "refused"
    assert outcomes["too many header fields (1500)"] == "refused"
    assert sum(1 for v in outcomes.values() if v == "stored") >= 18


def test_hostile_structures_are_bounded_and_said() -> None:
    found = dict(corpus())
    deep = parse(found["very deep nesting (3000 levels)"])
    assert any("nested" in w for w in deep.warnings)
    parts = parse(found["thousands of parts"])
    assert any(str(MAX_PARTS) in w for w in parts.warnings)
    zipped = parse(found["zip bomb (10 MB of zeros in a few KB)"])
    [archive] = zipped.attachments
    assert archive.content_type == "application/zip" and len(archive.content) < 100_000
    nul = parse(found["NUL bytes"])
    assert nul.header("subject") == "nul\ufffdhere" and nul.text == "body\ufffdwith\ufffdnuls\n"
    eight = parse(found["8-bit headers"])
    assert eight.header("subject") == "Grüße — 📦"
    assert eight.addresses("from") == [{"email": "jörg@sender.test", "name": "Jörg"}]
    latin = parse(found["latin-1 declared as utf-8"])
    assert latin.text == "café\n"


# -- fuzzing --------------------------------------------------------------------------------

_header = st.tuples(
    st.sampled_from(
        [
            "From",
            "To",
            "Cc",
            "Subject",
            "Content-Type",
            "Content-Transfer-Encoding",
            "Content-Disposition",
            "MIME-Version",
            "Reply-To",
            "X-Any",
        ]
    ),
    st.binary(max_size=80).filter(lambda b: b"\n" not in b and b"\r" not in b),
)
_ctype = st.sampled_from(
    [
        b"text/plain",
        b"text/html",
        b"multipart/mixed",
        b"multipart/alternative",
        b"message/rfc822",
        b"application/octet-stream",
        b"image/png",
        b"multipart/x",
    ]
)


@st.composite
def mime(draw: st.DrawFn, depth: int = 0) -> bytes:
    headers = b"".join(
        name.encode() + b": " + value + b"\r\n"
        for name, value in draw(st.lists(_header, max_size=6))
    )
    ctype = draw(_ctype)
    boundary = draw(st.sampled_from([b"b", b"b" * 70, b"", b"--", b"=?x?="]))
    charset = draw(st.sampled_from([b"utf-8", b"x-unknown", b"latin-1", b"utf-16", b""]))
    encoding = draw(st.sampled_from([b"base64", b"quoted-printable", b"7bit", b"x-uu", b""]))
    head = (
        headers
        + b"Content-Type: "
        + ctype
        + b'; boundary="'
        + boundary
        + b'"; charset='
        + charset
        + b"\r\nContent-Transfer-Encoding: "
        + encoding
        + b"\r\n"
    )
    if ctype.startswith(b"multipart") and depth < 3:
        children = draw(st.lists(mime(depth + 1), max_size=3))
        body = b"".join(b"--" + boundary + b"\r\n" + c + b"\r\n" for c in children)
        body += draw(st.sampled_from([b"--" + boundary + b"--\r\n", b""]))
    else:
        body = draw(st.binary(max_size=300))
    return head + b"\r\n" + body


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mime())
def test_fuzzed_mime_never_crashes_the_parser(raw: bytes) -> None:
    if check_message(raw) is None:
        summary(raw.split(b"\r\n\r\n")[0])
        payloads(raw, inline_limit=100)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_crash_the_parser(raw: bytes) -> None:
    if check_message(raw) is None:
        payloads(raw)
