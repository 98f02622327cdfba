"""Outbound delivery: the Deliverer leases due messages and gets every recipient to a final state.

The loop (DESIGN.md "The path of one message", steps 5 to 7):

1. `queue.lease()` claims due messages for this process (owner ``host:pid``); leases are renewed
   while attempts run, so a crashed process's messages come back after `lease_seconds`.
2. Each message's due recipients are grouped by `policy.destination_for` (local, route, smarthost
   or the MX of their domain). Messages leased together for one destination share connections.
3. Per destination: DNS facts (`dns.py`), one `policy.plan` decision (candidates and the TLS each
   requires, or a refusal), then connections (`attempt.Session`) limited globally and per
   destination with slow start. A connection-level failure moves on to the next address or MX
   host; a host that refused or timed out is skipped for `dead_host_seconds`.
4. When every group of a message has finished, one `record_attempt` stores all its results:
   delivered, failed, or deferred with exponential backoff; recipients past `max_lifetime` fail
   with 4.4.7. Failures (and a one-time delay warning, and NOTIFY=SUCCESS reports) become one
   RFC 3464 notification, queued like any message before the results are recorded, so a crash
   between the two repeats a notification rather than losing it.

Every recipient result is logged on "mailward.delivery" in Postfix's shape, e.g.
``0PJ2M3W9K1X7QF: to=<bob@example.org>, relay=mx.example.org[192.0.2.7]:25, delay=1.2,
tls=Verified TLSv1.3/TLS_AES_256_GCM_SHA384 (dane 3 1 1), dsn=2.0.0, status=sent (250 2.0.0 Ok)``.
`tls=` uses Postfix's words for what the connection proved: Verified (by DANE, naming the TLSA
record that matched, or by PKIX), Trusted (the chain leads to a trusted CA; names not checked),
Untrusted, Anonymous (no certificate), or plaintext (no TLS, or no connection: relay=none).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from mailward.config import Config, ConfigError, DeliveryConfig
from mailward.delivery.attempt import (
    AttemptError,
    AttemptSettings,
    Credentials,
    OutboundMessage,
    RecipientOutcome,
    Session,
    TlsOutcome,
)
from mailward.delivery.dns import DnsPermanentError, DnsResolver, DnsTemporaryError, HostAddresses, NextHops
from mailward.delivery.local import LocalDelivery, LocalResult
from mailward.delivery.mtasts import for_delivery, sts_facts
from mailward.delivery.policy import (
    Candidate,
    Destination,
    Plan,
    Refusal,
    RouteFacts,
    SecurityLevel,
    TlsaFacts,
    destination_for,
    literal_facts,
    plan,
    sts_matches,
    tlsa_hosts,
)
from mailward.metrics import DeliveryResult, DeliveryStatus, NotificationQueued, TlsResult, emit
from mailward.queue import (
    CorruptMessage,
    DestinationSlots,
    Envelope,
    LeaseLost,
    Queue,
    QueueError,
    Recipient,
    RecipientResult,
    RecipientState,
    ResultStatus,
    StoredMessage,
    TlsVerdict,
)
from mailward.reports.dsn import Action, RecipientReport, build_dsn, returns_whole_message, wanted
from mailward.reports.tlsrpt import (
    ReportPolicy,
    TlsReporter,
    TlsRptStore,
    policy_for,
    policy_for_sts,
    sts_testing_failure,
)

__all__ = [
    "DeadHosts",
    "Deliverer",
    "Resolver",
    "SlowStart",
    "backoff",
    "build_deliverer",
    "due_recipients",
    "group_by_destination",
    "lookup_tlsa",
    "read_smarthost_credentials",
    "settle",
]

log = logging.getLogger("mailward.delivery")

INLINE_BODY = 256 * 1024  # bodies up to this size are read once and kept for every connection
LEASE_BATCH = 200  # messages claimed per lease call
MAX_IDLE = 60.0  # an idle loop looks at the queue at least this often
LEASE_GATHER = 0.02  # seconds the deliverer waits after new mail wakes it, to lease it together
RECORD_RETRIES = 6  # tries again to record an attempt's results, 0.5 s apart and doubling (31.5 s)
RECORD_RETRY_FIRST = 0.5
STOP_GRACE = 20.0  # seconds stop() lets attempts in flight finish
# An open connection with nothing left to send waits this long for the next message to its
# destination (Postfix's smtp_connection_cache_time_limit): new mail arrives in small batches,
# and a new TLS connection per batch costs more than the delivery itself.
PARK_SECONDS = 2.0
SHARED_SLOT_POLL = 0.2  # seconds between tries for a destination slot held by other nodes
PARK_MAX_AGE = 300.0  # never reuse a connection opened longer ago (smtp_connection_reuse_time_limit)


# --- pure parts -------------------------------------------------------------------------------------


def backoff(attempts: int, initial: float, maximum: float, jitter: float = 0.0) -> float:
    """Seconds until the next try after `attempts` attempts: initial * 2**(attempts-1), at most
    `maximum`, made up to 10% shorter by `jitter` in [0, 1) so deferred batches spread out."""
    exponent = max(0, attempts - 1)
    delay = maximum if exponent >= 64 else min(initial * 2.0**exponent, maximum)
    return delay * (1.0 - 0.1 * jitter)


class SlowStart:
    """Connections one destination may have open: starts small, grows on success, halves on failure.

    Like Postfix's destination concurrency: a destination that works gets one more connection per
    successful connection up to `maximum`; one that fails loses half, never below one.
    """

    def __init__(self, initial: int, maximum: int) -> None:
        self.limit = min(initial, maximum)
        self.maximum = maximum
        self.active = 0

    @property
    def available(self) -> bool:
        return self.active < self.limit

    def success(self) -> None:
        self.limit = min(self.limit + 1, self.maximum)

    def failure(self) -> None:
        self.limit = max(1, self.limit // 2)


class DeadHosts:
    """Addresses that refused or never answered, skipped until their time is up."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._until: dict[tuple[str, int], float] = {}

    def mark(self, address: str, port: int, now: float) -> None:
        if self.seconds > 0:
            self._until[(address, port)] = now + self.seconds

    def is_dead(self, address: str, port: int, now: float) -> bool:
        until = self._until.get((address, port))
        if until is None:
            return False
        if until <= now:
            del self._until[(address, port)]
            return False
        return True

    def __len__(self) -> int:
        return len(self._until)


def due_recipients(message: StoredMessage, now: float) -> tuple[RecipientState, ...]:
    """Pending recipients whose time has come (others keep their own backoff)."""
    return tuple(r for r in message.pending if r.next_attempt_at is None or r.next_attempt_at <= now)


def group_by_destination(
    recipients: Iterable[RecipientState], config: Config
) -> dict[Destination, list[Recipient]]:
    """Recipients by where they go, in first-seen order."""
    groups: dict[Destination, list[Recipient]] = {}
    routed: dict[str, Destination] = {}  # many recipients share a domain
    for state in recipients:
        address = state.recipient.address
        domain = address.rpartition("@")[2].lower() if "@" in address else ""
        destination = routed.get(domain)
        if destination is None:
            destination = routed[domain] = destination_for(domain, config)
        groups.setdefault(destination, []).append(state.recipient)
    return groups


@dataclass(frozen=True, slots=True)
class Settled:
    """What one recipient's attempt means for the queue and for the sender."""

    result: RecipientResult
    report: RecipientReport | None  # a DSN entry, if one is due
    status_word: str  # for the log: sent | deferred | bounced | expired
    enhanced: str


def settle(
    state: RecipientState,
    outcome: RecipientOutcome,
    *,
    arrived_at: float,
    now: float,
    dc: DeliveryConfig,
    jitter: float = 0.0,
    remote_mta: str | None = None,
) -> Settled:
    """Turn one attempt's outcome into the stored result, and a DSN report when one is due.

    Pure: backoff from the recipient's attempt count, expiry `max_lifetime` after arrival (the
    envelope's received_at, as Postfix counts the queue lifetime), the delay
    warning once (on the attempt that first finds the recipient older than `delay_warning`),
    and the NOTIFY=SUCCESS report ("relayed" when the receiver does not do DSN).
    """
    rcpt = state.recipient
    if outcome.status == "delivered":
        report = None
        # RFC 3461 §4.1: a final delivery reports "delivered"; a receiver that takes DSN duty
        # reports itself; one that does not leaves us to say "relayed".
        action: Action | None = (
            "delivered" if remote_mta is None else None if outcome.remote_dsn else "relayed")
        if "SUCCESS" in rcpt.dsn_notify and action is not None:
            report = RecipientReport(recipient=rcpt, action=action, status=_with_class(outcome.enhanced, "2"),
                                     diagnostic=outcome.reply, remote_mta=remote_mta, last_attempt=now)
        return Settled(RecipientResult("delivered", outcome.reply), report, "sent", outcome.enhanced)
    if outcome.status == "failed":
        report = RecipientReport(recipient=rcpt, action="failed", status=_with_class(outcome.enhanced, "5"),
                                 diagnostic=outcome.reply, remote_mta=remote_mta, last_attempt=now)
        return Settled(RecipientResult("failed", outcome.reply), report, "bounced", outcome.enhanced)
    expires_at = arrived_at + dc.max_lifetime
    if now >= expires_at:
        reply = f"4.4.7 delivery time expired; last error: {outcome.reply}"
        report = RecipientReport(recipient=rcpt, action="failed", status="4.4.7", diagnostic=outcome.reply,
                                 remote_mta=remote_mta, last_attempt=now)
        return Settled(RecipientResult("failed", reply), report, "expired", "4.4.7")
    delay = backoff(state.attempts + 1, dc.retry_initial, dc.retry_max, jitter)
    next_at = min(now + delay, expires_at)
    report = None
    warn_after = arrived_at + dc.delay_warning
    previous = state.last_attempt_at
    if dc.delay_warning > 0 and now >= warn_after and (previous is None or previous < warn_after):
        report = RecipientReport(recipient=rcpt, action="delayed", status=_with_class(outcome.enhanced, "4"),
                                 diagnostic=outcome.reply, remote_mta=remote_mta, last_attempt=now,
                                 will_retry_until=expires_at)
    return Settled(RecipientResult("deferred", outcome.reply, next_at), report, "deferred", outcome.enhanced)


def _with_class(enhanced: str, klass: str) -> str:
    # A deferral may carry a 5.x.x reason (REQUIRETLS); a DSN's status class follows the action.
    head, dot, rest = enhanced.partition(".")
    if dot and head in "245" and re.fullmatch(r"[0-9]{1,3}\.[0-9]{1,3}", rest):
        return f"{klass}.{rest}"
    return f"{klass}.0.0"


_TLS_REQUIRED_RE = re.compile(rb"^tls-required[ \t]*:(.*)$", re.IGNORECASE | re.MULTILINE)


def tls_required_no(content: bytes) -> bool:
    """Whether the header section carries exactly one "TLS-Required: No" field (RFC 8689 §5).

    Anything else (another value, or the field twice) is not the sender's clear request and
    changes nothing: the safe reading of an ambiguous header is the policy as published.
    """
    end = content.find(b"\r\n\r\n")
    headers = content if end < 0 else content[: end + 2]
    unfolded = re.sub(rb"\r?\n[ \t]+", b" ", headers)
    values = [m.group(1).strip(b" \t\r").lower() for m in _TLS_REQUIRED_RE.finditer(unfolded)]
    return values == [b"no"]


_MESSAGE_ID_RE = re.compile(rb"^message-id:[ \t]*(<[^<>\s]+>)", re.IGNORECASE | re.MULTILINE)


def message_id_of(headers: bytes) -> str | None:
    unfolded = re.sub(rb"\r?\n[ \t]+", b" ", headers)
    match = _MESSAGE_ID_RE.search(unfolded)
    return match.group(1).decode("utf-8", "replace") if match else None


def read_smarthost_credentials(config: Config) -> Credentials | None:
    """The smarthost AUTH credentials, read once at start-up; ConfigError says what to fix."""
    sh = config.delivery.smarthost
    if sh is None or sh.username is None or sh.password_file is None:
        return None
    try:
        text = sh.password_file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"delivery.smarthost.password_file: {sh.password_file} cannot be read "
                          f"({exc.strerror or exc}); create it with the password on its first line, "
                          "readable by the mailward user.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"delivery.smarthost.password_file: {sh.password_file} is not UTF-8 text; "
                          "write the password as UTF-8.") from None
    password = text.splitlines()[0] if text else ""
    if not password:
        raise ConfigError(f"delivery.smarthost.password_file: {sh.password_file} is empty; put the "
                          "password on its first line.")
    return Credentials(sh.username, password)


def build_deliverer(config: Config, queue: Queue) -> Deliverer:
    """The Deliverer the service runs: resolver, local delivery and credentials from `config`.

    Raises ConfigError for what the operator must fix (an unreadable smarthost password file).
    """
    credentials = read_smarthost_credentials(config)
    resolver = DnsResolver(config.dns.resolvers, timeout=config.dns.timeout)
    local = LocalDelivery.from_config(config, queue)
    return Deliverer(config, queue, resolver, local, credentials=credentials)


# --- collaborators ------------------------------------------------------------------------------------


class Resolver(Protocol):
    """What the Deliverer needs from `dns.DnsResolver`: `next_hops` and `addresses` raise
    `DnsPermanentError` or `DnsTemporaryError` when DNS gives no usable answer; `tlsa` reports a
    failed lookup as status "bogus"."""

    async def next_hops(self, domain: str) -> NextHops: ...

    async def addresses(self, host: str) -> HostAddresses: ...

    async def tlsa(self, host: str, port: int = 25) -> TlsaFacts: ...


async def lookup_tlsa(resolver: Resolver, destination: Destination,
                      facts: RouteFacts) -> dict[str, TlsaFacts] | None:
    """The TLSA facts `plan` needs: one concurrent lookup per host that RFC 7672 lets DANE apply to
    (`policy.tlsa_hosts`: dane levels only, a secure MX RRset or the next-hop domain itself, and
    secure address records or a secure alias); None when no host qualifies.

    A lookup that raises counts as bogus, as one that fails does (§2.1.1): that host may not be
    used, which is never the same as "no TLSA records". The resolver caches the answers.
    """
    hosts = tlsa_hosts(destination, facts)
    if not hosts:
        return None
    answers = await asyncio.gather(*(resolver.tlsa(h, destination.port) for h in hosts),
                                   return_exceptions=True)
    found: dict[str, TlsaFacts] = {}
    for host, answer in zip(hosts, answers, strict=True):
        if isinstance(answer, BaseException):
            if not isinstance(answer, Exception):
                raise answer
            log.warning("%s: TLSA lookup for %s failed: %s", destination.key, host, answer)
            answer = TlsaFacts("bogus", base_domain=host)
        found[host] = answer
        log.debug("%s: TLSA for %s (base domain %s): %s, %d record(s)", destination.key, host,
                  answer.base_domain, answer.status, len(answer.records))
    return found


class LocalAgent(Protocol):
    """What the Deliverer needs from `local.LocalDelivery`."""

    async def deliver(
        self, message: StoredMessage, body: bytes, recipients: Sequence[str]
    ) -> Mapping[str, LocalResult]: ...


# --- the Deliverer ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Outcome:
    outcome: RecipientOutcome
    relay: str  # host[ip]:port, "local", "lmtp[...]" or "none"
    tls: TlsOutcome
    remote_mta: str | None = None
    policy: str | None = None  # the TLS security level of an SMTP attempt; None for local delivery

    def reached_host(self) -> bool:
        """Whether this attempt reached an SMTP host (local delivery and failed lookups did not)."""
        tls = self.tls
        return self.policy is not None and (self.relay != "none" or tls.active or tls.failure is not None)

    def verdict(self) -> TlsVerdict | None:
        """What the queue keeps as the TLS of this attempt; None unless it reached an SMTP host."""
        tls = self.tls
        if not self.reached_host():
            return None
        return TlsVerdict(protocol=tls.protocol, cipher=tls.cipher, verified=tls.verified,
                          policy=self.policy, failure=tls.failure, trust=tls.trust, dane=tls.dane)

    def tls_result(self) -> TlsResult | None:
        """The attempt's transport security in the metrics' words; None unless it reached an SMTP
        host or was held back because no host could give the TLS the policy demands."""
        tls, outcome = self.tls, self.outcome
        if outcome.status != "delivered":
            # A required TLS that failed, or a plan that found no host able to meet the policy
            # (4.7.5, or 5.7.30 under REQUIRETLS); a remote 5.7.x reply has a relay, not "none".
            if tls.failure is not None and self.policy not in (None, "none", "may"):
                return "deferred_policy"
            if self.policy is None and self.relay == "none" and outcome.enhanced[1:3] == ".7":
                return "deferred_policy"
        if not self.reached_host():
            return None
        if not tls.active:
            return "plaintext"
        if tls.verified:
            return "dane_verified" if tls.dane is not None or self.policy == "dane" else "sts_verified"
        return "opportunistic"


@dataclass(eq=False, slots=True)
class _Work:
    """One leased message while its groups are being delivered."""

    message: StoredMessage
    groups_left: int = 0
    outcomes: dict[str, _Outcome] = field(default_factory=dict)
    body: bytes | None = None
    eightbit: bool | None = None
    tls_optional: bool = False  # the sender wrote "TLS-Required: No" (RFC 8689 §5); set by _load
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    lost: bool = False  # the lease went to someone else: report nothing
    corrupt: bool = False  # the queue held it; report nothing
    finished: bool = False


@dataclass(eq=False, slots=True)
class _Job:
    work: _Work
    recipients: tuple[Recipient, ...]
    done: bool = False  # counted off its message's groups_left


@dataclass(slots=True)
class _Parked:
    session: Session
    timer: asyncio.TimerHandle


class _NoHost(Exception):
    def __init__(self, reply: str, tls: TlsOutcome, policy: str | None = None, *,
                 permanent: bool = False) -> None:
        super().__init__(reply)
        self.reply = reply
        self.tls = tls
        self.policy = policy
        self.permanent = permanent  # every host answered, and none can ever take this message


class _Gate:
    """A destination's slow-start counters with waiting."""

    def __init__(self, counters: SlowStart) -> None:
        self.counters = counters
        self.waiting = 0
        self.users = 0  # deliveries holding this gate; it is forgotten when none does
        self._changed = asyncio.Event()

    async def acquire(self) -> None:
        self.waiting += 1
        try:
            while not self.counters.available:
                self._changed.clear()
                await self._changed.wait()
        finally:
            self.waiting -= 1
        self.counters.active += 1

    def release(self) -> None:
        self.counters.active -= 1
        self._changed.set()

    def success(self) -> None:
        self.counters.success()
        self._changed.set()

    def failure(self) -> None:
        self.counters.failure()

    @property
    def idle(self) -> bool:
        return self.users == 0


class Deliverer:
    """Delivers what the queue holds; `run()` until `stop()`."""

    def __init__(
        self,
        config: Config,
        queue: Queue,
        resolver: Resolver | None,
        local: LocalAgent | None,
        clock: Callable[[], float] = time.time,
        *,
        rng: random.Random | None = None,
        owner: str | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        self.config = config
        self.dc = config.delivery
        self.queue = queue
        self.resolver = resolver
        self.local = local
        self.clock = clock
        self.rng = rng or random.Random()
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        if credentials is None:
            credentials = read_smarthost_credentials(config)
        self.settings = AttemptSettings(
            helo_name=self.dc.helo_name,
            connect_timeout=self.dc.connect_timeout,
            command_timeout=self.dc.command_timeout,
            data_timeout=self.dc.data_timeout,
        )
        self.smarthost_settings = AttemptSettings(
            helo_name=self.dc.helo_name,
            connect_timeout=self.dc.connect_timeout,
            command_timeout=self.dc.command_timeout,
            data_timeout=self.dc.data_timeout,
            credentials=credentials,
        )
        self.dead = DeadHosts(self.dc.dead_host_seconds)
        self.mta_sts = for_delivery(config, resolver, queue)
        # TLS reporting (RFC 8460): every TLS session with a recipient domain's MX is counted.
        self.tlsrpt = (TlsReporter(queue, clock=clock)
                       if config.tlsrpt.enabled and isinstance(queue, TlsRptStore) else None)
        if self.tlsrpt is not None and self.mta_sts is not None:
            self.mta_sts.observer = self.tlsrpt.sts_lookup
        self._connections = asyncio.Semaphore(self.dc.concurrency)
        self._local_slots = asyncio.Semaphore(self.dc.per_destination)
        self._gates: dict[str, _Gate] = {}
        self._works: dict[str, _Work] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._changed = asyncio.Event()
        self._running = asyncio.Event()
        self._loop_done = asyncio.Event()
        self._max_messages = max(LEASE_BATCH, 4 * self.dc.concurrency)
        # Lease when this many slots are free (or nothing is in flight): one lease per finished
        # message would split the queue into one-message groups with a connection each.
        self._refill_at = max(1, min(LEASE_BATCH, self._max_messages) // 4)
        self._parked: dict[tuple[str, Candidate], list[_Parked]] = {}
        self.postmaster = f"postmaster@{config.hostname}"

    # --- the loop ---

    async def run(self) -> None:
        if not self.dc.enabled:
            log.warning("delivery is disabled (delivery.enabled = false): mail is queued, not delivered")
            await self._stopping.wait()
            return
        self._running.set()
        renewer = asyncio.get_running_loop().create_task(self._renew_leases())
        try:
            while not self._stopping.is_set():
                try:
                    await self._step()
                except Exception:
                    # A bug here must not end delivery for the life of the process.
                    log.exception("delivery loop error; continuing")
                    await asyncio.sleep(1)
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            self._running.clear()
            self._loop_done.set()

    async def _step(self) -> None:
        capacity = self._max_messages - len(self._works)
        leased: list[StoredMessage] = []
        may_lease = self._may_lease()
        limit = min(capacity, LEASE_BATCH)
        if may_lease:
            try:
                leased = await self.queue.lease(self.owner, self.clock(), limit, self.dc.lease_seconds)
            except QueueError as exc:
                log.error("cannot lease messages: %s", exc)
                await asyncio.sleep(1)
                return
        if leased and self._stopping.is_set():
            # stop() came while we were leasing: hand these back untouched.
            for message in leased:
                with contextlib.suppress(QueueError):
                    await self.queue.record_attempt(message.id, self.owner, {}, self.clock())
            return
        if leased:
            self._dispatch(leased)
            if len(leased) >= limit:
                return  # more may be due: lease again at once
            # Fewer than asked: nothing else was due a moment ago, so wait for news rather than
            # lease again for nothing.
            may_lease = self._may_lease()
        await self._idle(may_lease)

    def _may_lease(self) -> bool:
        """Whether enough slots are free to lease (or nothing is in flight at all)."""
        return self._max_messages - len(self._works) >= self._refill_at or not self._works

    async def _idle(self, may_lease: bool) -> None:
        timeout = MAX_IDLE
        if may_lease:
            try:
                due = await self.queue.next_due()
            except QueueError:
                due = None
            if due is not None:
                timeout = min(MAX_IDLE, max(0.05, due - self.clock()))
        self._changed.clear()
        waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._stopping.wait()),
                                              asyncio.ensure_future(self._changed.wait())]
        if may_lease:
            waiters.append(asyncio.ensure_future(self.queue.wait_for_work(timeout)))
        try:
            done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
        work = waiters[2] if may_lease else None
        new_mail = work in done and work is not None and work.exception() is None and work.result() is True
        if new_mail and not self._stopping.is_set() and not self._changed.is_set():
            # New mail: let what arrives with it join the same lease, as Postfix's queue manager
            # takes what came in since its last scan. One lease, one plan and one record batch
            # for many messages instead of each alone, at the cost of a few milliseconds.
            await asyncio.sleep(LEASE_GATHER)

    def wake(self) -> None:
        """Look at the queue now (its clock may have moved, or an operator asked for a flush)."""
        self._changed.set()

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop leasing; let attempts in flight finish for `grace` seconds; record what is known
        and release the rest so the next start (or another node) takes over at once."""
        self._stopping.set()
        if self._running.is_set():
            await self._loop_done.wait()  # no lease can start after this
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for work in list(self._works.values()):
            if not work.finished:
                await self._finish(work)
        await self._close_parked()
        if self.tlsrpt is not None:
            await self.tlsrpt.close()

    def _dispatch(self, messages: Sequence[StoredMessage]) -> None:
        now = self.clock()
        by_destination: dict[Destination, list[_Job]] = {}
        finished_now: list[_Work] = []
        for message in messages:
            work = _Work(message)
            self._works[message.id] = work
            groups = group_by_destination(due_recipients(message, now), self.config)
            work.groups_left = len(groups)
            if not groups:
                finished_now.append(work)
            for destination, recipients in groups.items():
                by_destination.setdefault(destination, []).append(_Job(work, tuple(recipients)))
        for destination, jobs in by_destination.items():
            self._spawn(self._deliver_group(destination, jobs))
        for work in finished_now:
            self._spawn(self._finish(work))

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _renew_leases(self) -> None:
        interval = max(1.0, self.dc.lease_seconds / 3)
        while True:
            await asyncio.sleep(interval)
            for work in list(self._works.values()):
                if work.finished or work.lost:
                    continue
                try:
                    await self.queue.renew(work.message.id, self.owner, self.dc.lease_seconds, self.clock())
                except LeaseLost:
                    log.warning("%s: lease lost while delivering; another worker has the message",
                                work.message.id)
                    work.lost = True
                except QueueError as exc:
                    log.error("%s: cannot renew the lease: %s", work.message.id, exc)

    # --- one destination ---

    async def _deliver_group(self, destination: Destination, jobs: list[_Job]) -> None:
        cancelled = False
        try:
            if destination.kind == "local":
                await self._deliver_local(jobs)
            else:
                await self._deliver_remote(destination, jobs)
        except asyncio.CancelledError:
            cancelled = True
            raise
        except Exception:
            log.exception("delivery to %s failed unexpectedly", destination.key)
            for job in jobs:
                self._set_missing(job, _deferral("4.3.0 internal error in delivery"))
        finally:
            if not cancelled:
                for job in jobs:
                    if job.done:  # recorded as soon as it was sent (_job_sent)
                        continue
                    job.done = True
                    job.work.groups_left -= 1
                    if job.work.groups_left == 0:
                        await self._finish(job.work)

    def _job_sent(self, job: _Job) -> None:
        """A job has every outcome: if it was its message's last group, record the message now,
        while the connection goes on with the next job. Waiting for the whole group (up to a
        lease batch of messages) made a crash repeat every delivery the group had made so far.
        While stopping, stop() records what is left instead."""
        if job.done or not all(r.address in job.work.outcomes for r in job.recipients):
            return
        job.done = True
        job.work.groups_left -= 1
        if job.work.groups_left == 0 and not self._stopping.is_set():
            self._spawn(self._finish(job.work))

    def _set_missing(self, job: _Job, outcome: RecipientOutcome, relay: str = "none",
                     tls: TlsOutcome | None = None, policy: str | None = None) -> None:
        for r in job.recipients:
            if r.address not in job.work.outcomes:
                job.work.outcomes[r.address] = _Outcome(outcome, relay, tls or TlsOutcome(), policy=policy)

    async def _deliver_remote(self, destination: Destination, jobs: list[_Job]) -> None:
        facts_or_refusal = await self._route_facts(destination)
        tlsa = None
        sts = None
        if self.resolver is not None and not isinstance(facts_or_refusal, Refusal):
            tlsa = await lookup_tlsa(self.resolver, destination, facts_or_refusal)
            # RFC 8461 §5: before an enforce failure would expire a message, fetch the policy again.
            final = any(self.clock() - j.work.message.created_at >= self.dc.max_lifetime - self.dc.retry_max
                        for j in jobs)
            sts = await sts_facts(self.mta_sts, self.config, destination, facts_or_refusal, final=final)
            if self.tlsrpt is not None:
                self.tlsrpt.sts_failure(destination.domain,
                                        count=not all(j.work.message.envelope.tlsrpt for j in jobs))
        def decide(requiretls: bool, tls_optional: bool) -> Plan:
            if isinstance(facts_or_refusal, Refusal):
                return Plan(destination, refusal=facts_or_refusal)
            return plan(destination, facts_or_refusal, requiretls=requiretls, tls_optional=tls_optional,
                        tlsa=tlsa, sts=sts)

        # REQUIRETLS messages get their own plan and their own connections: a connection chosen
        # for opportunistic TLS must never carry them (maddy calls this pool poisoning). So do
        # messages marked "TLS-Required: No", whose plan leaves the destination's policy aside.
        # Their header is read only when that plan differs: a destination without DANE or
        # MTA-STS, or one that is down, costs no read of the content.
        plans = {(False, False): decide(False, False)}
        if any(not j.work.message.envelope.requiretls for j in jobs) \
                and (optional_plan := decide(False, True)) != plans[False, False]:
            plans[False, True] = optional_plan
            for job in jobs:
                if not job.work.message.envelope.requiretls:
                    await self._load(job.work)
        header_matters = (False, True) in plans
        for requiretls, tls_optional in ((False, False), (False, True), (True, False)):
            subset = [j for j in jobs if j.work.message.envelope.requiretls is requiretls
                      and (j.work.tls_optional and header_matters and not requiretls) is tls_optional]
            if not subset:
                continue
            if tls_optional:
                log.info("%s: TLS-Required: No in %s: the destination's DANE and MTA-STS policies are not "
                         "enforced for it (RFC 8689 §5)", destination.key,
                         ", ".join(j.work.message.id for j in subset))
            decision = plans.get((requiretls, tls_optional)) or decide(requiretls, tls_optional)
            for why in decision.skipped:
                log.info("%s: not using %s", destination.key, why)
            if not requiretls and not tls_optional and destination.kind == "mx" \
                    and destination.next_hop is None and not isinstance(facts_or_refusal, Refusal) \
                    and not all(j.work.message.envelope.tlsrpt for j in subset):
                self._tally_unusable(destination, facts_or_refusal, tlsa, decision)
            if decision.refusal is not None:
                refusal = decision.refusal
                status: ResultStatus = "failed" if refusal.permanent else "deferred"
                for job in subset:
                    self._set_missing(job, RecipientOutcome(status, refusal.reply, refusal.status))
                continue
            await self._connections_for(destination, decision, subset)

    async def _route_facts(self, destination: Destination) -> RouteFacts | Refusal:
        hop = destination.next_hop
        if hop is not None and hop.literal:
            return literal_facts(destination)
        if self.resolver is None:
            return Refusal(False, "4.4.3", "no DNS resolver configured")
        name = destination.lookup_name
        try:
            if destination.uses_mx:
                return (await self.resolver.next_hops(name)).facts()
            return (await self.resolver.addresses(name)).route_facts()
        except DnsPermanentError as exc:
            if destination.kind == "mx":
                return Refusal(True, exc.status, str(exc))
            # A route or smarthost the operator named: their mistake to fix, not the sender's.
            return Refusal(False, "4.4.4", f"next hop of {destination.key}: {exc}")
        except DnsTemporaryError as exc:
            return Refusal(False, exc.status, f"DNS lookup for {name} failed: {exc}")

    def _gate(self, key: str) -> _Gate:
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = _Gate(SlowStart(self.dc.slow_start_initial, self.dc.per_destination))
        return gate

    async def _connections_for(self, destination: Destination, decision: Plan, jobs: list[_Job]) -> None:
        pending = deque(jobs)
        gate = self._gate(destination.key)
        gate.users += 1
        settings = self.smarthost_settings if destination.authenticate else self.settings
        # TLS-RPT counts sessions with a recipient domain's own MX hosts, except those that only
        # carry our own TLS reports (counting them would report on the reports, day after day).
        report = destination.kind == "mx" and destination.next_hop is None and \
            not all(j.work.message.envelope.tlsrpt for j in jobs)

        async def connection() -> None:
            while pending:
                await gate.acquire()
                slot: int | None = None
                try:
                    if not pending:
                        return
                    slot = await self._shared_slot(destination.key)
                    async with self._connections:
                        if not pending:
                            return
                        try:
                            session = await self._connect(decision, settings, report=report)
                        except _NoHost as exc:
                            gate.failure()
                            outcome = (RecipientOutcome("failed", exc.reply, exc.reply.split(" ", 1)[0])
                                       if exc.permanent else _deferral(exc.reply))
                            while pending:
                                job = pending.popleft()
                                self._set_missing(job, outcome, "none", exc.tls, exc.policy)
                            return
                        gate.success()
                        parked = False
                        try:
                            await self._send_over(session, pending)
                            parked = self._park(destination.key, session)
                        finally:
                            if not parked:
                                await session.close()
                finally:
                    gate.release()
                    if slot is not None:
                        await self._release_shared_slot(destination.key, slot)

        try:
            await asyncio.gather(*(connection() for _ in range(min(len(jobs), self.dc.per_destination))))
        finally:
            gate.users -= 1
            if gate.idle:
                self._gates.pop(destination.key, None)

    async def _shared_slot(self, key: str) -> int | None:
        """With a queue several nodes share, wait for one of the destination's `per_destination`
        connection slots counted across all of them; the local gate counts this node's only.
        None when the queue has one node (SQLite). A parked connection holds no slot, as it holds
        no gate: both limits count connections at work."""
        if not isinstance(self.queue, DestinationSlots):
            return None
        warned = False
        while True:
            try:
                slot = await self.queue.acquire_destination_slot(key, self.dc.per_destination, self.clock())
            except QueueError as exc:
                # The database is away: wait for it rather than connect beyond the limit (and then
                # be unable to record the result anyway).
                if not warned:
                    log.warning("%s: cannot take a shared connection slot, waiting: %s", key, exc)
                    warned = True
                slot = None
                await asyncio.sleep(1.0)
            if slot is not None:
                return slot
            await asyncio.sleep(SHARED_SLOT_POLL * (0.5 + self.rng.random()))

    async def _release_shared_slot(self, key: str, slot: int) -> None:
        assert isinstance(self.queue, DestinationSlots)
        try:
            await self.queue.release_destination_slot(key, slot)
        except QueueError as exc:  # the slot expires by itself
            log.warning("%s: cannot release a shared connection slot: %s", key, exc)

    # --- connection reuse ---

    def _park(self, key: str, session: Session) -> bool:
        """Keep an idle, healthy connection for the next message to the same host with the same
        TLS requirement; False when it should be closed instead."""
        if self._stopping.is_set() or not session.usable or session.client.in_transaction:
            return False
        if time.monotonic() - session.opened_at > PARK_MAX_AGE:
            return False
        slot = self._parked.setdefault((key, session.candidate), [])
        if len(slot) >= self.dc.per_destination:
            return False
        entry = _Parked(session, asyncio.get_running_loop().call_later(
            PARK_SECONDS, lambda: self._spawn(self._expire_parked(key, session))))
        slot.append(entry)
        return True

    def _unpark(self, key: str, decision: Plan) -> Session | None:
        # In the plan's order, so a parked connection to a worse MX never beats a better one's.
        for candidate in decision.candidates:
            slot = self._parked.get((key, candidate))
            while slot:
                entry = slot.pop()
                entry.timer.cancel()
                if entry.session.usable:
                    return entry.session
                entry.session.abort()
        return None

    async def _expire_parked(self, key: str, session: Session) -> None:
        slot = self._parked.get((key, session.candidate), [])
        for entry in slot:
            if entry.session is session:
                slot.remove(entry)
                await session.close()
                break
        if not slot:
            self._parked.pop((key, session.candidate), None)

    async def _close_parked(self) -> None:
        parked = [entry for slot in self._parked.values() for entry in slot]
        self._parked.clear()
        for entry in parked:
            entry.timer.cancel()
        await asyncio.gather(*(entry.session.close() for entry in parked), return_exceptions=True)

    async def _connect(self, decision: Plan, settings: AttemptSettings, *, report: bool = False) -> Session:
        reused = self._unpark(decision.destination.key, decision)
        if reused is not None:
            return reused
        last: AttemptError | None = None
        last_policy: str | None = None
        skipped: list[Candidate] = []
        refused_requiretls = 0  # hosts reached whose only fault is not offering REQUIRETLS
        for candidate in decision.candidates:
            if self.dead.is_dead(candidate.address, candidate.port, self.clock()):
                skipped.append(candidate)
                continue
            try:
                session = await Session.open(candidate, settings)
            except AttemptError as exc:
                error = exc
                if report:
                    self._tally(decision, candidate, exc.tls, exc.local_ip)
            else:
                if report:
                    self._tally(decision, candidate, session.tls, session.local_ip, session.peer_chain)
                return session
            log.info("%s: %s", decision.destination.key, error.reply)
            if error.dead:
                self.dead.mark(candidate.address, candidate.port, self.clock())
            if error.retry_plaintext:
                # Only with delivery.may_retry_plaintext: whoever broke the handshake may be the one
                # reading what follows, so the operator must be able to find every such retry.
                log.warning("%s: TLS DOWNGRADE: retrying %s without TLS after a failed handshake, because "
                            "delivery.may_retry_plaintext is true", decision.destination.key, candidate.relay)
                try:
                    return await Session.open(candidate, settings, plaintext=True)
                except AttemptError as exc:
                    log.info("%s: %s", decision.destination.key, exc.reply)
                    error = exc
                    if exc.dead:
                        self.dead.mark(candidate.address, candidate.port, self.clock())
            refused_requiretls += error.requiretls_refused
            last, last_policy = error, candidate.tls.level.value
        if last is not None:
            # RFC 8689 §4.2.1: when no MX offers REQUIRETLS the message is returned, not kept;
            # any other fault on the way (a host down, a failed handshake) leaves room to retry.
            tried = len(decision.candidates) - len(skipped)
            raise _NoHost(last.reply, last.tls, last_policy,
                          permanent=not skipped and refused_requiretls == tried)
        names = ", ".join(c.relay for c in skipped)
        raise _NoHost(f"4.4.1 all mail hosts were unreachable recently, not retried yet: {names}",
                      TlsOutcome())

    def _tally(self, decision: Plan, candidate: Candidate, tls: TlsOutcome, local_ip: str | None,
               chain: Sequence[bytes] = ()) -> None:
        """Count one new TLS session for TLS reporting; reused connections were counted when opened."""
        if self.tlsrpt is None or not (tls.active or tls.result_type):
            return  # no TLS was tried: a refused connection or a plaintext level is no TLS session
        try:
            self._count_session(self.tlsrpt, decision, candidate, tls, local_ip, chain)
        except Exception:  # a count is not worth a delivery
            log.exception("%s: TLS reporting could not count a session", decision.destination.key)

    def _count_session(self, tlsrpt: TlsReporter, decision: Plan, candidate: Candidate, tls: TlsOutcome,
                       local_ip: str | None, chain: Sequence[bytes]) -> None:
        domain = decision.destination.domain
        sts = tlsrpt.sts(domain)
        policy = policy_for(candidate, sts)
        result, reason = tls.result_type, tls.failure or ""
        if result is None and policy.type == "sts" and sts is not None and sts.policy is not None \
                and sts.policy.mode == "testing":
            # RFC 8461 §5: a testing policy delivers anyway, and reports what enforce would refuse.
            found = sts_testing_failure(sts.policy.mx, candidate.host, chain, self.config.mta_sts.ca_file)
            if found is not None:
                result, reason = found
        tlsrpt.session(domain, policy, result, mx_host=candidate.host, receiving_ip=candidate.address,
                       sending_ip=local_ip or "", reason=reason)

    def _tally_unusable(self, destination: Destination, facts: RouteFacts,
                        tlsa: Mapping[str, TlsaFacts] | None, decision: Plan) -> None:
        """Count the MX hosts ruled out before any connection: a failed or bogus TLSA lookup
        (dnssec-invalid), no secure TLSA records at level dane-only (dane-required), or a host an
        enforced MTA-STS policy does not list (validation-failure, RFC 8461 §4.1)."""
        if self.tlsrpt is None:
            return
        sts = self.tlsrpt.sts(destination.domain)
        enforced = sts.policy.mx if sts is not None and sts.policy is not None \
            and sts.policy.mode == "enforce" and destination.level is SecurityLevel.DANE else None
        planned = {c.host for c in decision.candidates}
        for host in facts.hosts:
            if host.name in planned:
                continue
            found = None if tlsa is None else tlsa.get(host.name)
            policy = ReportPolicy("tlsa", (), (host.name,))
            if found is not None and found.status == "bogus":
                self.tlsrpt.session(destination.domain, policy, "dnssec-invalid", mx_host=host.name,
                                    reason="TLSA lookup failed or is bogus")
            elif destination.level is SecurityLevel.DANE_ONLY and (found is None or not found.usable):
                self.tlsrpt.session(destination.domain, policy, "dane-required", mx_host=host.name,
                                    reason="level dane-only and no usable DNSSEC-secure TLSA records")
            elif sts is not None and enforced is not None and not any(sts_matches(p, host.name)
                                                                      for p in enforced):
                self.tlsrpt.session(destination.domain, policy_for_sts(sts), "validation-failure",
                                    mx_host=host.name, reason="not listed in the MTA-STS policy")

    async def _send_over(self, session: Session, pending: deque[_Job]) -> None:
        relay = session.candidate.relay
        while pending and session.usable:
            job = pending.popleft()
            if session.messages and not await session.reset():
                pending.appendleft(job)
                return
            try:
                out = await self._outbound(job)
                outcomes = await session.send(out)
            except CorruptMessage as exc:
                log.error("%s: not delivered: %s", job.work.message.id, exc)
                job.work.corrupt = True
                continue
            for address, outcome in outcomes.items():
                job.work.outcomes[address] = _Outcome(outcome, relay, session.tls, session.candidate.host,
                                                      session.candidate.tls.level.value)
            self._job_sent(job)
            if not session.usable:
                return

    async def _load(self, work: _Work) -> None:
        """Read what delivery needs from the content once per attempt: a small body whole, whether
        it is 8-bit, and whether the header says "TLS-Required: No"."""
        message = work.message
        async with work.lock:
            if work.eightbit is not None:
                return
            # BODY=8BITMIME follows the content, not the client's claim: a client may send
            # 8-bit data without it, and 7-bit content declared 8BITMIME can still go to a
            # server without 8BITMIME.
            if message.size <= INLINE_BODY:
                work.body = b"".join([chunk async for chunk in await self.queue.open_body(message.id)])
                work.eightbit = not work.body.isascii()
                work.tls_optional = tls_required_no(work.body)
                return
            eightbit, head, need_head = False, b"", True
            async for chunk in await self.queue.open_body(message.id):
                if need_head:
                    head += chunk
                    need_head = b"\r\n\r\n" not in head and len(head) < INLINE_BODY
                eightbit = eightbit or not chunk.isascii()
                if eightbit and not need_head:
                    break
            work.eightbit, work.tls_optional = eightbit, tls_required_no(head)

    async def _outbound(self, job: _Job) -> OutboundMessage:
        work = job.work
        message = work.message
        await self._load(work)
        eightbit = bool(work.eightbit)
        if work.body is not None:
            return OutboundMessage(message, job.recipients, work.body, eightbit)

        async def stream() -> AsyncIterator[bytes]:
            async for chunk in await self.queue.open_body(message.id):
                yield chunk

        return OutboundMessage(message, job.recipients, stream, eightbit)

    # --- local ---

    async def _deliver_local(self, jobs: list[_Job]) -> None:
        if self.local is None:
            for job in jobs:
                self._set_missing(job, _deferral("4.3.0 local delivery is not available"), "local")
            return
        for job in jobs:
            async with self._local_slots:
                try:
                    out = await self._outbound(job)
                    body = out.body if isinstance(out.body, bytes) else b"".join(
                        [chunk async for chunk in out.body()])
                except CorruptMessage as exc:
                    log.error("%s: not delivered: %s", job.work.message.id, exc)
                    job.work.corrupt = True
                    continue
                addresses = [r.address for r in job.recipients]
                results = await self.local.deliver(job.work.message, body, addresses)
                for r in job.recipients:
                    result = results.get(r.address)
                    if result is None:
                        result = LocalResult(_deferral("4.3.0 no result from local delivery"), "local")
                    job.work.outcomes[r.address] = _Outcome(result.outcome, result.relay, TlsOutcome())

    # --- results ---

    async def _finish(self, work: _Work) -> None:
        """Record a message's results once. If this is cancelled (stop() ran out of patience),
        the work stays listed and stop() records it again: a repeated notification is better
        than a lease left to expire."""
        if work.finished:
            return
        try:
            await self._record(work)
        except Exception:
            log.exception("%s: recording the results failed; the message will be retried", work.message.id)
        work.finished = True
        self._works.pop(work.message.id, None)
        self._changed.set()

    async def _record(self, work: _Work) -> None:
        message = work.message
        if work.lost or work.corrupt:
            return
        now = self.clock()
        states = {s.recipient.address: s for s in message.recipients}
        settled: dict[str, tuple[Settled, _Outcome]] = {}
        for address, o in work.outcomes.items():
            state = states.get(address)
            if state is None or state.is_final:
                continue
            settled[address] = (settle(state, o.outcome, arrived_at=message.envelope.received_at,
                                       now=now, dc=self.dc, jitter=self.rng.random(),
                                       remote_mta=o.remote_mta), o)
        reports = [s.report for s, _ in settled.values() if s.report is not None]
        if reports and not await self._notify(message, reports, now):
            # Without its bounce a failure must not be final: retry it, and the bounce, later.
            for address, (s, o) in list(settled.items()):
                if s.result.status == "failed":
                    retry = RecipientResult("deferred", s.result.reply, now + self.dc.retry_initial)
                    settled[address] = (Settled(retry, None, "deferred", s.enhanced), o)
        results = {address: replace(s.result, tls=o.verdict()) for address, (s, o) in settled.items()}
        for attempt in range(RECORD_RETRIES + 1):
            try:
                await self.queue.record_attempt(message.id, self.owner, results, now)
                break
            except LeaseLost:
                log.warning("%s: lease lost before the results were recorded; another worker retries it",
                            message.id)
                return
            except CorruptMessage as exc:
                log.error("%s: %s", message.id, exc)
                return
            except QueueError as exc:
                # A full disk or a busy database passes. The mail has gone already: trying to record
                # it again (the lease is renewed meanwhile) beats sending it again after the lease.
                if attempt == RECORD_RETRIES or self._stopping.is_set():
                    log.error("%s: results not recorded, the message will be retried: %s", message.id, exc)
                    return
                delay = RECORD_RETRY_FIRST * 2 ** attempt
                log.warning("%s: results not recorded yet, trying again in %.1fs: %s", message.id, delay, exc)
                await asyncio.sleep(delay)
        for address, (s, o) in settled.items():
            emit(DeliveryResult(queue_id=message.id, to=address, relay=o.relay,
                                delay=max(0.0, now - message.envelope.received_at), tls=o.tls.summary(),
                                tls_result=o.tls_result(), dsn=s.enhanced, status=_STATUS[s.result.status],
                                expired=s.status_word == "expired", reply=s.result.reply))

    async def _notify(self, message: StoredMessage, reports: list[RecipientReport], now: float) -> bool:
        """Queue the notification for `reports`; False only if one was due and could not be queued."""
        env = message.envelope
        if env.sender == "" or not any(wanted(r.recipient.dsn_notify, r.action) for r in reports):
            return True
        try:
            full = returns_whole_message(env) and any(r.action == "failed" for r in reports)
            original = await self._original(message, whole=full)
            dsn = build_dsn(envelope=env, message_id_of_original=message_id_of(original), reports=reports,
                            original=original, reporting_mta=self.config.hostname, postmaster=self.postmaster,
                            now=now, queue_id=message.id)
            if dsn is None:
                return True
            envelope = Envelope(sender="", client_ip="127.0.0.1", client_helo=self.config.hostname,
                                listener="bounce", received_at=now, smtputf8=dsn.smtputf8,
                                body_type=dsn.body_type, requiretls=dsn.requiretls)
            async with await self.queue.begin(envelope) as txn:
                await txn.add_rcpt(Recipient(dsn.recipient))
                await txn.write_body(dsn.data)
                dsn_id = await txn.commit()
        except (QueueError, ValueError) as exc:
            log.error("%s: cannot queue the delivery status notification: %s", message.id, exc)
            return False
        emit(NotificationQueued(queue_id=message.id, kind=dsn.kind, notification_id=dsn_id))
        return True

    async def _original(self, message: StoredMessage, *, whole: bool) -> bytes:
        parts: list[bytes] = []
        size = 0
        async for chunk in await self.queue.open_body(message.id):
            parts.append(chunk)
            size += len(chunk)
            if not whole and b"\r\n\r\n" in b"".join(parts[-2:]):
                break
            if not whole and size > INLINE_BODY:
                break
        data = b"".join(parts)
        if not whole:
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                data = data[: end + 4]
        return data


_STATUS: dict[ResultStatus, DeliveryStatus] = {"delivered": "delivered", "deferred": "deferred",
                                               "failed": "bounced"}


def _deferral(reply: str) -> RecipientOutcome:
    status = reply.split(" ", 1)[0]
    return RecipientOutcome("deferred", reply, status if re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", status)
                            else "4.0.0")
