"""The engine's vocabulary: replies and the events a server or client engine reports."""

from __future__ import annotations

from dataclasses import dataclass

from mailward.smtp.address import Mailbox
from mailward.smtp.codes import Reply
from mailward.smtp.commands import MailParams, RcptParams

# --- server-side events -------------------------------------------------------------------------
# Events marked "decision" pause the engine until the session answers with accept() or respond().


@dataclass(frozen=True, slots=True)
class EhloReceived:
    """decision: accept() answers with the capabilities for the current state."""

    hostname: str
    esmtp: bool


@dataclass(frozen=True, slots=True)
class MailReceived:
    """decision: MAIL FROM with validated parameters; `sender` None is the null reverse path."""

    sender: Mailbox | None
    params: MailParams


@dataclass(frozen=True, slots=True)
class RcptReceived:
    """decision: RCPT TO with validated parameters."""

    recipient: Mailbox
    params: RcptParams


@dataclass(frozen=True, slots=True)
class DataStarted:
    """decision: the first DATA or BDAT of a transaction with at least one accepted recipient."""

    chunking: bool


@dataclass(frozen=True, slots=True)
class BodyChunk:
    """Message content, dot-unstuffed, CRLF line endings, in order."""

    data: bytes


@dataclass(frozen=True, slots=True)
class BodyEnded:
    """decision: end of data reached; reply 250 only once the message is durable."""

    size: int


@dataclass(frozen=True, slots=True)
class BodyRejected:
    """The engine discarded the message (already replied); the session must abort its transaction."""

    reply: Reply
    reason: str


@dataclass(frozen=True, slots=True)
class StartTlsRequested:
    """decision: accept() replies 220 and drops everything buffered; then call tls_established()."""


@dataclass(frozen=True, slots=True)
class AuthRequested:
    """decision: answer with auth_challenge(), auth_succeeded() or respond(failure)."""

    mechanism: str
    initial_response: bytes | None


@dataclass(frozen=True, slots=True)
class AuthResponse:
    """decision: the client's (base64-decoded) answer to a 334 challenge."""

    data: bytes


@dataclass(frozen=True, slots=True)
class AuthCancelled:
    """The client cancelled or garbled an AUTH exchange; the engine already replied."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class TransactionReset:
    """RSET, EHLO/HELO or STARTTLS ended the current mail transaction, if any."""


@dataclass(frozen=True, slots=True)
class QuitRequested:
    """The engine answered 221; flush and close."""


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """Bad input; the engine already replied. Logged by the session, never fatal on its own."""

    reply: Reply
    detail: str


@dataclass(frozen=True, slots=True)
class ConnectionClosing:
    """The engine gave up on the peer (421 sent, e.g. too many errors); flush and close."""

    reply: Reply
    reason: str


ServerEvent = (
    EhloReceived
    | MailReceived
    | RcptReceived
    | DataStarted
    | BodyChunk
    | BodyEnded
    | BodyRejected
    | StartTlsRequested
    | AuthRequested
    | AuthResponse
    | AuthCancelled
    | TransactionReset
    | QuitRequested
    | ProtocolError
    | ConnectionClosing
)

DECISION_EVENTS = (
    EhloReceived,
    MailReceived,
    RcptReceived,
    DataStarted,
    BodyEnded,
    StartTlsRequested,
    AuthRequested,
    AuthResponse,
)
