"""Local delivery: mail for `local_domains` goes into Maildirs, or to an LMTP server (RFC 2033).

Who a recipient is (`LocalRecipients.resolve`, pure apart from the user lookup):

* Local parts compare case-insensitively and all local domains share one set of names, as in
  Postfix's mydestination. ``user+tag`` is ``user`` unless ``user+tag`` itself is an alias or user.
* ``[[local.alias]]`` comes first. A target is a local user (``alice``), an address in a local
  domain (looked up again) or a remote address. An alias listing itself means its own mailbox (as
  in aliases(5)); reaching an alias again through others is a loop and fails 5.4.6.
* A user is a name in the users file (``alice``, or ``alice@`` one of the local domains) or an
  existing directory ``maildir/<name>/`` (a mailbox without a login). Only names made of letters,
  digits and ``. _ - + =``, not starting with a dot, can name a mailbox, so no local part can reach
  outside the maildir root (``..``, ``/``, NUL).
* Anything else goes to `catch_all` when it is set, and fails 5.1.1 otherwise.

With `local.lmtp` the LMTP server owns the users: local parts go there as they came, and
`catch_all` takes the recipients that server refuses with 5.1.1, in a second transaction.

Remote alias targets are not sent from here. They become the recipients of one new queued message
(same sender, same content with ``Delivered-To:`` prepended), so they get the queue's retries,
bounces and TLS policy like any mail; the alias recipient counts as delivered once that message is
committed. A message that already carries ``Delivered-To:`` for a recipient has been here before
and fails 5.4.6 (mail forwarding loop), as with Postfix's local(8).

Maildir (https://cr.yp.to/proto/maildir.html): the file is written under ``tmp/`` with a unique
name (``<sec>.M<usec>P<pid>Q<n>.<host>,S=<size>``), fsync'd, renamed into ``new/``, and ``new/`` is
fsync'd before delivery counts as done. ``Return-Path:`` and ``Delivered-To:`` are prepended and
lines end in LF, the Unix mailbox convention. A user's Maildir (tmp, new, cur) is created 0700 on
first delivery.

Failures: unknown user 5.1.1 and loops 5.4.6 are permanent; disk trouble (ENOSPC, EACCES, ...) and an
unreachable LMTP server are temporary, each logged once saying what to fix. If one target of an
alias defers, the whole recipient is retried, so its other targets may get a second copy (Postfix
behaves the same way).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import re
import socket
import time
import unicodedata
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mailward.auth import UserStore, UserStoreError
from mailward.config import Config, parse_next_hop
from mailward.delivery.attempt import RecipientOutcome, enhanced_of, outcome_of
from mailward.queue import Envelope, Queue, QueueError, Recipient, ResultStatus, StoredMessage
from mailward.smtp.address import AddressError, Mailbox, parse_mailbox
from mailward.smtp.client import (
    ClientConnection,
    ClientEvent,
    ClientProtocolError,
    EhloCompleted,
    EhloRefused,
    GreetingReceived,
    ReadyForBody,
    ReplyReceived,
    ServerClosed,
    TransactionResult,
)
from mailward.smtp.commands import MailParams, RcptParams
from mailward.stream import SmtpStream

__all__ = [
    "Forward",
    "LmtpServer",
    "LocalDelivery",
    "LocalMailbox",
    "LocalRecipients",
    "LocalResult",
    "Problem",
    "Resolution",
    "mailbox_name",
    "maildir_file_name",
    "write_maildir",
]

log = logging.getLogger("mailward.delivery")

MAX_ALIAS_DEPTH = 20
SUBADDRESS_DELIMITER = "+"
QUIT_TIMEOUT = 5.0

_SAFE_NAME = re.compile(r"[^\W_][\w.+=-]{0,63}")


def mailbox_name(local_part: str) -> str | None:
    """The name a local part gives a mailbox (NFC, lower case), or None if it cannot name one.

    Letters, digits and ``_ . + = -``, starting with a letter or digit, at most 64 characters:
    never ``/``, NUL, a control character or a leading dot, so it is one directory under the root.
    """
    name = unicodedata.normalize("NFC", local_part).lower()
    return name if _SAFE_NAME.fullmatch(name) else None


# --- results --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalResult:
    """One recipient's local delivery: its outcome, and the relay for the log line."""

    outcome: RecipientOutcome
    relay: str  # "local" (Maildir, forwarding) or "lmtp[host]:port" / "lmtp[/socket]"


def _outcome(status: ResultStatus, reply: str) -> RecipientOutcome:
    # Local replies are "<enhanced code> <text>"; the mailbox is final, so no "relayed" DSN.
    return RecipientOutcome(status, reply, reply.split(" ", 1)[0], remote_dsn=False)


# --- who a recipient is ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalMailbox:
    """A mailbox here: a Maildir directory name, or the local part an LMTP server gets."""

    user: str
    domain: str

    @property
    def address(self) -> str:
        return f"{self.user}@{self.domain}"


@dataclass(frozen=True, slots=True)
class Forward:
    """A remote alias target, sent on through the queue."""

    address: str


@dataclass(frozen=True, slots=True)
class Problem:
    """Why a recipient (or one target of an alias) cannot be delivered."""

    reply: str  # enhanced status code first
    permanent: bool = True


Target = LocalMailbox | Forward


@dataclass(frozen=True, slots=True)
class Resolution:
    """Where one recipient's mail goes. No targets: the first problem is the recipient's fate."""

    targets: tuple[Target, ...]
    problems: tuple[Problem, ...] = ()
    direct: bool = False  # a plain user, no alias: LMTP's 5.1.1 sends it to catch_all


class LocalRecipients:
    """Aliases, users and catch_all: which mailboxes and remote addresses a recipient means.

    `is_user` answers for a safe mailbox name; None means an LMTP server decides (every local
    part is passed on as it came).
    """

    def __init__(self, *, local_domains: Collection[str], default_domain: str,
                 aliases: Mapping[str, Sequence[str]], catch_all: str | None,
                 is_user: Callable[[str], bool] | None) -> None:
        self.local_domains = frozenset(d.lower() for d in local_domains)
        self.default_domain = default_domain
        self.aliases = {_fold(name): tuple(targets) for name, targets in aliases.items()}
        self.catch_all = catch_all
        self.is_user = is_user

    @classmethod
    def from_config(cls, config: Config) -> LocalRecipients:
        """The recipients table delivery uses; the inbound side asks the same one at RCPT time."""
        lc = config.local
        # With LMTP the mailbox server owns the users: every local part is passed on.
        is_user = None if lc.lmtp is not None else _user_lookup(UserStore(config.auth.users_file),
                                                                config.local_domains, lc.maildir)
        default_domain = config.hostname
        if config.local_domains and default_domain not in config.local_domains:
            default_domain = config.local_domains[0]
        return cls(local_domains=config.local_domains, default_domain=default_domain,
                   aliases={a.name: a.targets for a in lc.aliases}, catch_all=lc.catch_all,
                   is_user=is_user)

    def resolve(self, address: str) -> Resolution:
        """Raises UserStoreError when the users file cannot be read (a temporary failure)."""
        local, domain = self._split(address)
        if self._alias_of(local) is None:
            if self.is_user is None:
                return Resolution((LocalMailbox(local, domain),), direct=True)
            found = self._user(local, domain)
            if isinstance(found, LocalMailbox):
                return Resolution((found,), direct=True)
            if self.catch_all is None:
                return Resolution((), (found,))
            return self.catch_all_for(domain)
        targets, problems = self._expand(local, domain, ())
        return Resolution(tuple(dict.fromkeys(targets)), tuple(problems))

    def refusal(self, address: str) -> str | None:
        """Why mail for `address` would certainly fail here (asked at RCPT time, so an unknown user
        is refused in the session instead of bounced later to a possibly forged sender), or None.

        Raises UserStoreError when the users file cannot be read.
        """
        res = self.resolve(address)
        if res.targets or not res.problems or not all(p.permanent for p in res.problems):
            return None
        return res.problems[0].reply

    def catch_all_for(self, domain: str) -> Resolution:
        """Where mail for an unknown local part of `domain` goes (catch_all must be set)."""
        assert self.catch_all is not None
        targets, problems = self._target(self.catch_all, domain, ("*",))
        return Resolution(tuple(dict.fromkeys(targets)), tuple(problems))

    def _split(self, address: str) -> tuple[str, str]:
        local, at, domain = address.rpartition("@")
        if not at:  # <postmaster> without a domain (RFC 5321 §4.5.1)
            return address, self.default_domain
        return local, domain.lower()

    def _alias_of(self, local: str) -> str | None:
        key = _fold(local)
        for name in (key, _without_detail(key)):
            if name in self.aliases:
                return name
        return None

    def _expand(self, local: str, domain: str, path: tuple[str, ...]) -> tuple[list[Target], list[Problem]]:
        name = self._alias_of(local)
        if name is None:
            found = self._user(local, domain)
            return ([found], []) if isinstance(found, LocalMailbox) else ([], [found])
        if name in path:
            return [], [Problem(f"5.4.6 alias loop: {' -> '.join((*path, name))}")]
        if len(path) >= MAX_ALIAS_DEPTH:
            return [], [Problem(f"5.4.6 aliases nested deeper than {MAX_ALIAS_DEPTH} at {name}")]
        targets: list[Target] = []
        problems: list[Problem] = []
        for target in self.aliases[name]:
            t, p = self._target(target, domain, (*path, name))
            targets += t
            problems += p
        return targets, problems

    def _target(self, target: str, domain: str, path: tuple[str, ...]) -> tuple[list[Target], list[Problem]]:
        t_local, at, t_domain = target.rpartition("@")
        if not at:
            t_local, t_domain = target, domain
        t_domain = t_domain.lower()
        if at and t_domain not in self.local_domains:
            return [Forward(f"{t_local}@{t_domain}")], []
        if path and _fold(t_local) == path[-1]:
            # An alias naming itself keeps a copy in its own mailbox rather than looping.
            found = self._user(t_local, t_domain)
            return ([found], []) if isinstance(found, LocalMailbox) else ([], [found])
        return self._expand(t_local, t_domain, path)

    def _user(self, local: str, domain: str) -> LocalMailbox | Problem:
        if self.is_user is None:
            return LocalMailbox(local, domain)
        key = _fold(local)
        for candidate in dict.fromkeys((key, _without_detail(key))):
            name = mailbox_name(candidate)
            if name is not None and self.is_user(name):
                return LocalMailbox(name, domain)
        return Problem(f"5.1.1 <{local}@{domain}>: no such user here")


def _fold(local: str) -> str:
    return unicodedata.normalize("NFC", local).lower()


def _without_detail(key: str) -> str:
    base, sep, _ = key.partition(SUBADDRESS_DELIMITER)
    return base if sep and base else key


# --- Maildir --------------------------------------------------------------------------------------

_DELIVERIES = itertools.count(1)


def maildir_file_name(now: float, size: int, host: str | None = None) -> str:
    """``<sec>.M<usec>P<pid>Q<n>.<host>,S=<size>``: unique per host, process and delivery."""
    host = (host or socket.gethostname()).replace("/", "\\057").replace(":", "\\072")
    seconds = int(now)
    micro = int((now - seconds) * 1_000_000)
    return f"{seconds}.M{micro}P{os.getpid()}Q{next(_DELIVERIES)}.{host},S={size}"


_DISK_HINTS = {
    errno.ENOSPC: "free disk space",
    errno.EDQUOT: "raise the disk quota",
    errno.EACCES: "give the mailward user write access there",
    errno.EPERM: "give the mailward user write access there",
    errno.EROFS: "mount the file system read-write",
    errno.ENOTDIR: "move the file that is in the way",
    errno.EEXIST: "move the file that is in the way",
}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_maildir(root: Path, home: Path) -> None:
    created = False
    if not root.is_dir():
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        _fsync_dir(root.parent)
    for directory in (home, home / "tmp", home / "new", home / "cur"):
        try:
            os.mkdir(directory, 0o700)
            created = True
        except FileExistsError:
            if not directory.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(directory)) from None
    if created:
        # The message's own fsync covers new/'s entry for the file, not the directories themselves.
        _fsync_dir(home)
        _fsync_dir(root)


def write_maildir(root: Path, user: str, data: bytes, now: float) -> Path:
    """Deliver `data` into root/user/new durably; returns the file. Blocking: run in a thread."""
    if mailbox_name(user) != user:
        raise ValueError(f"{user!r} cannot name a mailbox")  # resolve() never produces one
    home = root / user
    new = home / "new"
    if not all((home / d).is_dir() for d in ("tmp", "new", "cur")):
        _create_maildir(root, home)
    name = maildir_file_name(now, len(data))
    tmp = home / "tmp" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        final = new / name
        os.rename(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(new)
    return final


def _lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


# --- LMTP -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LmtpServer:
    """`local.lmtp`: a unix socket path, or a host and port."""

    path: str | None = None
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, value: str) -> LmtpServer:
        if value.startswith("unix:"):
            return cls(path=value[5:])
        hop = parse_next_hop(value)
        if hop.port is None:
            raise ValueError(f"LMTP server {value!r} needs a port")
        return cls(host=hop.host, port=hop.port)

    @property
    def relay(self) -> str:
        return f"lmtp[{self.path}]" if self.path is not None else f"lmtp[{self.host}]:{self.port}"


@dataclass(frozen=True, slots=True)
class LmtpTimeouts:
    connect: float = 30.0
    command: float = 300.0
    data: float = 600.0


class _Trouble(Exception):
    """The LMTP session failed as a whole: every recipient still undecided is deferred."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


class _LmtpSession:
    """One LMTP connection driving the sans-IO client in its LMTP mode."""

    def __init__(self, server: LmtpServer, stream: SmtpStream, client: ClientConnection,
                 timeouts: LmtpTimeouts) -> None:
        self.server = server
        self.stream = stream
        self.client = client
        self.timeouts = timeouts

    @classmethod
    async def open(cls, server: LmtpServer, helo: str, timeouts: LmtpTimeouts) -> _LmtpSession:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeouts.connect):
                if server.path is not None:
                    _, stream = await loop.create_unix_connection(SmtpStream, server.path)
                else:
                    _, stream = await loop.create_connection(SmtpStream, server.host, server.port)
        except TimeoutError:
            raise _Trouble(f"4.4.1 connect to {server.relay}: timed out") from None
        except OSError as exc:
            why = exc.strerror or str(exc) or type(exc).__name__
            raise _Trouble(f"4.4.1 connect to {server.relay}: {why}") from None
        session = cls(server, stream, ClientConnection(helo, lmtp=True), timeouts)
        try:
            ev = await session._event(timeouts.command, "the greeting")
            if not isinstance(ev, GreetingReceived) or ev.reply.code != 220:
                raise session._broken(ev, "the greeting")
            session.client.ehlo()
            ev = await session._event(timeouts.command, "LHLO")
            if not isinstance(ev, EhloCompleted):
                raise session._broken(ev, "LHLO")
        except BaseException:
            stream.abort()
            raise
        return session

    async def send(self, sender: Mailbox | None, rcpts: Sequence[Mailbox], body: bytes,
                   params: MailParams) -> TransactionResult:
        self.client.start_transaction(sender, [(mb, RcptParams()) for mb in rcpts], params, size=len(body))
        timeout = self.timeouts.command
        while True:
            try:
                ev = await self._event(timeout, "the transaction")
            except _Trouble:
                # Recipients answered before the silence keep their replies; the rest get 451.
                self.stream.abort()
                self.client.receive_eof()
                while (late := self.client.next_event()) is not None:
                    if isinstance(late, TransactionResult):
                        return late
                raise
            if isinstance(ev, TransactionResult):
                return ev
            if isinstance(ev, ReadyForBody):
                timeout = self.timeouts.data
                self.client.send_body(body)
                self.client.end_body()
            # ServerClosed / ClientProtocolError: the engine already finished the transaction.

    async def close(self) -> None:
        if not self.client.closed and not self.client.in_transaction:
            try:
                self.client.quit()
                async with asyncio.timeout(QUIT_TIMEOUT):
                    while not isinstance(await self._event(None, "QUIT"), ReplyReceived | ServerClosed):
                        pass
            except (TimeoutError, _Trouble, ConnectionError):
                pass
        self.stream.close()

    async def _event(self, timeout: float | None, during: str) -> ClientEvent:
        while True:
            ev = self.client.next_event()
            if ev is not None:
                return ev
            data = self.client.data_to_send()
            if data:
                self.stream.write(data)
                await self.stream.drain()
            try:
                async with asyncio.timeout(timeout):
                    chunk = await self.stream.read()
            except TimeoutError:
                raise _Trouble(f"4.4.2 {self.server.relay}: no reply during {during} within "
                               f"{timeout:g}s") from None
            if chunk:
                self.client.receive_data(chunk)
            else:
                self.client.receive_eof()

    def _broken(self, ev: ClientEvent, during: str) -> _Trouble:
        self.stream.abort()
        where = self.server.relay
        if isinstance(ev, ClientProtocolError):
            return _Trouble(f"4.5.0 {where} broke the protocol during {during}: {ev.detail}")
        reply = ev.reply if isinstance(ev, GreetingReceived | EhloRefused | ServerClosed) else None
        if reply is None:
            return _Trouble(f"4.4.2 {where} closed the connection during {during}")
        # A mailbox server that refuses to talk is ours to fix, never the sender's fault: defer.
        status = "4" + enhanced_of(reply)[1:]
        return _Trouble(f"{status} {where} refused {during}: {' '.join(str(reply).split())}")


# --- the agent ------------------------------------------------------------------------------------


class LocalDelivery:
    """What the Deliverer hands local recipients to: `deliver()` returns one result per recipient."""

    def __init__(self, recipients: LocalRecipients, *, maildir: Path, hostname: str,
                 lmtp: LmtpServer | None = None, queue: Queue | None = None,
                 timeouts: LmtpTimeouts | None = None, clock: Callable[[], float] = time.time) -> None:
        self.recipients = recipients
        self.maildir = maildir
        self.hostname = hostname
        self.lmtp = lmtp
        self.queue = queue
        self.timeouts = timeouts or LmtpTimeouts()
        self.clock = clock

    @classmethod
    def from_config(cls, config: Config, queue: Queue | None = None) -> LocalDelivery:
        lc = config.local
        lmtp = None if lc.lmtp is None else LmtpServer.parse(lc.lmtp)
        dc = config.delivery
        return cls(LocalRecipients.from_config(config), maildir=lc.maildir, hostname=dc.helo_name,
                   lmtp=lmtp, queue=queue,
                   timeouts=LmtpTimeouts(dc.connect_timeout, dc.command_timeout, dc.data_timeout))

    async def deliver(self, message: StoredMessage, body: bytes,
                      recipients: Sequence[str]) -> dict[str, LocalResult]:
        results: dict[str, LocalResult] = {}
        plans: dict[str, Resolution] = {}
        seen = _delivered_to(body)
        for rcpt in dict.fromkeys(recipients):
            if rcpt.lower() in seen:
                results[rcpt] = LocalResult(_outcome("failed", f"5.4.6 mail forwarding loop for <{rcpt}>"),
                                            "local")
                continue
            try:
                plans[rcpt] = self.recipients.resolve(rcpt)
            except UserStoreError as exc:
                log.error("%s: local users cannot be looked up: %s", message.id, exc)
                results[rcpt] = LocalResult(_outcome("deferred", "4.3.0 local user lookup failed"), "local")

        # Each mailbox gets the message once, labelled with the first recipient that led there.
        boxes: dict[LocalMailbox, str] = {}
        for rcpt, plan in plans.items():
            for target in plan.targets:
                if isinstance(target, LocalMailbox):
                    boxes.setdefault(self._key(target), rcpt)
        if self.lmtp is None:
            done = {box: await self._to_maildir(message, body, box, rcpt) for box, rcpt in boxes.items()}
        else:
            done = await self._to_lmtp(message, body, list(boxes))
            plans, done = await self._lmtp_catch_all(message, body, plans, done)
        forwarded = await self._forward(message, body, plans)

        relay = "local" if self.lmtp is None else self.lmtp.relay
        for rcpt, plan in plans.items():
            outcomes = [done[self._key(t)] if isinstance(t, LocalMailbox) else forwarded[t]
                        for t in plan.targets]
            if not outcomes:
                problem = plan.problems[0]
                results[rcpt] = LocalResult(_outcome("failed" if problem.permanent else "deferred",
                                                     problem.reply), "local")
                continue
            for problem in plan.problems:
                log.warning("%s: <%s>: one alias target is not delivered: %s", message.id, rcpt,
                            problem.reply)
            via = relay if any(isinstance(t, LocalMailbox) for t in plan.targets) else "local"
            results[rcpt] = LocalResult(_combine(outcomes), via)
        return results

    def _key(self, box: LocalMailbox) -> LocalMailbox:
        # All local domains share one Maildir per user; an LMTP server gets each address as is.
        return box if self.lmtp is not None else LocalMailbox(box.user, "")

    # --- Maildir ---

    async def _to_maildir(self, message: StoredMessage, body: bytes, box: LocalMailbox,
                          rcpt: str) -> RecipientOutcome:
        env = message.envelope
        head = f"Return-Path: <{env.sender}>\r\nDelivered-To: {rcpt}\r\n".encode()
        data = head + body if env.body_type == "BINARYMIME" else _lf(head + body)
        try:
            await asyncio.to_thread(write_maildir, self.maildir, box.user, data, self.clock())
        except OSError as exc:
            where = exc.filename or self.maildir / box.user
            hint = _DISK_HINTS.get(exc.errno or 0, "check the file system")
            log.error("%s: delivery to the maildir of %s failed at %s (%s); %s, the message stays queued "
                      "and is retried", message.id, box.user, where, exc.strerror or exc, hint)
            return _outcome("deferred", "4.3.0 mailbox temporarily unavailable")
        except ValueError as exc:
            return _outcome("failed", f"5.1.3 {exc}")
        return _outcome("delivered", f"2.0.0 delivered to maildir of {box.user}")

    # --- LMTP ---

    async def _to_lmtp(self, message: StoredMessage, body: bytes,
                       boxes: list[LocalMailbox]) -> dict[LocalMailbox, RecipientOutcome]:
        assert self.lmtp is not None
        out: dict[LocalMailbox, RecipientOutcome] = {}
        if not boxes:
            return out
        env = message.envelope
        try:
            sender = None if env.sender == "" else parse_mailbox(env.sender, smtputf8=True)
        except AddressError as exc:
            return {b: _outcome("failed", f"5.1.7 bad sender address <{env.sender}>: {exc}") for b in boxes}
        wire: list[tuple[LocalMailbox, Mailbox]] = []
        for box in boxes:
            try:
                wire.append((box, parse_mailbox(box.address, smtputf8=True)))
            except AddressError as exc:
                out[box] = _outcome("failed", f"5.1.3 bad recipient address <{box.address}>: {exc}")
        if not wire:
            return out
        binary = env.body_type == "BINARYMIME"
        # This hop is the final delivery, so REQUIRETLS ends here (RFC 8689 §5), and SMTPUTF8 is
        # asked for only when an address needs it (the engine sees that), as Postfix's autodetect.
        params = MailParams(body="BINARYMIME" if binary else None if body.isascii() else "8BITMIME")
        try:
            session = await _LmtpSession.open(self.lmtp, self.hostname, self.timeouts)
        except _Trouble as exc:
            log.warning("%s: %s", message.id, exc.reply)
            return {**out, **{box: _outcome("deferred", exc.reply) for box, _ in wire}}
        try:
            result = await session.send(sender, [mb for _, mb in wire], body, params)
        except _Trouble as exc:
            log.warning("%s: %s", message.id, exc.reply)
            return {**out, **{box: _outcome("deferred", exc.reply) for box, _ in wire}}
        finally:
            await session.close()
        for (box, _), (_, reply) in zip(wire, result.outcomes, strict=True):
            out[box] = outcome_of(reply, remote_dsn=False)
        return out

    async def _lmtp_catch_all(
        self, message: StoredMessage, body: bytes, plans: dict[str, Resolution],
        done: dict[LocalMailbox, RecipientOutcome],
    ) -> tuple[dict[str, Resolution], dict[LocalMailbox, RecipientOutcome]]:
        """Recipients the LMTP server does not know go to catch_all, in a second transaction."""
        if self.recipients.catch_all is None:
            return plans, done
        plans = dict(plans)
        for rcpt, plan in plans.items():
            box = plan.targets[0] if plan.direct else None
            if not isinstance(box, LocalMailbox):
                continue
            if done[box].status == "failed" and done[box].enhanced == "5.1.1":
                plans[rcpt] = self.recipients.catch_all_for(box.domain)
        extra = [t for plan in plans.values() for t in plan.targets
                 if isinstance(t, LocalMailbox) and t not in done]
        if extra:
            done = {**done, **await self._to_lmtp(message, body, list(dict.fromkeys(extra)))}
        return plans, done

    # --- forwarding ---

    async def _forward(self, message: StoredMessage, body: bytes,
                       plans: Mapping[str, Resolution]) -> dict[Forward, RecipientOutcome]:
        """Queue one new message for every remote alias target; the queue does the rest."""
        firsts: dict[Forward, str] = {}
        for rcpt, plan in plans.items():
            for target in plan.targets:
                if isinstance(target, Forward):
                    firsts.setdefault(target, rcpt)
        if not firsts:
            return {}
        if self.queue is None:
            return dict.fromkeys(firsts, _outcome("deferred", "4.3.0 forwarding is not available"))
        env = message.envelope
        originals = {s.recipient.address: s.recipient for s in message.recipients}
        envelope = Envelope(sender=env.sender, client_ip="127.0.0.1", client_helo=self.hostname,
                            listener="forward", received_at=self.clock(), smtputf8=env.smtputf8,
                            body_type=env.body_type, dsn_ret=env.dsn_ret, dsn_envid=env.dsn_envid,
                            requiretls=env.requiretls)
        labels = list(dict.fromkeys(firsts.values()))
        head = "".join(f"Delivered-To: {rcpt}\r\n" for rcpt in labels).encode()
        try:
            async with await self.queue.begin(envelope) as txn:
                for target, rcpt in firsts.items():
                    original = originals.get(rcpt)
                    notify = original.dsn_notify if original else frozenset()
                    orcpt = original.dsn_orcpt if original and original.dsn_orcpt else f"rfc822;{rcpt}"
                    await txn.add_rcpt(Recipient(target.address, dsn_notify=notify, dsn_orcpt=orcpt))
                await txn.write_body(head)
                await txn.write_body(body)
                new_id = await txn.commit()
        except (QueueError, ValueError) as exc:
            log.error("%s: cannot queue the forwarded copy: %s", message.id, exc)
            return dict.fromkeys(firsts, _outcome("deferred", "4.3.0 forwarding failed"))
        log.info("%s: forwarded to %s as %s", message.id, ", ".join(f"<{t.address}>" for t in firsts), new_id)
        return {t: _outcome("delivered", f"2.0.0 forwarded to <{t.address}> as {new_id}") for t in firsts}


def _user_lookup(users: UserStore, domains: Sequence[str], maildir: Path) -> Callable[[str], bool]:
    def is_user(name: str) -> bool:
        if users.get(name) is not None or any(users.get(f"{name}@{d}") is not None for d in domains):
            return True
        return (maildir / name).is_dir()  # a mailbox the operator made, without a login

    return is_user


def _combine(outcomes: Iterable[RecipientOutcome]) -> RecipientOutcome:
    """One recipient's fate from its targets': any deferral retries it, else any delivery counts."""
    items = list(outcomes)
    for o in items:
        if o.status == "deferred":
            return o
    delivered = [o for o in items if o.status == "delivered"]
    if not delivered:
        return items[0]
    if len(delivered) == 1:
        return delivered[0]
    replies = "; ".join(o.reply.partition(" ")[2] for o in delivered)
    return RecipientOutcome("delivered", f"2.0.0 {replies}", "2.0.0", remote_dsn=False)


_DELIVERED_TO = re.compile(rb"^delivered-to:[ \t]*(.*?)[ \t]*$", re.IGNORECASE | re.MULTILINE)


def _delivered_to(body: bytes) -> frozenset[str]:
    """The lower-cased addresses of the Delivered-To: headers the message already carries."""
    end = body.find(b"\r\n\r\n")
    head = body if end < 0 else body[:end + 2]
    head = re.sub(rb"\r\n[ \t]+", b" ", head)
    return frozenset(m.group(1).decode("utf-8", "replace").strip("<>").lower()
                     for m in _DELIVERED_TO.finditer(head.replace(b"\r\n", b"\n")))
