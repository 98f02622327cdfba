"""The client role of the engine: commands out, server replies in, typed events out.

Used by outbound delivery, the smarthost relay, ``mailward check`` and, with ``lmtp=True``, local
delivery over LMTP (RFC 2033). Like the server role it does no I/O: the driver moves bytes between
the socket and this object and reacts to events.

Call sequence (each arrow is "on this event, the driver may call")::

    client = ClientConnection("out.example.net")
    # loop: client.receive_data(sock.recv()); handle every client.next_event();
    #       sock.sendall(client.data_to_send())
    GreetingReceived (220)  -> client.ehlo()
    EhloCompleted           -> client.starttls()          if policy wants TLS and caps.starttls
    StartTlsReady           -> handshake; client.tls_established(); client.ehlo()
    EhloCompleted           -> client.auth("PLAIN", b"\\0user\\0secret")   (submission/smarthost)
    AuthChallenge           -> client.auth_respond(data) or client.auth_cancel()
    AuthCompleted           -> client.start_transaction(sender, [(rcpt, RcptParams())], params, size=n)
    ReadyForBody            -> client.send_body(chunk) ...; client.end_body()
    TransactionResult       -> result.outcomes; then client.rset() / start_transaction() / quit()
    ServerClosed, ClientProtocolError: terminal; close the socket.

Example, with the server role standing in for the network::

    client.receive_data(b"220 mx.example ESMTP\\r\\n")   # -> GreetingReceived
    client.ehlo()                                       # writes b"EHLO out.example.net\\r\\n"
    client.receive_data(b"250-mx.example\\r\\n250 PIPELINING\\r\\n")   # -> EhloCompleted
    client.start_transaction(None, [(rcpt, RcptParams())])
    # writes MAIL, RCPT and DATA in one go (PIPELINING); replies 250, 250, 354 -> ReadyForBody

Rules the engine enforces, because delivery must never get them wrong:

* Every reply is matched to the command it answers through a FIFO of commands written. A reply when
  nothing is outstanding is a protocol error, except an unsolicited 421 (RFC 5321 §3.8).
* Any 421 (except to QUIT) ends the session: an open transaction is finished with that reply for
  every recipient still undecided, then ``ServerClosed``. EOF does the same with a local 451 4.4.2.
* After the 220 to STARTTLS every byte already received is discarded, and so is anything that
  arrives before ``tls_established()`` (STARTTLS response injection, aiosmtplib
  GHSA-vxj7-4xrp-5vr4). The pre-TLS capabilities are forgotten; MAIL needs a fresh EHLO.
* Message content never leaves with a bare CR or LF: each becomes CRLF, across chunk boundaries,
  and lines starting with "." are dot-stuffed (SMTP smuggling). BODY=BINARYMIME via BDAT is the
  one exception: it is sent verbatim, as RFC 3030 requires.
* What the server announced it would refuse is refused locally, without sending anything, with a
  reply-shaped failure (SIZE, SMTPUTF8, 8BITMIME, BINARYMIME, REQUIRETLS). ESMTP parameters the
  server did not announce are left out instead (SIZE=, BODY=7BIT, AUTH=, and the DSN parameters,
  which RFC 3461 §4.1 forbids sending to a non-DSN server; the caller, which knows NOTIFY=SUCCESS,
  issues the "relayed" DSN from ``capabilities.dsn``).
* A transaction whose MAIL was accepted but whose content never ended (all recipients refused,
  DATA refused, a BDAT chunk refused) leaves state on the server; the next start_transaction()
  sends RSET first, unreported, so a caller cannot meet "503 sender already specified".
* LMTP (``lmtp=True``): ``ehlo()`` sends LHLO and never falls back to HELO; the content is sent
  with DATA only, and its end is answered once per accepted recipient, in RCPT order (RFC 2033
  §4.2), which ``TransactionResult.final_replies`` carries. A session that ends part-way leaves the
  recipients still unanswered with the closing reply, never with an earlier recipient's success.
* Server input never raises. ``ClientUsageError`` is raised only for API misuse, and a control
  character in an argument propagates unchanged as ``commands.InjectionError`` (or
  ``address.AddressError`` for a hand-built Mailbox; both are ValueError): such a value comes from
  our own configuration or code, never from the peer, so it is a programming error, and it is
  raised before anything is queued.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum, auto

from mailward.smtp.address import Mailbox
from mailward.smtp.codes import Reply
from mailward.smtp.commands import (
    Auth,
    Bdat,
    Data,
    Ehlo,
    Helo,
    Mail,
    MailParams,
    Noop,
    Quit,
    Rcpt,
    RcptParams,
    Rset,
    StartTls,
)
from mailward.smtp.replies import (
    MAX_REPLY_LINE,
    MAX_REPLY_LINES,
    Capabilities,
    MalformedReply,
    ReplyParser,
)

__all__ = [
    "BINARY_UNSUPPORTED",
    "CONNECTION_LOST",
    "EIGHTBIT_UNSUPPORTED",
    "MAX_REPLY_LINE",
    "MAX_REPLY_LINES",
    "PROTOCOL_FAILURE",
    "REQUIRETLS_UNSUPPORTED",
    "SMTPUTF8_UNSUPPORTED",
    "AuthChallenge",
    "AuthCompleted",
    "BodyEncoder",
    "Capabilities",
    "ClientConnection",
    "ClientEvent",
    "ClientProtocolError",
    "ClientUsageError",
    "EhloCompleted",
    "EhloRefused",
    "GreetingReceived",
    "MalformedReply",
    "ReadyForBody",
    "ReplyParser",
    "ReplyReceived",
    "ServerClosed",
    "StartTlsReady",
    "StartTlsRefused",
    "TransactionResult",
]

class ClientUsageError(RuntimeError):
    """The caller used the client out of sequence (a bug in the driver, never the peer's doing)."""


# --- reply parsing -------------------------------------------------------------------------------


# --- message content -----------------------------------------------------------------------------


class BodyEncoder:
    """Turns message content into what goes on the wire, chunk by chunk, without per-byte loops.

    With ``normalize`` every CRLF, bare CR and bare LF becomes one CRLF (a CR ending one chunk and
    an LF starting the next are one CRLF); with ``dot_stuff`` a "." starting a line is doubled.
    ``finish()`` returns what must follow the last chunk so the content ends in CRLF. With neither
    option the content passes through untouched (BINARYMIME).
    """

    __slots__ = ("_cr", "_line_start", "_normalize", "_stuff")

    def __init__(self, *, normalize: bool = True, dot_stuff: bool = True) -> None:
        self._normalize = normalize
        self._stuff = dot_stuff
        self._cr = False  # the previous chunk ended in CR, held back until we see what follows
        self._line_start = True  # the output so far ends at a line start (or is empty)

    def encode(self, chunk: bytes) -> bytes:
        if not chunk or not self._normalize:
            return chunk
        prefix = b""
        if self._cr:
            self._cr = False
            prefix = b"\r\n"
            self._line_start = True
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if chunk.endswith(b"\r"):
            self._cr = True
            chunk = chunk[:-1]
        if chunk:
            lf = chunk.count(b"\n")
            if lf != chunk.count(b"\r") or lf != chunk.count(b"\r\n"):
                # Each CRLF, then each remaining (bare) CR, then each LF is one line break.
                chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
            if self._stuff:
                if b"\r\n." in chunk:
                    chunk = chunk.replace(b"\r\n.", b"\r\n..")
                if self._line_start and chunk[:1] == b".":
                    prefix += b"."
            self._line_start = chunk.endswith(b"\n")
        return prefix + chunk if prefix else chunk

    def finish(self) -> bytes:
        if not self._normalize:
            return b""
        tail = b"" if self._line_start and not self._cr else b"\r\n"
        self._cr = False
        self._line_start = True
        return tail


# --- events --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GreetingReceived:
    """The server's greeting; anything but 220 means "no service here": only quit() is allowed."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class EhloCompleted:
    """EHLO (or the HELO fallback) succeeded; transactions may start."""

    reply: Reply
    capabilities: Capabilities


@dataclass(frozen=True, slots=True)
class EhloRefused:
    """EHLO failed and HELO was not tried or failed too."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class StartTlsReady:
    """220 to STARTTLS: do the handshake, then call tls_established() and ehlo()."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class StartTlsRefused:
    """STARTTLS was refused; whether to go on in clear is for the TLS policy to decide."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class AuthChallenge:
    """A 334 challenge, base64-decoded: answer with auth_respond() or auth_cancel()."""

    data: bytes


@dataclass(frozen=True, slots=True)
class AuthCompleted:
    """The AUTH exchange ended; ``succeeded`` only for 235."""

    reply: Reply

    @property
    def succeeded(self) -> bool:
        return self.reply.code == 235


@dataclass(frozen=True, slots=True)
class ReadyForBody:
    """Stream the content with send_body(), then end_body()."""

    chunking: bool


_NO_FINAL_REPLY = Reply(451, "4.3.0", ("No final reply for the message content",))


@dataclass(frozen=True, slots=True)
class TransactionResult:
    """How one transaction ended; emitted exactly once per start_transaction().

    ``rcpt_replies`` has one entry per recipient, in the order given; when MAIL failed every entry
    is the MAIL reply. ``data_reply`` is the final reply to the content (or the refusal of DATA or
    of a BDAT chunk), None when no recipient was accepted and so no content was sent.
    Failures decided locally (nothing was sent) or synthesised on 421/EOF have the same shape.
    """

    mail_reply: Reply
    rcpt_replies: tuple[tuple[Mailbox, Reply], ...]
    data_reply: Reply | None
    # LMTP only: each recipient's own reply to the end of the content, aligned with rcpt_replies
    # (None where RCPT failed or the reply never came); empty for SMTP.
    final_replies: tuple[Reply | None, ...] = ()

    @property
    def outcomes(self) -> tuple[tuple[Mailbox, Reply], ...]:
        """The reply that decides each recipient's fate."""
        out = []
        for i, (mailbox, reply) in enumerate(self.rcpt_replies):
            if 200 <= reply.code < 300:
                final = self.final_replies[i] if self.final_replies else None
                reply = final or self.data_reply or _NO_FINAL_REPLY
            out.append((mailbox, reply))
        return tuple(out)

    @property
    def delivered(self) -> tuple[Mailbox, ...]:
        return tuple(mb for mb, reply in self.outcomes if 200 <= reply.code < 300)


@dataclass(frozen=True, slots=True)
class ReplyReceived:
    """The reply to RSET, NOOP or QUIT."""

    command: str
    reply: Reply


@dataclass(frozen=True, slots=True)
class ServerClosed:
    """The server ended the session: its 421 reply, or None for EOF. Terminal."""

    reply: Reply | None


@dataclass(frozen=True, slots=True)
class ClientProtocolError:
    """The server broke the protocol; the session is unusable: close the connection. Terminal."""

    detail: str


ClientEvent = (
    GreetingReceived
    | EhloCompleted
    | EhloRefused
    | StartTlsReady
    | StartTlsRefused
    | AuthChallenge
    | AuthCompleted
    | ReadyForBody
    | TransactionResult
    | ReplyReceived
    | ServerClosed
    | ClientProtocolError
)


# --- local failures ------------------------------------------------------------------------------


def _local(code: int, enhanced: str, text: str) -> Reply:
    return Reply(code, enhanced, (text + " (decided locally, message not sent)",))


REQUIRETLS_UNSUPPORTED = _local(
    550, "5.7.30", "REQUIRETLS support required: the server does not offer REQUIRETLS over TLS"
)
SMTPUTF8_UNSUPPORTED = _local(554, "5.6.7", "Message needs SMTPUTF8, which the server does not offer")
EIGHTBIT_UNSUPPORTED = _local(554, "5.6.3", "8-bit content and the server does not offer 8BITMIME")
BINARY_UNSUPPORTED = _local(
    554, "5.6.3", "Binary content and the server does not offer BINARYMIME, CHUNKING and PIPELINING"
)
CONNECTION_LOST = Reply(451, "4.4.2", ("Connection closed before the server replied",))
PROTOCOL_FAILURE = Reply(451, "4.5.0", ("The server violated the SMTP protocol",))


def _too_big(size: int, limit: int) -> Reply:
    return _local(552, "5.3.4", f"Message size {size} exceeds the server's fixed limit of {limit}")


# --- the connection ------------------------------------------------------------------------------


class _Kind(Enum):
    GREETING = auto()
    EHLO = auto()
    HELO = auto()
    STARTTLS = auto()
    AUTH = auto()
    MAIL = auto()
    RCPT = auto()
    DATA = auto()
    DOT = auto()
    BDAT = auto()
    RSET = auto()
    NOOP = auto()
    QUIT = auto()


# RFC 2920 §3.1 (plus STARTTLS and AUTH): nothing may be written after these until they are answered.
_BARRIERS = frozenset(
    {_Kind.GREETING, _Kind.EHLO, _Kind.HELO, _Kind.STARTTLS, _Kind.AUTH, _Kind.DATA, _Kind.NOOP, _Kind.QUIT}
)


class _Phase(Enum):
    COMMANDS = auto()  # MAIL/RCPT (and DATA) written or queued
    BODY = auto()  # the caller streams content
    ENDING = auto()  # content ended, waiting for the last replies


@dataclass(eq=False, slots=True)
class _Txn:
    recipients: tuple[Mailbox, ...]
    use_bdat: bool
    encoder: BodyEncoder
    rcpt_replies: list[Reply | None]
    mail_reply: Reply | None = None
    data_reply: Reply | None = None
    accepted: int = 0
    pending: int = 0  # commands of this transaction queued or awaiting a reply
    phase: _Phase = _Phase.COMMANDS
    content_ended: bool = False  # the reply to "." or BDAT LAST arrived
    held: bytes | None = None  # BDAT: the newest chunk, kept so the last one can carry LAST
    final_replies: list[Reply | None] | None = None  # LMTP: per-recipient replies to "."

    @property
    def mail_ok(self) -> bool:
        return self.mail_reply is not None and 200 <= self.mail_reply.code < 300

    @property
    def body_failed(self) -> bool:
        return self.data_reply is not None and not 200 <= self.data_reply.code < 300


@dataclass(eq=False, slots=True)
class _Sent:
    kind: _Kind
    txn: _Txn | None = None
    index: int = 0  # RCPT, and LMTP's replies to ".": which recipient
    last: bool = False  # BDAT: the LAST chunk
    silent: bool = False  # sent by the engine itself (lone ".", implicit RSET): reply not reported


class ClientConnection:
    """One SMTP client session's protocol state. Never raises on server input."""

    def __init__(
        self, local_hostname: str, *, tls_active: bool = False, allow_plaintext_auth: bool = False,
        lmtp: bool = False,
    ) -> None:
        self._ehlo_bytes = Ehlo(local_hostname).to_bytes()  # refuses a hostname with controls now
        if lmtp:
            # RFC 2033 §4.1: LHLO takes EHLO's argument and gets EHLO's reply.
            self._ehlo_bytes = b"LHLO" + self._ehlo_bytes[4:]
        self._helo_bytes = Helo(local_hostname).to_bytes()
        self.lmtp = lmtp
        self.local_hostname = local_hostname
        self.allow_plaintext_auth = allow_plaintext_auth
        self._tls_active = tls_active
        self._parser = ReplyParser()
        self._out: list[bytes] = []
        self._events: deque[ClientEvent] = deque()
        self._queued: deque[tuple[bytes, _Sent]] = deque()
        self._inflight: deque[_Sent] = deque([_Sent(_Kind.GREETING)])
        self._greeting: Reply | None = None
        self._caps: Capabilities | None = None
        self._txn: _Txn | None = None
        self._tls_wait = False  # 220 to STARTTLS received, handshake not yet done
        self._auth_active = False
        self._auth_turn = False  # a challenge awaits auth_respond()/auth_cancel()
        self._auth_cancelling = False
        self._authenticated = False
        self._needs_rset = False  # the server may still hold an unfinished transaction of ours
        self._quit_sent = False
        self._dead = False  # ServerClosed or ClientProtocolError was emitted

    # --- I/O surface -----------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self._dead or self._tls_wait or not data:
            return
        self._parser.feed(data)
        while not self._dead and not self._tls_wait:
            item = self._parser.next_reply()
            if item is None:
                break
            if isinstance(item, MalformedReply):
                self._protocol_error(item.detail)
                break
            self._dispatch(item)
            self._flush()

    def receive_eof(self) -> None:
        if self._dead:
            return
        self._finish_aborted(CONNECTION_LOST)
        self._terminate(ServerClosed(None))

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    def next_event(self) -> ClientEvent | None:
        return self._events.popleft() if self._events else None

    # --- state -----------------------------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities | None:
        """The current EHLO capabilities; None before EHLO and again after STARTTLS."""
        return self._caps

    @property
    def greeting(self) -> Reply | None:
        return self._greeting

    @property
    def tls_active(self) -> bool:
        return self._tls_active

    @property
    def authenticated(self) -> bool:
        return self._authenticated

    @property
    def awaiting_tls(self) -> bool:
        return self._tls_wait

    @property
    def in_transaction(self) -> bool:
        return self._txn is not None

    @property
    def closed(self) -> bool:
        return self._dead

    # --- commands --------------------------------------------------------------------------------

    def ehlo(self) -> None:
        self._check_ready("EHLO")
        self._caps = None
        self._needs_rset = False  # EHLO resets the server's transaction state too
        self._submit(self._ehlo_bytes, _Sent(_Kind.EHLO))

    def starttls(self) -> None:
        self._check_ready("STARTTLS")
        caps = self._need_caps("STARTTLS")
        if self._tls_active:
            raise ClientUsageError("STARTTLS on a session that already uses TLS")
        if not caps.starttls:
            raise ClientUsageError("STARTTLS was not offered by the server")
        self._submit(StartTls().to_bytes(), _Sent(_Kind.STARTTLS))

    def tls_established(self) -> None:
        """The TLS handshake after StartTlsReady completed: start over at EHLO (RFC 3207 §4.2)."""
        if not self._tls_wait:
            raise ClientUsageError("tls_established() without a StartTlsReady")
        self._tls_wait = False
        self._tls_active = True
        self._caps = None
        self._needs_rset = False
        self._authenticated = False
        self._parser.clear()

    def auth(self, mechanism: str, initial_response: bytes | None = None) -> None:
        """Start SASL; ``initial_response`` is raw bytes (base64 is done here), b"" sends "="."""
        self._check_ready("AUTH")
        caps = self._need_caps("AUTH")
        mech = mechanism.upper()
        if not (self._tls_active or self.allow_plaintext_auth):
            # RFC 8314 §5: credentials never travel in clear unless explicitly configured.
            raise ClientUsageError("AUTH without TLS (set allow_plaintext_auth=True to permit it)")
        if self._authenticated:
            raise ClientUsageError("already authenticated")
        if mech not in caps.auth:
            raise ClientUsageError(f"AUTH {mech} was not offered by the server")
        line = Auth(mech, initial_response).to_bytes()
        self._auth_active = True
        self._auth_turn = False
        self._auth_cancelling = False
        self._submit(line, _Sent(_Kind.AUTH))

    def auth_respond(self, data: bytes) -> None:
        if not self._auth_turn or self._dead:
            raise ClientUsageError("auth_respond() without a pending AuthChallenge")
        self._auth_turn = False
        self._submit(base64.b64encode(data) + b"\r\n", _Sent(_Kind.AUTH))

    def auth_cancel(self) -> None:
        if not self._auth_turn or self._dead:
            raise ClientUsageError("auth_cancel() without a pending AuthChallenge")
        self._auth_turn = False
        self._auth_cancelling = True
        self._submit(b"*\r\n", _Sent(_Kind.AUTH))

    def rset(self) -> None:
        self._check_ready("RSET")
        self._needs_rset = False
        self._submit(Rset().to_bytes(), _Sent(_Kind.RSET))

    def noop(self) -> None:
        self._check_ready("NOOP")
        self._submit(Noop().to_bytes(), _Sent(_Kind.NOOP))

    def quit(self) -> None:
        """Say goodbye; a no-op once the session is over. Not allowed in the middle of a
        transaction or an AUTH exchange (the line would be read as content): close instead."""
        if self._dead or self._quit_sent:
            return
        if self._tls_wait or self._txn is not None or self._auth_active:
            raise ClientUsageError("QUIT during STARTTLS, AUTH or a transaction: close the connection")
        self._quit_sent = True
        self._submit(Quit().to_bytes(), _Sent(_Kind.QUIT))

    def start_transaction(
        self,
        sender: Mailbox | None,
        recipients: Sequence[tuple[Mailbox, RcptParams]],
        mail_params: MailParams | None = None,
        *,
        size: int | None = None,
        use_bdat: bool = False,
    ) -> Reply | None:
        """Send MAIL and RCPT (and DATA unless ``use_bdat``), pipelined when the server allows.

        Returns None when the commands were queued, or the local failure when the server announced
        it would refuse this message; that failure also arrives as a TransactionResult, so a driver
        that only reads events handles both alike. ``size`` (else ``mail_params.size``) is the
        message size, checked against SIZE and sent as SIZE=.
        """
        self._check_ready("MAIL")
        caps = self._need_caps("MAIL")
        if not recipients:
            raise ClientUsageError("a transaction needs at least one recipient")
        params = mail_params or MailParams()
        if size is None:
            size = params.size
        if size is not None and size < 0:
            raise ClientUsageError("size must not be negative")
        binary = params.body == "BINARYMIME"
        # RFC 2033 defines per-recipient replies for DATA only, so LMTP never uses BDAT.
        bdat_usable = caps.chunking and caps.pipelining and not self.lmtp
        mailboxes = [mb for mb, _ in recipients]
        all_boxes = mailboxes if sender is None else [sender, *mailboxes]
        needs_utf8 = params.smtputf8 or any(not mb.local_part.isascii() for mb in all_boxes)

        failure = None
        if params.requiretls and not (caps.requiretls and self._tls_active):
            failure = REQUIRETLS_UNSUPPORTED
        elif needs_utf8 and not caps.smtputf8:
            failure = SMTPUTF8_UNSUPPORTED
        elif params.body == "8BITMIME" and not caps.eightbitmime:
            failure = EIGHTBIT_UNSUPPORTED
        elif binary and not (caps.binarymime and bdat_usable):
            failure = BINARY_UNSUPPORTED
        elif size is not None and caps.size and size > caps.size:
            failure = _too_big(size, caps.size)
        if failure is not None:
            self._events.append(
                TransactionResult(failure, tuple((mb, failure) for mb in mailboxes), None)
            )
            return failure

        if binary and not use_bdat:
            raise ClientUsageError("BODY=BINARYMIME must be sent with use_bdat=True")
        if use_bdat and not bdat_usable:
            # Without PIPELINING each BDAT would need its reply before the next (RFC 3030), which
            # this streaming API does not model: use DATA for such servers.
            raise ClientUsageError("use_bdat needs the server's CHUNKING and PIPELINING, and SMTP")

        wire_params = dataclasses.replace(
            params,
            size=size if caps.size is not None else None,
            body=params.body if caps.eightbitmime or binary else None,
            smtputf8=needs_utf8,
            ret=params.ret if caps.dsn else None,
            envid=params.envid if caps.dsn else None,
            auth=params.auth if caps.auth else None,
        )

        def on_wire(mb: Mailbox) -> Mailbox:
            # Without SMTPUTF8 a non-ASCII domain still travels, as A-labels (RFC 6531 §3.2).
            if needs_utf8 or mb.domain.isascii():
                return mb
            return dataclasses.replace(mb, domain=mb.ascii_domain)

        # Serialise everything first: an InjectionError must leave no half-written transaction.
        lines = [Mail(None if sender is None else on_wire(sender), wire_params).to_bytes()]
        for mb, rparams in recipients:
            lines.append(Rcpt(on_wire(mb), rparams if caps.dsn else RcptParams()).to_bytes())
        txn = _Txn(
            recipients=tuple(mailboxes),
            use_bdat=use_bdat,
            encoder=BodyEncoder(normalize=not binary, dot_stuff=not use_bdat),
            rcpt_replies=[None] * len(mailboxes),
        )
        self._txn = txn
        if self._needs_rset:
            self._needs_rset = False
            self._submit(Rset().to_bytes(), _Sent(_Kind.RSET, silent=True))
        self._submit(lines[0], _Sent(_Kind.MAIL, txn))
        for i, line in enumerate(lines[1:]):
            self._submit(line, _Sent(_Kind.RCPT, txn, index=i))
        if not use_bdat:
            self._submit(Data().to_bytes(), _Sent(_Kind.DATA, txn))
        return None

    def send_body(self, chunk: bytes) -> None:
        txn = self._body_txn("send_body")
        if not isinstance(chunk, bytes):
            chunk = bytes(chunk)  # a caller's buffer may change after we return
        data = txn.encoder.encode(chunk)
        if not txn.use_bdat:
            if data:
                self._out.append(data)
            return
        if txn.body_failed or not data:
            return  # the server already refused a chunk; the rest is wasted bandwidth
        if txn.held is not None:
            self._write_bdat(txn, txn.held, last=False)
        txn.held = data

    def end_body(self) -> None:
        txn = self._body_txn("end_body")
        txn.phase = _Phase.ENDING
        tail = txn.encoder.finish()
        if not txn.use_bdat:
            self._out.append(tail + b".\r\n")
            if not self.lmtp:
                self._expect(_Sent(_Kind.DOT, txn))
                return
            txn.final_replies = [None] * len(txn.recipients)
            for i, reply in enumerate(txn.rcpt_replies):
                if reply is not None and 200 <= reply.code < 300:
                    self._expect(_Sent(_Kind.DOT, txn, index=i))
            return
        held, txn.held = txn.held, None
        if not txn.body_failed:
            self._write_bdat(txn, (held or b"") + tail, last=True)
        self._txn_progress(txn)

    # --- internals: writing ----------------------------------------------------------------------

    def _check_ready(self, what: str) -> None:
        if self._dead:
            raise ClientUsageError(f"{what}: the session is closed")
        if self._quit_sent:
            raise ClientUsageError(f"{what} after QUIT")
        if self._greeting is None:
            raise ClientUsageError(f"{what} before the server's greeting")
        if self._greeting.code != 220:
            raise ClientUsageError(f"{what}: the server refused service; only quit() is allowed")
        if self._tls_wait or any(
            s.kind is _Kind.STARTTLS for s in (*self._inflight, *(q[1] for q in self._queued))
        ):
            raise ClientUsageError(f"{what} during STARTTLS; call tls_established() first")
        if self._auth_active:
            raise ClientUsageError(f"{what} during an AUTH exchange")
        if self._txn is not None:
            raise ClientUsageError(f"{what} while a transaction is in progress")

    def _need_caps(self, what: str) -> Capabilities:
        if self._caps is None:
            raise ClientUsageError(f"{what} before a completed EHLO (required again after STARTTLS)")
        return self._caps

    def _body_txn(self, what: str) -> _Txn:
        txn = self._txn
        if self._dead or txn is None or txn.phase is not _Phase.BODY:
            raise ClientUsageError(f"{what}() outside the body phase (wait for ReadyForBody)")
        return txn

    def _submit(self, data: bytes, sent: _Sent) -> None:
        if sent.txn is not None:
            sent.txn.pending += 1
        self._queued.append((data, sent))
        self._flush()

    def _flush(self) -> None:
        pipelining = self._caps is not None and self._caps.pipelining
        while self._queued and not self._dead and not self._tls_wait:
            if self._inflight and (not pipelining or self._inflight[-1].kind in _BARRIERS):
                return
            data, sent = self._queued.popleft()
            self._out.append(data)
            self._inflight.append(sent)

    def _expect(self, sent: _Sent) -> None:
        if sent.txn is not None:
            sent.txn.pending += 1
        self._inflight.append(sent)

    def _write_bdat(self, txn: _Txn, data: bytes, *, last: bool) -> None:
        self._out.append(Bdat(len(data), last).to_bytes())
        if data:
            self._out.append(data)
        self._expect(_Sent(_Kind.BDAT, txn, last=last))

    def _drop_queued(self, txn: _Txn) -> None:
        keep = deque(item for item in self._queued if item[1].txn is not txn)
        txn.pending -= len(self._queued) - len(keep)
        self._queued = keep

    # --- internals: replies ----------------------------------------------------------------------

    def _dispatch(self, reply: Reply) -> None:
        if not self._inflight:
            if reply.code == 421:  # RFC 5321 §3.8: a server may say 421 before closing, unasked
                self._closed_by_server(reply)
            elif not self._quit_sent:
                self._protocol_error(f"reply with no command outstanding: {reply}")
            return
        sent = self._inflight.popleft()
        kind = sent.kind
        if sent.txn is not None:
            sent.txn.pending -= 1
        if reply.code == 421 and kind is not _Kind.QUIT:
            self._closed_by_server(reply)
            return
        if reply.code // 100 == 3 and kind not in (_Kind.DATA, _Kind.AUTH):
            self._protocol_error(f"intermediate reply {reply.code} to {kind.name}")
            return
        if kind is _Kind.GREETING:
            self._greeting = reply
            self._events.append(GreetingReceived(reply))
        elif kind is _Kind.EHLO:
            if 200 <= reply.code < 300:
                self._caps = Capabilities.from_ehlo(reply)
                self._events.append(EhloCompleted(reply, self._caps))
            elif reply.code in (500, 502) and not self.lmtp:  # LMTP has no HELO
                self._submit(self._helo_bytes, _Sent(_Kind.HELO))
            else:
                self._events.append(EhloRefused(reply))
        elif kind is _Kind.HELO:
            if 200 <= reply.code < 300:
                self._caps = Capabilities.from_helo(reply)
                self._events.append(EhloCompleted(reply, self._caps))
            else:
                self._events.append(EhloRefused(reply))
        elif kind is _Kind.STARTTLS:
            if reply.code == 220:
                # Whatever followed the 220 in clear was injected (or is TLS, which the driver
                # reads itself): never act on it.
                self._parser.clear()
                self._tls_wait = True
                self._caps = None
                self._events.append(StartTlsReady(reply))
            else:
                self._events.append(StartTlsRefused(reply))
        elif kind is _Kind.AUTH:
            self._on_auth(reply)
        elif kind in (_Kind.RSET, _Kind.NOOP, _Kind.QUIT):
            if not sent.silent:
                self._events.append(ReplyReceived(kind.name, reply))
        else:
            txn = sent.txn
            assert txn is not None
            self._on_txn_reply(txn, sent, reply)

    def _on_auth(self, reply: Reply) -> None:
        if reply.code == 334:
            if self._auth_cancelling:
                self._protocol_error("334 after the AUTH exchange was cancelled")
                return
            try:
                challenge = base64.b64decode(reply.lines[0].strip().encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError, ValueError):
                # RFC 4954 §4: the client answers an undecodable challenge with "*".
                self._auth_cancelling = True
                self._submit(b"*\r\n", _Sent(_Kind.AUTH))
                return
            self._auth_turn = True
            self._events.append(AuthChallenge(challenge))
            return
        if reply.code // 100 == 3:
            self._protocol_error(f"intermediate reply {reply.code} to AUTH")
            return
        self._auth_active = self._auth_turn = self._auth_cancelling = False
        self._authenticated = reply.code == 235
        self._events.append(AuthCompleted(reply))

    def _on_txn_reply(self, txn: _Txn, sent: _Sent, reply: Reply) -> None:
        ok = 200 <= reply.code < 300
        kind = sent.kind
        if kind is _Kind.MAIL:
            txn.mail_reply = reply
            if not ok:
                self._drop_queued(txn)  # without PIPELINING no RCPT has been written yet
        elif kind is _Kind.RCPT:
            txn.rcpt_replies[sent.index] = reply
            if ok and txn.mail_ok:
                txn.accepted += 1
            if sent.index == len(txn.recipients) - 1:
                if txn.accepted == 0:
                    self._drop_queued(txn)  # DATA, when it has not been written yet
                elif txn.use_bdat:
                    txn.phase = _Phase.BODY
                    self._events.append(ReadyForBody(chunking=True))
        elif kind is _Kind.DATA:
            if reply.code == 354:
                if txn.accepted == 0:
                    # RFC 2920 §3.1: DATA was pipelined, nobody wants the content: end it at once.
                    self._out.append(b".\r\n")
                    self._expect(_Sent(_Kind.DOT, txn, silent=True))
                else:
                    txn.phase = _Phase.BODY
                    self._events.append(ReadyForBody(chunking=False))
                    return
            elif reply.code // 100 == 3 or ok:
                self._protocol_error(f"reply {reply.code} to DATA")
                return
            elif txn.accepted:
                txn.data_reply = reply
        elif kind is _Kind.DOT:
            if txn.final_replies is not None and not sent.silent:
                txn.final_replies[sent.index] = reply
                # data_reply stays unset until every recipient is answered, so a session ending
                # half-way gives the rest its closing reply rather than someone else's.
                if txn.pending == 0:
                    txn.content_ended = True
                    txn.data_reply = reply
            else:
                txn.content_ended = True
                if not sent.silent:
                    txn.data_reply = reply
        elif kind is _Kind.BDAT:
            txn.content_ended = sent.last
            if (not ok or sent.last) and not txn.body_failed:
                txn.data_reply = reply  # the first refused chunk decides, else the LAST one's reply
        self._txn_progress(txn)

    def _txn_progress(self, txn: _Txn) -> None:
        if txn.pending == 0 and txn.phase is not _Phase.BODY and self._txn is txn:
            self._finish(txn)

    def _finish(self, txn: _Txn) -> None:
        self._txn = None
        # Only the end of the content clears the server's transaction (RFC 5321 §4.1.1.4); after
        # anything else the next MAIL would meet "503 sender already specified".
        self._needs_rset = txn.mail_ok and not txn.content_ended
        mail_reply = txn.mail_reply or PROTOCOL_FAILURE
        if txn.mail_ok:
            rcpts = tuple(
                (mb, r or PROTOCOL_FAILURE) for mb, r in zip(txn.recipients, txn.rcpt_replies, strict=True)
            )
        else:
            rcpts = tuple((mb, mail_reply) for mb in txn.recipients)
        data_reply = txn.data_reply if txn.accepted else None
        final = tuple(txn.final_replies) if txn.final_replies is not None else ()
        self._events.append(TransactionResult(mail_reply, rcpts, data_reply, final))

    def _finish_aborted(self, reply: Reply) -> None:
        """The session ends with a transaction open: every undecided part gets ``reply``."""
        txn = self._txn
        if txn is None:
            return
        if txn.mail_reply is None:
            txn.mail_reply = reply
        txn.rcpt_replies = [r or reply for r in txn.rcpt_replies]
        if txn.accepted and txn.data_reply is None:
            txn.data_reply = reply
        self._finish(txn)

    def _closed_by_server(self, reply: Reply) -> None:
        self._finish_aborted(reply)
        self._terminate(ServerClosed(reply))

    def _protocol_error(self, detail: str) -> None:
        self._finish_aborted(PROTOCOL_FAILURE)
        self._terminate(ClientProtocolError(detail))

    def _terminate(self, event: ClientEvent) -> None:
        self._events.append(event)
        self._dead = True
        self._tls_wait = False
        self._auth_active = self._auth_turn = False
        self._parser.clear()
        self._queued.clear()
        self._inflight.clear()
