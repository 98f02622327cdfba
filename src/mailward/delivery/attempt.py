"""One outbound SMTP connection to one host address, driving the sans-IO client over `SmtpStream`.

`Session.open()` connects, reads the greeting, says EHLO (HELO when refused), upgrades with STARTTLS
as the `TlsRequirement` demands (or starts with TLS on an implicit-TLS relay), says EHLO again and
authenticates to a smarthost. `Session.send()` then delivers one message at a time over the same
connection (RSET between messages) and returns one `RecipientOutcome` per recipient; `close()`
says QUIT. Trouble that concerns the connection rather than a recipient (refused, timeout, TLS
demanded but missing, 421, AUTH refused) raises `AttemptError`, so the Deliverer can try the next
host; nothing here decides routing, retries or bounces.

Every wait has its own timeout (RFC 5321 §4.5.3.2): connect and TLS handshake, greeting and
command replies, and the content with its final reply.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from mailward.delivery.dane import verify_chain
from mailward.delivery.policy import Candidate, TlsRequirement
from mailward.metrics import TlsHandshake, emit
from mailward.queue import Recipient, ResultStatus, StoredMessage, TlsTrust, TlsVerdict
from mailward.reports.tlsrpt import ResultType, handshake_result_type
from mailward.smtp.address import AddressError, Mailbox, parse_mailbox
from mailward.smtp.client import (
    CONNECTION_LOST,
    AuthChallenge,
    AuthCompleted,
    Capabilities,
    ClientConnection,
    ClientEvent,
    ClientProtocolError,
    EhloCompleted,
    EhloRefused,
    GreetingReceived,
    ReadyForBody,
    ReplyReceived,
    ServerClosed,
    StartTlsReady,
    StartTlsRefused,
    TransactionResult,
)
from mailward.smtp.codes import Reply
from mailward.smtp.commands import MailParams, RcptParams
from mailward.stream import SmtpStream, StreamClosed
from mailward.tls import chain_trusted, client_context, peer_chain, tls_facts

__all__ = [
    "AttemptError",
    "AttemptSettings",
    "Credentials",
    "OutboundMessage",
    "RecipientOutcome",
    "Session",
    "SessionTrace",
    "TlsOutcome",
    "enhanced_of",
]

log = logging.getLogger("mailward.delivery")

QUIT_TIMEOUT = 5.0  # a peer that does not answer QUIT is not worth waiting for


# --- results ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsOutcome:
    """The TLS verdict of one connection, for the log line, `queue list` and TLS reporting."""

    protocol: str | None = None  # e.g. "TLSv1.3"; None: plaintext
    cipher: str | None = None
    verified: bool = False  # the certificate was checked as the policy asked (PKIX + name, or DANE)
    peer_subject: str | None = None
    failure: str | None = None  # why TLS was not used, or how it failed
    trust: TlsTrust | None = None  # Verified, Trusted, Untrusted or Anonymous (`TlsVerdict.outcome`)
    dane: str | None = None  # the TLSA record that authenticated the peer, as "3 1 1"
    result_type: ResultType | None = None  # how TLS failed, in RFC 8460's words (TLS reporting)

    @property
    def active(self) -> bool:
        return self.protocol is not None

    def summary(self) -> str:
        """``Verified TLSv1.3/TLS_AES_256_GCM_SHA384 (dane 3 1 1)``, ``Untrusted ...`` or ``plaintext``."""
        return TlsVerdict(protocol=self.protocol, cipher=self.cipher, verified=self.verified,
                          trust=self.trust, dane=self.dane).summary()


PLAINTEXT = TlsOutcome()


@dataclass(frozen=True, slots=True)
class RecipientOutcome:
    """What one recipient's delivery attempt gave."""

    status: ResultStatus
    reply: str  # the remote reply as one line, or our own diagnosis with its status code first
    enhanced: str  # enhanced status code, e.g. "2.0.0"; derived from the reply code when absent
    remote_dsn: bool = True  # the receiver took over DSN duty (else NOTIFY=SUCCESS means "relayed")


def enhanced_of(reply: Reply) -> str:
    if reply.enhanced:
        return reply.enhanced
    return {2: "2.0.0", 4: "4.0.0"}.get(reply.code // 100, "5.0.0")


def outcome_of(reply: Reply, *, remote_dsn: bool = True) -> RecipientOutcome:
    status: ResultStatus
    if 200 <= reply.code < 300:
        status = "delivered"
    elif reply.code >= 500:
        status = "failed"
    else:
        status = "deferred"  # 4xx, and anything unexpected is temporary
    return RecipientOutcome(status, _one_line(str(reply)), enhanced_of(reply), remote_dsn)


def _one_line(text: str) -> str:
    return " ".join(text.split())


class AttemptError(Exception):
    """Trouble with the connection rather than with a recipient: try the next host, then defer.

    `dead` marks a host that refused or never answered, so it is skipped for a while;
    `retry_plaintext` says the policy allows the same host once more without STARTTLS.
    """

    def __init__(self, status: str, reason: str, *, dead: bool = False, retry_plaintext: bool = False,
                 tls: TlsOutcome = PLAINTEXT, requiretls_refused: bool = False) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.dead = dead
        self.retry_plaintext = retry_plaintext
        self.tls = tls
        self.requiretls_refused = requiretls_refused  # the host does not offer REQUIRETLS (RFC 8689)
        self.local_ip: str | None = None  # our end of the connection, when there was one (TLS-RPT)

    @property
    def reply(self) -> str:
        return f"{self.status} {self.reason}"


# --- inputs -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:
        return f"Credentials({self.username!r}, ...)"  # never a password in a log or traceback


@dataclass(frozen=True, slots=True)
class AttemptSettings:
    helo_name: str
    connect_timeout: float
    command_timeout: float
    data_timeout: float
    credentials: Credentials | None = None


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """One message's recipients for this connection, with a way to read its stored body."""

    message: StoredMessage
    recipients: tuple[Recipient, ...]
    body: bytes | Callable[[], AsyncIterator[bytes]]  # bytes in memory, or an opener of the stream
    eightbit: bool  # the content has octets above 127


# --- the session ------------------------------------------------------------------------------------


@dataclass(slots=True)
class SessionTrace:
    """What `Session.open` saw, for `mailward check` (delivery passes none): the session even when
    opening failed, so its greeting, EHLO answer and TLS object can still be shown, and the
    capabilities announced before STARTTLS, which the EHLO after it replaces."""

    session: Session | None = None
    before_tls: Capabilities | None = None


class _Timeout(Exception):
    pass


@functools.lru_cache(maxsize=32)
def _context(verify: bool, ca_file: Path | None) -> ssl.SSLContext:
    # Loading the system trust store costs milliseconds; one context per kind serves all sessions.
    return client_context(verify=verify, cafile=ca_file)


def _subject(sslobj: ssl.SSLObject) -> str | None:
    chain = peer_chain(sslobj)
    if not chain:
        return None
    try:
        return x509.load_der_x509_certificate(chain[0]).subject.rfc4514_string()
    except ValueError:
        return None


class Session:
    """One SMTP client connection, ready for transactions once `open()` returned."""

    def __init__(self, candidate: Candidate, settings: AttemptSettings, stream: SmtpStream,
                 client: ClientConnection) -> None:
        self.candidate = candidate
        self.settings = settings
        self.stream = stream
        self.client = client
        self.tls: TlsOutcome = PLAINTEXT
        self.messages = 0
        self.opened_at = time.monotonic()
        self.peer_chain: tuple[bytes, ...] = ()  # as the peer sent it, for TLS reporting's checks
        sockname = stream.transport.get_extra_info("sockname") if stream.transport is not None else None
        self.local_ip: str | None = str(sockname[0]) if isinstance(sockname, tuple) else None

    # --- opening ---

    @classmethod
    async def open(cls, candidate: Candidate, settings: AttemptSettings, *,
                   plaintext: bool = False, trace: SessionTrace | None = None) -> Session:
        """Connect and get ready for MAIL. `plaintext` skips STARTTLS (a `may` retry); `trace`
        collects what the connection showed."""
        loop = asyncio.get_running_loop()
        where = candidate.relay
        try:
            async with asyncio.timeout(settings.connect_timeout):
                _, stream = await loop.create_connection(SmtpStream, candidate.address, candidate.port)
        except TimeoutError:
            raise AttemptError("4.4.1", f"connect to {where}: timed out", dead=True) from None
        except OSError as exc:
            why = exc.strerror or str(exc) or type(exc).__name__
            raise AttemptError("4.4.1", f"connect to {where}: {why}", dead=True) from None
        tls = candidate.tls
        session = cls(candidate, settings, stream,
                      ClientConnection(settings.helo_name, tls_active=False))
        if trace is not None:
            trace.session = session
        try:
            if tls.implicit:
                await session._handshake(tls)
                session.client = ClientConnection(settings.helo_name, tls_active=True)
            await session._greet()
            await session._ehlo()
            if trace is not None:
                trace.before_tls = session.client.capabilities
            if not tls.implicit and not plaintext:
                await session._starttls(tls)
            elif plaintext:
                session.tls = TlsOutcome(failure="TLS handshake failed before; retried without TLS")
            if tls.requiretls:
                await session._check_requiretls()
            if settings.credentials is not None:
                await session._authenticate(settings.credentials)
        except BaseException as exc:
            if isinstance(exc, AttemptError):
                exc.local_ip = session.local_ip
            session.abort()
            raise
        return session

    async def _greet(self) -> None:
        try:
            ev = await self._event(self.settings.command_timeout)
        except _Timeout:
            raise AttemptError("4.4.2", f"{self.candidate.relay}: no greeting within "
                                        f"{self.settings.command_timeout:g}s", dead=True,
                               tls=self.tls) from None
        if isinstance(ev, GreetingReceived):
            if ev.reply.code == 220:
                self._check_alive("greeting")
                return
            await self._quit()
            # RFC 5321 §3.1: 554 (or 421) here means "no service"; another MX may give it.
            raise AttemptError(enhanced_of(ev.reply), f"host {self.candidate.relay} refused to talk: "
                                                      f"{_one_line(str(ev.reply))}", tls=self.tls)
        raise self._broken(ev, "greeting")

    async def _check_requiretls(self) -> None:
        # RFC 8689 §4.2.1: a REQUIRETLS message goes only to a server that offers REQUIRETLS once
        # TLS is up; one that does not is passed over for the next MX before any envelope is sent.
        caps = self.client.capabilities
        if caps is not None and caps.requiretls and self.client.tls_active:
            return
        await self._quit()
        raise AttemptError("5.7.30", f"REQUIRETLS support required: {self.candidate.relay} does not offer "
                                     "REQUIRETLS", tls=self.tls, requiretls_refused=True)

    async def _ehlo(self) -> None:
        self.client.ehlo()
        ev = await self._command_event("EHLO")
        if isinstance(ev, EhloCompleted):
            self._check_alive("EHLO")
            return
        if isinstance(ev, EhloRefused):
            await self._quit()
            raise AttemptError(enhanced_of(ev.reply), f"host {self.candidate.relay} refused EHLO and "
                                                      f"HELO: {_one_line(str(ev.reply))}", tls=self.tls)
        raise self._broken(ev, "EHLO")

    async def _starttls(self, tls: TlsRequirement) -> None:
        caps = self.client.capabilities
        assert caps is not None
        if not tls.starttls:
            return
        if not caps.starttls:
            if tls.required:
                await self._quit()
                raise AttemptError("4.7.4", f"TLS is required ({tls.reason}) but {self.candidate.relay} "
                                            "does not offer STARTTLS",
                                   tls=TlsOutcome(failure="STARTTLS not offered",
                                                  result_type="starttls-not-supported"))
            self.tls = TlsOutcome(failure="STARTTLS not offered", result_type="starttls-not-supported")
            return
        self.client.starttls()
        ev = await self._command_event("STARTTLS")
        if isinstance(ev, StartTlsRefused):
            text = _one_line(str(ev.reply))
            if tls.required:
                await self._quit()
                raise AttemptError("4.7.4", f"TLS is required but {self.candidate.relay} refused "
                                            f"STARTTLS: {text}",
                                   tls=TlsOutcome(failure=f"STARTTLS refused: {text}",
                                                  result_type="starttls-not-supported"))
            self.tls = TlsOutcome(failure=f"STARTTLS refused: {text}", result_type="starttls-not-supported")
            return
        if not isinstance(ev, StartTlsReady):
            raise self._broken(ev, "STARTTLS")
        await self._handshake(tls)
        self.client.tls_established()
        await self._ehlo()

    async def _handshake(self, tls: TlsRequirement) -> None:
        # DANE replaces PKIX: the handshake accepts any chain and dane.verify_chain judges it
        # against the TLSA records before a single envelope byte is sent (RFC 7672 §3).
        verify = tls.verify == "pkix"
        context = _context(verify, tls.ca_file)
        name = tls.verify_name or self.candidate.host
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                sslobj = await self.stream.start_tls(context, server_side=False, server_hostname=name)
        except (TimeoutError, ssl.SSLError, OSError, StreamClosed) as exc:
            emit(TlsHandshake(relay=self.candidate.relay, seconds=time.perf_counter() - started, ok=False))
            why = _tls_failure(exc)
            self.abort()
            raise AttemptError("4.7.5" if isinstance(exc, ssl.SSLCertVerificationError) else "4.7.0",
                               f"TLS with {self.candidate.relay} failed: {why}",
                               retry_plaintext=tls.plaintext_after_failed_handshake and not tls.implicit,
                               tls=TlsOutcome(failure=why, result_type=handshake_result_type(exc))) from None
        emit(TlsHandshake(relay=self.candidate.relay, seconds=time.perf_counter() - started, ok=True))
        facts = tls_facts(sslobj)
        chain = peer_chain(sslobj)
        self.peer_chain = tuple(chain)
        dane: str | None = None
        if tls.verify == "dane":
            verdict = verify_chain(tls.tlsa, chain, tls.dane_names)
            if not verdict.verified:
                outcome = TlsOutcome(protocol=facts.version, cipher=facts.cipher, trust="Untrusted",
                                     peer_subject=_subject(sslobj), failure=f"DANE: {verdict.reason}",
                                     result_type=verdict.failure or "validation-failure")
                self.abort()
                raise AttemptError("4.7.5", f"DANE authentication of {self.candidate.relay} failed: "
                                            f"{verdict.reason}", tls=outcome)
            verify = True
            if verdict.record is not None:
                r = verdict.record
                dane = f"{r.usage} {r.selector} {r.matching_type}"
        trust: TlsTrust
        if verify:
            trust = "Verified"
        elif not chain:
            trust = "Anonymous"
        else:
            # Not required here, only reported (Postfix's "Trusted" TLS), so the log shows which
            # opportunistic peers would pass verification.
            trust = "Trusted" if chain_trusted(chain) else "Untrusted"
        self.tls = TlsOutcome(protocol=facts.version, cipher=facts.cipher, verified=verify, trust=trust,
                              dane=dane, peer_subject=_subject(sslobj))

    async def _authenticate(self, cred: Credentials) -> None:
        caps = self.client.capabilities
        assert caps is not None
        if not (self.tls.active and self.tls.verified):
            # RFC 8314 §5: credentials only over verified TLS; the policy makes this unreachable.
            raise AttemptError("4.7.0", f"{self.candidate.relay}: refusing AUTH without verified TLS",
                               tls=self.tls)
        user, password = cred.username.encode(), cred.password.encode()
        if "PLAIN" in caps.auth:
            self.client.auth("PLAIN", b"\0" + user + b"\0" + password)
        elif "LOGIN" in caps.auth:
            self.client.auth("LOGIN")
        else:
            await self._quit()
            raise AttemptError("4.7.0", f"{self.candidate.relay} offers no AUTH mechanism we can use "
                                        f"({', '.join(sorted(caps.auth)) or 'none'})", tls=self.tls)
        answers = [user, password]
        while True:
            ev = await self._command_event("AUTH")
            if isinstance(ev, AuthChallenge):
                if answers:
                    self.client.auth_respond(answers.pop(0))
                else:
                    self.client.auth_cancel()
                continue
            if isinstance(ev, AuthCompleted):
                if ev.succeeded:
                    return
                await self._quit()
                # Postfix soft-bounces authentication failures too: a password fix should not
                # cost the queued mail.
                raise AttemptError("4.7.0", f"AUTH as {cred.username} at {self.candidate.relay} failed: "
                                            f"{_one_line(str(ev.reply))}", tls=self.tls)
            raise self._broken(ev, "AUTH")

    # --- messages ---

    @property
    def usable(self) -> bool:
        return not self.client.closed and not self.stream_closed

    @property
    def stream_closed(self) -> bool:
        transport = self.stream.transport
        return transport is None or transport.is_closing()

    async def reset(self) -> bool:
        """RSET before reusing the connection; False if it is no longer usable."""
        try:
            self.client.rset()
            ev = await self._command_event("RSET")
        except AttemptError:
            return False
        return isinstance(ev, ReplyReceived) and 200 <= ev.reply.code < 300

    async def send(self, out: OutboundMessage) -> dict[str, RecipientOutcome]:
        """Deliver one message; an outcome for every recipient, whatever happens to the connection.

        CorruptMessage from the body stream propagates after the connection is aborted, so no
        truncated message can be completed by a final dot.
        """
        env = out.message.envelope
        results: dict[str, RecipientOutcome] = {}
        try:
            sender = None if env.sender == "" else parse_mailbox(env.sender, smtputf8=True)
        except AddressError as exc:
            return {r.address: RecipientOutcome("failed", f"5.1.7 bad sender address <{env.sender}>: {exc}",
                                                "5.1.7") for r in out.recipients}
        rcpts: list[tuple[Recipient, Mailbox]] = []
        for r in out.recipients:
            try:
                rcpts.append((r, parse_mailbox(r.address, smtputf8=True)))
            except AddressError as exc:
                results[r.address] = RecipientOutcome("failed", f"5.1.3 bad recipient address: {exc}",
                                                      "5.1.3")
        if not rcpts:
            return results
        caps = self.client.capabilities
        assert caps is not None
        binary = env.body_type == "BINARYMIME"
        body_type = "BINARYMIME" if binary else "8BITMIME" if out.eightbit else None
        # Where REQUIRETLS is not enforced on this hop (an operator's relaxed requiretls mode), it
        # is still passed on to a server that offers it, so the next hop keeps enforcing it.
        offered = caps.requiretls and self.client.tls_active
        requiretls = env.requiretls and (self.candidate.tls.requiretls or offered)
        params = MailParams(body=body_type, smtputf8=env.smtputf8, ret=env.dsn_ret, envid=env.dsn_envid,
                            requiretls=requiretls)
        use_bdat = caps.chunking and caps.pipelining
        wire = [(mb, RcptParams(notify=r.dsn_notify or None, orcpt=r.dsn_orcpt)) for r, mb in rcpts]
        self.messages += 1
        try:
            self.client.start_transaction(sender, wire, params, size=out.message.size, use_bdat=use_bdat)
        except ValueError as exc:
            # A stored envelope value that cannot go on the wire (say, an ENVID beyond one octet
            # per character) will never go: fail rather than retry for days.
            why = f"5.6.0 envelope cannot be sent: {exc}"
            return {**results, **{r.address: RecipientOutcome("failed", why, "5.6.0") for r, _ in rcpts}}
        result = await self._transaction(out)
        remote_dsn = caps.dsn
        for (r, _), (_, reply) in zip(rcpts, result.outcomes, strict=True):
            results[r.address] = outcome_of(reply, remote_dsn=remote_dsn)
        return results

    async def _transaction(self, out: OutboundMessage) -> TransactionResult:
        timeout = self.settings.command_timeout
        try:
            while True:
                ev = await self._event(timeout)
                if isinstance(ev, TransactionResult):
                    return ev
                if isinstance(ev, ReadyForBody):
                    timeout = self.settings.data_timeout
                    await self._send_body(out)
                    continue
                if isinstance(ev, ServerClosed | ClientProtocolError):
                    continue  # the engine already finished the transaction; its result comes next
                raise AssertionError(f"unexpected event in a transaction: {ev!r}")
        except _Timeout:
            # Abort and let the engine give every undecided recipient its "connection lost".
            self.abort()
            self.client.receive_eof()
            while (ev2 := self.client.next_event()) is not None:
                if isinstance(ev2, TransactionResult):
                    return _timed_out(ev2, timeout)
            raise AssertionError("no transaction result after a timeout") from None

    async def _send_body(self, out: OutboundMessage) -> None:
        deadline = self.settings.data_timeout
        try:
            async with asyncio.timeout(deadline):
                if isinstance(out.body, bytes):
                    self.client.send_body(out.body)
                    await self._flush()
                else:
                    async for chunk in out.body():
                        self.client.send_body(chunk)
                        await self._flush()
        except TimeoutError:
            raise _Timeout from None
        except BaseException:
            # A corrupt or unreadable body (or cancellation): the final dot must never follow.
            self.abort()
            raise
        self.client.end_body()

    # --- closing ---

    async def close(self) -> None:
        """QUIT politely (bounded), then close."""
        if self.usable and not self.client.in_transaction:
            await self._quit()
        self.stream.close()

    async def _quit(self) -> None:
        if self.client.closed:
            return
        try:
            self.client.quit()
            async with asyncio.timeout(QUIT_TIMEOUT):
                while True:
                    ev = await self._event(None)
                    if isinstance(ev, ReplyReceived | ServerClosed | ClientProtocolError):
                        break
        except (TimeoutError, _Timeout, AttemptError, ConnectionError):
            pass
        self.stream.close()

    def abort(self) -> None:
        self.stream.abort()

    # --- driving the engine ---

    async def _flush(self) -> None:
        data = self.client.data_to_send()
        if data:
            self.stream.write(data)
            await self.stream.drain()

    async def _event(self, timeout: float | None) -> ClientEvent:
        while True:
            ev = self.client.next_event()
            if ev is not None:
                return ev
            await self._flush()
            try:
                async with asyncio.timeout(timeout):
                    data = await self.stream.read()
            except TimeoutError:
                raise _Timeout from None
            if data:
                self.client.receive_data(data)
            else:
                self.client.receive_eof()

    async def _command_event(self, command: str) -> ClientEvent:
        try:
            ev = await self._event(self.settings.command_timeout)
        except _Timeout:
            self.abort()
            raise AttemptError("4.4.2", f"{self.candidate.relay}: no reply to {command} within "
                                        f"{self.settings.command_timeout:g}s", tls=self.tls) from None
        if isinstance(ev, ServerClosed | ClientProtocolError):
            raise self._broken(ev, command)
        return ev

    def _check_alive(self, during: str) -> None:
        """Replies the server sent unasked in the same read as the one awaited (response
        injection) have already ended the engine's session: report that as the attempt's failure
        instead of issuing the next command on a closed session."""
        if self.client.closed:
            ev = self.client.next_event()
            raise self._broken(ev if ev is not None else ServerClosed(None), during)

    def _broken(self, ev: ClientEvent, during: str) -> AttemptError:
        self.abort()
        if isinstance(ev, ServerClosed):
            reply = ev.reply or CONNECTION_LOST
            if ev.reply is None:
                text = f"{self.candidate.relay} closed the connection during {during}"
            else:
                text = f"{self.candidate.relay} closed the session during {during}: {_one_line(str(reply))}"
            return AttemptError(enhanced_of(reply) if reply.code // 100 == 4 else "4.4.2", text, tls=self.tls)
        if isinstance(ev, ClientProtocolError):
            return AttemptError("4.5.0", f"{self.candidate.relay} broke the protocol during {during}: "
                                         f"{ev.detail}", tls=self.tls)
        return AttemptError("4.5.0", f"{self.candidate.relay}: unexpected {type(ev).__name__} during "
                                     f"{during}", tls=self.tls)


def _timed_out(result: TransactionResult, timeout: float) -> TransactionResult:
    lost = Reply(451, "4.4.2", (f"Timed out after {timeout:g}s waiting for the server",))

    def swap(reply: Reply) -> Reply:
        return lost if reply is CONNECTION_LOST else reply

    return TransactionResult(
        swap(result.mail_reply),
        tuple((mb, swap(r)) for mb, r in result.rcpt_replies),
        None if result.data_reply is None else swap(result.data_reply),
    )


def _tls_failure(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "handshake timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return str(exc) or type(exc).__name__

