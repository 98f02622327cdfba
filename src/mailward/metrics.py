"""The event vocabulary: every session and delivery fact worth a log line or a metric is one typed
event, and `emit(event)` turns it into both. It decides nothing.

One event, one log line: its text in the human format (the words Postfix operators know, such as
``to=<bob@example.org>, relay=..., status=sent``), or one JSON object with the event's name and
typed fields when `log.format = "json"`. The same event moves the Prometheus metrics of every
attached `Metrics` (normally one per process, attached by the service while it runs); each keeps its
own `CollectorRegistry`, so several can live in one process, as in tests.

`MetricsEndpoint` serves them at /metrics over plain HTTP from the service's own event loop, so it
starts and stops with the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

__all__ = [
    "TLS_RESULTS",
    "AuthResult",
    "Connected",
    "ConnectionRefused",
    "DeliveryResult",
    "DeliveryStatus",
    "Disconnected",
    "DnsLookup",
    "Event",
    "JsonFormatter",
    "MessageAccepted",
    "MessageRefused",
    "Metrics",
    "MetricsEndpoint",
    "NotificationQueued",
    "QueueSize",
    "TlsEstablished",
    "TlsFailed",
    "TlsHandshake",
    "TlsResult",
    "emit",
]

# How a recipient's delivery attempt went, as far as transport security is concerned:
# authenticated by DANE; authenticated by PKIX (MTA-STS, or a verify/secure policy); TLS without
# authentication; no TLS; or not delivered because the TLS the policy demands could not be had.
TlsResult = Literal["dane_verified", "sts_verified", "opportunistic", "plaintext", "deferred_policy"]
TLS_RESULTS: tuple[TlsResult, ...] = ("dane_verified", "sts_verified", "opportunistic", "plaintext",
                                      "deferred_policy")
DeliveryStatus = Literal["delivered", "deferred", "bounced"]


# --- the events -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """One fact. `name` is its JSON `event` value; `text()` its human log line (without the prefix
    the log format adds)."""

    name: ClassVar[str] = "event"
    logger: ClassVar[str] = "mailward"
    level: ClassVar[int] = logging.INFO

    def text(self) -> str:
        raise NotImplementedError

    def severity(self) -> int:
        return self.level

    def fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __str__(self) -> str:
        return self.text()


@dataclass(frozen=True, slots=True, kw_only=True)
class _SessionEvent(Event):
    logger: ClassVar[str] = "mailward.inbound"

    listener: str
    client: str

    @property
    def prefix(self) -> str:
        return f"{self.listener}[{self.client}]:"


@dataclass(frozen=True, slots=True, kw_only=True)
class Connected(_SessionEvent):
    name: ClassVar[str] = "connect"

    def text(self) -> str:
        return f"{self.prefix} connect"


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionRefused(_SessionEvent):
    name: ClassVar[str] = "connection_refused"
    level: ClassVar[int] = logging.WARNING

    reason: str

    def text(self) -> str:
        return f"{self.listener}: refused connection from {self.client}: {self.reason}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Disconnected(_SessionEvent):
    name: ClassVar[str] = "disconnect"

    seconds: float
    tls_version: str | None  # None: the session never had TLS

    def text(self) -> str:
        return f"{self.prefix} disconnect after {self.seconds:.1f}s"


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsEstablished(_SessionEvent):
    name: ClassVar[str] = "tls"

    version: str
    cipher: str
    seconds: float  # the handshake's duration

    def text(self) -> str:
        return f"{self.prefix} TLS {self.version} {self.cipher}"


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsFailed(_SessionEvent):
    name: ClassVar[str] = "tls_failed"

    reason: str
    seconds: float

    def text(self) -> str:
        return f"{self.prefix} TLS handshake failed: {self.reason}"


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthResult(_SessionEvent):
    name: ClassVar[str] = "auth"

    user: str | None  # the login name; None when the client never gave one
    ok: bool
    reason: str = ""

    def severity(self) -> int:
        return logging.INFO if self.ok else logging.WARNING

    def text(self) -> str:
        if self.ok:
            return f"{self.prefix} AUTH {self.user} ok"
        return f"{self.prefix} AUTH failed for {self.user or '?'}: {self.reason}"


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageAccepted(_SessionEvent):
    name: ClassVar[str] = "accepted"

    queue_id: str
    sender: str
    nrcpt: int
    size: int
    tls_version: str | None

    def text(self) -> str:
        tls = f" tls={self.tls_version}" if self.tls_version else ""
        return f"{self.prefix} {self.queue_id}: from=<{self.sender}> nrcpt={self.nrcpt} size={self.size}{tls}"


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageRefused(_SessionEvent):
    name: ClassVar[str] = "refused"
    level: ClassVar[int] = logging.WARNING

    reason: str

    def text(self) -> str:
        return f"{self.prefix} message refused: {self.reason}"


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryResult(Event):
    """One recipient's attempt, with what Postfix's delivery line carries and the TLS verdict."""

    name: ClassVar[str] = "delivery"
    logger: ClassVar[str] = "mailward.delivery"

    queue_id: str
    to: str
    relay: str  # host[address]:port, "local", "lmtp[...]" or "none"
    delay: float  # seconds since the message arrived
    tls: str  # Postfix's words: "Verified TLSv1.3/... (dane 3 1 1)", "Untrusted ...", "plaintext"
    tls_result: TlsResult | None  # None: no SMTP host was reached (local delivery, DNS failure)
    dsn: str  # enhanced status code
    status: DeliveryStatus
    expired: bool = False  # bounced because the message outlived delivery.max_lifetime
    reply: str

    def text(self) -> str:
        word = {"delivered": "sent", "deferred": "deferred", "bounced": "expired" if self.expired
                else "bounced"}[self.status]
        return (f"{self.queue_id}: to=<{self.to}>, relay={self.relay}, delay={self.delay:.1f}, "
                f"tls={self.tls}, dsn={self.dsn}, status={word} ({self.reply})")


@dataclass(frozen=True, slots=True, kw_only=True)
class NotificationQueued(Event):
    name: ClassVar[str] = "notification"
    logger: ClassVar[str] = "mailward.delivery"

    queue_id: str
    kind: Literal["failure", "delay", "success"]
    notification_id: str

    def text(self) -> str:
        word = {"failure": "non-delivery", "delay": "delay", "success": "delivery status"}[self.kind]
        return f"{self.queue_id}: sender {word} notification: {self.notification_id}"


@dataclass(frozen=True, slots=True, kw_only=True)
class DnsLookup(Event):
    name: ClassVar[str] = "dns"
    logger: ClassVar[str] = "mailward.delivery"
    level: ClassVar[int] = logging.DEBUG

    query: str  # e.g. "MX example.org"
    rdtype: str
    seconds: float
    ok: bool

    def text(self) -> str:
        return f"DNS {self.query}: {'answered' if self.ok else 'failed'} in {self.seconds * 1000:.1f} ms"


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsHandshake(Event):
    """An outbound handshake (inbound ones are TlsEstablished and TlsFailed)."""

    name: ClassVar[str] = "tls_handshake"
    logger: ClassVar[str] = "mailward.delivery"
    level: ClassVar[int] = logging.DEBUG

    relay: str
    seconds: float
    ok: bool

    def text(self) -> str:
        how = "done" if self.ok else "failed"
        return f"TLS handshake with {self.relay} {how} in {self.seconds * 1000:.1f} ms"


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueSize(Event):
    name: ClassVar[str] = "queue"
    logger: ClassVar[str] = "mailward.queue"
    level: ClassVar[int] = logging.DEBUG

    messages: int
    oldest_age: float

    def text(self) -> str:
        return f"queue: {self.messages} message(s), oldest {self.oldest_age:.0f}s"


# --- emitting -------------------------------------------------------------------------------------

_attached: list[Metrics] = []


def emit(event: Event) -> None:
    """Log `event` as one line and count it in every attached `Metrics`."""
    logger = logging.getLogger(event.logger)
    level = event.severity()
    if logger.isEnabledFor(level):
        # The event itself is the message: str() gives the human text, JsonFormatter its fields.
        logger.log(level, event)
    for metrics in _attached:
        metrics.record(event)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event, message, then the event's fields.

    Plain log calls become `"event": "log"` with only the message, so every line parses.
    """

    def format(self, record: logging.LogRecord) -> str:
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {
            "time": f"{when}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        event = record.msg if isinstance(record.msg, Event) else None
        out["event"] = event.name if event is not None else "log"
        out["message"] = record.getMessage()
        if event is not None:
            for key, value in event.fields().items():
                out.setdefault(key, value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


# --- Prometheus -----------------------------------------------------------------------------------

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The process's counters, gauges and histograms in a registry of their own."""

    def __init__(self) -> None:
        # No `_created` series beside every counter: a restart already shows as a counter reset.
        # (Called through a typed name: prometheus-client leaves this function unannotated.)
        disable_created: Callable[[], None] = disable_created_metrics
        disable_created()
        r = self.registry = CollectorRegistry()
        self.connections = Counter("mailward_connections", "Inbound connections accepted", ["listener"],
                                   registry=r)
        self.connections_refused = Counter("mailward_connections_refused",
                                           "Inbound connections refused by a connection limit or shutdown",
                                           ["listener"], registry=r)
        self.sessions_active = Gauge("mailward_sessions_active", "Inbound sessions open now", ["listener"],
                                     registry=r)
        self.sessions = Counter("mailward_sessions", "Inbound sessions ended, by the TLS version they used "
                                "(none: no TLS)", ["listener", "tls_version"], registry=r)
        self.tls_failures = Counter("mailward_tls_handshake_failures",
                                    "Inbound TLS handshakes that failed or timed out", ["listener"],
                                    registry=r)
        self.auth = Counter("mailward_auth", "SMTP AUTH attempts by result (success, failure)",
                            ["listener", "result"], registry=r)
        self.accepted = Counter("mailward_messages_accepted", "Messages queued (250 sent after the fsync)",
                                ["listener"], registry=r)
        self.refused = Counter("mailward_messages_refused", "Message contents refused at end of data",
                               ["listener"], registry=r)
        self.deliveries = Counter("mailward_deliveries", "Recipient delivery attempts by outcome "
                                  "(delivered, deferred, bounced)", ["status"], registry=r)
        self.delivery_tls = Counter("mailward_delivery_tls",
                                    "Recipient delivery attempts that reached an SMTP host or were held back "
                                    "by TLS policy, by TLS result", ["tls"], registry=r)
        self.notifications = Counter("mailward_notifications", "Delivery status notifications queued",
                                     ["kind"], registry=r)
        self.dns_latency = Histogram("mailward_dns_lookup_seconds",
                                     "DNS lookups made by delivery (not cached)", ["type", "result"],
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self.tls_latency = Histogram("mailward_tls_handshake_seconds", "TLS handshakes, inbound and outbound",
                                     ["side", "result"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_messages = Gauge("mailward_queue_messages", "Messages in the queue", registry=r)
        self.queue_oldest = Gauge("mailward_queue_oldest_message_age_seconds",
                                  "Age of the oldest queued message; 0 when the queue is empty", registry=r)
        # Series that exist before their first event, so a dashboard's rate() starts at zero.
        for status in ("delivered", "deferred", "bounced"):
            self.deliveries.labels(status=status)
        for result in TLS_RESULTS:
            self.delivery_tls.labels(tls=result)

    def attach(self) -> None:
        if self not in _attached:
            _attached.append(self)

    def detach(self) -> None:
        with contextlib.suppress(ValueError):
            _attached.remove(self)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def record(self, event: Event) -> None:
        match event:
            case Connected():
                self.connections.labels(event.listener).inc()
                self.sessions_active.labels(event.listener).inc()
            case ConnectionRefused():
                self.connections_refused.labels(event.listener).inc()
            case Disconnected():
                self.sessions_active.labels(event.listener).dec()
                self.sessions.labels(event.listener, event.tls_version or "none").inc()
            case TlsEstablished():
                self.tls_latency.labels("inbound", "ok").observe(event.seconds)
            case TlsFailed():
                self.tls_failures.labels(event.listener).inc()
                self.tls_latency.labels("inbound", "failed").observe(event.seconds)
            case AuthResult():
                self.auth.labels(event.listener, "success" if event.ok else "failure").inc()
            case MessageAccepted():
                self.accepted.labels(event.listener).inc()
            case MessageRefused():
                self.refused.labels(event.listener).inc()
            case DeliveryResult():
                self.deliveries.labels(event.status).inc()
                if event.tls_result is not None:
                    self.delivery_tls.labels(event.tls_result).inc()
            case NotificationQueued():
                self.notifications.labels(event.kind).inc()
            case DnsLookup():
                self.dns_latency.labels(event.rdtype, "ok" if event.ok else "failed").observe(event.seconds)
            case TlsHandshake():
                self.tls_latency.labels("outbound", "ok" if event.ok else "failed").observe(event.seconds)
            case QueueSize():
                self.queue_messages.set(event.messages)
                self.queue_oldest.set(event.oldest_age)
            case _:
                pass


# --- the /metrics endpoint ------------------------------------------------------------------------

# The classic text format, which every Prometheus reads; our names need none of the newer escaping.
EXPOSITION_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_REQUEST_LIMIT = 8192  # octets of request line and headers; a scrape sends a few hundred
_REQUEST_TIMEOUT = 10.0


class MetricsEndpoint:
    """A minimal HTTP/1.1 server for GET /metrics; `refresh` runs before each scrape (the queue
    gauges are read then, not polled)."""

    def __init__(self, metrics: Metrics, address: str, port: int,
                 refresh: Callable[[], Awaitable[None]] | None = None) -> None:
        self.metrics = metrics
        self.address = address
        self.port = port
        self.refresh = refresh
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.address, self.port,
                                                  reuse_address=True, limit=_REQUEST_LIMIT)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.wait(list(self._clients), timeout=5)
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                status, body, ctype = await self._answer(head)
                writer.write(b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: " + ctype.encode()
                             + b"\r\nContent-Length: " + str(len(body)).encode()
                             + b"\r\nConnection: close\r\n\r\n"
                             + (b"" if head.startswith(b"HEAD ") else body))
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._clients.discard(task)

    async def _answer(self, head: bytes) -> tuple[str, bytes, str]:
        method, _, rest = head.split(b"\r\n", 1)[0].partition(b" ")
        target = rest.partition(b" ")[0].partition(b"?")[0]
        if method not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", b"only GET /metrics\n", "text/plain; charset=utf-8"
        if target != b"/metrics":
            return "404 Not Found", b"mailward serves /metrics only\n", "text/plain; charset=utf-8"
        if self.refresh is not None:
            try:
                await self.refresh()
            except Exception as exc:  # a stale gauge is better than no scrape
                logging.getLogger("mailward").warning("metrics: queue size not refreshed: %s", exc)
        return "200 OK", self.metrics.exposition(), EXPOSITION_TYPE
