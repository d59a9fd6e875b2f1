"""Bounce notices that are no RFC 3464 report, relay wrappers and multi-recipient reports."""

from __future__ import annotations

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
