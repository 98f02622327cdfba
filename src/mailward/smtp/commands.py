"""SMTP commands: parsing (server role) and serialising (client role) with ESMTP parameters.

Both roles share these dataclasses, so `parse_command(cmd.to_bytes())` round-trips, and the client can
never write a command the server would read differently. Serialising refuses CR, LF and NUL in any
argument (command injection through the client API).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from mailward.smtp import codes
from mailward.smtp.address import (
    AddressError,
    Mailbox,
    format_path,
    parse_forward_path,
    parse_reverse_path,
    split_path,
)
from mailward.smtp.codes import Reply


class CommandError(Exception):
    """A command line the server must refuse; carries the reply to send."""

    def __init__(self, reply: Reply, detail: str = "") -> None:
        super().__init__(detail or str(reply))
        self.reply = reply
        self.detail = detail or reply.text


class InjectionError(ValueError):
    """A caller tried to put CR, LF or NUL (or another control) into a command argument."""


_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_VALUE_BAD = re.compile(r"[\x00-\x20=\x7f]")
_UNSAFE_ARG = re.compile(r"[\x00-\x1f\x7f]")
_SASL_MECH = re.compile(r"[A-Z0-9_-]{1,20}\Z")
_BDAT_SIZE = re.compile(r"[0-9]{1,15}\Z")
_XTEXT_HEX = re.compile(r"\+([0-9A-F]{2})")
_XTEXT_CHARS = re.compile(r"[!-<>-~]*\Z")  # RFC 3461 §4: xchar and "+", never "="
BODY_TYPES = ("7BIT", "8BITMIME", "BINARYMIME")
NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY"})


def xtext_decode(value: str) -> str:
    """RFC 3461 §4 xtext: "+" HEXCHAR HEXCHAR stands for one octet; a stray "+" is an error."""
    if not _XTEXT_CHARS.match(value):
        raise ValueError("xtext is printable ASCII only")
    if "+" not in value:
        return value
    if value.count("+") != len(_XTEXT_HEX.findall(value)):
        raise ValueError("malformed xtext")
    raw = _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), value)
    return raw


def xtext_encode(value: str) -> str:
    out = []
    for ch in value:
        o = ord(ch)
        if o > 255:
            # xtext carries octets; a character it cannot carry must not pass through raw.
            raise InjectionError(f"character beyond one octet in an xtext value: {value!r}")
        if ch in "+=" or o < 33 or o > 126:
            out.append(f"+{o:02X}")
        else:
            out.append(ch)
    return "".join(out)


_UTF8_XTEXT_HEX = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


def utf8_addr_xtext_encode(value: str) -> str:
    """RFC 6533 §3 utf-8-addr-xtext: SP, "+", "=", backslash and controls as \\x{HEX}."""
    # Non-ASCII is allowed raw here, but not the Unicode spaces and controls that split or end lines.
    return "".join(f"\\x{{{ord(c):X}}}" if c in "+=\\" or ord(c) <= 32 or 127 <= ord(c) <= 160
                   or c.isspace() else c for c in value)


def utf8_addr_xtext_decode(value: str) -> str:
    try:
        return _UTF8_XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), value)
    except (ValueError, OverflowError):
        raise ValueError("malformed utf-8-addr-xtext") from None


def _check_hostname(value: str) -> str:
    if not value or " " in value:
        raise InjectionError(f"EHLO/HELO needs one word, got {value!r}")
    return _check_arg(value)


def _check_arg(value: str) -> str:
    if _UNSAFE_ARG.search(value):
        raise InjectionError(f"control character in SMTP command argument: {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class MailParams:
    size: int | None = None
    body: str | None = None
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    requiretls: bool = False
    auth: str | None = None

    def to_esmtp(self) -> str:
        # Values that could smuggle a second parameter never leave as written.
        if self.body is not None and self.body not in BODY_TYPES:
            raise InjectionError(f"invalid BODY value {self.body!r}")
        if self.ret is not None and self.ret not in ("FULL", "HDRS"):
            raise InjectionError(f"invalid RET value {self.ret!r}")
        if self.size is not None and self.size < 0:
            raise InjectionError("SIZE must not be negative")
        if self.envid == "" or self.auth == "":
            raise InjectionError("ENVID and AUTH values must not be empty")
        parts = []
        if self.size is not None:
            parts.append(f"SIZE={self.size}")
        if self.body is not None:
            parts.append(f"BODY={self.body}")
        if self.smtputf8:
            parts.append("SMTPUTF8")
        if self.ret is not None:
            parts.append(f"RET={self.ret}")
        if self.envid is not None:
            parts.append(f"ENVID={xtext_encode(self.envid)}")
        if self.requiretls:
            parts.append("REQUIRETLS")
        if self.auth is not None:
            parts.append(f"AUTH={xtext_encode(self.auth)}")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class RcptParams:
    notify: frozenset[str] | None = None
    orcpt: str | None = None

    def to_esmtp(self) -> str:
        parts = []
        if self.notify is not None:
            order = ("NEVER", "SUCCESS", "FAILURE", "DELAY")
            if not self.notify or not self.notify <= NOTIFY_VALUES | {"NEVER"}:
                raise InjectionError(f"invalid NOTIFY value {sorted(self.notify)!r}")
            parts.append("NOTIFY=" + ",".join(v for v in order if v in self.notify))
        if self.orcpt is not None:
            addr_type, _, addr = self.orcpt.partition(";")
            if not _KEYWORD.match(addr_type):
                raise InjectionError(f"invalid ORCPT address type {addr_type!r}")
            utf8 = addr_type.lower() == "utf-8"
            enc = utf8_addr_xtext_encode(addr) if utf8 else xtext_encode(addr)
            parts.append(f"ORCPT={addr_type};{enc}")
        return " ".join(parts)


def _split_params(text: str) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    # RFC 5321 separates parameters with SP only; str.split() would also split on U+0085 etc.,
    # letting one decoded value smuggle a second parameter.
    for item in filter(None, text.split(" ")):
        key, eq, value = item.partition("=")
        if not _KEYWORD.match(key) or (eq and (not value or _VALUE_BAD.search(value))):
            raise CommandError(codes.SYNTAX, f"malformed ESMTP parameter {item!r}")
        ukey = key.upper()
        if ukey in seen:
            raise CommandError(codes.SYNTAX, f"duplicate ESMTP parameter {ukey}")
        seen.add(ukey)
        out.append((ukey, value if eq else None))
    return out


def _need(key: str, value: str | None) -> str:
    if value is None:
        raise CommandError(codes.SYNTAX, f"{key} needs a value")
    return value


def _no_value(key: str, value: str | None) -> None:
    if value is not None:
        raise CommandError(codes.SYNTAX, f"{key} takes no value")


def parse_mail_params(text: str) -> MailParams:
    size = body = ret = envid = auth = None
    smtputf8 = requiretls = False
    for key, value in _split_params(text):
        if key == "SIZE":
            v = _need(key, value)
            if not v.isascii() or not v.isdigit() or len(v) > 20:
                raise CommandError(codes.SYNTAX, "SIZE must be a decimal number")
            size = int(v)
        elif key == "BODY":
            v = _need(key, value).upper()
            if v not in BODY_TYPES:
                raise CommandError(codes.SYNTAX, f"unknown BODY type {value!r}")
            body = v
        elif key == "SMTPUTF8":
            _no_value(key, value)
            smtputf8 = True
        elif key == "RET":
            v = _need(key, value).upper()
            if v not in ("FULL", "HDRS"):
                raise CommandError(codes.SYNTAX, "RET must be FULL or HDRS")
            ret = v
        elif key == "ENVID":
            v = _need(key, value)
            try:
                envid = xtext_decode(v)
            except ValueError:
                raise CommandError(codes.SYNTAX, "ENVID is not valid xtext") from None
            if len(envid) > 100:
                raise CommandError(codes.SYNTAX, "ENVID longer than 100 characters")
        elif key == "REQUIRETLS":
            _no_value(key, value)
            requiretls = True
        elif key == "AUTH":
            v = _need(key, value)
            try:
                auth = xtext_decode(v)
            except ValueError:
                raise CommandError(codes.SYNTAX, "AUTH= is not valid xtext") from None
        else:
            raise CommandError(codes.PARAM_UNKNOWN, f"unsupported MAIL parameter {key}")
    return MailParams(size, body, smtputf8, ret, envid, requiretls, auth)


def parse_rcpt_params(text: str) -> RcptParams:
    notify: frozenset[str] | None = None
    orcpt = None
    for key, value in _split_params(text):
        if key == "NOTIFY":
            items = frozenset(_need(key, value).upper().split(","))
            if items != {"NEVER"} and not (items and items <= NOTIFY_VALUES):
                raise CommandError(codes.SYNTAX, "NOTIFY must be NEVER or SUCCESS,FAILURE,DELAY")
            notify = items
        elif key == "ORCPT":
            addr_type, semi, addr = _need(key, value).partition(";")
            if not semi or not addr or not _KEYWORD.match(addr_type):
                raise CommandError(codes.SYNTAX, "ORCPT must be addr-type;address")
            try:
                addr = utf8_addr_xtext_decode(addr) if addr_type.lower() == "utf-8" else xtext_decode(addr)
            except ValueError:
                raise CommandError(codes.SYNTAX, "ORCPT is not valid xtext") from None
            orcpt = f"{addr_type};{addr}"
        else:
            raise CommandError(codes.PARAM_UNKNOWN, f"unsupported RCPT parameter {key}")
    return RcptParams(notify, orcpt)


# --- commands ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ehlo:
    hostname: str

    def to_bytes(self) -> bytes:
        return f"EHLO {_check_hostname(self.hostname)}\r\n".encode()


@dataclass(frozen=True, slots=True)
class Helo:
    hostname: str

    def to_bytes(self) -> bytes:
        return f"HELO {_check_hostname(self.hostname)}\r\n".encode()


@dataclass(frozen=True, slots=True)
class Mail:
    sender: Mailbox | None
    params: MailParams = MailParams()

    def to_bytes(self) -> bytes:
        esmtp = self.params.to_esmtp()
        line = f"MAIL FROM:{format_path(self.sender)}" + (f" {esmtp}" if esmtp else "")
        return (_check_arg(line) + "\r\n").encode()


@dataclass(frozen=True, slots=True)
class Rcpt:
    recipient: Mailbox
    params: RcptParams = RcptParams()

    def to_bytes(self) -> bytes:
        esmtp = self.params.to_esmtp()
        line = f"RCPT TO:{format_path(self.recipient)}" + (f" {esmtp}" if esmtp else "")
        return (_check_arg(line) + "\r\n").encode()


@dataclass(frozen=True, slots=True)
class Data:
    def to_bytes(self) -> bytes:
        return b"DATA\r\n"


@dataclass(frozen=True, slots=True)
class Bdat:
    size: int
    last: bool

    def to_bytes(self) -> bytes:
        return f"BDAT {self.size}{' LAST' if self.last else ''}\r\n".encode()


@dataclass(frozen=True, slots=True)
class Rset:
    def to_bytes(self) -> bytes:
        return b"RSET\r\n"


@dataclass(frozen=True, slots=True)
class Noop:
    argument: str = ""

    def to_bytes(self) -> bytes:
        arg = _check_arg(self.argument)
        return f"NOOP{' ' + arg if arg else ''}\r\n".encode()


@dataclass(frozen=True, slots=True)
class Quit:
    def to_bytes(self) -> bytes:
        return b"QUIT\r\n"


@dataclass(frozen=True, slots=True)
class Vrfy:
    argument: str

    def to_bytes(self) -> bytes:
        return f"VRFY {_check_arg(self.argument)}\r\n".encode()


@dataclass(frozen=True, slots=True)
class Help:
    argument: str = ""

    def to_bytes(self) -> bytes:
        arg = _check_arg(self.argument)
        return f"HELP{' ' + arg if arg else ''}\r\n".encode()


@dataclass(frozen=True, slots=True)
class StartTls:
    def to_bytes(self) -> bytes:
        return b"STARTTLS\r\n"


@dataclass(frozen=True, slots=True)
class Auth:
    mechanism: str
    initial_response: bytes | None = None

    def to_bytes(self) -> bytes:
        mech = _check_arg(self.mechanism)
        if self.initial_response is None:
            return f"AUTH {mech}\r\n".encode()
        ir = base64.b64encode(self.initial_response).decode() or "="
        return f"AUTH {mech} {ir}\r\n".encode()


Command = Ehlo | Helo | Mail | Rcpt | Data | Bdat | Rset | Noop | Quit | Vrfy | Help | StartTls | Auth

_NO_ARGS: dict[str, Command] = {
    "DATA": Data(),
    "RSET": Rset(),
    "QUIT": Quit(),
    "STARTTLS": StartTls(),
}


def decode_base64(text: str) -> bytes:
    """Strict base64 for AUTH: "=" alone is the empty string (RFC 4954 §4)."""
    if text == "=":
        return b""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise CommandError(codes.AUTH_BAD_BASE64, "malformed base64") from None


def _address_reply(err: AddressError) -> Reply:
    return Reply(err.code, err.enhanced, (err.text,))


_ARG_VERBS = frozenset({"EHLO", "HELO", "MAIL", "RCPT", "BDAT", "AUTH", "VRFY"})


def parse_command(line: bytes) -> Command:
    """Parse one command line (without its CRLF). Raises CommandError, never anything else."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        # A known verb with a broken argument is a bad argument (501), not an unknown command.
        verb = line.split(b" ", 1)[0].decode("ascii", "replace").upper()
        if b" " in line and verb in _ARG_VERBS:
            raise CommandError(codes.SYNTAX, "argument is not valid UTF-8") from None
        raise CommandError(codes.UNRECOGNIZED, "command is not valid UTF-8") from None
    if _UNSAFE_ARG.search(text):
        raise CommandError(codes.BARE_LF_COMMAND, "control character in command")
    verb, _, arg = text.partition(" ")
    verb = verb.upper()
    if verb in _NO_ARGS:
        if arg.strip():
            raise CommandError(codes.SYNTAX, f"{verb} takes no arguments")
        return _NO_ARGS[verb]
    if verb in ("EHLO", "HELO"):
        name = arg.strip()
        if not name or " " in name:
            raise CommandError(codes.r(501, "5.5.4", f"Syntax: {verb} hostname"))
        return Ehlo(name) if verb == "EHLO" else Helo(name)
    if verb == "MAIL":
        if arg[:5].upper() != "FROM:":
            raise CommandError(codes.r(501, "5.5.4", "Syntax: MAIL FROM:<address>"))
        try:
            path, rest = split_path(arg[5:])
            params = parse_mail_params(rest)
            return Mail(parse_reverse_path(path, smtputf8=params.smtputf8), params)
        except AddressError as err:
            raise CommandError(_address_reply(err), err.text) from None
    if verb == "RCPT":
        if arg[:3].upper() != "TO:":
            raise CommandError(codes.r(501, "5.5.4", "Syntax: RCPT TO:<address>"))
        try:
            path, rest = split_path(arg[3:])
            rcpt_params = parse_rcpt_params(rest)
            # UTF-8 is checked against the transaction's SMTPUTF8 by the server, which knows it.
            return Rcpt(parse_forward_path(path, smtputf8=True), rcpt_params)
        except AddressError as err:
            raise CommandError(_address_reply(err), err.text) from None
    if verb == "BDAT":
        parts = [p for p in arg.split(" ") if p]
        if (
            not 1 <= len(parts) <= 2
            or not _BDAT_SIZE.match(parts[0])
            or (len(parts) == 2 and parts[1].upper() != "LAST")
        ):
            raise CommandError(codes.r(501, "5.5.4", "Syntax: BDAT size [LAST]"))
        return Bdat(int(parts[0]), len(parts) == 2)
    if verb == "AUTH":
        parts = [p for p in arg.split(" ") if p]
        if not 1 <= len(parts) <= 2:
            raise CommandError(codes.r(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]"))
        mech = parts[0].upper()
        if not _SASL_MECH.match(mech):
            raise CommandError(codes.AUTH_BAD_MECH)
        return Auth(mech, decode_base64(parts[1]) if len(parts) == 2 else None)
    if verb == "NOOP":
        return Noop(arg)
    if verb == "HELP":
        return Help(arg)
    if verb == "VRFY":
        if not arg.strip():
            raise CommandError(codes.r(501, "5.5.4", "Syntax: VRFY address"))
        return Vrfy(arg)
    if verb in ("EXPN", "TURN", "ETRN", "SEND", "SOML", "SAML"):
        raise CommandError(codes.NOT_IMPLEMENTED, f"{verb} not implemented")
    raise CommandError(codes.UNRECOGNIZED, "unknown command")
