"""The message queue: the model every part of mailward shares, and the `Queue` protocol.

The queue is the centre of the MTA (DESIGN principle 1): inbound writes into it, delivery leases
from it, reports travel through it, and nothing else holds shared state. This module owns the
vocabulary only: the frozen records, the errors and the protocol a backend implements. It knows
nothing about SQL, so the embedded SQLite backend (`mailward.queue.sqlite`) and a later
PostgreSQL backend present the same surface to `inbound` and `delivery`.

It is hand-written rather than borrowed from a job-queue library because its contract is the
product's promise: `Transaction.commit()` returns only once the envelope, recipients and body are
on disk (principle 5, RFC 5321 section 6.1), and a stored body is verified before any of it leaves.
"""

from __future__ import annotations

import builtins
import json
import random
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Literal, Protocol, Self, get_args, runtime_checkable

__all__ = [
    "BodyType",
    "CorruptMessage",
    "DestinationSlots",
    "DsnRet",
    "Envelope",
    "LeaseLost",
    "MessageNotFound",
    "Queue",
    "QueueError",
    "QueueFull",
    "Recipient",
    "RecipientResult",
    "RecipientState",
    "RecipientStatus",
    "ResultStatus",
    "StoredMessage",
    "StsPolicyRecord",
    "TlsFacts",
    "TlsRptTally",
    "TlsTrust",
    "TlsVerdict",
    "Transaction",
    "after_attempt",
    "attempt_target",
    "new_queue_id",
]

BodyType = Literal["7BIT", "8BITMIME", "BINARYMIME"]
DsnRet = Literal["FULL", "HDRS"]
RecipientStatus = Literal["queued", "deferred", "delivered", "failed", "held"]
ResultStatus = Literal["delivered", "deferred", "failed"]

DSN_NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY", "NEVER"})
FINAL_STATUSES: frozenset[str] = frozenset({"delivered", "failed"})

# Envelope strings end up in logs, Received: headers and DSNs; a line break in one is an injection.
_FORBIDDEN = frozenset("\r\n\0")


def _check_clean(name: str, value: str | None) -> None:
    if value is not None and not _FORBIDDEN.isdisjoint(value):
        raise ValueError(f"{name} contains CR, LF or NUL")


# --- errors ---------------------------------------------------------------------------------------


class QueueError(Exception):
    """The queue could not do what was asked; temporary. The server answers 451 4.3.0."""


class QueueFull(QueueError):
    """Storage is full or failing (disk full, quota); temporary, 451 4.3.0 like any QueueError."""


class CorruptMessage(QueueError):
    """A stored record is torn or does not match its recorded length and digest.

    The backend has already held the message for the operator and logged it on "mailward.queue";
    the message is never delivered in this state.
    """

    def __init__(self, message_id: str, detail: str) -> None:
        super().__init__(f"message {message_id} is corrupt: {detail}")
        self.message_id = message_id
        self.detail = detail


class MessageNotFound(QueueError):
    """No message with this id (never existed, delivered, or deleted)."""

    def __init__(self, message_id: str) -> None:
        super().__init__(f"message {message_id} is not in the queue")
        self.message_id = message_id


class LeaseLost(QueueError):
    """The caller no longer holds the lease: it expired and another worker took it, or the message
    was deleted. The caller must stop working on the message and must not report results for it."""

    def __init__(self, message_id: str, owner: str) -> None:
        super().__init__(f"{owner} does not hold the lease on message {message_id}")
        self.message_id = message_id
        self.owner = owner


# --- queue ids ------------------------------------------------------------------------------------

# Crockford base32: no I, L, O, U, so ids survive being read aloud or copied from a log by hand.
_ID_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ID_RANDOM_BITS = 24
_ID_CHARS = 14  # 70 bits: 46 bits of milliseconds (until year 4199) + 24 bits


class _IdClock:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0

    def next(self, now: float) -> int:
        # The low bits start at a random value, not zero, so two processes (the daemon and a
        # sendmail command, or two nodes of a shared queue) almost never meet; within one process
        # the value only grows, so ids are unique and sort by time even if the clock steps back.
        # Ids are not secrets, so the fast generator will do (it is reseeded in forked children).
        candidate = (int(now * 1000) << _ID_RANDOM_BITS) | random.getrandbits(_ID_RANDOM_BITS)
        with self._lock:
            value = max(candidate, self._last + 1)
            self._last = value
        return value


_ID_CLOCK = _IdClock()


def new_queue_id(now: float | None = None) -> str:
    """A 14-character, time-ordered, log-friendly queue id, e.g. ``"0PJ2M3W9K1X7QF"``."""
    value = _ID_CLOCK.next(time.time() if now is None else now)
    chars = []
    for _ in range(_ID_CHARS):
        chars.append(_ID_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


# --- model ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsFacts:
    """What the inbound TLS session negotiated, for Received: and REQUIRETLS decisions."""

    version: str
    cipher: str
    bits: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """Everything known about a message at MAIL FROM time, as the session accepted it."""

    sender: str  # "" is the null reverse path (bounces)
    client_ip: str
    client_helo: str
    listener: str  # e.g. "mx", "submission", "submissions"
    received_at: float  # epoch seconds
    smtputf8: bool = False
    body_type: BodyType = "7BIT"
    size_hint: int | None = None  # the SIZE= parameter; the stored size is authoritative
    dsn_ret: DsnRet | None = None
    dsn_envid: str | None = None
    requiretls: bool = False
    auth_user: str | None = None
    tls: TlsFacts | None = None
    # A TLS report (RFC 8460) mailward itself queued: its sessions are not counted in the next
    # report, which would otherwise report on its own delivery day after day.
    tlsrpt: bool = False

    def __post_init__(self) -> None:
        if self.body_type not in get_args(BodyType):
            raise ValueError(f"body_type must be one of {get_args(BodyType)}, not {self.body_type!r}")
        if self.dsn_ret is not None and self.dsn_ret not in get_args(DsnRet):
            raise ValueError(f"dsn_ret must be FULL, HDRS or None, not {self.dsn_ret!r}")
        if self.size_hint is not None and self.size_hint < 0:
            raise ValueError("size_hint must not be negative")
        for name in ("sender", "client_ip", "client_helo", "listener", "dsn_envid", "auth_user"):
            _check_clean(name, getattr(self, name))

    def to_json(self) -> str:
        """A stable JSON form for storage; `from_json` reads it back."""
        data: dict[str, Any] = {
            "v": 1,
            "sender": self.sender,
            "client_ip": self.client_ip,
            "client_helo": self.client_helo,
            "listener": self.listener,
            "received_at": self.received_at,
            "smtputf8": self.smtputf8,
            "body_type": self.body_type,
            "size_hint": self.size_hint,
            "dsn_ret": self.dsn_ret,
            "dsn_envid": self.dsn_envid,
            "requiretls": self.requiretls,
            "auth_user": self.auth_user,
            "tls": None
            if self.tls is None
            else {"version": self.tls.version, "cipher": self.tls.cipher, "bits": self.tls.bits},
        }
        if self.tlsrpt:
            data["tlsrpt"] = True  # only when set, so older readers see the envelopes they know
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Envelope:
        """Parse `to_json` output; ValueError if it is not exactly that shape."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("v") != 1:
                raise ValueError("unknown envelope format")
            tls = data["tls"]
            facts = None
            if tls is not None:
                facts = TlsFacts(
                    version=_typed(tls["version"], str),
                    cipher=_typed(tls["cipher"], str),
                    bits=_typed(tls["bits"], int),
                )
            return cls(
                sender=_typed(data["sender"], str),
                client_ip=_typed(data["client_ip"], str),
                client_helo=_typed(data["client_helo"], str),
                listener=_typed(data["listener"], str),
                received_at=float(_typed(data["received_at"], (int, float))),
                smtputf8=_typed(data["smtputf8"], bool),
                body_type=data["body_type"],
                size_hint=_optional(data["size_hint"], int),
                dsn_ret=data["dsn_ret"],
                dsn_envid=_optional(data["dsn_envid"], str),
                requiretls=_typed(data["requiretls"], bool),
                auth_user=_optional(data["auth_user"], str),
                tls=facts,
                tlsrpt=_typed(data.get("tlsrpt", False), bool),
            )
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed envelope: {exc}") from exc


def _typed(value: Any, kind: type[Any] | tuple[type[Any], ...]) -> Any:
    # bool is an int subclass; a stored flag must not pass as a count or the reverse.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise TypeError(f"unexpected {type(value).__name__} {value!r}")
    return value


def _optional(value: Any, kind: type[Any]) -> Any:
    return None if value is None else _typed(value, kind)


@dataclass(frozen=True, slots=True)
class Recipient:
    """One RCPT TO as accepted, with its DSN parameters (RFC 3461)."""

    address: str
    dsn_notify: frozenset[str] = frozenset()  # empty: the default (FAILURE, and DELAY at our choice)
    dsn_orcpt: str | None = None  # "addr-type;address", the address already decoded from xtext

    def __post_init__(self) -> None:
        _check_clean("address", self.address)
        _check_clean("dsn_orcpt", self.dsn_orcpt)
        unknown = self.dsn_notify - DSN_NOTIFY_VALUES
        if unknown:
            raise ValueError(f"unknown NOTIFY value(s): {', '.join(sorted(unknown))}")
        if "NEVER" in self.dsn_notify and len(self.dsn_notify) > 1:
            raise ValueError("NOTIFY=NEVER cannot be combined with other values")


TlsTrust = Literal["Verified", "Trusted", "Untrusted", "Anonymous"]


_TRUST: dict[object, TlsTrust] = {"Verified": "Verified", "Trusted": "Trusted", "Untrusted": "Untrusted",
                                  "Anonymous": "Anonymous"}


def _trust(value: object) -> TlsTrust | None:
    if value is None:
        return None
    if value not in _TRUST:
        raise TypeError(f"trust {value!r} is not one of {', '.join(_TRUST.values())}")
    return _TRUST[value]


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsVerdict:
    """The TLS of one outbound delivery attempt, kept per recipient for `queue list` and reports.

    Stored as a JSON object. Readers ignore keys they do not know, so later verdicts (the MTA-STS
    policy id, say) can add fields without a schema change; `trust` and `dane` came that way, and
    a verdict stored without `trust` reads as Verified or Untrusted from `verified`.
    """

    protocol: str | None = None  # e.g. "TLSv1.3"; None: the attempt ran without TLS
    cipher: str | None = None
    verified: bool = False  # the peer was authenticated as `policy` asks (PKIX or DANE)
    policy: str | None = None  # the effective security level: "none", "may", "encrypt", "verify", ...
    failure: str | None = None  # why TLS was not used, or how it failed
    trust: TlsTrust | None = None  # what the certificate proved (see `outcome`); None without TLS
    dane: str | None = None  # usage, selector and matching type of the TLSA record that matched

    def __post_init__(self) -> None:
        if self.trust is None and self.protocol is not None:
            # A verdict stored before `trust` existed says as much as `verified` does.
            object.__setattr__(self, "trust", "Verified" if self.verified else "Untrusted")

    @property
    def outcome(self) -> str:
        """Postfix's word for the connection: Verified (PKIX or DANE authenticated the peer),
        Trusted (the chain leads to a trusted CA, names not checked), Untrusted, Anonymous (no
        certificate), or plaintext."""
        return "plaintext" if self.protocol is None or self.trust is None else self.trust

    def summary(self) -> str:
        """As the delivery log writes it: ``Verified TLSv1.3/TLS_AES_256_GCM_SHA384 (dane 3 1 1)``,
        ``Verified ... (pkix)``, ``Untrusted TLSv1.3/TLS_AES_256_GCM_SHA384`` or ``plaintext``."""
        word = self.outcome
        if self.protocol is None:
            return word
        text = f"{word} {self.protocol}/{self.cipher}"
        if word == "Verified":
            text += f" (dane {self.dane})" if self.dane else " (pkix)"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "cipher": self.cipher, "verified": self.verified,
                "policy": self.policy, "failure": self.failure, "trust": self.trust, "dane": self.dane}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> TlsVerdict:
        """Parse `to_json` output (or a later version's); ValueError if a known key is malformed."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise TypeError("not an object")
            return cls(
                protocol=_optional(data.get("protocol"), str),
                cipher=_optional(data.get("cipher"), str),
                verified=_typed(data.get("verified", False), bool),
                policy=_optional(data.get("policy"), str),
                failure=_optional(data.get("failure"), str),
                trust=_trust(data.get("trust")),
                dane=_optional(data.get("dane"), str),
            )
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed TLS verdict: {exc}") from exc


@dataclass(frozen=True, slots=True)
class StsPolicyRecord:
    """An MTA-STS policy (RFC 8461) as the queue keeps it: the queue is where state that must
    survive restarts and be shared by nodes lives, and §10.2 asks for a persistent cache."""

    domain: str
    id: str  # the TXT record id it was fetched under
    text: str  # the policy as served; parsed again when read, so a damaged row is never trusted
    fetched_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class TlsRptTally:
    """A count of outbound TLS sessions for TLS reporting (RFC 8460), as the queue keeps it.

    Sessions with the same day, policy and (for failures) the same failure detail add up in one
    row; `result_type` "" counts successful sessions. The queue keeps tallies because every node
    that shares a queue reports together, and a restart must not lose the day.
    """

    day: str  # the UTC day, YYYY-MM-DD
    domain: str  # the policy domain: the recipient domain
    policy_type: str  # tlsa | sts | no-policy-found
    policy_strings: tuple[str, ...] = ()
    mx_hosts: tuple[str, ...] = ()
    result_type: str = ""  # "" for successful sessions, else an RFC 8460 §4.3 result type
    sending_ip: str = ""
    receiving_mx: str = ""
    receiving_ip: str = ""
    reason_code: str = ""  # failure-reason-code
    information: str = ""  # additional-information
    count: int = 1


@dataclass(frozen=True, slots=True)
class RecipientState:
    """A recipient and where its delivery stands.

    Backends store queued, deferred, delivered or failed. "held" is how a pending recipient is
    reported while its message is held, so a listing shows why it is not moving; releasing the
    message shows the stored status again.
    """

    recipient: Recipient
    status: RecipientStatus
    attempts: int = 0
    next_attempt_at: float | None = None  # None once final
    last_reply: str | None = None
    last_attempt_at: float | None = None
    tls: TlsVerdict | None = None  # of the last attempt; None before one, or when none was made

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """The outcome of one delivery attempt for one recipient."""

    status: ResultStatus
    reply: str  # the remote reply (or our own diagnosis) for logs and DSNs
    next_attempt_at: float | None = None  # required for "deferred", absent otherwise
    tls: TlsVerdict | None = None  # None when no connection got as far as TLS (local, DNS failure)

    def __post_init__(self) -> None:
        if self.status not in get_args(ResultStatus):
            raise ValueError(f"status must be delivered, deferred or failed, not {self.status!r}")
        if (self.status == "deferred") != (self.next_attempt_at is not None):
            raise ValueError("next_attempt_at is required for deferred results and only for them")


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A committed message as the queue holds it (the body is read with `Queue.open_body`)."""

    id: str
    envelope: Envelope
    recipients: tuple[RecipientState, ...]
    size: int  # bytes of body
    digest: str  # sha256 hex of the body
    created_at: float
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    held: bool = False
    hold_reason: str | None = None  # "operator", or what made the message corrupt

    @property
    def pending(self) -> tuple[RecipientState, ...]:
        """Recipients not yet delivered or failed."""
        return tuple(r for r in self.recipients if not r.is_final)

    @property
    def next_attempt_at(self) -> float | None:
        due = [r.next_attempt_at for r in self.pending if r.next_attempt_at is not None]
        return min(due) if due else None


# --- protocols ------------------------------------------------------------------------------------


def attempt_target(
    found: Sequence[StoredMessage | CorruptMessage], id: str, owner: str,
    results: Mapping[str, RecipientResult],
) -> tuple[StoredMessage, dict[str, int]]:
    """What every backend checks before it records an attempt, before its first write (so a
    refusal needs no undo): the message still exists, is readable and leased by `owner`, and each
    result names one of its recipients that is not final yet. Returns the message and each
    recipient's position. Raises LeaseLost, the CorruptMessage read, or ValueError."""
    if not found:
        raise LeaseLost(id, owner)
    message = found[0]
    if isinstance(message, CorruptMessage):
        raise message
    if message.lease_owner != owner:
        raise LeaseLost(id, owner)
    seq_of = {r.recipient.address: seq for seq, r in enumerate(message.recipients)}
    for address in results:
        if address not in seq_of:
            raise ValueError(f"{address!r} is not a recipient of message {id}")
        state = message.recipients[seq_of[address]]
        if state.is_final:
            raise ValueError(f"recipient {address!r} of message {id} is already {state.status}")
    return message, seq_of


def after_attempt(message: StoredMessage, results: Mapping[str, RecipientResult], now: float
                   ) -> StoredMessage:
    """The message as record_attempt leaves it (lease released), worked out from the row it read
    and locked rather than read back: the same decoding rules as both backends', one read fewer."""
    recipients = []
    for state in message.recipients:
        result = results.get(state.recipient.address)
        if result is not None:
            held = message.held and result.status not in FINAL_STATUSES
            state = RecipientState(recipient=state.recipient, status="held" if held else result.status,
                                   attempts=state.attempts + 1, next_attempt_at=result.next_attempt_at,
                                   last_reply=result.reply, last_attempt_at=now, tls=result.tls)
        recipients.append(state)
    return replace(message, recipients=tuple(recipients), lease_owner=None, lease_expires_at=None)


class Transaction(Protocol):
    """One message being received. Abort unless committed; usable as ``async with``."""

    @property
    def id(self) -> str:
        """The queue id the message will have; known from the start so session logs can use it."""
        ...

    @property
    def envelope(self) -> Envelope: ...

    @property
    def size(self) -> int:
        """Body bytes written so far (for the server's SIZE limit)."""
        ...

    async def add_rcpt(self, recipient: Recipient) -> None:
        """Add a recipient; an exact duplicate address is ignored (delivered once)."""
        ...

    async def write_body(self, chunk: bytes) -> None:
        """Append body bytes; memory use stays bounded whatever the message size."""
        ...

    async def commit(self) -> str:
        """Store the message; returns its id only once envelope, recipients and body are durable."""
        ...

    async def abort(self) -> None:
        """Leave nothing behind. Idempotent; safe after a failed or cancelled commit."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class Queue(Protocol):
    """The durable queue, as `inbound`, `delivery`, `reports` and the CLI use it.

    Times are epoch seconds passed in by the caller where the caller schedules (lease, renew,
    record_attempt), so the deliverer and its tests own the clock.
    """

    async def begin(self, envelope: Envelope) -> Transaction: ...

    async def lease(
        self, owner: str, now: float, limit: int, lease_seconds: float
    ) -> builtins.list[StoredMessage]:
        """Atomically claim up to `limit` due, unheld messages whose lease is free or expired."""
        ...

    async def renew(self, id: str, owner: str, lease_seconds: float, now: float) -> float:
        """Extend a lease held by `owner`; returns the new expiry. Raises LeaseLost."""
        ...

    async def open_body(self, id: str) -> AsyncIterator[bytes]:
        """Stream a stored body. Raises CorruptMessage (before the last chunk is handed out) if
        the stored bytes do not match the recorded length and digest."""
        ...

    async def record_attempt(
        self, id: str, owner: str, results: Mapping[str, RecipientResult], now: float
    ) -> StoredMessage | None:
        """Apply per-recipient results (keyed by address) and release the lease. Returns the
        updated message, or None when every recipient is final and the message was removed."""
        ...

    async def retry(self, ids: Sequence[str] | None, now: float) -> int:
        """Make every pending recipient of the messages `ids` (None: of every message) due at `now`,
        without counting an attempt; held messages are left alone. Returns how many messages are
        now due, or already in delivery (an operator's `queue retry`, or `queue flush`)."""
        ...

    async def hold(self, id: str) -> bool:
        """Stop delivering a message until released; False if there is no such message."""
        ...

    async def release(self, id: str) -> bool:
        """Undo `hold`; False if there is no such message."""
        ...

    async def delete(self, id: str) -> bool:
        """Remove a message and its body; False if there is no such message."""
        ...

    async def get(self, id: str) -> StoredMessage | None: ...

    async def list(self, limit: int = 100, after: str | None = None) -> builtins.list[StoredMessage]:
        """Messages in id (that is, arrival) order, starting after the id `after`."""
        ...

    async def count(self) -> int: ...

    async def oldest_age(self, now: float) -> float:
        """Seconds since the oldest message was committed; 0.0 for an empty queue."""
        ...

    async def next_due(self) -> float | None:
        """When the earliest unheld message is next due, so an idle deliverer knows how long to
        sleep; None if nothing is waiting."""
        ...

    async def wait_for_work(self, timeout: float | None) -> bool:
        """Wait until a commit, release or retry may have made work, including one made by another
        process (the `mailward queue` tool); False if `timeout` passed first."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class DestinationSlots(Protocol):
    """Connection slots per destination shared by every node of a shared queue (PostgreSQL), so
    `delivery.per_destination` holds across nodes, not per node. The embedded queue has one node
    and does not implement it; the Deliverer's own gates suffice there."""

    async def acquire_destination_slot(self, destination: str, limit: int, now: float) -> int | None:
        """Take one of `limit` slots of `destination`; its number, or None when all are taken."""
        ...

    async def release_destination_slot(self, destination: str, slot: int) -> None: ...
