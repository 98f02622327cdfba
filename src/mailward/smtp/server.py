"""The server role of the engine: a state machine fed with bytes that reports typed events.

Use:
    srv = ServerConnection(ServerOptions(hostname="mx.example"))
    srv.greet()
    srv.receive_data(bytes_from_peer)
    while (event := srv.next_event()) is not None:
        ... decision events are answered with srv.accept() / srv.respond(reply) ...
    send(srv.data_to_send())

Commands are handled strictly one at a time: after a decision event the engine parses nothing more
until the session has answered, so pipelined commands (RFC 2920) see the outcome of earlier ones.
"""

from __future__ import annotations

import base64
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Literal

from mailward.smtp import codes
from mailward.smtp.codes import Reply
from mailward.smtp.commands import (
    Auth,
    Bdat,
    CommandError,
    Data,
    Ehlo,
    Helo,
    Help,
    Mail,
    Noop,
    Quit,
    Rcpt,
    Rset,
    StartTls,
    Vrfy,
    decode_base64,
    parse_command,
)
from mailward.smtp.events import (
    AuthCancelled,
    AuthRequested,
    AuthResponse,
    BodyChunk,
    BodyEnded,
    BodyRejected,
    ConnectionClosing,
    DataStarted,
    EhloReceived,
    MailReceived,
    ProtocolError,
    QuitRequested,
    RcptReceived,
    ServerEvent,
    StartTlsRequested,
    TransactionReset,
)

AUTH_LINE_LIMIT = 12288  # RFC 4954 §4: an AUTH response line may be this long
_BARE_LF = re.compile(rb"(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")
# The first bare CR or dot-stuffed line: DATA content needs a closer look only after one.
_CR_NOTABLE = re.compile(rb"\r(?!\n)|\r\n\.")


def _has_bare_line_ending(data: bytes) -> bool:
    # Counting runs in C at memory speed; a regex scan was the engine's slowest step.
    crlf = data.count(b"\r\n")
    return data.count(b"\n") != crlf or data.count(b"\r") != crlf


def _bare_and_stuffed(data: bytes) -> tuple[bool, bool]:
    """Whether `data` has a bare CR or LF, and whether a line in it (after the first) starts with
    a dot. One regex pass and two counts in C, a third of the time of counting CRLFs and searching
    for dots apart: a bare CR shows in the search, a bare LF as more LFs than CRs once every CR is
    known to have its LF."""
    notable = _CR_NOTABLE.search(data)
    if notable is None:
        return data.count(b"\r") != data.count(b"\n"), False
    at = notable.start()
    bare = data.count(b"\r") != data.count(b"\n") or _BARE_CR.search(data, at) is not None
    return bare, data.find(b"\r\n.", at) >= 0


def _has_line_longer_than(data: bytes, limit: int) -> bool:
    """Whether some line, counted without its LF (a CR before it counts), is longer than `limit`.

    Jumps from one LF to the last LF within reach instead of splitting every line: a 100 KB body
    costs about a hundred short searches in C and no allocation (splitting was a tenth of the
    engine's time on large messages).
    """
    last = -1
    while len(data) - last - 1 > limit:
        last = data.rfind(b"\n", last + 1, last + 2 + limit)
        if last < 0:
            return True
    return False


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """What one listener offers. Limits default to RFC 5321 §4.5.3."""

    hostname: str
    max_message_size: int | None = 50 * 1024 * 1024
    max_recipients: int = 1000
    max_command_line: int = 512
    max_text_line: int = 1000
    bare_line_endings: Literal["reject", "normalize"] = "reject"
    starttls: bool = False  # STARTTLS is offered (a TLS context exists)
    require_tls: bool = False  # submission on 587: MAIL and AUTH only after STARTTLS
    auth_mechanisms: tuple[str, ...] = ()  # offered only under TLS
    require_auth: bool = False  # MAIL needs a prior successful AUTH (RFC 6409 §4.3)
    chunking: bool = True
    smtputf8: bool = True
    eightbitmime: bool = True
    dsn: bool = True
    requiretls: bool = True  # advertised only under TLS (RFC 8689 §4)
    pipelining: bool = True
    hard_error_limit: int = 20
    greeting: str = "ESMTP mailward"


class _State(Enum):
    COMMAND = auto()
    DECISION = auto()  # waiting for the session to answer a decision event
    DATA = auto()  # reading DATA content up to <CRLF>.<CRLF>
    BDAT = auto()  # reading a BDAT chunk of known length
    AUTH = auto()  # waiting for the client's answer to a 334 challenge
    TLS = auto()  # 220 sent for STARTTLS; waiting for the handshake
    CLOSED = auto()


@dataclass(slots=True)
class _Transaction:
    smtputf8: bool = False
    body: str | None = None
    size_hint: int | None = None
    recipients: int = 0
    rcpt_commands: int = 0
    started: bool = False  # DATA or first BDAT accepted
    chunking: bool = False
    size: int = 0


@dataclass(slots=True)
class _Pending:
    kind: type
    command: object = None
    extra: dict[str, object] = field(default_factory=dict)


class ServerConnection:
    """One SMTP server session's protocol state. Never raises on peer input."""

    def __init__(self, options: ServerOptions, *, tls_active: bool = False) -> None:
        self.options = options
        self.tls_active = tls_active
        self.authenticated_as: str | None = None
        self.helo: str | None = None
        self.esmtp = False
        self.errors = 0
        self._in = bytearray()
        self._out: list[bytes] = []
        self._events: deque[ServerEvent] = deque()
        self._state = _State.COMMAND
        self._pending: _Pending | None = None
        self._txn: _Transaction | None = None
        self._bdat_left = 0
        self._bdat_last = False
        self._body_error: tuple[Reply, str] | None = None
        self._skip_long_line = False
        self._cr_pending = False  # BDAT: last chunk ended in CR, next may start with LF
        self._after_crlf = True  # DATA: the content so far ends at a CRLF line boundary
        self._swallow: tuple[Reply, str, bool] | None = None  # BDAT octets to drop, then this reply

    # --- I/O surface -----------------------------------------------------------------------------

    def greet(self, reply: Reply | None = None) -> None:
        """Queue the 220 greeting, or a 421/554 refusal which also closes the session."""
        if reply is None:
            reply = Reply(220, None, (f"{self.options.hostname} {self.options.greeting}",))
        self._out.append(reply.to_bytes())
        if reply.code != 220:
            self._state = _State.CLOSED

    def receive_data(self, data: bytes) -> None:
        if self._state is _State.CLOSED or self._state is _State.TLS:
            # After 220 to STARTTLS every plaintext byte is an injection attempt (CVE-2011-0411).
            return
        self._in += data

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def closed(self) -> bool:
        return self._state is _State.CLOSED

    @property
    def awaiting_decision(self) -> bool:
        return self._state is _State.DECISION

    @property
    def awaiting_tls(self) -> bool:
        return self._state is _State.TLS

    @property
    def in_transaction(self) -> bool:
        return self._txn is not None

    def next_event(self) -> ServerEvent | None:
        """The next event, or None when more input (or a decision) is needed."""
        while not self._events:
            if self._state in (_State.DECISION, _State.TLS, _State.CLOSED):
                return None
            if not self._step():
                break  # a step that needs more input may still have reported something
        return self._events.popleft() if self._events else None

    def close(self, reply: Reply | None = None) -> None:
        """The session ends the conversation (timeout, shutdown): optional 421, then nothing more."""
        if reply is not None and self._state is not _State.CLOSED:
            self._out.append(reply.to_bytes())
        self._state = _State.CLOSED
        self._in.clear()

    # --- decisions -------------------------------------------------------------------------------

    def accept(self, reply: Reply | None = None) -> None:
        """Accept the pending decision with its default (or the given) positive reply."""
        p = self._take_pending()
        if p.kind is EhloReceived:
            cmd = p.command
            assert isinstance(cmd, Ehlo | Helo)
            self._reset_transaction(emit=False)
            self.helo = cmd.hostname
            self.esmtp = isinstance(cmd, Ehlo)
            if reply is None:
                reply = self._ehlo_reply() if self.esmtp else codes.r(250, None, self.options.hostname)
            self._send(reply)
        elif p.kind is MailReceived:
            cmd = p.command
            assert isinstance(cmd, Mail)
            self._txn = _Transaction(
                smtputf8=cmd.params.smtputf8, body=cmd.params.body, size_hint=cmd.params.size
            )
            self._send(reply or codes.SENDER_OK)
        elif p.kind is RcptReceived:
            assert self._txn is not None
            self._txn.recipients += 1
            self._send(reply or codes.RCPT_OK)
        elif p.kind is DataStarted:
            assert self._txn is not None
            self._txn.started = True
            if p.command == "BDAT":
                self._txn.chunking = True
                self._state = _State.BDAT
                return
            self._after_crlf = True  # the DATA command's own CRLF starts the first line
            self._send(reply or codes.START_DATA, _State.DATA)
        elif p.kind is BodyEnded:
            self._txn = None
            self._send(reply or codes.OK)
        elif p.kind is StartTlsRequested:
            self._send(reply or codes.READY_TLS, _State.TLS)
            self._in.clear()  # RFC 3207 §4.2: nothing read before the handshake may be acted on
        elif p.kind in (AuthRequested, AuthResponse):
            raise RuntimeError("answer AUTH with auth_challenge(), auth_succeeded() or respond()")

    def respond(self, reply: Reply) -> None:
        """Refuse (or otherwise answer) the pending decision with `reply`."""
        p = self._take_pending()
        if reply.code == 421:
            self._send(reply)
            self.close()
            return
        if p.kind is DataStarted and p.command == "BDAT":
            # The chunk's octets follow the command regardless; swallow them (RFC 3030 §2).
            self._txn = None
            self._swallow = (reply, "", False)
            self._state = _State.BDAT
            return
        if p.kind in (DataStarted, BodyEnded):
            self._txn = None
        self._send(reply)
        if p.kind in (AuthRequested, AuthResponse):
            self._count_error()  # after the reply: reaching the limit appends 421 and closes

    def auth_challenge(self, challenge: bytes) -> None:
        p = self._take_pending()
        if p.kind not in (AuthRequested, AuthResponse):
            raise RuntimeError("auth_challenge() outside an AUTH exchange")
        self._out.append(b"334 " + base64.b64encode(challenge) + b"\r\n")
        self._state = _State.AUTH

    def auth_succeeded(self, user: str, reply: Reply | None = None) -> None:
        p = self._take_pending()
        if p.kind not in (AuthRequested, AuthResponse):
            raise RuntimeError("auth_succeeded() outside an AUTH exchange")
        self.authenticated_as = user
        self._send(reply or codes.AUTH_OK)

    def tls_established(self) -> None:
        """The handshake after STARTTLS completed: start over as if newly connected (RFC 3207 §4.2)."""
        if self._state is not _State.TLS:
            raise RuntimeError("tls_established() without an accepted STARTTLS")
        self.tls_active = True
        self.helo = None
        self.esmtp = False
        self._txn = None
        self._in.clear()
        self._state = _State.COMMAND

    # --- internals -------------------------------------------------------------------------------

    def _take_pending(self) -> _Pending:
        if self._state is not _State.DECISION or self._pending is None:
            raise RuntimeError("no decision is pending")
        p, self._pending = self._pending, None
        self._state = _State.COMMAND
        return p

    def _send(self, reply: Reply, state: _State = _State.COMMAND) -> None:
        self._out.append(reply.to_bytes())
        self._state = state

    def _decide(self, event: ServerEvent, command: object = None) -> None:
        self._pending = _Pending(type(event), command)
        self._state = _State.DECISION
        self._events.append(event)

    def _count_error(self) -> None:
        self.errors += 1
        if self.errors >= self.options.hard_error_limit:
            self._out.append(codes.TOO_MANY_ERRORS.to_bytes())
            self._events.append(ConnectionClosing(codes.TOO_MANY_ERRORS, "too many errors"))
            self._state = _State.CLOSED
            self._in.clear()

    def _error(self, reply: Reply, detail: str) -> None:
        self._out.append(reply.to_bytes())
        self._events.append(ProtocolError(reply, detail))
        self._count_error()

    def _reset_transaction(self, emit: bool = True) -> None:
        if self._txn is not None:
            self._txn = None
            self._events.append(TransactionReset())
        elif emit:
            self._events.append(TransactionReset())

    def _ehlo_reply(self) -> Reply:
        o = self.options
        lines = [o.hostname]
        if o.pipelining:
            lines.append("PIPELINING")
        if o.max_message_size is not None:
            lines.append(f"SIZE {o.max_message_size}")
        if o.eightbitmime:
            lines.append("8BITMIME")
        if o.chunking:
            lines += ["CHUNKING", "BINARYMIME"]
        if o.starttls and not self.tls_active:
            lines.append("STARTTLS")
        if o.auth_mechanisms and self.tls_active and self.authenticated_as is None:
            lines.append("AUTH " + " ".join(o.auth_mechanisms))
        lines.append("ENHANCEDSTATUSCODES")
        if o.dsn:
            lines.append("DSN")
        if o.smtputf8:
            lines.append("SMTPUTF8")
        if o.requiretls and self.tls_active:
            lines.append("REQUIRETLS")
        return Reply(250, None, tuple(lines))

    def _step(self) -> bool:
        """Consume some input; False when nothing more can be done without more bytes."""
        if self._state is _State.DATA:
            return self._step_data()
        if self._state is _State.BDAT:
            return self._step_bdat()
        limit = AUTH_LINE_LIMIT if self._state is _State.AUTH else self.options.max_command_line
        buf = self._in
        nl = buf.find(b"\n")
        if nl < 0:
            if len(buf) > limit:
                # Keep a trailing CR: it may pair with an LF in the next read.
                keep = 1 if buf.endswith(b"\r") else 0
                del buf[: len(buf) - keep]
                if not self._skip_long_line:
                    self._skip_long_line = True
                    self._line_too_long()
            return False
        line = bytes(buf[:nl])
        del buf[: nl + 1]
        if self._skip_long_line:
            self._skip_long_line = False
            return True
        if not line.endswith(b"\r") or b"\r" in line[:-1]:
            self._error(codes.BARE_LF_COMMAND, "bare LF or CR in command")
            if self._state is _State.AUTH:
                self._state = _State.COMMAND
            return True
        line = line[:-1]
        if len(line) + 2 > limit:
            self._line_too_long()
            return True
        if self._state is _State.AUTH:
            self._auth_line(line)
        else:
            self._command(line)
        return True

    def _line_too_long(self) -> None:
        # RFC 4954 §4 has its own code for an AUTH response line; either way the exchange is over,
        # also when the line is still arriving (the rest of it is skipped as a command line).
        if self._state is _State.AUTH:
            self._state = _State.COMMAND
            self._error(codes.AUTH_LINE_TOO_LONG, "AUTH response line too long")
        else:
            self._error(codes.LINE_TOO_LONG, "command line too long")

    def _auth_line(self, line: bytes) -> None:
        self._state = _State.COMMAND
        text = line.decode("ascii", "replace").strip()
        if text == "*":
            self._out.append(codes.AUTH_CANCELLED.to_bytes())
            self._events.append(AuthCancelled(codes.AUTH_CANCELLED))
            self._count_error()
            return
        try:
            data = decode_base64(text)
        except CommandError as err:
            self._out.append(err.reply.to_bytes())
            self._events.append(AuthCancelled(err.reply))
            self._count_error()
            return
        self._decide(AuthResponse(data), "AUTH")

    def _command(self, line: bytes) -> None:
        try:
            cmd = parse_command(line)
        except CommandError as err:
            self._error(err.reply, err.detail)
            return
        o = self.options
        txn = self._txn
        if isinstance(cmd, Ehlo | Helo):
            self._decide(EhloReceived(cmd.hostname, isinstance(cmd, Ehlo)), cmd)
        elif isinstance(cmd, Mail):
            if self.helo is None:
                self._error(codes.r(503, "5.5.1", "Send EHLO or HELO first"), "MAIL before EHLO")
            elif o.require_tls and not self.tls_active:
                self._error(codes.NEED_STARTTLS, "MAIL before STARTTLS")
            elif o.require_auth and self.authenticated_as is None:
                self._error(codes.NEED_AUTH, "MAIL without AUTH")
            elif txn is not None:
                self._error(codes.NESTED_MAIL, "nested MAIL")
            else:
                reply = self._check_mail(cmd)
                if reply is not None:
                    self._error(reply, f"MAIL refused: {reply}")
                else:
                    self._decide(MailReceived(cmd.sender, cmd.params), cmd)
        elif isinstance(cmd, Rcpt):
            if txn is None:
                self._error(codes.NEED_MAIL, "RCPT without MAIL")
            elif txn.started:
                self._error(codes.BAD_SEQUENCE, "RCPT during BDAT")
            elif txn.recipients >= o.max_recipients:
                self._out.append(codes.TOO_MANY_RCPTS.to_bytes())
                self._events.append(ProtocolError(codes.TOO_MANY_RCPTS, "too many recipients"))
            elif cmd.recipient.needs_smtputf8 and not txn.smtputf8:
                self._error(codes.NEED_SMTPUTF8, "UTF-8 recipient without SMTPUTF8")
            elif (cmd.params.notify is not None or cmd.params.orcpt is not None) and not o.dsn:
                self._error(codes.PARAM_UNKNOWN, "DSN parameter while DSN is off")
            else:
                self._decide(RcptReceived(cmd.recipient, cmd.params), cmd)
        elif isinstance(cmd, Data):
            if txn is None:
                self._error(codes.NEED_MAIL, "DATA without MAIL")
            elif txn.chunking:
                self._error(codes.BAD_SEQUENCE, "DATA after BDAT")
            elif txn.body == "BINARYMIME":
                self._error(codes.BINARYMIME_NEEDS_BDAT, "DATA with BODY=BINARYMIME")
            elif txn.recipients == 0:
                self._error(codes.NO_VALID_RCPTS, "DATA without recipients")
            else:
                self._body_error = None
                txn.size = 0
                self._decide(DataStarted(chunking=False), "DATA")
        elif isinstance(cmd, Bdat):
            self._bdat(cmd)
        elif isinstance(cmd, Rset):
            self._reset_transaction()
            self._send(codes.RESET_OK)
        elif isinstance(cmd, Noop):
            self._send(codes.NOOP_OK)
        elif isinstance(cmd, Quit):
            self._out.append(codes.r(221, "2.0.0", "Bye").to_bytes())
            self._events.append(QuitRequested())
            self._state = _State.CLOSED
            self._in.clear()
        elif isinstance(cmd, Vrfy):
            self._send(codes.VRFY_CANNOT)
        elif isinstance(cmd, Help):
            self._send(codes.HELP)
        elif isinstance(cmd, StartTls):
            if not o.starttls:
                self._error(codes.NOT_IMPLEMENTED, "STARTTLS not offered")
            elif self.tls_active:
                self._error(codes.r(503, "5.5.1", "TLS already active"), "STARTTLS under TLS")
            else:
                # Buffered bytes are dropped only once accepted, in accept(); until then nothing runs.
                self._reset_transaction(emit=self._txn is not None)
                self._decide(StartTlsRequested())
        elif isinstance(cmd, Auth):
            self._auth(cmd)

    def _check_mail(self, cmd: Mail) -> Reply | None:
        o, p = self.options, cmd.params
        if p.size is not None and o.max_message_size is not None and p.size > o.max_message_size:
            return codes.TOO_BIG
        if p.body == "8BITMIME" and not o.eightbitmime:
            return codes.PARAM_UNKNOWN
        if p.body == "BINARYMIME" and not o.chunking:
            return codes.PARAM_UNKNOWN
        if p.smtputf8 and not o.smtputf8:
            return codes.PARAM_UNKNOWN
        if (p.ret is not None or p.envid is not None) and not o.dsn:
            return codes.PARAM_UNKNOWN
        if p.requiretls and not (o.requiretls and self.tls_active):
            return codes.REQUIRETLS_NEEDS_TLS
        if cmd.sender is not None and cmd.sender.needs_smtputf8 and not p.smtputf8:
            return codes.NEED_SMTPUTF8
        return None

    def _auth(self, cmd: Auth) -> None:
        o = self.options
        if not o.auth_mechanisms:
            self._error(codes.NOT_IMPLEMENTED, "AUTH not offered")
        elif not self.tls_active:
            self._error(codes.NEED_STARTTLS if o.starttls else codes.NOT_IMPLEMENTED, "AUTH before TLS")
        elif self.authenticated_as is not None:
            self._error(codes.ALREADY_AUTH, "AUTH twice")
        elif self._txn is not None:
            self._error(codes.BAD_SEQUENCE, "AUTH during a mail transaction")
        elif cmd.mechanism not in o.auth_mechanisms:
            self._error(codes.AUTH_BAD_MECH, f"AUTH {cmd.mechanism} not offered")
        else:
            self._decide(AuthRequested(cmd.mechanism, cmd.initial_response), cmd)

    # --- message content ------------------------------------------------------------------------

    def _bdat(self, cmd: Bdat) -> None:
        txn = self._txn
        self._bdat_left = cmd.size
        self._bdat_last = cmd.last
        if txn is None or txn.recipients == 0:
            # The octets follow regardless of our answer (RFC 3030 §2): swallow them, then reply.
            reply = codes.NEED_MAIL if txn is None else codes.NO_VALID_RCPTS
            self._swallow = (reply, "BDAT outside a usable transaction", True)
            self._state = _State.BDAT
            return
        if not txn.started:
            self._body_error = None
            txn.size = 0
            self._cr_pending = False
            self._decide(DataStarted(chunking=True), "BDAT")
            return
        self._state = _State.BDAT

    def _step_bdat(self) -> bool:
        if self._bdat_left and self._in:
            take = bytes(self._in[: self._bdat_left])
            del self._in[: len(take)]
            self._bdat_left -= len(take)
            if self._swallow is None and self._body_error is None:
                self._bdat_content(take)
        if self._bdat_left:
            return False
        if self._swallow is not None:
            reply, detail, is_error = self._swallow
            self._swallow = None
            self._state = _State.COMMAND
            if is_error:
                self._error(reply, detail)
            else:
                self._send(reply)
            return True
        txn = self._txn
        assert txn is not None
        if self._bdat_last and self._cr_pending and self._body_error is None:
            self._cr_pending = False
            if self._check_bare():
                self._body_fail(codes.BARE_LF_DATA, "bare CR at end of BDAT content")
            elif self._account(2):
                self._events.append(BodyChunk(b"\r\n"))
        if self._body_error is not None:
            self._reject_body()
        elif self._bdat_last:
            self._decide(BodyEnded(txn.size))
        else:
            self._send(codes.r(250, "2.0.0", f"{txn.size} octets received"))
        return True

    def _reject_body(self) -> None:
        assert self._body_error is not None
        reply, reason = self._body_error
        self._body_error = None
        self._txn = None
        self._out.append(reply.to_bytes())
        self._events.append(BodyRejected(reply, reason))
        self._state = _State.COMMAND

    def _check_bare(self) -> bool:
        return self.options.bare_line_endings == "reject"

    def _body_fail(self, reply: Reply, reason: str) -> None:
        if self._body_error is None:
            self._body_error = (reply, reason)

    def _bdat_content(self, data: bytes) -> None:
        txn = self._txn
        assert txn is not None
        if txn.body != "BINARYMIME":
            # RFC 3030 keeps CRLF line structure for non-binary bodies; smuggling works there too.
            # A CR ending a chunk waits for the next chunk to learn whether an LF follows.
            if self._cr_pending:
                data = b"\r" + data
                self._cr_pending = False
            if data.endswith(b"\r"):
                data = data[:-1]
                self._cr_pending = True
            if _has_bare_line_ending(data):
                if self._check_bare():
                    self._body_fail(codes.BARE_LF_DATA, "bare CR or LF in BDAT content")
                    return
                data = self._normalize(data)
        if data and self._account(len(data)):
            self._events.append(BodyChunk(data))

    def _account(self, n: int) -> bool:
        txn = self._txn
        assert txn is not None
        txn.size += n
        limit = self.options.max_message_size
        if limit is not None and txn.size > limit:
            self._body_fail(codes.TOO_BIG, "message too big")
            return False
        return True

    @staticmethod
    def _normalize(data: bytes) -> bytes:
        return _BARE_CR.sub(b"\r\n", _BARE_LF.sub(b"\r\n", data))

    def _step_data(self) -> bool:
        buf = self._in
        # In normalize mode a bare LF also ends a line; only CRLF.CRLF ever ends the data.
        normalize = not self._check_bare()
        last = buf.rfind(b"\n") if normalize else buf.rfind(b"\r\n")
        if last < 0:
            return self._data_partial()
        cut = last + 1 if normalize else last + 2
        region = bytes(buf[:cut])
        at_crlf = self._after_crlf
        if at_crlf and region.startswith(b".\r\n"):
            end = 0
        else:
            end = region.find(b"\r\n.\r\n")
            if end >= 0:
                end += 2
        if end >= 0:
            body = region[:end]
            del buf[: end + 3]
        else:
            body = region
            del buf[:cut]
        if body:
            self._data_content(body, at_crlf)
            self._after_crlf = body.endswith(b"\r\n")
        if end >= 0:
            self._data_finished()
        return True

    def _data_partial(self) -> bool:
        # No complete line buffered. Drop what cannot be accepted anyway, so memory stays bounded.
        buf = self._in
        if self._check_bare() and (b"\n" in buf or _BARE_CR.search(buf[:-1])):
            self._body_fail(codes.BARE_LF_DATA, "bare CR or LF in DATA")
            keep = 1 if buf.endswith(b"\r") else 0
            del buf[: len(buf) - keep]
            self._after_crlf = False
        elif len(buf) > self.options.max_text_line:
            keep = 1 if buf.endswith(b"\r") else 0
            del buf[: len(buf) - keep]
            self._after_crlf = False
            self._body_fail(codes.DATA_LINE_TOO_LONG, "line too long in DATA")
        return False

    def _data_content(self, body: bytes, at_line_start: bool) -> None:
        if self._body_error is not None:
            return
        bare, stuffed = _bare_and_stuffed(body)
        if bare and self._check_bare():
            self._body_fail(codes.BARE_LF_DATA, "bare CR or LF in DATA")
            return
        limit = self.options.max_text_line
        # Lines include their CRLF in the RFC 5321 §4.5.3.1.6 limit, so 998 octets of text is the most.
        if len(body) > limit - 2 and _has_line_longer_than(body, limit - 1):
            self._body_fail(codes.DATA_LINE_TOO_LONG, "line too long in DATA")
            return
        # Un-stuff on the raw CRLF structure first; normalising bare endings afterwards cannot
        # create an end-of-data marker because the marker was already searched for.
        if at_line_start and body.startswith(b"."):
            body = body[1:]
        if stuffed:
            body = body.replace(b"\r\n.", b"\r\n")
        if bare:
            body = self._normalize(body)
        if self._account(len(body)):
            self._events.append(BodyChunk(body))

    def _data_finished(self) -> None:
        txn = self._txn
        assert txn is not None
        if self._body_error is not None:
            self._reject_body()
        else:
            self._decide(BodyEnded(txn.size))


def replies_bytes(replies: Iterable[Reply]) -> bytes:
    return b"".join(r.to_bytes() for r in replies)
