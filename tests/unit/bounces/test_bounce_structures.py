"""Bounce notices that are no RFC 3464 report, relay wrappers and multi-recipient reports."""

from __future__ import annotations

from postbode.bounces.classify import normalize_text
from postbode.bounces.parse import parse, remote_status, smtp_stage

# Postfix's notice to the postmaster when its SMTP server refused mail (smtpd_chat.c,
# notify_classes = policy): the refused recipient is named only in the transcript.
POSTMASTER_COPY = b"""\
From: MAILER-DAEMON@mx.dest.test (Mail Delivery System)
To: postmaster@dest.test
Subject: Postfix SMTP server: errors from client.shop.test[192.0.2.7]
Date: Mon, 7 Dec 2026 10:00:00 +0000 (UTC)

Transcript of session follows.

 Out: 220 mx.dest.test ESMTP Postfix
 In:  EHLO client.shop.test
 Out: 250-mx.dest.test
 Out: 250 DSN
 In:  MAIL FROM:<orders@shop.test>
 Out: 250 2.1.0 Ok
 In:  RCPT TO:<gone@dest.test>
 Out: 550 5.1.1 <gone@dest.test>: Recipient address rejected: User unknown in
     local recipient table
 In:  QUIT
 Out: 221 2.0.0 Bye

For other details, see the local mail logfile
"""

GATEWAY_NOTICE = b"""\
From: Mail Gateway <gateway@filter.dest.test>
To: orders@shop.test
Subject: Message could not be sent

Your message could not be sent to its destination.

    >>> RCPT TO:<ivy@dest.test>
    <<< 550 5.1.1 No such mailbox
"""

FORWARDED_INLINE = b"""\
From: Judy Moss <judy@shop.test>
To: support@shop.test
Subject: Fwd: Undelivered Mail Returned to Sender
Content-Type: text/plain; charset=utf-8

Hi, this came back, can you check?

---------- Forwarded message ---------
From: Mail Delivery System <MAILER-DAEMON@mx.shop.test>
Date: Mon, 7 Dec 2026 at 10:00
Subject: Undelivered Mail Returned to Sender
To: <judy@shop.test>

This is the mail system at host mx.shop.test.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

<kim@dest.test>: host mx.dest.test[192.0.2.9] said: 552 5.2.2 <kim@dest.test>:
    Mailbox full (in reply to RCPT TO command)
"""


def test_postmaster_copy_with_a_transcript_is_a_bounce_for_the_refused_recipient() -> None:
    report = parse(POSTMASTER_COPY)
    assert report.kind == "bounce"
    [record] = report.records
    assert (record.recipient, record.status, record.category, record.hard) == (
        "gone@dest.test",
        "5.1.1",
        "user_unknown",
        True,
    )


def test_gateway_notice_naming_the_recipient_only_in_the_transcript() -> None:
    report = parse(GATEWAY_NOTICE)
    assert report.kind == "bounce"
    assert [(r.recipient, r.category) for r in report.records] == [
        ("ivy@dest.test", "user_unknown")
    ]


def test_report_forwarded_inline_by_a_person() -> None:
    report = parse(FORWARDED_INLINE)
    assert report.kind == "bounce"
    [record] = report.records
    assert (record.recipient, record.category, record.hard) == (
        "kim@dest.test",
        "mailbox_full",
        False,
    )


def test_report_forwarded_as_an_attachment() -> None:
    inner = FORWARDED_INLINE.split(b"---------- Forwarded message ---------\n", 1)[1]
    raw = (
        b"From: Judy Moss <judy@shop.test>\nTo: support@shop.test\nSubject: Fwd: bounce\n"
        b'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b1"\n\n'
        b"--b1\nContent-Type: text/plain\n\nSee attached.\n"
        b"--b1\nContent-Type: message/rfc822\n\n" + inner + b"\n--b1--\n"
    )
    report = parse(raw)
    assert report.kind == "bounce"
    assert report.records[0].recipient == "kim@dest.test"


def test_a_person_forwarding_ordinary_mail_is_not_a_bounce() -> None:
    raw = (
        b"From: Judy Moss <judy@shop.test>\nTo: kim@dest.test\nSubject: Fwd: lunch\n\n"
        b"---------- Forwarded message ---------\nFrom: Leo <leo@shop.test>\n"
        b"Subject: lunch\nTo: judy@shop.test\n\nNoon at the usual place?\n"
    )
    assert parse(raw).kind == "not_bounce"


def test_multi_recipient_text_report_gives_each_recipient_its_own_reason() -> None:
    raw = b"""\
From: MAILER-DAEMON@relay.shop.test
To: orders@shop.test
Subject: Delivery status notification: failed
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="b"

--b
Content-Type: text/plain

An error has occurred while attempting to deliver a message for
the following list of recipients:

ann@dest.test: 550 5.7.1 <ann@dest.test>: Relay access denied
bob@dest.test: 552 5.2.2 Mailbox full
cy@dest.test: 550 5.1.1 The email account that you tried to reach does not exist

--b
Content-Type: message/delivery-status

Reporting-MTA: dns; relay.shop.test

Final-Recipient: rfc822; ann@dest.test
Action: failed
Status: 5.0.0

Final-Recipient: rfc822; bob@dest.test
Action: failed
Status: 5.0.0

Final-Recipient: rfc822; cy@dest.test
Action: failed
Status: 5.0.0

--b--
"""
    got = {r.recipient: (r.status, r.category, r.hard) for r in parse(raw).records}
    assert got == {
        "ann@dest.test": ("5.7.1", "blocked", False),
        "bob@dest.test": ("5.2.2", "mailbox_full", False),
        "cy@dest.test": ("5.1.1", "user_unknown", True),
    }


def test_the_remote_reply_a_relay_quotes_wins_over_the_relays_wrapper() -> None:
    # A relay's catch-all code before the remote server's own reply code and text.
    assert remote_status("5.3.0 - Other mail system problem 550-'Unknown user'") == (None, 550)
    # The innermost reply with a code is the remote server's.
    assert remote_status("5.1.0 Remote Server returned '550 5.7.1 Blocked by policy'") == (
        "5.7.1",
        550,
    )
    raw = b"""\
From: MAILER-DAEMON@relay.shop.test
To: orders@shop.test
Subject: Undeliverable: order
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="b"

--b
Content-Type: text/plain

Delivery has failed to these recipients or groups.

--b
Content-Type: message/delivery-status

Reporting-MTA: dns; relay.shop.test

Final-Recipient: rfc822; dan@dest.test
Action: failed
Status: 5.1.0
Diagnostic-Code: smtp; 5.1.0 Remote Server returned '550 5.7.1 Service unavailable;
 Client host [192.0.2.1] blocked using zen.spamhaus.org'

--b--
"""
    [record] = parse(raw).records
    assert (record.status, record.category, record.hard) == ("5.7.1", "blocked", False)


def test_the_smtp_stage_is_read_from_each_mtas_wording() -> None:
    assert smtp_stage("host x said: 550 No (in reply to RCPT TO command)") == "rcpt"
    assert smtp_stage("SMTP error from remote mail server after end of data: 550 x") == "data"
    assert smtp_stage("SMTP error from remote mail server after MAIL FROM:<a@b.test>:") == "mail"
    assert smtp_stage("host x refused to talk to me: 554 go away") == "connect"
    assert smtp_stage(">>> DATA\n<<< 554 5.7.1 spam") == "data"
    assert smtp_stage("550 No such user") is None


def test_user_unknown_after_data_is_a_filter_refusal_not_a_bad_address() -> None:
    raw = b"""\
From: Mail Delivery System <MAILER-DAEMON@mx.shop.test>
To: orders@shop.test
Subject: Mail delivery failed: returning message to sender
X-Failed-Recipients: eve@dest.test

This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  eve@dest.test
    host mx.dest.test [192.0.2.9]
    SMTP error from remote mail server after end of data:
    550 No such user here
"""
    [record] = parse(raw).records
    assert (record.category, record.hard) == ("blocked", False)


def _opensmtpd_report(line: str, diagnostic: str | None = None) -> bytes:
    """A report as OpenSMTPD 6.8 writes it (bounce.c): the reply its SMTP session got on
    the recipient's own line, and a delivery-status part with its own X.0.0 only."""
    diag = f"Diagnostic-Code: smtp; {diagnostic}\n" if diagnostic else ""
    return f"""\
Subject: Delivery status notification: failed
From: Mailer Daemon <MAILER-DAEMON@relay.shop.test>
To: orders@shop.test
MIME-Version: 1.0
Content-Type: multipart/mixed;boundary="7486628355998212447/relay.shop.test"

This is a MIME-encapsulated message.

--7486628355998212447/relay.shop.test
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

    Hi!

    This is the MAILER-DAEMON, please DO NOT REPLY to this email.

    An error has occurred while attempting to deliver a message for
    the following list of recipients:

ivy@dest.test: {line}

    Below is a copy of the original message:

--7486628355998212447/relay.shop.test
Content-Description: Delivery Report
Content-Type: message/delivery-status

Reporting-MTA: dns; relay.shop.test

Final-Recipient: rfc822; ivy@dest.test
Action: failed
Status: 5.0.0
{diag}
--7486628355998212447/relay.shop.test--
""".encode()


def test_a_code_less_no_such_user_given_first_hand_on_the_recipients_line_is_hard() -> None:
    # OpenSMTPD names no SMTP command, but the reply on the recipient's line is the one its
    # own session got: no relay stands between it and the report.
    for line in (
        "550 Unrouteable address",
        "550 Invalid Recipient - https://community.mimecast.com/docs/DOC-1369#550",
        "552 1 Requested mail action aborted, mailbox not found",
    ):
        [record] = parse(_opensmtpd_report(line)).records
        assert (record.recipient, record.category, record.hard) == (
            "ivy@dest.test",
            "user_unknown",
            True,
        ), line


def test_the_same_reply_quoted_by_a_relay_without_its_stage_suppresses_nobody() -> None:
    # A Diagnostic-Code quoting a remote reply with neither an X.1 code nor the command it
    # answered: filtering gateways refuse after DATA in these words (docs/bounces.md).
    raw = _opensmtpd_report("see below", diagnostic="550 Unrouteable address")
    [record] = parse(raw).records
    assert (record.category, record.hard) == ("blocked", False)


def test_a_multi_line_reply_joined_by_opensmtpd_keeps_its_phrases_apart() -> None:
    # OpenSMTPD drops "550-" and a one-digit-detail code from each later line of a reply;
    # a longer code stays glued to the word before it.
    joined = (
        "550-5.7.26 This mail has been blocked because the sender is unauthenticated. "
        "Gmail5.7.26 requires all senders to authenticate with either SPF or DKIM."
    )
    assert "gmail requires" in normalize_text(joined)
    assert normalize_text("no mailbox here by that name. (#5.1.1)").endswith("(#5.1.1)")
    [record] = parse(_opensmtpd_report(joined)).records
    assert (record.status, record.category) == ("5.7.26", "auth_failure")
