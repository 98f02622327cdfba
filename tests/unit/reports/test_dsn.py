"""Delivery status notifications: structure, every field, NOTIFY/RET/ENVID/ORCPT, SMTPUTF8,
REQUIRETLS redaction, and that hostile input cannot break the MIME structure."""

from __future__ import annotations

import email
import email.utils
import re
from email import policy
from email.message import EmailMessage, Message
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailward.queue import Envelope, Recipient
from mailward.reports import dsn
from mailward.reports.dsn import (
    DEFAULT_MAX_ORIGINAL,
    DsnMessage,
    RecipientReport,
    build_dsn,
    returns_whole_message,
    wanted,
)

RECEIVED = 1_700_000_000.0
NOW = RECEIVED + 3600.0
MTA = "mail.example.org"
POSTMASTER = "postmaster@example.org"
ORIGINAL_HEADERS = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: Quarterly figures\r\n"
    b"Message-ID: <orig-1@example.org>\r\n"
)
ORIGINAL = ORIGINAL_HEADERS + b"\r\nThe secret body.\r\n"


def envelope(**overrides: Any) -> Envelope:
    fields: dict[str, Any] = {
        "sender": "alice@example.org",
        "client_ip": "192.0.2.10",
        "client_helo": "client.example.org",
        "listener": "submission",
        "received_at": RECEIVED,
    }
    fields.update(overrides)
    return Envelope(**fields)


def report(address: str = "bob@example.net", **overrides: Any) -> RecipientReport:
    notify = overrides.pop("notify", frozenset())
    orcpt = overrides.pop("orcpt", None)
    fields: dict[str, Any] = {
        "recipient": Recipient(address, dsn_notify=notify, dsn_orcpt=orcpt),
        "action": "failed",
        "status": "5.1.1",
        "diagnostic": "550 5.1.1 <bob@example.net>: Recipient address rejected: User unknown",
        "remote_mta": "mx.example.net",
        "last_attempt": NOW - 60,
    }
    fields.update(overrides)
    return RecipientReport(**fields)


def build(*reports: RecipientReport, env: Envelope | None = None, **kwargs: Any) -> DsnMessage | None:
    args: dict[str, Any] = {
        "envelope": env or envelope(),
        "message_id_of_original": "<orig-1@example.org>",
        "reports": list(reports) or [report()],
        "original": ORIGINAL,
        "reporting_mta": MTA,
        "postmaster": POSTMASTER,
        "now": NOW,
    }
    args.update(kwargs)
    return build_dsn(**args)


def build_ok(*reports: RecipientReport, **kwargs: Any) -> DsnMessage:
    result = build(*reports, **kwargs)
    assert result is not None
    check_lines(result.data)
    return result


def check_lines(data: bytes) -> None:
    """Every line ends in CRLF and has at most 998 octets; no bare CR, LF or NUL anywhere."""
    assert data.endswith(b"\r\n")
    assert b"\x00" not in data
    lines = data.split(b"\r\n")
    assert lines[-1] == b""
    for line in lines[:-1]:
        assert b"\r" not in line and b"\n" not in line, line
        assert len(line) <= 998, len(line)


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=policy.default)
    assert msg.defects == []
    return msg


def parts(data: bytes) -> list[EmailMessage]:
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    return cast(list[EmailMessage], list(msg.iter_parts()))


def status_blocks(data: bytes) -> list[dict[str, str]]:
    """The delivery-status part as field dicts: per-message first, then one per recipient."""
    # Parsed from text so that UTF-8 fields of a global report come back as characters; only an
    # included original can hold other bytes.
    text = data.decode("utf-8", errors="replace")
    msg = email.message_from_string(text, policy=policy.default)
    part = list(msg.iter_parts())[1]
    payload = cast(list[Message], part.get_payload())
    if part.get_content_type() == "message/delivery-status":
        return [{k: str(v) for k, v in block.items()} for block in payload]
    # message/global-delivery-status is read as one message: first block headers, rest body.
    assert part.get_content_type() == "message/global-delivery-status"
    first = payload[0]
    blocks = [{k: str(v) for k, v in first.items()}]
    for text in re.split(r"\r?\n\r?\n", cast(str, first.get_payload())):
        if text.strip():
            block = email.message_from_string(text + "\r\n\r\n", policy=policy.default)
            blocks.append({k: str(v) for k, v in block.items()})
    return blocks


def text_of(part: EmailMessage) -> str:
    return cast(str, part.get_content()).replace("\r\n", "\n")


def flat(text: str) -> str:
    """Wrapped prose as one line, to look for sentences whatever the wrapping."""
    return re.sub(r"\s*\n\s*", " ", text)


# --- NOTIFY ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("notify", "action", "expected"),
    [
        (frozenset(), "failed", True),
        (frozenset(), "delayed", True),
        (frozenset(), "delivered", False),
        (frozenset(), "relayed", False),
        (frozenset(), "expanded", False),
        (frozenset({"NEVER"}), "failed", False),
        (frozenset({"NEVER"}), "delayed", False),
        (frozenset({"NEVER"}), "delivered", False),
        (frozenset({"SUCCESS"}), "failed", False),
        (frozenset({"SUCCESS"}), "delayed", False),
        (frozenset({"SUCCESS"}), "delivered", True),
        (frozenset({"SUCCESS"}), "relayed", True),
        (frozenset({"SUCCESS"}), "expanded", True),
        (frozenset({"DELAY"}), "failed", False),
        (frozenset({"DELAY"}), "delayed", True),
        (frozenset({"FAILURE"}), "failed", True),
        (frozenset({"FAILURE"}), "delayed", False),
        (frozenset({"FAILURE", "DELAY"}), "delivered", False),
        (frozenset({"SUCCESS", "FAILURE", "DELAY"}), "delayed", True),
    ],
)
def test_wanted_follows_rfc3461_notify(notify: frozenset[str], action: str, expected: bool) -> None:
    assert wanted(notify, action) is expected


def test_wanted_rejects_an_unknown_action() -> None:
    with pytest.raises(ValueError, match="unknown DSN action"):
        wanted(frozenset(), "bounced")


def test_notify_never_gives_no_report() -> None:
    assert build(report(notify=frozenset({"NEVER"}))) is None


def test_notify_success_only_gives_no_failure_report() -> None:
    assert build(report(notify=frozenset({"SUCCESS"}))) is None


def test_notify_success_reports_delivery() -> None:
    ok = report(
        notify=frozenset({"SUCCESS"}),
        action="delivered",
        status="2.0.0",
        diagnostic="250 2.0.0 Ok: queued as 4Xyz",
    )
    result = build_ok(ok)
    assert result.kind == "success"
    msg = parse(result.data)
    assert msg["Subject"] == "Successful Mail Delivery Report"
    blocks = status_blocks(result.data)
    assert blocks[1]["Action"] == "delivered"
    assert blocks[1]["Status"] == "2.0.0"
    assert blocks[1]["Diagnostic-Code"] == "smtp; 250 2.0.0 Ok: queued as 4Xyz"
    original = parts(result.data)[2]
    assert original.get_content_type() == "text/rfc822-headers"
    assert original["Content-Description"] == "Message Headers"


def test_default_notify_does_not_report_success() -> None:
    assert build(report(action="delivered", status="2.0.0")) is None


def test_notify_delay_only_reports_the_delay() -> None:
    delayed = report(
        notify=frozenset({"DELAY"}),
        action="delayed",
        status="4.4.1",
        diagnostic="connect to mx.example.net[192.0.2.25]:25: Connection timed out",
        will_retry_until=RECEIVED + 5 * 86400,
    )
    failed = report("carol@example.net", notify=frozenset({"DELAY"}))
    result = build_ok(delayed, failed)
    assert result.kind == "delay"
    msg = parse(result.data)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    blocks = status_blocks(result.data)
    assert len(blocks) == 2
    assert blocks[1]["Final-Recipient"] == "rfc822; bob@example.net"
    assert blocks[1]["Action"] == "delayed"
    assert blocks[1]["Status"] == "4.4.1"
    assert blocks[1]["Diagnostic-Code"] == (
        "X-Mailward; connect to mx.example.net[192.0.2.25]:25: Connection timed out"
    )
    until = email.utils.parsedate_to_datetime(blocks[1]["Will-Retry-Until"])
    assert until.timestamp() == RECEIVED + 5 * 86400
    text = text_of(parts(result.data)[0])
    assert "carol" not in result.data.decode()
    assert "you do not need to send it again" in text
    assert f"it will be retried until {email.utils.format_datetime(until)}." in flat(text)


def test_null_sender_never_gets_a_report() -> None:
    assert build(env=envelope(sender="")) is None


def test_no_reports_gives_nothing() -> None:
    assert (
        build_dsn(
            envelope=envelope(),
            message_id_of_original=None,
            reports=[],
            original=ORIGINAL,
            reporting_mta=MTA,
            postmaster=POSTMASTER,
            now=NOW,
        )
        is None
    )


# --- a single failure, every field ----------------------------------------------------------------


def test_single_failed_recipient() -> None:
    result = build_ok(queue_id="0PJ2M3W9K1X7QF")
    assert result.sender == ""
    assert result.recipient == "alice@example.org"
    assert result.kind == "failure"
    assert result.returned == "headers"
    assert result.smtputf8 is False
    assert result.body_type == "7BIT"
    assert result.requiretls is False

    msg = parse(result.data)
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mail.example.org>"
    assert msg["To"] == "alice@example.org"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Date"].datetime.timestamp() == NOW
    assert re.fullmatch(r"<\d+\.[0-9a-f]+@mail\.example\.org>", msg["Message-ID"])
    assert msg["In-Reply-To"] == "<orig-1@example.org>"
    assert msg["References"] == "<orig-1@example.org>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"

    text, status, original = parts(result.data)
    assert text.get_content_type() == "text/plain"
    assert text.get_content_charset() == "us-ascii"
    body = text_of(text)
    assert "mail.example.org" in body
    assert "<bob@example.net>: the message could not be delivered (status 5.1.1)." in body
    assert (
        "The mail server mx.example.net said: 550 5.1.1 <bob@example.net>: Recipient address "
        "rejected: User unknown" in flat(body)
    )
    assert "<postmaster@example.org>" in body
    assert "Queue id: 0PJ2M3W9K1X7QF" in body
    assert "The headers of your original message are attached." in body

    assert status.get_content_type() == "message/delivery-status"
    per_message, per_recipient = status_blocks(result.data)
    assert per_message["Reporting-MTA"] == "dns; mail.example.org"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == RECEIVED
    assert per_message["X-Mailward-Queue-ID"] == "0PJ2M3W9K1X7QF"
    assert "Original-Envelope-Id" not in per_message
    assert per_recipient == {
        "Final-Recipient": "rfc822; bob@example.net",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx.example.net",
        "Diagnostic-Code": "smtp; 550 5.1.1 <bob@example.net>: Recipient address rejected: User unknown",
        "Last-Attempt-Date": per_recipient["Last-Attempt-Date"],
    }
    assert email.utils.parsedate_to_datetime(per_recipient["Last-Attempt-Date"]).timestamp() == NOW - 60

    assert original.get_content_type() == "text/rfc822-headers"
    assert original["Content-Description"] == "Undelivered Message Headers"
    assert text_of(original) == ORIGINAL_HEADERS.decode().replace("\r\n", "\n")
    assert b"secret body" not in result.data


def test_each_report_gets_a_fresh_message_id_and_boundary() -> None:
    first, second = build_ok(), build_ok()
    assert parse(first.data)["Message-ID"] != parse(second.data)["Message-ID"]
    assert parse(first.data).get_boundary() != parse(second.data).get_boundary()


def test_local_reason_is_not_reported_as_an_smtp_reply() -> None:
    result = build_ok(report(diagnostic="Null MX: example.net accepts no mail", remote_mta=None))
    blocks = status_blocks(result.data)
    assert blocks[1]["Diagnostic-Code"] == "X-Mailward; Null MX: example.net accepts no mail"
    assert "Remote-MTA" not in blocks[1]
    assert "Reason: Null MX: example.net accepts no mail" in text_of(parts(result.data)[0])


@pytest.mark.parametrize("diagnostic", [None, "", " \r\n\t "])
def test_report_without_diagnostic_or_attempt_omits_those_fields(diagnostic: str | None) -> None:
    result = build_ok(report(diagnostic=diagnostic, remote_mta=None, last_attempt=None))
    assert status_blocks(result.data)[1] == {
        "Final-Recipient": "rfc822; bob@example.net",
        "Action": "failed",
        "Status": "5.1.1",
    }
    assert "Reason:" not in text_of(parts(result.data)[0])


def test_expired_message_fails_with_a_temporary_status() -> None:
    expired = report(status="4.4.7", diagnostic="message expired after 5 days in the queue")
    assert status_blocks(build_ok(expired).data)[1]["Status"] == "4.4.7"


def test_multiline_remote_reply_becomes_one_line() -> None:
    reply = "550-5.7.1 Message rejected by policy.\r\n550-5.7.1 See https://example.net/why\r\n550 5.7.1 Bye"
    result = build_ok(report(status="5.7.1", diagnostic=reply))
    assert status_blocks(result.data)[1]["Diagnostic-Code"] == (
        "smtp; 550-5.7.1 Message rejected by policy. 550-5.7.1 See https://example.net/why 550 5.7.1 Bye"
    )


# --- several recipients ---------------------------------------------------------------------------


def test_several_recipients_with_mixed_actions() -> None:
    reports = [
        report("bob@example.net"),
        report(
            "carol@example.com",
            action="delayed",
            status="4.2.2",
            diagnostic="452 4.2.2 Mailbox full",
            remote_mta="mx.example.com",
            will_retry_until=RECEIVED + 432000,
        ),
        report(
            "dave@example.com",
            notify=frozenset({"SUCCESS", "FAILURE"}),
            action="delivered",
            status="2.0.0",
            diagnostic="250 2.0.0 Ok",
            remote_mta="mx.example.com",
        ),
        report(
            "erin@example.com",
            notify=frozenset({"SUCCESS"}),
            action="relayed",
            status="2.0.0",
            diagnostic="250 2.0.0 Ok",
            remote_mta="old.example.com",
        ),
        report("frank@example.com", action="delivered", status="2.0.0", diagnostic="250 ok"),
        report("grace@example.com", notify=frozenset({"NEVER"})),
    ]
    result = build_ok(*reports)
    assert result.kind == "failure"
    msg = parse(result.data)
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    blocks = status_blocks(result.data)
    assert [(b["Final-Recipient"], b["Action"], b["Status"]) for b in blocks[1:]] == [
        ("rfc822; bob@example.net", "failed", "5.1.1"),
        ("rfc822; carol@example.com", "delayed", "4.2.2"),
        ("rfc822; dave@example.com", "delivered", "2.0.0"),
        ("rfc822; erin@example.com", "relayed", "2.0.0"),
    ]
    assert blocks[2]["Remote-MTA"] == "dns; mx.example.com"
    assert blocks[2]["Diagnostic-Code"] == "smtp; 452 4.2.2 Mailbox full"
    assert "Will-Retry-Until" in blocks[2]
    assert all("Will-Retry-Until" not in b for b in blocks[:2] + blocks[3:])
    text = text_of(parts(result.data)[0])
    for address in ("bob@example.net", "carol@example.com", "dave@example.com", "erin@example.com"):
        assert f"<{address}>:" in text
    assert "frank" not in text and "grace" not in text
    assert "does not send delivery reports" in flat(text)


def test_delay_outranks_success_for_the_subject() -> None:
    reports = [
        report("a@example.net", action="delayed", status="4.4.1"),
        report("b@example.net", notify=frozenset({"SUCCESS"}), action="expanded", status="2.0.0"),
    ]
    result = build_ok(*reports)
    assert result.kind == "delay"
    assert [b["Action"] for b in status_blocks(result.data)[1:]] == ["delayed", "expanded"]


# --- ENVID and ORCPT ------------------------------------------------------------------------------


def test_envid_and_orcpt_are_echoed() -> None:
    env = envelope(dsn_envid="QQ314159")
    reports = [
        report("bob@example.net", orcpt="rfc822;Bob.Smith@Example.NET"),
        report("carol@example.net"),
    ]
    blocks = status_blocks(build_ok(*reports, env=env).data)
    assert blocks[0]["Original-Envelope-Id"] == "QQ314159"
    assert list(blocks[0])[:2] == ["Original-Envelope-Id", "Reporting-MTA"]
    assert blocks[1]["Original-Recipient"] == "rfc822; Bob.Smith@Example.NET"
    assert list(blocks[1])[:2] == ["Original-Recipient", "Final-Recipient"]
    assert blocks[1]["Final-Recipient"] == "rfc822; bob@example.net"
    assert "Original-Recipient" not in blocks[2]


def test_malformed_orcpt_is_left_out() -> None:
    blocks = status_blocks(build_ok(report(orcpt="no-semicolon")).data)
    assert "Original-Recipient" not in blocks[1]


def test_utf8_orcpt_in_a_plain_report_is_escaped() -> None:
    blocks = status_blocks(build_ok(report(orcpt="utf-8;b\u00f8b+x@example.net")).data)
    assert blocks[1]["Original-Recipient"] == "utf-8; b\\x{F8}b\\x{2B}x@example.net"


# --- RET ------------------------------------------------------------------------------------------


def test_ret_full_returns_the_whole_message() -> None:
    result = build_ok(env=envelope(dsn_ret="FULL"))
    assert result.returned == "message"
    original = parts(result.data)[2]
    assert original.get_content_type() == "message/rfc822"
    assert original["Content-Description"] == "Undelivered Message"
    inner = cast(list[EmailMessage], original.get_payload())[0]
    assert inner["Subject"] == "Quarterly figures"
    assert inner.get_content() == "The secret body.\r\n"
    assert ORIGINAL in result.data
    assert "Your original message is attached." in text_of(parts(result.data)[0])


@pytest.mark.parametrize("ret", ["HDRS", None])
def test_ret_hdrs_and_default_return_headers_only(ret: str | None) -> None:
    result = build_ok(env=envelope(dsn_ret=ret))
    assert result.returned == "headers"
    original = parts(result.data)[2]
    assert original.get_content_type() == "text/rfc822-headers"
    assert "Subject: Quarterly figures" in original.get_content()
    assert b"secret body" not in result.data


def test_ret_full_returns_only_headers_in_a_delay_report() -> None:
    delayed = report(action="delayed", status="4.4.1")
    result = build_ok(delayed, env=envelope(dsn_ret="FULL"))
    assert result.returned == "headers"
    assert parts(result.data)[2].get_content_type() == "text/rfc822-headers"


def test_oversized_original_falls_back_to_headers_with_a_note() -> None:
    big = ORIGINAL_HEADERS + b"\r\n" + b"x" * 900 + b"\r\n"
    result = build_ok(env=envelope(dsn_ret="FULL"), original=big, max_original=500)
    assert result.returned == "headers"
    assert parts(result.data)[2].get_content_type() == "text/rfc822-headers"
    assert b"x" * 900 not in result.data
    assert "larger than 500 bytes" in text_of(parts(result.data)[0])


def test_default_size_cap_is_ten_mebibytes() -> None:
    assert DEFAULT_MAX_ORIGINAL == 10 * 1024 * 1024
    big = ORIGINAL_HEADERS + b"\r\n" + (b"y" * 998 + b"\r\n") * (DEFAULT_MAX_ORIGINAL // 1000 + 1)
    result = build_ok(env=envelope(dsn_ret="FULL"), original=big)
    assert result.returned == "headers"
    assert len(result.data) < 10_000


@pytest.mark.parametrize(
    ("original", "body_type"),
    [
        (ORIGINAL_HEADERS + b"\r\nbare\nLF\r\n", "8BITMIME"),
        (ORIGINAL_HEADERS + b"\r\nNUL\x00\r\n", "8BITMIME"),
        (ORIGINAL_HEADERS + b"\r\n" + b"z" * 1200 + b"\r\n", "8BITMIME"),
        (ORIGINAL, "BINARYMIME"),
    ],
)
def test_original_that_cannot_be_returned_unchanged_falls_back_to_headers(
    original: bytes, body_type: str
) -> None:
    result = build_ok(env=envelope(dsn_ret="FULL", body_type=body_type), original=original)
    assert result.returned == "headers"
    assert parts(result.data)[2].get_content_type() == "text/rfc822-headers"
    assert "cannot be returned unchanged" in flat(text_of(parts(result.data)[0]))


def test_eight_bit_original_is_returned_with_8bit_encoding() -> None:
    latin1 = ORIGINAL_HEADERS + b"Content-Type: text/plain; charset=latin-1\r\n\r\nCaf\xe9\r\n"
    result = build_ok(env=envelope(dsn_ret="FULL", body_type="8BITMIME"), original=latin1)
    assert result.returned == "message"
    assert result.body_type == "8BITMIME"
    original = parts(result.data)[2]
    assert original.get_content_type() == "message/rfc822"
    assert original["Content-Transfer-Encoding"] == "8bit"
    assert latin1 in result.data


def test_returns_whole_message_tells_the_caller_what_to_read() -> None:
    assert returns_whole_message(envelope(dsn_ret="FULL")) is True
    assert returns_whole_message(envelope(dsn_ret="HDRS")) is False
    assert returns_whole_message(envelope()) is False
    assert returns_whole_message(envelope(dsn_ret="FULL", requiretls=True)) is False
    assert returns_whole_message(envelope(dsn_ret="FULL", requiretls=True), redact=False) is True


def test_headers_only_original_and_messy_header_section() -> None:
    messy = b"Subject: one\nX-Long: " + b"a" * 3000 + b"\r\nX-Nul: a\x00b\rc\r\n  \r\nbody\r\n"
    result = build_ok(original=messy)
    headers = text_of(parts(result.data)[2])
    assert headers.startswith("Subject: one\nX-Long: aaa")
    # Folded, not cut: the 3000 octets are all there once the folds are undone.
    assert headers.replace("\n ", "").count("a" * 3000) == 1
    assert "X-Nul: ab c\n" in headers
    assert "body" not in headers


# --- SMTPUTF8 -------------------------------------------------------------------------------------


def test_smtputf8_original_uses_the_global_types() -> None:
    env = envelope(sender="\u00e1lice@ex\u00e1mple.org", smtputf8=True, dsn_ret="FULL")
    original = "From: \u00c1lice <\u00e1lice@ex\u00e1mple.org>\r\nSubject: h\u00e9llo\r\n\r\nb\u00f6dy\r\n"
    original_bytes = original.encode()
    failed = report(
        "b\u00f8b@ex\u00e4mple.net",
        orcpt="utf-8;b\u00f8b@ex\u00e4mple.net",
        diagnostic="550 5.1.1 Empf\u00e4nger unbekannt",
    )
    result = build_ok(failed, env=env, original=original_bytes)
    assert result.smtputf8 is True
    assert result.body_type == "8BITMIME"
    assert result.recipient == "\u00e1lice@ex\u00e1mple.org"
    msg = parse(result.data)
    assert msg.get_param("report-type") == "global-delivery-status"
    text, status, returned = parts(result.data)
    assert text.get_content_charset() == "utf-8"
    assert "<b\u00f8b@ex\u00e4mple.net>" in text_of(text)
    assert status.get_content_type() == "message/global-delivery-status"
    assert status["Content-Transfer-Encoding"] == "8bit"
    assert returned.get_content_type() == "message/global"
    blocks = status_blocks(result.data)
    assert blocks[1]["Original-Recipient"] == "utf-8; b\u00f8b@ex\u00e4mple.net"
    assert blocks[1]["Final-Recipient"] == "utf-8; b\u00f8b@ex\u00e4mple.net"
    assert blocks[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 Empf\u00e4nger unbekannt"
    assert b"To: <\xc3\xa1lice@ex\xc3\xa1mple.org>\r\n" in result.data
    assert original_bytes in result.data


def test_non_ascii_headers_use_global_headers() -> None:
    original = "Subject: gr\u00fc\u00dfe\r\n\r\nbody\r\n".encode()
    result = build_ok(original=original)
    assert result.smtputf8 is False
    assert result.body_type == "8BITMIME"
    assert parse(result.data).get_param("report-type") == "global-delivery-status"
    assert parts(result.data)[2].get_content_type() == "message/global-headers"
    assert b"Subject: gr\xc3\xbc\xc3\x9fe\r\n" in result.data


def test_plain_report_escapes_non_ascii_reply_text() -> None:
    result = build_ok(report(diagnostic="550 5.1.1 Empf\u00e4nger unbekannt"))
    assert result.data.isascii()
    assert status_blocks(result.data)[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 Empf\\x{E4}nger unbekannt"


def test_latin1_headers_stay_rfc822_headers() -> None:
    result = build_ok(original=b"Subject: caf\xe9\r\n\r\nbody\r\n")
    assert parts(result.data)[2].get_content_type() == "text/rfc822-headers"
    assert parts(result.data)[2]["Content-Transfer-Encoding"] == "8bit"


# --- hostile input --------------------------------------------------------------------------------


def test_hostile_remote_reply_cannot_inject() -> None:
    boundary_guess = "=_mailward_dsn_" + "0" * 24
    hostile = (
        "550 5.1.1 no\r\nSubject: injected\r\n\r\n--" + boundary_guess + "\r\n"
        "Content-Type: text/html\r\n\r\n<b>evil</b>\nX-Evil: 1\rX-Also: 2\x00\x1b[31m\u2028end"
    )
    result = build_ok(report(diagnostic=hostile, remote_mta="mx.evil\r\nX-Injected: yes"))
    msg = parse(result.data)
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert len(msg.get_all("Subject", [])) == 1
    assert "X-Injected" not in msg and "X-Evil" not in msg
    sections = parts(result.data)
    assert [p.get_content_type() for p in sections] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    blocks = status_blocks(result.data)
    assert len(blocks) == 2
    assert set(blocks[1]) == {
        "Final-Recipient",
        "Action",
        "Status",
        "Remote-MTA",
        "Diagnostic-Code",
        "Last-Attempt-Date",
    }
    assert blocks[1]["Remote-MTA"] == "dns; mx.evil X-Injected: yes"
    diagnostic = blocks[1]["Diagnostic-Code"]
    assert diagnostic.startswith("smtp; 550 5.1.1 no Subject: injected --=_mailward_dsn_")
    assert "\x00" not in diagnostic and "\x1b" not in diagnostic and "\u2028" not in diagnostic
    for line in result.data.split(b"\r\n"):
        assert not line.startswith(b"--" + boundary_guess.encode())
        assert not line.startswith((b"Subject: injected", b"X-Evil", b"Content-Type: text/html"))


def test_boundary_found_in_the_content_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = iter(["a" * 24, "a" * 24, "b" * 24, "c" * 24])
    monkeypatch.setattr(dsn, "_random_token", lambda: next(tokens))
    original = b"Subject: x\r\nX-Trap: --=_mailward_dsn_" + b"a" * 24 + b"\r\n\r\n"
    result = build_ok(original=original)
    msg = parse(result.data)
    assert msg.get_boundary() == "=_mailward_dsn_" + "b" * 24
    assert msg["Message-ID"].startswith(f"<{int(NOW)}.{'c' * 24}@")
    assert len(parts(result.data)) == 3


def test_overlong_diagnostic_is_folded_and_capped() -> None:
    words = " ".join(f"word{i}" for i in range(100))
    long_token = "x" * 2500
    result = build_ok(report(diagnostic=f"550 5.0.0 {words} {long_token}"))
    diagnostic = status_blocks(result.data)[1]["Diagnostic-Code"]
    assert diagnostic.startswith(f"smtp; 550 5.0.0 {words} xxx")
    assert diagnostic.replace(" ", "").count("x") == 2500
    capped = build_ok(report(diagnostic="550 " + "y" * 10_000))
    assert status_blocks(capped.data)[1]["Diagnostic-Code"].endswith(" ...")


def test_hostile_original_headers_cannot_break_the_structure() -> None:
    original = (
        b"Subject: a\r\n--=_mailward_dsn_\r\nContent-Type: multipart/mixed; boundary=x\r\n"
        b"\xff\xfe: \x00\x01\r\r\n\r\n--x\r\n"
    )
    result = build_ok(env=envelope(dsn_ret="FULL"), original=original)
    assert len(parts(result.data)) == 3


def test_invalid_report_and_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="enhanced status code"):
        report(status="550")
    with pytest.raises(ValueError, match="does not fit"):
        report(status="2.0.0")
    with pytest.raises(ValueError, match="does not fit"):
        report(action="delayed", status="5.1.1")
    with pytest.raises(ValueError, match="action must be"):
        report(action="bounced")
    with pytest.raises(ValueError, match="only reported for delayed"):
        report(will_retry_until=NOW)
    with pytest.raises(ValueError, match="reporting_mta"):
        build(reporting_mta="mail.example.org\r\nX-Evil: 1")
    with pytest.raises(ValueError, match="postmaster"):
        build(postmaster="postmaster@example.org\r\nBcc: x@y")
    with pytest.raises(ValueError, match="max_original"):
        build(max_original=-1)


def test_untrusted_message_id_is_not_echoed() -> None:
    msg = parse(build_ok(message_id_of_original="<a@b>\r\nBcc: victim@example.com").data)
    assert "In-Reply-To" not in msg and "References" not in msg and "Bcc" not in msg
    no_id = parse(build_ok(message_id_of_original=None).data)
    assert "In-Reply-To" not in no_id


# --- REQUIRETLS -----------------------------------------------------------------------------------


def test_requiretls_original_is_redacted() -> None:
    result = build_ok(env=envelope(requiretls=True, dsn_ret="FULL"))
    assert result.returned == "none"
    assert result.requiretls is False
    sections = parts(result.data)
    assert [p.get_content_type() for p in sections] == ["text/plain", "message/delivery-status"]
    assert b"Quarterly figures" not in result.data
    assert b"secret body" not in result.data
    assert b"orig-1@example.org" not in result.data
    assert "REQUIRETLS" in text_of(sections[0])
    assert status_blocks(result.data)[1]["Action"] == "failed"


def test_requiretls_report_over_a_protected_path_keeps_content() -> None:
    result = build_ok(env=envelope(requiretls=True, dsn_ret="FULL"), redact=False)
    assert result.returned == "message"
    assert result.requiretls is True
    assert len(parts(result.data)) == 3
    assert ORIGINAL in result.data


def test_redaction_can_be_asked_for_without_requiretls() -> None:
    result = build_ok(redact=True)
    assert result.returned == "none"
    assert len(parts(result.data)) == 2


# --- any input ------------------------------------------------------------------------------------


# Pieces that make line endings, folds, boundaries and over-long lines likely in generated input.
PIECES = [b"\r\n", b"\n", b"\r", b"X: y", b"--", b" ", b"\xc3\xa9", b"a" * 600]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    reply=st.text(max_size=1500),
    original=st.binary(max_size=3000) | st.lists(st.sampled_from(PIECES)).map(b"".join),
    ret=st.sampled_from([None, "FULL", "HDRS"]),
    smtputf8=st.booleans(),
    requiretls=st.booleans(),
    action=st.sampled_from(["failed", "delayed"]),
)
def test_any_reply_and_original_give_a_well_formed_report(
    reply: str, original: bytes, ret: str | None, smtputf8: bool, requiretls: bool, action: str
) -> None:
    env = envelope(dsn_ret=ret, smtputf8=smtputf8, requiretls=requiretls)
    status = "5.0.0" if action == "failed" else "4.0.0"
    result = build_ok(report(action=action, status=status, diagnostic=reply), env=env, original=original)
    sections = parts(result.data)
    assert len(sections) == (2 if requiretls else 3)
    assert result.data.isascii() or result.body_type == "8BITMIME"
    blocks = status_blocks(result.data)
    assert len(blocks) == 2
    assert blocks[1]["Action"] == action
    assert blocks[1]["Status"] == status
    assert ("Diagnostic-Code" in blocks[1]) == bool(dsn._one_line(reply, utf8=True))


def test_header_section_over_the_cap_is_cut_at_a_line() -> None:
    result = build_ok(max_original=60)
    headers = text_of(parts(result.data)[2])
    assert headers == "From: Alice <alice@example.org>\nTo: Bob <bob@example.net>\n"
    assert "too large to return in full" in flat(text_of(parts(result.data)[0]))


def test_delay_without_a_known_end_says_it_is_still_retried() -> None:
    result = build_ok(report(action="delayed", status="4.4.1", diagnostic=None))
    assert "Will-Retry-Until" not in status_blocks(result.data)[1]
    assert "still being retried (status 4.4.1)" in flat(text_of(parts(result.data)[0]))
