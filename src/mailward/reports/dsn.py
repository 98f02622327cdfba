"""Delivery status notifications (RFC 3464, RFC 3461 NOTIFY/RET/ENVID/ORCPT, RFC 6533 for SMTPUTF8).

Pure, like `delivery.policy`: the Deliverer says what happened to which recipients, `build_dsn`
returns the notification's envelope and bytes (or None when none is due), and the Deliverer queues
it like any other message (DESIGN principle 1). Nothing here reads a clock, the queue or a socket.

Everything that came from elsewhere is untrusted: a remote MTA chooses its reply text and a sender
chooses the original headers. Reply text is reduced to one line of printable text before it goes
into a field, every line is CRLF-terminated and at most 998 octets, and the MIME boundary is chosen
after all content is known, so nothing included can close a part early or add a header.

The structure (three parts: explanation, machine-readable status, original headers or message)
follows Postfix, so tools that parse Postfix bounces read ours.
"""

from __future__ import annotations

import re
import secrets
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Literal, get_args

from mailward.queue import Envelope, Recipient

__all__ = [
    "DEFAULT_MAX_ORIGINAL",
    "Action",
    "DsnKind",
    "DsnMessage",
    "RecipientReport",
    "ReturnedContent",
    "build_dsn",
    "returns_whole_message",
    "wanted",
]

Action = Literal["failed", "delayed", "delivered", "relayed", "expanded"]
DsnKind = Literal["failure", "delay", "success"]
ReturnedContent = Literal["message", "headers", "none"]

DEFAULT_MAX_ORIGINAL = 10 * 1024 * 1024

# RFC 3461 §4.1: which NOTIFY keyword asks for a report with this action.
_NOTIFY_FOR_ACTION: dict[str, str] = {
    "failed": "FAILURE",
    "delayed": "DELAY",
    "delivered": "SUCCESS",
    "relayed": "SUCCESS",
    "expanded": "SUCCESS",
}
# "failed" also takes 4.x.x: a message that expires in the queue fails with the last temporary
# status (e.g. 4.4.7), as Postfix reports it.
_STATUS_CLASSES: dict[str, str] = {
    "failed": "45",
    "delayed": "4",
    "delivered": "2",
    "relayed": "2",
    "expanded": "2",
}
_SUBJECTS: dict[str, str] = {
    "failure": "Undelivered Mail Returned to Sender",
    "delay": "Delayed Mail (still being retried)",
    "success": "Successful Mail Delivery Report",
}

_STATUS_RE = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})\Z")
_SMTP_REPLY_RE = re.compile(r"[2-5][0-9][0-9](?:[ -]|\Z)")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?\Z")
_ADDR_TYPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}\Z")
_MSGID_RE = re.compile(r"<[^<>\s]+>\Z")
# C0, DEL, C1, the Unicode line separators and lone surrogates: nothing a header may carry.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_LINE_BREAKS = re.compile(r"[\r\n]+")
_SPACES = re.compile(r" {2,}")
_BARE_CR_LF_NUL = re.compile(rb"\r(?!\n)|(?<!\r)\n|\x00")
_LONG_LINE = re.compile(rb"[^\r\n]{999}")

_MAX_LINE = 998  # RFC 5322 §2.1.1, octets without the CRLF
_FOLD_AT = 78
_TEXT_WIDTH = 76
_MAX_DIAGNOSTIC = 4000  # characters; a remote reply can be arbitrarily long, a bounce should not be


@dataclass(frozen=True, slots=True, kw_only=True)
class RecipientReport:
    """What happened to one recipient, as the Deliverer saw it.

    ``diagnostic`` is the remote reply exactly as received (``"550 5.1.1 <x@y>: user unknown"``;
    a multi-line reply may keep its line breaks) or a local reason such as ``"Null MX"``. Text that
    starts like an SMTP reply is reported as ``Diagnostic-Code: smtp;``, anything else under the
    ``X-Mailward`` diagnostic type. ``will_retry_until`` belongs to delayed reports only.
    """

    recipient: Recipient  # the address, NOTIFY and ORCPT as accepted
    action: Action
    status: str  # enhanced status code, e.g. "5.1.1"
    diagnostic: str | None = None
    remote_mta: str | None = None  # host name of the server that answered
    last_attempt: float | None = None  # epoch seconds
    will_retry_until: float | None = None  # epoch seconds

    def __post_init__(self) -> None:
        if self.action not in get_args(Action):
            raise ValueError(f"action must be one of {get_args(Action)}, not {self.action!r}")
        match = _STATUS_RE.match(self.status)
        if match is None:
            raise ValueError(f"status must be an enhanced status code such as 5.1.1, not {self.status!r}")
        if match.group(1) not in _STATUS_CLASSES[self.action]:
            raise ValueError(f"status {self.status} does not fit action {self.action!r}")
        if self.will_retry_until is not None and self.action != "delayed":
            raise ValueError("will_retry_until is only reported for delayed recipients")

    @property
    def address(self) -> str:
        return self.recipient.address

    @property
    def orcpt(self) -> str | None:
        """The ORCPT value, ``"addr-type;address"`` with the xtext already decoded."""
        return self.recipient.dsn_orcpt


@dataclass(frozen=True, slots=True, kw_only=True)
class DsnMessage:
    """A notification ready to be queued.

    The envelope sender is always the null reverse path (RFC 5321 §4.5.5, RFC 3461 §6.1), so
    the notification itself can never cause another one.
    """

    recipient: str  # the original envelope sender
    data: bytes  # the whole message, CRLF line endings
    kind: DsnKind
    smtputf8: bool  # the notification must be sent with SMTPUTF8 (RFC 6531)
    body_type: Literal["7BIT", "8BITMIME"]
    requiretls: bool  # original content of a REQUIRETLS message is inside: send with REQUIRETLS
    returned: ReturnedContent  # what of the original is included
    sender: str = ""


def wanted(notify: frozenset[str], action: str) -> bool:
    """Whether a recipient's NOTIFY (RFC 3461 §4.1) asks for a report with this action.

    No NOTIFY means FAILURE and DELAY; NEVER means nothing; otherwise exactly the listed ones.
    "relayed" and "expanded" are successes as far as the sender is concerned.
    """
    try:
        keyword = _NOTIFY_FOR_ACTION[action]
    except KeyError:
        raise ValueError(f"unknown DSN action {action!r}") from None
    if "NEVER" in notify:
        return False
    if not notify:
        return keyword in ("FAILURE", "DELAY")
    return keyword in notify


def returns_whole_message(envelope: Envelope, *, redact: bool | None = None) -> bool:
    """Whether a failure report for this message may include its body, so the caller knows to
    pass the whole message to `build_dsn` rather than only its header section."""
    if redact is None:
        redact = envelope.requiretls
    return envelope.dsn_ret == "FULL" and not redact


def build_dsn(
    *,
    envelope: Envelope,
    message_id_of_original: str | None,
    reports: Sequence[RecipientReport],
    original: bytes,
    reporting_mta: str,
    postmaster: str,
    now: float,
    redact: bool | None = None,
    max_original: int = DEFAULT_MAX_ORIGINAL,
    queue_id: str | None = None,
) -> DsnMessage | None:
    """Build the notification for `reports`, or None when none is due.

    None when the original sender is the null path (never report on a report) or when no report
    is wanted by its recipient's NOTIFY. Reports nobody asked for are left out of the rest.

    The kind follows from what remains: "failure" if any recipient failed, else "delay" if any is
    delayed, else "success"; one notification may cover recipients with different actions.

    `original` is the stored message: its header section is enough unless
    `returns_whole_message(envelope)`; the whole message is returned only in a failure report for
    a RET=FULL original of at most `max_original` octets whose lines are already mail-safe,
    otherwise its headers are returned with a note saying why. RET=HDRS, no RET, delay and success
    reports return the headers only (as Postfix does). `redact` (default: the original's
    REQUIRETLS, RFC 8689 §5) leaves all original content out; pass False only when the report
    will travel with REQUIRETLS itself, which `DsnMessage.requiretls` then says.

    `reporting_mta` is this host's name (ASCII), `postmaster` the address the sender can ask for
    help, `now` the report's date and `queue_id` the original's queue id, for the postmaster.
    """
    if not _HOSTNAME_RE.match(reporting_mta):
        raise ValueError(f"reporting_mta must be an ASCII host name, not {reporting_mta!r}")
    if not postmaster or _UNSAFE.search(postmaster) or " " in postmaster:
        raise ValueError(f"postmaster must be a plain address, not {postmaster!r}")
    if max_original < 0:
        raise ValueError("max_original must not be negative")
    if envelope.sender == "":
        return None
    chosen = [r for r in reports if wanted(r.recipient.dsn_notify, r.action)]
    if not chosen:
        return None
    actions = {r.action for r in chosen}
    kind: DsnKind = "failure" if "failed" in actions else "delay" if "delayed" in actions else "success"
    if redact is None:
        redact = envelope.requiretls

    header_lines, headers_cut = _header_section(original, max_original)
    header_bytes = b"".join(line + b"\r\n" for line in header_lines)
    # RFC 6533: an SMTPUTF8 original is reported with the global types and UTF-8 may appear in
    # fields; otherwise every field stays ASCII so the report needs nothing from the path back.
    utf8 = (
        envelope.smtputf8
        or not envelope.sender.isascii()
        or any(not r.address.isascii() for r in chosen)
        or (not redact and _is_utf8_beyond_ascii(header_bytes))
    )

    returned: ReturnedContent
    why_headers_only: str | None = None
    if redact:
        returned = "none"
    elif kind == "failure" and envelope.dsn_ret == "FULL":
        if len(original) > max_original:
            returned = "headers"
            why_headers_only = (
                f"Your message was larger than {max_original} bytes, so only its headers are attached."
            )
        elif envelope.body_type == "BINARYMIME" or not _mail_safe(original):
            returned = "headers"
            why_headers_only = (
                "Your message contains binary data or over-long lines and cannot be returned "
                "unchanged, so only its headers are attached."
            )
        else:
            returned = "message"
    else:
        returned = "headers"
    if returned == "headers" and headers_cut:
        cut_note = "Your message's headers were too large to return in full; the first ones are attached."
        why_headers_only = f"{why_headers_only} {cut_note}" if why_headers_only else cut_note

    message_id = None if redact else _message_id(message_id_of_original, utf8=utf8)
    parts = [
        _explanation_part(
            kind,
            chosen,
            reporting_mta=reporting_mta,
            postmaster=_one_line(postmaster, utf8=utf8),
            returned=returned,
            why_headers_only=why_headers_only,
            message_id=message_id,
            queue_id=None if queue_id is None else _one_line(queue_id, utf8=utf8),
            utf8=utf8,
        ),
        _status_part(envelope, chosen, reporting_mta=reporting_mta, queue_id=queue_id, utf8=utf8),
    ]
    if returned == "message":
        parts.append(_original_part(original, whole=True, utf8=utf8, kind=kind))
    elif returned == "headers":
        parts.append(_original_part(header_bytes, whole=False, utf8=utf8, kind=kind))
    boundary = _choose_boundary(parts)

    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        *_field("To", f"<{_printable(envelope.sender)}>"),
        f"Subject: {_SUBJECTS[kind]}",
        f"Date: {_date(now)}",
        f"Message-ID: <{int(now)}.{_random_token()}@{reporting_mta}>",
    ]
    if message_id is not None:
        # RFC 3834 §3.1.5: an automatic reply refers to what it answers, so mail clients thread it.
        head += [f"In-Reply-To: {message_id}", f"References: {message_id}"]
    head += [
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f"Content-Type: multipart/report; report-type={_status_subtype(utf8)};",
        f'\tboundary="{boundary.decode("ascii")}"',
    ]
    delimiter = b"\r\n--" + boundary
    data = b"".join(
        [
            b"".join(_encode_line(line) for line in head),
            b"\r\nThis is a MIME-encapsulated message.\r\n",
            *(delimiter + b"\r\n" + part for part in parts),
            delimiter + b"--\r\n",
        ]
    )
    return DsnMessage(
        recipient=envelope.sender,
        data=data,
        kind=kind,
        smtputf8=envelope.smtputf8 or not envelope.sender.isascii(),
        body_type="7BIT" if data.isascii() else "8BITMIME",
        requiretls=envelope.requiretls and not redact,
        returned=returned,
    )


# --- parts ----------------------------------------------------------------------------------------


def _explanation_part(
    kind: DsnKind,
    reports: Sequence[RecipientReport],
    *,
    reporting_mta: str,
    postmaster: str,
    returned: ReturnedContent,
    why_headers_only: str | None,
    message_id: str | None,
    queue_id: str | None,
    utf8: bool,
) -> bytes:
    paragraphs: list[str] = [f"This is the mail system at host {reporting_mta}."]
    if kind == "failure":
        paragraphs.append("Your message could not be delivered to one or more recipients.")
    elif kind == "delay":
        paragraphs.append(
            "Your message has not yet been delivered to one or more recipients. This is only a "
            "warning: you do not need to send it again, the mail system keeps trying."
        )
    else:
        paragraphs.append("This is the delivery report you asked for.")
    facts = []
    if message_id is not None:
        facts.append(f"Message-ID of your message: {message_id}")
    if queue_id is not None:
        facts.append(f"Queue id: {queue_id}")
    lines: list[str] = []
    for paragraph in paragraphs:
        lines += [*_wrap(paragraph), ""]
    if facts:
        lines += [*(line for fact in facts for line in _wrap(fact)), ""]

    retry_until: list[float] = []
    for report in reports:
        address = _address_text(report.address, utf8=utf8)
        lines += _wrap(f"<{address}>: {_what_happened(report)}")
        diagnostic = _diagnostic(report, utf8=utf8)
        if diagnostic:
            if _SMTP_REPLY_RE.match(diagnostic):
                server = "The remote mail server"
                if report.remote_mta is not None:
                    server = f"The mail server {_one_line(report.remote_mta, utf8=utf8)}"
                lines += _wrap(f"{server} said: {diagnostic}", indent="    ")
            else:
                lines += _wrap(f"Reason: {diagnostic}", indent="    ")
        if report.will_retry_until is not None:
            retry_until.append(report.will_retry_until)
        lines.append("")

    if kind == "failure":
        advice = (
            "What you can do: check the addresses above for typing mistakes, or ask the recipient "
            "for an address that works; the reply quoted above says why the message was refused. "
            f"If you think the mail system is at fault, write to <{postmaster}> and include this report."
        )
    elif kind == "delay":
        until = f" by {_date(max(retry_until))}" if retry_until else ""
        advice = (
            f"If the message cannot be delivered{until}, you will receive another report saying so. "
            f"For help, write to <{postmaster}> and include this report."
        )
    else:
        advice = "Nothing needs to be done."
    lines += [*_wrap(advice), ""]
    if returned == "message":
        lines += _wrap("Your original message is attached.")
    elif returned == "headers":
        lines += _wrap(why_headers_only or "The headers of your original message are attached.")
    else:
        lines += _wrap(
            "Your original message is not attached: it was sent with REQUIRETLS, and this report "
            "may travel over connections that are not protected."
        )
    body = "".join(line + "\r\n" for line in lines).encode("utf-8")
    charset = "us-ascii" if body.isascii() else "utf-8"
    head = ["Content-Description: Notification", f"Content-Type: text/plain; charset={charset}"]
    return _part(head, body)


def _what_happened(report: RecipientReport) -> str:
    status = f"(status {report.status})"
    if report.action == "failed":
        return f"the message could not be delivered {status}."
    if report.action == "delayed":
        if report.will_retry_until is None:
            return f"the message has not been delivered yet and is still being retried {status}."
        return (
            f"the message has not been delivered yet {status}; it will be retried until "
            f"{_date(report.will_retry_until)}."
        )
    if report.action == "delivered":
        return f"the message was delivered {status}."
    if report.action == "relayed":
        return (
            f"the message was passed on to a mail system that does not send delivery reports {status}; "
            "no further report will come."
        )
    return f"the message was delivered to a list or alias that passes it on to its members {status}."


def _status_part(
    envelope: Envelope,
    reports: Sequence[RecipientReport],
    *,
    reporting_mta: str,
    queue_id: str | None,
    utf8: bool,
) -> bytes:
    # Field order follows the RFC 3464 §2.2 and §2.3 grammar; extension fields come last.
    per_message: list[str] = []
    if envelope.dsn_envid is not None:
        per_message += _field("Original-Envelope-Id", _one_line(envelope.dsn_envid, utf8=utf8))
    per_message += _field("Reporting-MTA", f"dns; {reporting_mta}")
    per_message += _field("Arrival-Date", _date(envelope.received_at))
    if queue_id is not None:
        per_message += _field("X-Mailward-Queue-ID", _one_line(queue_id, utf8=utf8))
    blocks = [per_message]
    for report in reports:
        fields: list[str] = []
        if report.orcpt is not None:
            addr_type, semicolon, address = report.orcpt.partition(";")
            addr_type = addr_type.strip()
            # A malformed ORCPT cannot have come through our parser; leave it out rather than guess.
            if semicolon and address and _ADDR_TYPE_RE.match(addr_type):
                fields += _field("Original-Recipient", _address_field(addr_type, address, utf8=utf8))
        fields += _field("Final-Recipient", _address_field("rfc822", report.address, utf8=utf8))
        fields += _field("Action", report.action)
        fields += _field("Status", report.status)
        if report.remote_mta is not None:
            fields += _field("Remote-MTA", f"dns; {_one_line(report.remote_mta, utf8=utf8)}")
        text = _diagnostic(report, utf8=utf8)
        if text:
            diagnostic_type = "smtp" if _SMTP_REPLY_RE.match(text) else "X-Mailward"
            fields += _field("Diagnostic-Code", f"{diagnostic_type}; {text}")
        if report.last_attempt is not None:
            fields += _field("Last-Attempt-Date", _date(report.last_attempt))
        if report.will_retry_until is not None:
            fields += _field("Will-Retry-Until", _date(report.will_retry_until))
        blocks.append(fields)
    body = b"\r\n".join(b"".join(_encode_line(line) for line in block) for block in blocks)
    head = ["Content-Description: Delivery report", f"Content-Type: message/{_status_subtype(utf8)}"]
    return _part(head, body)


def _original_part(content: bytes, *, whole: bool, utf8: bool, kind: DsnKind) -> bytes:
    if whole:
        content_type = "message/global" if utf8 else "message/rfc822"
        description = "Undelivered Message" if kind == "failure" else "Message"
    else:
        # message/global-headers promises UTF-8; 8-bit legacy headers stay text/rfc822-headers.
        global_ok = utf8 and (content.isascii() or _is_utf8_beyond_ascii(content))
        content_type = "message/global-headers" if global_ok else "text/rfc822-headers"
        description = "Undelivered Message Headers" if kind == "failure" else "Message Headers"
    return _part([f"Content-Description: {description}", f"Content-Type: {content_type}"], content)


def _part(head: list[str], body: bytes) -> bytes:
    if not body.isascii():
        head = [*head, "Content-Transfer-Encoding: 8bit"]
    return b"".join(_encode_line(line) for line in head) + b"\r\n" + body


def _status_subtype(utf8: bool) -> str:
    return "global-delivery-status" if utf8 else "delivery-status"


def _choose_boundary(parts: Sequence[bytes]) -> bytes:
    # Random, then checked: no included text can contain it, whoever wrote that text.
    for _ in range(64):
        boundary = f"=_mailward_dsn_{_random_token()}".encode("ascii")
        if not any(boundary in part for part in parts):
            return boundary
    raise RuntimeError("could not find a MIME boundary absent from the report")


def _random_token() -> str:
    return secrets.token_hex(12)


# --- the original ---------------------------------------------------------------------------------


def _header_section(original: bytes, limit: int) -> tuple[list[bytes], bool]:
    """The original's header lines, made safe to include; True if some were left out for size.

    Stored messages have CRLF lines, but this also copes with LF-only, bare CR, NUL and over-long
    lines, so whatever the stored bytes are, the report stays well-formed.
    """
    lines: list[bytes] = []
    size = 0
    pos = 0
    while pos < len(original):
        end = original.find(b"\n", pos)
        if end < 0:
            end = len(original)
        line = original[pos:end]
        pos = end + 1
        # Trailing blanks go, so a folded remainder is never blanks only; a line of blanks thus
        # ends the header section like an empty one, as some parsers read it anyway.
        line = line.replace(b"\x00", b"").replace(b"\r", b" ").rstrip(b" \t")
        if not line:
            break
        for chunk in _split_long(line):
            size += len(chunk) + 2
            if size > limit:
                return lines, True
            lines.append(chunk)
    return lines, False


def _split_long(line: bytes) -> list[bytes]:
    # Folding (CRLF + space) keeps an over-long header one header; the cut avoids splitting a
    # UTF-8 sequence so a message/global-headers part stays valid UTF-8.
    chunks: list[bytes] = []
    while len(line) > _MAX_LINE:
        cut = _MAX_LINE
        while cut > _MAX_LINE - 3 and 0x80 <= line[cut] <= 0xBF:
            cut -= 1
        chunks.append(line[:cut])
        line = b" " + line[cut:]
    chunks.append(line)
    return chunks


def _mail_safe(data: bytes) -> bool:
    """CRLF lines of at most 998 octets and no NUL: can be returned byte for byte."""
    return _BARE_CR_LF_NUL.search(data) is None and _LONG_LINE.search(data) is None


def _is_utf8_beyond_ascii(data: bytes) -> bool:
    if data.isascii():
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# --- text -----------------------------------------------------------------------------------------


def _one_line(value: str, *, utf8: bool, limit: int | None = None) -> str:
    """Untrusted text as one line of printable characters; ASCII with \\x{HEX} escapes unless utf8.

    A multi-line SMTP reply becomes its lines joined by spaces (as Postfix logs it).
    """
    text = " ".join(piece.strip() for piece in _LINE_BREAKS.split(value) if piece.strip())
    text = _SPACES.sub(" ", _UNSAFE.sub(" ", text)).strip()
    if limit is not None and len(text) > limit:
        text = text[:limit].rstrip() + " ..."
    if not utf8:
        text = "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in text)
    return text


def _diagnostic(report: RecipientReport, *, utf8: bool) -> str:
    if report.diagnostic is None:
        return ""
    return _one_line(report.diagnostic, utf8=utf8, limit=_MAX_DIAGNOSTIC)


def _printable(value: str) -> str:
    return _UNSAFE.sub("?", value)


def _address_text(address: str, *, utf8: bool) -> str:
    text = _printable(address)
    if not utf8:
        text = "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in text)
    return text


def _address_field(addr_type: str, address: str, *, utf8: bool) -> str:
    """``addr-type; address`` for Original-/Final-Recipient.

    A non-ASCII address is of type utf-8 (RFC 6533 §3): raw UTF-8 in a global report
    (utf-8-addr-unitext), \\x{HEX} escapes in a plain one (utf-8-addr-xtext).
    """
    if addr_type.lower() == "utf-8" or not address.isascii():
        return f"utf-8; {_utf8_addr(address, keep_unicode=utf8)}"
    return f"{addr_type}; {_address_text(address, utf8=utf8)}"


def _utf8_addr(address: str, *, keep_unicode: bool) -> str:
    out = []
    for c in address:
        code = ord(c)
        if (
            c in "+=\\"
            or code <= 0x20
            or 0x7F <= code <= 0x9F
            or _UNSAFE.match(c)
            or (code > 0x7E and not keep_unicode)
        ):
            out.append(f"\\x{{{code:X}}}")
        else:
            out.append(c)
    return "".join(out)


def _message_id(value: str | None, *, utf8: bool) -> str | None:
    if value is None:
        return None
    text = _one_line(value, utf8=True)
    # Cannot be folded, so it must fit on a line with its field name.
    if not _MSGID_RE.match(text) or _octets(text) > 900 or (not utf8 and not text.isascii()):
        return None
    return text


def _wrap(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(
        text,
        width=_TEXT_WIDTH,
        initial_indent=indent,
        subsequent_indent=indent,
        break_long_words=True,
        break_on_hyphens=False,
    ) or [""]


def _field(name: str, value: str) -> list[str]:
    """``Name: value`` folded at spaces near 78 octets, never over 998 (RFC 5322 §2.2.3).

    Folding only inserts CRLF before an existing space, so unfolding gives the value back; only
    a word too long for any line is cut, which adds a space.
    """
    value = value.rstrip()
    lines: list[str] = []
    current = f"{name}:"
    has_word = False
    for word in value.split(" "):
        piece = " " + word
        if word and has_word and _octets(current) + _octets(piece) > _FOLD_AT:
            lines.append(current)
            current = piece
        else:
            current += piece
        has_word = has_word or bool(word)
        while _octets(current) > _MAX_LINE:
            cut = _prefix_within(current, _MAX_LINE)
            lines.append(current[:cut])
            current = " " + current[cut:]
    lines.append(current)
    return lines


def _octets(text: str) -> int:
    return len(text.encode("utf-8"))


def _prefix_within(text: str, octets: int) -> int:
    total = 0
    for index, char in enumerate(text):
        total += len(char.encode("utf-8"))
        if total > octets:
            return max(index, 2)
    return len(text)


def _encode_line(line: str) -> bytes:
    return line.encode("utf-8") + b"\r\n"


def _date(epoch: float) -> str:
    return format_datetime(datetime.fromtimestamp(epoch, UTC))
