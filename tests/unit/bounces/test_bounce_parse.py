"""Bounce parsing: message kinds, recipients, Message-ID of the original, hostile input."""

from __future__ import annotations

import base64

from postbode.bounces.parse import BounceReport, parse, parse_for_scoring

ORIGINAL_ID = "<20240101.abc123@shop.test>"


def _dsn(*, action: str = "failed", status: str = "5.1.1", diag: str | None = None) -> bytes:
    diag = diag or "smtp; 550 5.1.1 <bob@dest.test>: Recipient address rejected: User unknown"
    return (
        "From: MAILER-DAEMON@mx.dest.test (Mail Delivery System)\n"
        "To: bounce+tok@return.shop.test\n"
        "Subject: Undelivered Mail Returned to Sender\n"
        "MIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B1"\n'
        "\n"
        "--B1\n"
        "Content-Type: text/plain\n"
        "\n"
        "I'm sorry to have to inform you that your message could not be delivered.\n"
        "--B1\n"
        "Content-Type: message/delivery-status\n"
        "\n"
        "Reporting-MTA: dns; mx.dest.test\n"
        "\n"
        "Final-Recipient: rfc822; bob@dest.test\n"
        "Original-Recipient: rfc822;bob@dest.test\n"
        f"Action: {action}\n"
        f"Status: {status}\n"
        "Remote-MTA: dns; in.dest.test\n"
        f"Diagnostic-Code: {diag}\n"
        "\n"
        "--B1\n"
        "Content-Type: text/rfc822-headers\n"
        "\n"
        "From: Shop <noreply@shop.test>\n"
        "To: bob@dest.test\n"
        "Subject: Your order\n"
        f"Message-ID: {ORIGINAL_ID}\n"
        "\n"
        "--B1--\n"
    ).encode()


def test_rfc3464_dsn_gives_recipient_status_reason_and_message_id() -> None:
    report = parse(_dsn())
    assert report.kind == "bounce"
    assert report.original_message_id == ORIGINAL_ID
    rec = report.records[0]
    assert rec.recipient == "bob@dest.test"
    assert (rec.status, rec.reply_code, rec.category, rec.hard) == (
        "5.1.1",
        550,
        "user_unknown",
        True,
    )
    assert "Recipient address rejected" in rec.diagnostic
    assert rec.remote_mta == "in.dest.test"
    assert rec.action == "failed"


def test_crlf_and_cr_line_endings_parse_the_same() -> None:
    lf = parse(_dsn())
    assert parse(_dsn().replace(b"\n", b"\r\n")) == lf
    assert parse(_dsn().replace(b"\n", b"\r")) == lf


def test_delay_report_is_a_soft_bounce() -> None:
    report = parse(_dsn(action="delayed", status="4.4.7", diag="smtp; 451 4.4.7 timeout"))
    assert report.kind == "bounce"
    assert (report.records[0].category, report.records[0].hard) == ("expired", False)


def test_success_dsn_is_not_a_bounce() -> None:
    report = parse(_dsn(action="delivered", status="2.0.0", diag="smtp; 250 2.0.0 Ok"))
    assert report.kind == "delivered"
    assert not report.is_bounce
    assert parse_for_scoring(_dsn(action="delivered", status="2.0.0"))["is_bounce"] is False


def test_message_id_from_an_attached_message_rfc822() -> None:
    raw = _dsn().replace(b"text/rfc822-headers", b"message/rfc822")
    assert parse(raw).original_message_id == ORIGINAL_ID


def test_message_id_from_a_plain_text_bounce_body() -> None:
    raw = (
        b"From: MAILER-DAEMON@mx.example.test\n"
        b"To: sender@shop.test\n"
        b"Subject: failure notice\n"
        b"\n"
        b"Hi. This is the qmail-send program at mx.example.test.\n"
        b"I'm afraid I wasn't able to deliver your message to the following addresses.\n"
        b"This is a permanent error; I've given up. Sorry it didn't work out.\n"
        b"\n"
        b"<carol@dest.test>:\n"
        b"192.0.2.7 does not like recipient.\n"
        b"Remote host said: 552 5.2.2 <carol@dest.test>: Mailbox full\n"
        b"Giving up on 192.0.2.7.\n"
        b"\n"
        b"--- Below this line is a copy of the message.\n"
        b"\n"
        b"Return-Path: <sender@shop.test>\n"
        b"Message-ID: <q1.2.3@shop.test>\n"
        b"From: sender@shop.test\n"
        b"To: carol@dest.test\n"
        b"\n"
        b"hello\n"
    )
    report = parse(raw)
    assert report.kind == "bounce"
    assert report.original_message_id == "<q1.2.3@shop.test>"
    rec = report.records[0]
    assert (rec.recipient, rec.status, rec.category, rec.hard) == (
        "carol@dest.test",
        "5.2.2",
        "mailbox_full",
        False,
    )


def test_exim_bounce_uses_x_failed_recipients() -> None:
    raw = (
        b"From: Mail Delivery System <Mailer-Daemon@mx.shop.test>\n"
        b"To: sender@shop.test\n"
        b"Subject: Mail delivery failed: returning message to sender\n"
        b"X-Failed-Recipients: dave@dest.test\n"
        b"Auto-Submitted: auto-replied\n"
        b"\n"
        b"This message was created automatically by mail delivery software.\n"
        b"\n"
        b"A message that you sent could not be delivered to one or more of its\n"
        b"recipients. This is a permanent error. The following address(es) failed:\n"
        b"\n"
        b"  dave@dest.test\n"
        b"    host mx.dest.test [192.0.2.9]\n"
        b"    SMTP error from remote mail server after initial connection:\n"
        b"    554 5.7.1 Service unavailable; client [192.0.2.1] blocked using zen.spamhaus.org\n"
    )
    report = parse(raw)
    assert report.kind == "bounce"
    rec = report.records[0]
    assert (rec.recipient, rec.status, rec.category, rec.hard) == (
        "dave@dest.test",
        "5.7.1",
        "blocked",
        False,
    )


def test_arf_complaint_is_not_a_bounce() -> None:
    raw = (
        b"From: fbl@isp.test\n"
        b"To: abuse@shop.test\n"
        b"Subject: FW: Your order\n"
        b'Content-Type: multipart/report; report-type=feedback-report; boundary="F"\n'
        b"\n"
        b"--F\n"
        b"Content-Type: text/plain\n"
        b"\n"
        b"This is an email abuse report.\n"
        b"--F\n"
        b"Content-Type: message/feedback-report\n"
        b"\n"
        b"Feedback-Type: abuse\n"
        b"User-Agent: isp-fbl/1.0\n"
        b"Version: 1\n"
        b"Original-Rcpt-To: <erin@isp.test>\n"
        b"\n"
        b"--F\n"
        b"Content-Type: message/rfc822\n"
        b"\n"
        b"From: noreply@shop.test\n"
        b"To: erin@isp.test\n"
        b"Message-ID: <arf.1@shop.test>\n"
        b"\n"
        b"buy now\n"
        b"--F--\n"
    )
    report = parse(raw)
    assert report.kind == "complaint"
    assert report.feedback_type == "abuse"
    assert report.records[0].recipient == "erin@isp.test"
    assert report.original_message_id == "<arf.1@shop.test>"
    assert parse_for_scoring(raw)["is_bounce"] is False


def test_vacation_auto_reply_is_not_a_bounce() -> None:
    raw = (
        b"From: Frank <frank@dest.test>\n"
        b"To: noreply@shop.test\n"
        b"Subject: Automatic reply: Your order\n"
        b"Auto-Submitted: auto-replied\n"
        b"\n"
        b"I am out of the office until Monday and will reply upon my return.\n"
    )
    assert parse(raw).kind == "auto_reply"


def test_ordinary_mail_is_not_a_bounce() -> None:
    raw = b"From: grace@dest.test\nTo: shop@shop.test\nSubject: hello\n\nThanks for the order!\n"
    assert parse(raw) == BounceReport(kind="not_bounce")
    scored = parse_for_scoring(raw)
    assert scored["is_bounce"] is False
    assert scored["kind"] == "not_bounce"


# ---------------------------------------------------------------------------- hostile input
def test_twenty_megabyte_bounce_is_parsed() -> None:
    filler = base64.encodebytes(b"\x00" * (15 * 1024 * 1024))
    raw = _dsn().replace(
        b"--B1--\n",
        b"--B1\nContent-Type: application/octet-stream\n"
        b"Content-Transfer-Encoding: base64\n\n" + filler + b"--B1--\n",
    )
    assert len(raw) > 20_000_000
    report = parse(raw)
    assert report.kind == "bounce"
    assert report.records[0].recipient == "bob@dest.test"


def test_huge_plain_text_body_is_parsed() -> None:
    raw = (
        b"From: MAILER-DAEMON@mx.example.test\nTo: s@shop.test\nSubject: failure notice\n\n"
        b"<h@dest.test>:\n550 5.1.1 user unknown\n" + b"x" * 20_000_000 + b"\n"
    )
    report = parse(raw)
    assert report.kind == "bounce"
    assert report.records[0].recipient == "h@dest.test"


def test_deeply_nested_multiparts_are_bounded() -> None:
    depth = 200
    head = "".join(
        f'Content-Type: multipart/mixed; boundary="b{i}"\n\n--b{i}\n' for i in range(depth)
    )
    tail = "".join(f"\n--b{i}--\n" for i in reversed(range(depth)))
    raw = (
        "From: MAILER-DAEMON@mx.example.test\nTo: s@shop.test\nSubject: Returned mail\n"
        + head
        + "Content-Type: text/plain\n\n<i@dest.test>: 550 5.1.1 user unknown\n"
        + tail
    ).encode()
    report = parse(raw)
    assert report.kind in ("bounce", "not_bounce")


def test_many_parts_are_bounded() -> None:
    parts = "".join("--P\nContent-Type: text/plain\n\nhello\n" for _ in range(50_000))
    raw = (
        "From: x@shop.test\nTo: y@shop.test\nSubject: hi\n"
        'Content-Type: multipart/mixed; boundary="P"\n\n' + parts + "--P--\n"
    ).encode()
    assert parse(raw).kind == "not_bounce"


def test_broken_mime_does_not_raise() -> None:
    samples = [
        b"",
        b"\xff\xfe\x00garbage",
        b"Content-Type: multipart/report; boundary=\n\n--\n--\n",
        b"Content-Type: multipart/mixed\n\nno boundary parameter at all\n",
        b'Content-Type: multipart/report; boundary="X"\n\n--X\nContent-Type: message/delivery'
        b"-status\nContent-Transfer-Encoding: base64\n\n!!!not base64!!!\n",
        b"From: MAILER-DAEMON@x\nSubject: =?bogus?Q?=ZZ?= failure notice\n\n<>: \n",
        b"Subject: Returned mail\nContent-Type: text/plain; charset=no-such-charset\n"
        b"Content-Transfer-Encoding: quoted-printable\n\n=E9=\n",
    ]
    for raw in samples:
        report = parse(raw)
        assert report.kind in ("bounce", "not_bounce", "auto_reply", "delivered", "complaint")
        assert isinstance(parse_for_scoring(raw), dict)


def test_bounce_of_a_bounce_reports_the_inner_failure_once() -> None:
    inner = _dsn()
    raw = (
        b"From: MAILER-DAEMON@relay.example.test\n"
        b"To: postmaster@mx.dest.test\n"
        b"Subject: Undelivered Mail Returned to Sender\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="OUTER"\n\n'
        b"--OUTER\nContent-Type: text/plain\n\nYour bounce could not be delivered.\n"
        b"--OUTER\nContent-Type: message/delivery-status\n\n"
        b"Reporting-MTA: dns; relay.example.test\n\n"
        b"Final-Recipient: rfc822; postmaster@mx.dest.test\nAction: failed\nStatus: 5.1.1\n"
        b"Diagnostic-Code: smtp; 550 5.1.1 unknown user\n\n"
        b"--OUTER\nContent-Type: message/rfc822\n\n" + inner + b"\n--OUTER--\n"
    )
    report = parse(raw)
    assert report.kind == "bounce"
    # The outer report is about the bounce's own recipient, not about bob inside.
    assert [r.recipient for r in report.records] == ["postmaster@mx.dest.test"]


def test_apple_mail_unsubscribe_is_an_opt_out_complaint() -> None:
    raw = (
        b"From: ivy@icloud.test\nTo: unsubscribe-123@shop.test\nSubject: unsubscribe\n"
        b"Auto-Submitted: auto-replied\nX-Apple-Unsubscribe: true\n\n"
        b"Apple Mail sent this email to unsubscribe from the message.\n"
    )
    report = parse(raw)
    assert (report.kind, report.feedback_type) == ("complaint", "opt-out")
    assert report.records[0].recipient == "ivy@icloud.test"


def test_a_person_quoting_dsn_fields_is_not_a_bounce() -> None:
    raw = (
        b"From: Judy <judy@dest.test>\nTo: support@shop.test\nSubject: Question about this\n\n"
        b"Hi, my colleague got this, what does it mean?\n\n"
        b"Final-Recipient: rfc822; kim@dest.test\nAction: failed\nStatus: 5.1.1\n"
    )
    assert parse(raw).kind == "not_bounce"


def test_non_english_diagnostics_are_classified() -> None:
    raw = (
        "From: MAILER-DAEMON@mx.example.test\nTo: s@shop.test\nSubject: Returned mail\n"
        "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
        "<leo@dest.test>:\n550 Boîte aux lettres pleine\n"
    ).encode()
    report = parse(raw)
    assert (report.records[0].recipient, report.records[0].category) == (
        "leo@dest.test",
        "mailbox_full",
    )


def test_header_fields_unfold_and_the_first_value_wins() -> None:
    from postbode.bounces.parse import _split_head

    head, body = _split_head(
        "Subject: one\n\ttwo\nBad Name: x\n folded into nothing\nSubject: again\n"
        "Message-ID:\n <a@b.test>\nno colon here\n continued\nX-Empty:\n\nbody\n"
    )
    assert head == {"subject": "one two", "message-id": " <a@b.test>", "x-empty": ""}
    assert body == "body\n"


def test_the_returned_original_is_cut_off_whatever_the_case_of_the_text() -> None:
    from postbode.bounces.parse import _original_mark

    assert _original_mark("Delivery failed.\n\n----- Original Message -----\nTo: a") == 18
    assert _original_mark("--- Below this line is a copy of the message.") == 0
    # "İ" lower-cases to two characters: offsets still come from the text itself.
    assert _original_mark("İstanbul\nnothing\n  ORIGINAL MESSAGE FOLLOWS\n") == 17
    assert _original_mark("no mark in here\n") is None
