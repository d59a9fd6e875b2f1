"""The simple MIME build writes the bytes the email package writes, and leaves to it what it
cannot write so."""

from __future__ import annotations

import re
import string
from email import message_from_bytes, quoprimime
from email.message import EmailMessage
from email.policy import SMTP

import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postbode.ingest import mime
from postbode.ingest.mime import Attachment, Draft, Mailbox, MimeError, parse_mailbox

_BOUNDARY = re.compile(rb"={15}\d{19}==(?:\.\d+)?")


def _numbered(raw: bytes) -> bytes:
    """The message with its MIME boundaries numbered in order of appearance."""
    seen: dict[bytes, bytes] = {}

    def number(match: re.Match[bytes]) -> bytes:
        return seen.setdefault(match.group(), b"=boundary-%d=" % len(seen))

    return _BOUNDARY.sub(number, raw)


def assert_same_as_email_package(draft: Draft) -> bytes | None:
    simple = mime._build_simple(draft)
    try:
        reference = mime.build_with_email_package(draft)
    except MimeError:
        assert simple is None
        return None
    if simple is not None:
        assert _numbered(simple) == _numbered(reference)
    assert _numbered(mime.build(draft)) == _numbered(reference)
    return simple


SHOP = parse_mailbox("Shop <orders@shop.test>")
ALICE = parse_mailbox("alice@dest.test")


@pytest.mark.parametrize(
    "draft",
    [
        Draft(SHOP, "Your order 12", to=[ALICE], text="Thanks.\r\nBye.\r\n"),
        Draft(SHOP, "Hi", to=[ALICE], html="<p>Hi</p>"),
        Draft(SHOP, "Hi", to=[ALICE], text="Hi", html="<p>Hi</p>"),
        Draft(SHOP, "Hi", text="only Bcc recipients"),
        Draft(
            parse_mailbox("Acme Inc. <orders@shop.test>"),
            "Invoice",
            to=[ALICE, parse_mailbox('"Bob, Jr." <bob@dest.test>')],
            cc=[parse_mailbox("carol@dest.test")],
            reply_to=parse_mailbox("help@shop.test"),
            text="Your invoice.",
            html="<p>Your <b>invoice</b>.</p>",
            headers=[("X-Order", "1234"), ("List-Unsubscribe", "<https://shop.test/u/1>")],
            attachments=[
                Attachment("invoice 12.pdf", "application", "pdf", b"%PDF\x00\xff" * 50),
                Attachment("empty.bin", "application", "octet-stream", b""),
            ],
        ),
        Draft(SHOP, "Long lines", to=[ALICE], text="x" * 200 + "\n" + "y = 1 " * 40),
        Draft(SHOP, "Grüße", to=[ALICE], text="ü"),
        Draft(SHOP, "Hi", to=[ALICE], text="Grüße aus Köln\n" * 20),
        Draft(SHOP, "Hi", to=[ALICE], text="Здравствуйте\n" * 3),
        Draft(SHOP, "Hi", to=[ALICE], text="a\rb\r\nc\nd\n\n"),
        Draft(SHOP, "Hi", to=[ALICE], text=""),
        Draft(SHOP, "Hi", to=[ALICE], text="{x} {{y}} %s"),
        Draft(SHOP, "=?utf-8?q?hi?=", to=[ALICE], text="x"),
        Draft(SHOP, "x" * 200, to=[ALICE], text="x"),
        Draft(SHOP, "Hi", to=[parse_mailbox(f"r{i}@dest.test") for i in range(20)], text="x"),
        Draft(parse_mailbox("Zoë <zoe@shop.test>"), "Hi", to=[ALICE], text="x"),
        Draft(SHOP, "Hi", to=[parse_mailbox("用户@dest.test")], text="x"),
        Draft(
            SHOP,
            "Hi",
            to=[ALICE],
            text="x",
            attachments=[Attachment("Grüße.txt", "text", "plain", b"x")],
        ),
        Draft(
            SHOP,
            "Hi",
            to=[ALICE],
            text="x",
            attachments=[Attachment("a.csv", "text", "csv", b"x", {"charset": "utf-8"})],
        ),
    ],
)
def test_simple_build_is_the_email_packages(draft: Draft) -> None:
    assert_same_as_email_package(draft)


def test_common_shapes_take_the_simple_build() -> None:
    for draft in [
        Draft(SHOP, "Your order 12", to=[ALICE], text="Thanks.\r\n" * 30),
        Draft(SHOP, "Your order 12", to=[ALICE], text="Thanks.", html="<p>" + "x" * 500),
        Draft(
            SHOP,
            "Invoice",
            to=[ALICE],
            html="<p>Grüße</p>",
            headers=[("X-Order", "1")],
            attachments=[Attachment("invoice.pdf", "application", "pdf", b"\x00" * 5000)],
        ),
        # Fields to encode or fold are folded one by one, the rest of the message as above.
        Draft(SHOP, "Ihre Bestellung bei Müller ist unterwegs", to=[ALICE], text="Hallo"),
        Draft(parse_mailbox("Zoë <zoe@shop.test>"), "Hi", to=[ALICE], text="x", html="y"),
        Draft(SHOP, "Hi", to=[parse_mailbox(f"r{i}@dest.test") for i in range(20)], text="x"),
        Draft(SHOP, "Hi", to=[parse_mailbox("用户@dest.test")], text="x"),
        Draft(SHOP, "x" * 200, to=[ALICE], text="x", headers=[("X-Long", "y " * 100)]),
    ]:
        assert assert_same_as_email_package(draft) is not None


def test_simple_build_is_one_field_a_line_with_short_lines() -> None:
    raw = mime.build(
        Draft(
            SHOP,
            "Invoice",
            to=[ALICE],
            text="é" * 3000,
            html="<p>" + "x" * 3000,
            attachments=[Attachment("a.bin", "application", "octet-stream", b"\xff" * 3000)],
        )
    )
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78
    assert b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b"")
    msg = message_from_bytes(raw, policy=SMTP)
    assert isinstance(msg, EmailMessage)
    parts = {p.get_content_type(): p.get_content() for p in msg.walk() if not p.is_multipart()}
    parts = {k: v.replace("\r\n", "\n") if isinstance(v, str) else v for k, v in parts.items()}
    assert parts == {
        "text/plain": "é" * 3000 + "\n",
        "text/html": "<p>" + "x" * 3000 + "\n",
        "application/octet-stream": b"\xff" * 3000,
    }


# -- property: any draft the API can make -------------------------------------------------------

_ascii = string.ascii_letters + string.digits + string.punctuation + " "
_plain_line = st.text(alphabet=_ascii, min_size=1, max_size=30)
_any_line = st.one_of(
    _plain_line,
    st.text(alphabet=string.printable, max_size=30),
    st.text(alphabet=st.characters(blacklist_categories=["Cs", "Cc"]), max_size=30),
    st.sampled_from(["=?utf-8?q?x?=", " a ", "a  b", "x" * 90, "", '"a" <b>', "a\\b"]),
)


@st.composite
def _mailbox(draw: st.DrawFn, plain: bool) -> Mailbox:
    local = draw(
        st.from_regex(r"[a-z0-9%+=?'_-]{1,9}(\.[a-z0-9%+=?'_-]{1,9}){0,2}", fullmatch=True)
    )
    if not plain:
        local = draw(st.sampled_from([local, "用户", "zoë"]))
    name = draw(st.one_of(st.just(""), _plain_line if plain else _any_line))
    try:
        mime.check_line(name)
    except MimeError:
        name = ""
    return Mailbox(local, draw(st.sampled_from(["dest.test", "xn--bcher-kva.test"])), name.strip())


@st.composite
def _body(draw: st.DrawFn) -> str:
    chunks = draw(
        st.lists(
            st.one_of(
                st.text(alphabet=string.printable, max_size=120),
                st.text(max_size=40).filter(
                    lambda s: not any(0xD800 <= ord(c) < 0xE000 for c in s)
                ),
                st.sampled_from(["\r\n", "\n", "\r", "x" * 100, " \t \n", "=", "é" * 60]),
            ),
            max_size=20,
        )
    )
    return "".join(chunks)


def _checked_line(value: str) -> str | None:
    try:
        return mime.check_line(value)
    except MimeError:
        return None


@st.composite
def _draft(draw: st.DrawFn) -> Draft:
    # Half the drafts are of ASCII lines, so that many take the simple build.
    plain = draw(st.booleans())
    line = _plain_line if plain else _any_line
    headers = draw(
        st.lists(
            st.tuples(st.sampled_from(["X-Order", "List-Unsubscribe", "x-a", "X-Long" * 5]), line),
            max_size=3,
            unique_by=lambda h: h[0],
        )
    )
    text, html = draw(st.sampled_from([(True, False), (False, True), (True, True)]))
    attachments = draw(
        st.lists(
            st.builds(
                Attachment,
                filename=st.one_of(line, st.just("invoice.pdf")).filter(lambda f: f.strip() != ""),
                maintype=st.sampled_from(["application", "text", "image"]),
                subtype=st.sampled_from(["pdf", "plain", "png", "vnd.openxmlformats-document" * 2]),
                data=st.binary(max_size=200),
                params=st.sampled_from([{}, {}, {}, {"name": "x"}]),
            ),
            max_size=2,
        )
    )
    return Draft(
        sender=draw(_mailbox(plain)),
        subject=_checked_line(draw(line)) or "Hi",
        to=draw(st.lists(_mailbox(plain), max_size=3)),
        cc=draw(st.lists(_mailbox(plain), max_size=2)),
        reply_to=draw(st.none() | _mailbox(plain)),
        text=draw(_body()) if text else None,
        html=draw(_body()) if html else None,
        headers=[(n, v) for n, v in headers if _checked_line(v) is not None],
        attachments=[a for a in attachments if _checked_line(a.filename) is not None],
    )


@settings(
    max_examples=500,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(draft=_draft())
def test_fuzz_simple_build_is_the_email_packages(draft: Draft) -> None:
    assert_same_as_email_package(draft)


# -- addresses: a domain checked once --------------------------------------------------------------


def _reference(address: str) -> tuple[str, str] | str:
    try:
        valid = validate_email(
            address, allow_smtputf8=True, check_deliverability=False, test_environment=True
        )
    except EmailNotValidError as exc:
        return str(exc)
    return valid.local_part, valid.ascii_domain


def _fast(address: str) -> tuple[str, str] | str:
    try:
        return mime._address(address)
    except MimeError as exc:
        return exc.message


_ATEXT = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
_labels = st.one_of(
    st.text(alphabet=string.ascii_letters + string.digits + "-", min_size=1, max_size=12),
    st.sampled_from(["xn--bcher-kva", "xn--zz", "Test", "localhost", "invalid", "onion", "123"]),
    st.text(alphabet=string.ascii_lowercase, min_size=60, max_size=70),
)
_domains = st.one_of(
    st.lists(_labels, min_size=1, max_size=5).map(".".join),
    st.sampled_from(["bench.test", "EXAMPLE.com", "a..b", ".x.test", "x.test.", "bücher.test"]),
)
_locals = st.one_of(
    st.text(alphabet=_ATEXT + ".", min_size=0, max_size=20),
    st.text(alphabet=_ATEXT, min_size=60, max_size=200),
    st.sampled_from(["Postmaster", "ABUSE", "zoë", '"quoted"', "a b", "a@b"]),
)


@pytest.mark.parametrize(
    "address",
    [
        "r1@bench.test",
        "Postmaster@bench.test",
        "a.b+c@xn--bcher-kva.test",
        "zoë@bücher.test",
        "x@localhost",
        "x@123.456",
        "a" * 64 + "@" + "b" * 63 + ".test",
        "a" * 200 + "@" + "b" * 50 + ".test",
        "a" * 250 + "@b.test",
        "@bench.test",
        "a..b@bench.test",
        "a@",
    ],
)
def test_addresses_are_email_validators(address: str) -> None:
    assert _fast(address) == _reference(address)


@settings(max_examples=1000, deadline=None, database=None)
@given(address=st.tuples(_locals, st.sampled_from(["@", "@", "@@", ""]), _domains).map("".join))
def test_fuzz_addresses_are_email_validators(address: str) -> None:
    assert _fast(address) == _reference(address)


# -- quoted-printable: the email package's encoder, faster ----------------------------------------

_latin1_lines = st.lists(
    st.one_of(
        st.text(alphabet=st.characters(max_codepoint=255), max_size=200),
        st.sampled_from(["\r\n", "\n", "\r", " ", "\t", "=", "x" * 76 + "=", "x" * 75 + " "]),
        st.text(alphabet="x= \t\xe9", min_size=70, max_size=90),
    ),
    max_size=12,
).map("".join)


@pytest.mark.parametrize(
    "body",
    ["", "a", "=", " ", "a \n", "x" * 77, "x" * 78, "x" * 79, "x" * 76 + "é", "x" * 77 + " "],
)
def test_quoted_printable_is_quoprimes(body: str) -> None:
    assert mime._quoted_printable(body) == quoprimime.body_encode(body, 78)


@settings(max_examples=2000, deadline=None, database=None)
@given(body=_latin1_lines)
def test_fuzz_quoted_printable_is_quoprimes(body: str) -> None:
    assert mime._quoted_printable(body) == quoprimime.body_encode(body, 78)


# -- address lists: folded after the commas --------------------------------------------------------


@st.composite
def _address_list(draw: st.DrawFn) -> list[Mailbox]:
    boxes = []
    for _ in range(draw(st.integers(1, 8))):
        local = "x" * draw(st.integers(1, 70))
        name = draw(
            st.sampled_from(["", "", "Bob", "Bob Example", "Acme Inc.", 'Say "hi"', "a, b"])
        )
        boxes.append(Mailbox(local, draw(st.sampled_from(["ab.test", "example.test"])), name))
    return boxes


@settings(max_examples=3000, deadline=None, database=None)
@given(boxes=_address_list(), name=st.sampled_from(["To", "Cc", "Reply-To"]))
def test_fuzz_address_lists_fold_as_the_email_packages(boxes: list[Mailbox], name: str) -> None:
    policy = mime._ASCII_HEADERS
    expected = mime._folded(policy, name, [m.header() for m in boxes])
    assert mime._mailboxes(policy, name, boxes) == expected


def test_long_address_lists_fold_without_the_email_package() -> None:
    shown = [f"recipient{i}@example.test" for i in range(10)]
    folded = mime._address_lines("To", shown)
    assert folded is not None and folded == mime._folded(
        mime._ASCII_HEADERS, "To", [parse_mailbox(a).header() for a in shown]
    )
