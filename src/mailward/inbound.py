"""Inbound SMTP: the listeners (mx on 25, submission on 587, submissions on 465, the local socket)
and their sessions.

A session is a short asyncio loop around the sans-IO server engine: it reads bytes from an
`SmtpStream`, feeds the engine, answers its decision events from listener rules, AUTH and the queue,
and writes the engine's replies. `250 queued as` is sent only after `commit()` returned, which means
the message is fsync'd (RFC 5321 §6.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import os
import re
import socket
import stat
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from mailward import __version__
from mailward.auth import (
    AuthThrottle,
    AuthTicket,
    Challenge,
    Credentials,
    SaslExchange,
    SaslFailure,
    UnsupportedMechanism,
    UserStore,
    UserStoreError,
    start_exchange,
)
from mailward.config import Config, ListenerConfig, ListenerKind
from mailward.metrics import (
    AuthResult,
    Connected,
    ConnectionRefused,
    Disconnected,
    MessageAccepted,
    MessageRefused,
    TlsEstablished,
    TlsFailed,
    emit,
)
from mailward.queue import Envelope, Queue, QueueError, Recipient, TlsFacts, Transaction
from mailward.smtp import codes
from mailward.smtp.address import AddressError, domain_to_ascii
from mailward.smtp.codes import Reply
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
from mailward.smtp.server import ServerConnection, ServerOptions
from mailward.stream import SmtpStream, StreamClosed
from mailward.tls import ServerTls, tls_facts

log = logging.getLogger("mailward.inbound")

AUTH_KINDS = ("submission", "submissions")
# How long AUTH waits for a password-check slot while others from the same address or for the same
# user are in flight, before it answers 454.
AUTH_ADMISSION_WAIT = 10.0
# Octets of message content that count as one record for the read deadline when no line ends in
# them (BDAT chunks, content read only to be dropped): at the default data_timeout of 600 s a client
# must keep above about 110 octets/s (Postfix asks 500).
CONTENT_RECORD = 64 * 1024

# RFC 8314 §4.3 wants the IANA registry name in the `tls` clause. OpenSSL already uses those for
# TLS 1.3 suites but has its own names for TLS 1.2; these are the ones tls.TLS12_CIPHERS offers.
_IANA_TLS12_SUITES = {
    "ECDHE-ECDSA-AES128-GCM-SHA256": "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256": "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384": "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384": "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305": "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    "ECDHE-RSA-CHACHA20-POLY1305": "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
}
_IANA_SUITE_RE = re.compile(r"TLS_[A-Z0-9_]+")


def _trace_name(helo: str | None) -> str:
    """The EHLO name as Received: may show it: a domain (A-labels) or address literal, else "unknown".

    The engine takes any word as EHLO argument; a ';' or '(' in it would end the clauses early or
    open a comment, letting the client forge the rest of our trace header.
    """
    if not helo:
        return "unknown"
    try:
        return domain_to_ascii(helo, allow_literal=True)
    except AddressError:
        return "unknown"


def iana_cipher_suite(openssl_name: str) -> str | None:
    """The registry name of a negotiated suite, or None when unknown (the clause is then left out)."""
    if _IANA_SUITE_RE.fullmatch(openssl_name):
        return openssl_name
    return _IANA_TLS12_SUITES.get(openssl_name)


@dataclass(slots=True)
class InboundServices:
    """What every session shares: the one config, the queue, TLS contexts, users and throttling."""

    config: Config
    queue: Queue
    tls: ServerTls | None
    users: UserStore | None
    throttle: AuthThrottle
    clock: Callable[[], float] = time.time
    # Why a local recipient would certainly fail (unknown user), or None; raises UserStoreError.
    local_refusal: Callable[[str], str | None] | None = None
    # Set (and replaced) whenever a password check settles: AUTH waiting for a slot looks again.
    auth_settled: asyncio.Event = field(default_factory=asyncio.Event)


def server_options(config: Config, lc: ListenerConfig, has_tls: bool) -> ServerOptions:
    submission = lc.kind in AUTH_KINDS
    return ServerOptions(
        hostname=config.hostname,
        max_message_size=lc.max_message_size,
        max_recipients=lc.max_recipients,
        bare_line_endings=lc.bare_line_endings,
        starttls=has_tls and lc.kind != "submissions",
        require_tls=lc.kind == "submission",
        auth_mechanisms=tuple(config.auth.mechanisms) if submission else (),
        require_auth=submission,
    )


class Listener:
    """One bound address:port of one kind, with its connection limits and live sessions."""

    def __init__(self, lc: ListenerConfig, services: InboundServices, *,
                 sock: socket.socket | None = None) -> None:
        self.config = lc
        self.services = services
        self.options = server_options(services.config, lc, services.tls is not None)
        self.sessions: set[Session] = set()
        self.per_ip: Counter[str] = Counter()
        self.server: asyncio.Server | None = None
        self.draining = False
        # Bound before root was dropped (service.bind_listeners); else start() binds lc's address.
        self.sock = sock

    @property
    def name(self) -> str:
        return self.config.name

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.sock is not None:
            self.server = await loop.create_server(lambda: _InboundStream(self), sock=self.sock, backlog=1024)
            return
        self.server = await loop.create_server(
            lambda: _InboundStream(self), self.config.address, self.config.port,
            reuse_address=True, backlog=1024,
        )

    def stop_accepting(self) -> None:
        self.draining = True
        if self.server is not None:
            self.server.close()

    async def drain(self, timeout: float) -> None:
        """Close idle sessions now; give those inside a transaction `timeout` seconds to finish."""
        for s in list(self.sessions):
            s.shutdown()
        tasks = [s.task for s in self.sessions if s.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        if self.server is not None:
            await self.server.wait_closed()

    def admit(self, stream: SmtpStream) -> bool:
        ip = stream.peer[0]
        lc = self.config
        if self.draining:
            return self._refuse(stream, codes.SHUTTING_DOWN, "shutting down")
        if len(self.sessions) >= lc.max_connections:
            return self._refuse(stream, codes.TOO_MANY_CONNECTIONS, "listener connection limit")
        if self.per_ip[ip] >= lc.max_connections_per_ip:
            return self._refuse(stream, codes.TOO_MANY_CONNECTIONS, "per-client connection limit")
        session = Session(self, stream)
        self.sessions.add(session)
        self.per_ip[ip] += 1
        session.task = asyncio.get_running_loop().create_task(self._run(session))
        return True

    def _refuse(self, stream: SmtpStream, reply: Reply, why: str) -> bool:
        emit(ConnectionRefused(listener=self.name, client=stream.peer[0], reason=why))
        if self.config.kind != "submissions":  # no TLS yet on 465: just close
            stream.write(reply.to_bytes())
        stream.close()
        return False

    async def _run(self, session: Session) -> None:
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            ip = session.stream.peer[0]
            self.per_ip[ip] -= 1
            if self.per_ip[ip] <= 0:
                del self.per_ip[ip]


class _InboundStream(SmtpStream):
    def __init__(self, listener: Listener) -> None:
        super().__init__()
        self._listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._listener.admit(self)


# --- the local submission socket ------------------------------------------------------------------

LOCAL_KIND = "local"
LOCAL_SOCKET_NAME = "mailward.sock"
LOCAL_SOCKET_MODE = 0o660
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes with the terminating NUL


def local_socket_path(state_dir: Path) -> Path:
    return state_dir / LOCAL_SOCKET_NAME


class LocalSocketError(Exception):
    """The local socket cannot be set up; one sentence saying what and how to fix it."""


def _local_listener_config(config: Config) -> ListenerConfig:
    # Not a configurable kind (every server has the socket), so its limits are fixed here; size and
    # recipient limits follow the most generous listener so local mail is never refused for them.
    return ListenerConfig(
        kind=cast(ListenerKind, LOCAL_KIND),
        address="",
        port=0,
        max_connections=100,
        max_connections_per_ip=100,  # every local session has the same peer, "local"
        command_timeout=300.0,
        data_timeout=600.0,
        handshake_timeout=30.0,
        max_message_size=max((lc.max_message_size for lc in config.listeners), default=50 * 1024 * 1024),
        max_recipients=max((lc.max_recipients for lc in config.listeners), default=1000),
        bare_line_endings="reject",
        name=LOCAL_KIND,
    )


class LocalListener(Listener):
    """SMTP on a unix socket for programs on this host (`mailward sendmail`), like Postfix's pickup.

    The socket's mode (0660: mailward's user and group) decides who may connect, so a session here
    is trusted: no TLS (nothing leaves the host), no AUTH, any sender, relay allowed. Envelopes
    record listener "local" and client_ip "local"; the Received: header names the submitting uid.
    """

    def __init__(self, path: Path, services: InboundServices) -> None:
        super().__init__(_local_listener_config(services.config), services)
        self.options = server_options(services.config, self.config, has_tls=False)
        self.path = path
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket file we made

    async def start(self) -> None:
        if len(os.fsencode(self.path)) > _SUN_PATH_MAX:
            raise LocalSocketError(
                f"the local submission socket path {self.path} is longer than the {_SUN_PATH_MAX} bytes "
                "a unix socket path may have; choose a shorter state_dir.")
        await self._clear_stale()
        # Bound under a private name, given its mode, listening, and only then renamed into place:
        # the public path never shows a socket with the umask's mode or one that refuses connections.
        # The name is shorter than the final one, so it fits wherever that fits.
        tmp = self.path.with_name(f".mw{os.getpid()}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            tmp.unlink(missing_ok=True)
            sock.bind(str(tmp))
            os.chmod(tmp, LOCAL_SOCKET_MODE)
            sock.listen(128)
            os.replace(tmp, self.path)
            st = os.stat(self.path)
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise LocalSocketError(self._failure(exc)) from None
        self._bound = (st.st_dev, st.st_ino)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_unix_server(lambda: _LocalStream(self), sock=sock, backlog=128)

    async def _clear_stale(self) -> None:
        """Remove the socket of a server that died; refuse to replace a live one or a non-socket."""
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        except OSError as exc:
            raise LocalSocketError(self._failure(exc)) from None
        if not stat.S_ISSOCK(mode):
            raise LocalSocketError(f"{self.path} exists and is not a socket; mailward needs that path for "
                                   "its local submission socket, so move the file away.")
        try:
            async with asyncio.timeout(5):
                _, writer = await asyncio.open_unix_connection(str(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            self.path.unlink(missing_ok=True)  # nobody listens: a leftover of a crash
            return
        except (OSError, TimeoutError) as exc:
            raise LocalSocketError(self._failure(exc)) from None
        writer.close()
        raise LocalSocketError(f"another mailward is already listening on {self.path}; stop it first or "
                               "give this one another state_dir.")

    def _failure(self, exc: Exception) -> str:
        why = (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or "timeout"
        hint = (f"let the mailward user write to {self.path.parent}" if isinstance(exc, PermissionError)
                else "check state_dir")
        return f"the local submission socket {self.path} cannot be set up ({why}); {hint}."

    def stop_accepting(self) -> None:
        super().stop_accepting()
        # Gone at once, so `mailward sendmail` reports "not running" (a temporary failure its caller
        # retries); only our own file is removed, never one a successor put there.
        if self._bound is not None:
            with contextlib.suppress(OSError):
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._bound:
                    self.path.unlink()
            self._bound = None

    def admit(self, stream: SmtpStream) -> bool:
        if isinstance(stream, _LocalStream):
            log.info("%s: connection from uid %s", self.name, stream.peer_uid)
        return super().admit(stream)


def _peer_uid(sock: Any) -> int | None:
    """The uid of the process at the other end of a unix socket (Linux SO_PEERCRED)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if sock is None or option is None:
        return None
    size = struct.calcsize("3i")
    try:
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, option, size))
    except (OSError, struct.error):
        return None
    return int(uid)


class _LocalStream(_InboundStream):
    """A connection on the local socket: its peer is "local", and its uid is known to the kernel."""

    def __init__(self, listener: Listener) -> None:
        super().__init__(listener)
        self.peer = ("local", 0)
        self.peer_uid: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.peer_uid = _peer_uid(transport.get_extra_info("socket"))
        super().connection_made(transport)


@dataclass(slots=True)
class _MessageState:
    txn: Transaction
    recipients: list[str] = field(default_factory=list)
    # The queue failed while the body arrived (e.g. disk full): the rest is read and dropped.
    failed: bool = False


class Session:
    """One client connection on one listener."""

    def __init__(self, listener: Listener, stream: SmtpStream) -> None:
        self.listener = listener
        self.services = listener.services
        self.stream = stream
        self.task: asyncio.Task[None] | None = None
        self.engine = ServerConnection(listener.options)
        self.tls: TlsFacts | None = None
        self.message: _MessageState | None = None
        self.sasl: SaslExchange | None = None
        self.closing = False
        self.in_data = False
        self._chunking = False  # the message content comes in BDAT chunks
        self._content_octets = 0  # content octets read since the read deadline last restarted
        self.client_ip = stream.peer[0]
        self.log_prefix = f"{listener.name}[{self.client_ip}]:"

    def shutdown(self) -> None:
        """Service shutdown: an idle session ends now with 421; a busy one after its transaction."""
        self.closing = True
        if self.message is None and not self.in_data:
            self.engine.close(codes.SHUTTING_DOWN)
            self._flush()
            self.stream.close()

    async def run(self) -> None:
        lc = self.listener.config
        started = time.monotonic()
        emit(Connected(listener=self.listener.name, client=self.client_ip))
        try:
            if lc.kind == "submissions":
                if not await self._handshake(implicit=True):
                    return
                self.engine.tls_active = True
            self.engine.greet()
            await self._loop()
        except (StreamClosed, ConnectionError) as exc:
            log.info("%s connection lost: %s", self.log_prefix, exc)
        except Exception:
            # An unexpected bug must cost one session, never the listener; the client retries.
            log.exception("%s session failed", self.log_prefix)
            self.engine.close(codes.LOCAL_ERROR)
            self._flush()
        finally:
            await self._abort_message()
            self.stream.close()
            emit(Disconnected(listener=self.listener.name, client=self.client_ip,
                              seconds=time.monotonic() - started,
                              tls_version=self.tls.version if self.tls is not None else None))

    async def _handshake(self, *, implicit: bool = False) -> bool:
        tls = self.services.tls
        assert tls is not None
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.listener.config.handshake_timeout):
                sslobj = await self.stream.start_tls(tls.context, server_side=True, implicit=implicit)
        except (TimeoutError, OSError, StreamClosed) as exc:
            # str(), not the exception itself: an exception is always truthy, a timeout's text empty.
            emit(TlsFailed(listener=self.listener.name, client=self.client_ip, reason=str(exc) or "timeout",
                           seconds=time.perf_counter() - started))
            return False
        self.tls = tls_facts(sslobj)
        emit(TlsEstablished(listener=self.listener.name, client=self.client_ip, version=self.tls.version,
                            cipher=self.tls.cipher, seconds=time.perf_counter() - started))
        return True

    def _flush(self) -> None:
        out = self.engine.data_to_send()
        if out:
            self.stream.write(out)

    def _completes_record(self, event: ServerEvent) -> bool:
        """Whether `event` finishes a record, which restarts the read deadline.

        The timeouts bound the time to receive a whole record, not each read (as Postfix's
        smtpd_per_record_deadline does), so a client trickling a byte every few seconds is dropped
        (slowloris). A record is a command line, a DATA content line (the engine cuts body chunks at
        line ends), or CONTENT_RECORD octets of content read (see `_loop`); BDAT chunks have no
        lines to count.
        """
        if isinstance(event, BodyChunk) and self._chunking:
            return False
        self._content_octets = 0
        return True

    async def _loop(self) -> None:
        engine, lc = self.engine, self.listener.config
        loop = asyncio.get_running_loop()
        deadline: float | None = None  # by when the record being read must be complete
        while True:
            event = engine.next_event()
            if event is None:
                if engine.closed:
                    self._flush()
                    return
                if engine.awaiting_tls:
                    self._flush()
                    if not await self._handshake():
                        return
                    engine.tls_established()
                    deadline = None
                    continue
                self._flush()
                await self.stream.drain()
                if self.closing and self.message is None:
                    engine.close(codes.SHUTTING_DOWN)
                    self._flush()
                    return
                if deadline is None:
                    deadline = loop.time() + (lc.data_timeout if self.in_data else lc.command_timeout)
                try:
                    # asyncio.timeout_at() costs no extra task per read, unlike wait_for on 3.11.
                    async with asyncio.timeout_at(deadline):
                        data = await self.stream.read()
                except TimeoutError:
                    log.info("%s timeout", self.log_prefix)
                    engine.close(codes.TIMEOUT)
                    self._flush()
                    return
                if not data:
                    return
                if self.in_data:
                    # Content the engine reads but reports nothing for (BDAT, or content being
                    # dropped after a size or line refusal) must still count as progress, or a
                    # large message on a slow link would time out instead of getting its answer.
                    self._content_octets += len(data)
                    if self._content_octets >= CONTENT_RECORD:
                        self._content_octets = 0
                        deadline = None
                engine.receive_data(data)
                continue
            if self._completes_record(event):
                deadline = None
            await self._handle(event)

    async def _handle(self, ev: ServerEvent) -> None:
        engine = self.engine
        if isinstance(ev, BodyChunk):
            await self._body_chunk(ev.data)
        elif isinstance(ev, EhloReceived):
            engine.accept()
        elif isinstance(ev, MailReceived):
            await self._mail(ev)
        elif isinstance(ev, RcptReceived):
            await self._rcpt(ev)
        elif isinstance(ev, DataStarted):
            self._chunking = ev.chunking
            await self._data_started()
        elif isinstance(ev, BodyEnded):
            await self._body_ended(ev)
        elif isinstance(ev, BodyRejected):
            self.in_data = False
            emit(MessageRefused(listener=self.listener.name, client=self.client_ip, reason=ev.reason))
            await self._abort_message()
        elif isinstance(ev, TransactionReset):
            await self._abort_message()
        elif isinstance(ev, StartTlsRequested):
            if self.services.tls is None:
                engine.respond(codes.TLS_UNAVAILABLE)
            else:
                engine.accept()
        elif isinstance(ev, AuthRequested):
            await self._auth_start(ev)
        elif isinstance(ev, AuthResponse):
            await self._auth_step(ev.data)
        elif isinstance(ev, AuthCancelled):
            self.sasl = None
            log.info("%s AUTH cancelled", self.log_prefix)
        elif isinstance(ev, ProtocolError):
            log.info("%s %s: %s", self.log_prefix, ev.reply, ev.detail)
        elif isinstance(ev, ConnectionClosing):
            log.warning("%s closing: %s", self.log_prefix, ev.reason)
        elif isinstance(ev, QuitRequested):
            pass

    # --- transaction -----------------------------------------------------------------------------

    async def _mail(self, ev: MailReceived) -> None:
        engine = self.engine
        user = engine.authenticated_as
        sender = "" if ev.sender is None else str(ev.sender)
        users = self.services.users
        if user is not None and users is not None and not users.may_send_as(user, sender):
            log.warning("%s sender <%s> not owned by %s", self.log_prefix, sender, user)
            engine.respond(codes.NOT_SENDER_OWNER)
            return
        p = ev.params
        envelope = Envelope(
            sender=sender,
            client_ip=self.client_ip,
            client_helo=engine.helo or "",
            listener=self.listener.config.kind,
            received_at=self.services.clock(),
            smtputf8=p.smtputf8,
            body_type=p.body or "7BIT",  # type: ignore[arg-type]
            size_hint=p.size,
            dsn_ret=p.ret,  # type: ignore[arg-type]
            dsn_envid=p.envid,
            requiretls=p.requiretls,
            auth_user=user,
            tls=self.tls,
        )
        try:
            txn = await self.services.queue.begin(envelope)
        except QueueError as exc:
            log.error("%s queue unavailable: %s", self.log_prefix, exc)
            engine.respond(codes.LOCAL_ERROR)
            return
        self.message = _MessageState(txn)
        engine.accept()

    async def _rcpt(self, ev: RcptReceived) -> None:
        engine, msg = self.engine, self.message
        assert msg is not None
        rcpt = ev.recipient
        if self.listener.config.kind == "mx" and not self._is_ours(rcpt.ascii_domain):
            log.warning("%s relay denied to <%s>", self.log_prefix, rcpt)
            engine.respond(codes.RELAY_DENIED)
            return
        # Queue the domain the relay decision was made on (lower-case A-labels), not the spelling
        # the client chose, so delivery can never route on a name this check did not see.
        address = f"{rcpt.local_part}@{rcpt.ascii_domain}" if rcpt.domain else "postmaster"
        if not self._local_recipient_ok(address, rcpt.ascii_domain):
            return
        notify = ev.params.notify if ev.params.notify is not None else frozenset()
        try:
            await msg.txn.add_rcpt(Recipient(address=address, dsn_notify=notify,
                                             dsn_orcpt=ev.params.orcpt))
        except QueueError as exc:
            log.error("%s queue error: %s", self.log_prefix, exc)
            engine.respond(codes.LOCAL_ERROR)
            return
        msg.recipients.append(address)
        engine.accept()

    def _local_recipient_ok(self, address: str, domain: str) -> bool:
        """Refuse unknown local users now, like Postfix's local_recipient_maps: a bounce later
        would go to a sender that is often forged. Local submissions (sendmail) keep Postfix's
        behaviour of accepting and bouncing; postmaster is always accepted (RFC 5321 §4.5.1)."""
        check = self.services.local_refusal
        if check is None or self.listener.config.kind == LOCAL_KIND:
            return True
        if domain and domain not in self.services.config.local_domains:
            return True
        if address.partition("@")[0].lower() == "postmaster":
            return True
        try:
            why = check(address)
        except UserStoreError as exc:
            log.error("%s local users cannot be looked up for <%s>: %s", self.log_prefix, address, exc)
            self.engine.respond(codes.LOCAL_ERROR)
            return False
        if why is None:
            return True
        log.warning("%s recipient <%s> refused: %s", self.log_prefix, address, why)
        self.engine.respond(codes.UNKNOWN_USER)
        return False

    def _is_ours(self, domain: str) -> bool:
        cfg = self.services.config
        if domain == "":  # <Postmaster> without a domain is always ours (RFC 5321 §4.5.1)
            return True
        return domain in cfg.local_domains or domain in cfg.relay_domains

    async def _data_started(self) -> None:
        msg = self.message
        assert msg is not None
        self.in_data = True
        try:
            await msg.txn.write_body(self._received_header(msg))
        except QueueError as exc:
            log.error("%s queue error: %s", self.log_prefix, exc)
            self.engine.respond(codes.LOCAL_ERROR)
            await self._abort_message()
            self.in_data = False
            return
        self.engine.accept()

    async def _body_chunk(self, data: bytes) -> None:
        msg = self.message
        assert msg is not None
        if msg.failed:
            return
        try:
            await msg.txn.write_body(data)
        except QueueError as exc:
            # Storage failed mid-DATA (a full disk under a spooled body). Cutting the connection
            # here would look like a network fault to the client; instead read the rest, drop it,
            # and answer 451 at the end of data, as a failed commit does. The transaction has
            # discarded what it had, so nothing half-written can be queued.
            log.error("%s queue error: %s", self.log_prefix, exc)
            msg.failed = True

    async def _body_ended(self, ev: BodyEnded) -> None:
        msg = self.message
        assert msg is not None
        self.in_data = False
        if msg.failed:
            self.engine.respond(codes.LOCAL_ERROR)
            await self._abort_message()
            return
        try:
            queue_id = await msg.txn.commit()
        except QueueError as exc:
            log.error("%s commit failed: %s", self.log_prefix, exc)
            self.engine.respond(codes.LOCAL_ERROR)
            await self._abort_message()
            return
        self.message = None
        emit(MessageAccepted(listener=self.listener.name, client=self.client_ip, queue_id=queue_id,
                             sender=msg.txn.envelope.sender, nrcpt=len(msg.recipients), size=msg.txn.size,
                             tls_version=self.tls.version if self.tls else None))
        self.engine.accept(codes.r(250, "2.0.0", f"Ok: queued as {queue_id}"))

    async def _abort_message(self) -> None:
        msg, self.message = self.message, None
        if msg is not None:
            try:
                await msg.txn.abort()
            except QueueError as exc:
                log.error("%s abort failed: %s", self.log_prefix, exc)

    def _received_header(self, msg: _MessageState) -> bytes:
        """RFC 5321 §4.4 trace header with the TLS clause RFC 8314 §4.3 asks for (RFC 3848 names).

        Clause order is the grammar's: from, by, with, id, for, then registered clauses (`tls`).
        """
        engine, cfg = self.engine, self.services.config
        env = msg.txn.envelope
        tls, authenticated = self.tls, engine.authenticated_as is not None
        if env.smtputf8:
            proto = "UTF8SMTP"
        else:
            # STARTTLS and AUTH are ESMTP extensions; RFC 3848 registers no "SMTPS"/"SMTPA".
            proto = "ESMTP" if engine.esmtp or tls is not None or authenticated else "SMTP"
        if tls is not None:
            proto += "S"
        if authenticated:
            proto += "A"
        ip = self.client_ip
        if isinstance(self.stream, _LocalStream):
            # No network peer to record; like sendmail's and Postfix's local submissions, name the user.
            uid = self.stream.peer_uid
            lines = [f"Received: (from {'a local user' if uid is None else f'userid {uid}'})"]
        else:
            literal = f"IPv6:{ip}" if ":" in ip else ip
            lines = [f"Received: from {_trace_name(engine.helo)} ([{literal}])"]
        if tls is not None:
            lines.append(f"\t(using {tls.version} with cipher {tls.cipher} ({tls.bits}/{tls.bits} bits))")
        lines.append(f"\tby {cfg.hostname} (mailward {__version__}) with {proto} id {msg.txn.id}")
        if len(msg.recipients) == 1:
            lines.append(f"\tfor <{msg.recipients[0]}>")
        suite = iana_cipher_suite(tls.cipher) if tls is not None else None
        if suite is not None:
            lines.append(f"\ttls {suite}")
        lines[-1] += ";"
        lines.append(f"\t{email.utils.format_datetime(email.utils.localtime())}")
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")

    # --- AUTH ------------------------------------------------------------------------------------

    async def _auth_start(self, ev: AuthRequested) -> None:
        throttle = self.services.throttle
        if throttle.check(self.client_ip, None, self.services.clock()) is not None:
            log.warning("%s AUTH refused: client locked out", self.log_prefix)
            self.engine.respond(codes.AUTH_TEMPFAIL)
            return
        try:
            self.sasl = start_exchange(ev.mechanism, ev.initial_response)
        except UnsupportedMechanism:
            self.engine.respond(codes.AUTH_BAD_MECH)
            return
        await self._auth_step(None)

    async def _auth_step(self, data: bytes | None) -> None:
        engine, sasl = self.engine, self.sasl
        if sasl is None:
            engine.respond(codes.BAD_SEQUENCE)
            return
        result = sasl.step(data)
        if isinstance(result, Challenge):
            engine.auth_challenge(result.data)
            return
        self.sasl = None
        if isinstance(result, SaslFailure):
            await self._auth_failed(None, result.reason)
            return
        assert isinstance(result, Credentials)
        await self._auth_verify(result)

    async def _auth_verify(self, cred: Credentials) -> None:
        services, engine = self.services, self.engine
        ticket = await self._auth_admission(cred.authcid)
        if ticket is None:
            log.warning("%s AUTH refused for %s: locked out", self.log_prefix, cred.authcid)
            engine.respond(codes.AUTH_TEMPFAIL)
            return
        record = None
        failed = False
        try:
            if services.users is not None:
                # argon2 costs tens of milliseconds of CPU: keep it off the event loop, unless
                # this password was verified moments ago (a client connecting once per message).
                try:
                    record = services.users.verify_cached(cred.authcid, cred.password)
                    if record is None:
                        record = await asyncio.get_running_loop().run_in_executor(
                            None, services.users.verify, cred.authcid, cred.password)
                except UserStoreError as exc:
                    log.error("%s AUTH impossible: %s", self.log_prefix, exc)
                    engine.respond(codes.AUTH_TEMPFAIL)
                    return
            failed = record is None
        finally:
            services.throttle.settle(ticket, failed=failed, now=services.clock())
            services.auth_settled.set()
            services.auth_settled = asyncio.Event()
        if record is None:
            await self._auth_failed(cred.authcid, "bad credentials", counted=True)
            return
        services.throttle.success(self.client_ip, record.name, services.clock())
        emit(AuthResult(listener=self.listener.name, client=self.client_ip, user=record.name, ok=True))
        engine.auth_succeeded(record.name)

    async def _auth_admission(self, user: str) -> AuthTicket | None:
        """A slot for the password check, waiting (bounded) while the checks already in flight
        from this address or for this user could use up its limit; None when locked out."""
        services = self.services
        deadline = time.monotonic() + AUTH_ADMISSION_WAIT
        while services.throttle.check(self.client_ip, user, services.clock()) is None:
            ticket = services.throttle.admit(self.client_ip, user, services.clock())
            if ticket is not None:
                return ticket
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(services.auth_settled.wait(), left)
        return None

    async def _auth_failed(self, user: str | None, reason: str, *, counted: bool = False) -> None:
        throttle = self.services.throttle
        if not counted:
            throttle.failure(self.client_ip, user, self.services.clock())
        delay = throttle.delay_for(self.client_ip, user, self.services.clock())
        emit(AuthResult(listener=self.listener.name, client=self.client_ip, user=user, ok=False,
                        reason=reason))
        if delay > 0:
            await asyncio.sleep(delay)
        self.engine.respond(codes.AUTH_FAILED)
