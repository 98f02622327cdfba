"""Replies and the enhanced status codes (RFC 3463) the engine sends, named once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: code, enhanced status code (RFC 3463) and one or more text lines."""

    code: int
    enhanced: str | None
    lines: tuple[str, ...]

    @classmethod
    def make(cls, code: int, enhanced: str | None, *lines: str) -> Reply:
        return cls(code, enhanced, lines or ("",))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def to_bytes(self) -> bytes:
        prefix = f"{self.code}"
        enh = f"{self.enhanced} " if self.enhanced else ""
        out = []
        last = len(self.lines) - 1
        for i, line in enumerate(self.lines):
            sep = " " if i == last else "-"
            body = f"{enh}{line}" if line or enh else ""
            out.append(f"{prefix}{sep}{body}".rstrip(" ") + "\r\n")
        return "".join(out).encode("utf-8", "replace")

    def __str__(self) -> str:
        enh = f" {self.enhanced}" if self.enhanced else ""
        return f"{self.code}{enh} {' '.join(self.lines)}".rstrip()


def r(code: int, enhanced: str | None, text: str) -> Reply:
    return Reply(code, enhanced, (text,))


OK = r(250, "2.0.0", "Ok")
SENDER_OK = r(250, "2.1.0", "Sender ok")
RCPT_OK = r(250, "2.1.5", "Recipient ok")
RESET_OK = r(250, "2.0.0", "Reset state")
NOOP_OK = r(250, "2.0.0", "Ok")
START_DATA = r(354, None, "End data with <CR><LF>.<CR><LF>")
READY_TLS = r(220, "2.0.0", "Ready to start TLS")
VRFY_CANNOT = r(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = r(214, "2.0.0", "See RFC 5321")
AUTH_OK = r(235, "2.7.0", "Authentication successful")

SHUTTING_DOWN = r(421, "4.3.2", "Service shutting down, closing connection")
TOO_MANY_ERRORS = r(421, "4.7.0", "Too many errors, closing connection")
TIMEOUT = r(421, "4.4.2", "Timeout exceeded, closing connection")
TOO_MANY_CONNECTIONS = r(421, "4.7.0", "Too many connections, try again later")
LOCAL_ERROR = r(451, "4.3.0", "Local error, try again later")
TOO_MANY_RCPTS = r(452, "4.5.3", "Too many recipients")
TLS_UNAVAILABLE = r(454, "4.7.0", "TLS not available")
AUTH_TEMPFAIL = r(454, "4.7.0", "Temporary authentication failure")

UNRECOGNIZED = r(500, "5.5.2", "Command not recognized")
# X.5.6 is registered by RFC 4954 for AUTH lines only; any other too-long line is a syntax error.
LINE_TOO_LONG = r(500, "5.5.2", "Line too long")
AUTH_LINE_TOO_LONG = r(500, "5.5.6", "Authentication Exchange line is too long")
BARE_LF_COMMAND = r(500, "5.5.2", "Bare <LF> or <CR> received; use <CR><LF>")
SYNTAX = r(501, "5.5.4", "Syntax error in parameters or arguments")
NOT_IMPLEMENTED = r(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = r(503, "5.5.1", "Bad sequence of commands")
NEED_MAIL = r(503, "5.5.1", "Need MAIL command")
NEED_RCPT = r(503, "5.5.1", "Need RCPT command")
NESTED_MAIL = r(503, "5.5.1", "Sender already specified")
ALREADY_AUTH = r(503, "5.5.1", "Already authenticated")
AUTH_BAD_MECH = r(504, "5.5.4", "Unrecognized authentication type")
AUTH_CANCELLED = r(501, "5.7.0", "Authentication cancelled")
AUTH_BAD_BASE64 = r(501, "5.5.2", "Cannot decode response")
AUTH_FAILED = r(535, "5.7.8", "Authentication credentials invalid")
NEED_STARTTLS = r(530, "5.7.0", "Must issue a STARTTLS command first")
NEED_AUTH = r(530, "5.7.0", "Authentication required")
NO_VALID_RCPTS = r(554, "5.5.1", "No valid recipients")
RELAY_DENIED = r(554, "5.7.1", "Relay access denied")
UNKNOWN_USER = r(550, "5.1.1", "Recipient address rejected: user unknown")
TOO_BIG = r(552, "5.3.4", "Message size exceeds fixed limit")
BARE_LF_DATA = r(550, "5.5.2", "Message contains bare <CR> or <LF>; use <CR><LF> line endings")
DATA_LINE_TOO_LONG = r(500, "5.5.2", "Message contains a line longer than allowed")
PARAM_UNKNOWN = r(555, "5.5.4", "Unsupported MAIL or RCPT parameter")
NEED_SMTPUTF8 = r(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
NOT_SENDER_OWNER = r(553, "5.7.1", "Sender address not owned by the authenticated user")
BINARYMIME_NEEDS_BDAT = r(503, "5.5.1", "BODY=BINARYMIME requires BDAT")
REQUIRETLS_NEEDS_TLS = r(530, "5.7.10", "REQUIRETLS needs a TLS session")
