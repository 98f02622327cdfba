"""The one configuration object: a TOML file becomes a frozen, validated `Config` at start-up.

Every key is declared once, on the dataclass field that holds it: the annotation gives its type
(with `Annotated` constraints) and `setting(...)` gives its doc and default. The loader, the error
messages and `describe()` (what `mailward config check` prints) all walk those declarations, so a
key cannot be parsed in one place and documented in another.

Defaults are written as TOML values and go through the same validation as the file, so a default
can never be a value the file could not contain. A default that depends on other keys (the port of
a listener depends on its kind) is a `Derived`, computed from the keys declared before it.

File checks live in `check_files`, not in the loader: the demo generates its certificate only after
its configuration exists, and `config check` on another machine should still parse the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import ipaddress
import math
import os
import re
import socket
import stat
import tomllib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import idna

CONFIG_ENV = "MAILWARD_CONFIG"
DEFAULT_CONFIG_FILE = Path("mailward.toml")


class ConfigError(Exception):
    """One sentence naming the key (or file) at fault and saying how to fix it."""


# --- the declaration vocabulary -------------------------------------------------------------------

_SETTING = "mailward.setting"


@dataclass(frozen=True, slots=True)
class Derived:
    """A default computed from keys declared earlier; `doc` says how, for `describe()`."""

    doc: str
    compute: Callable[[Scope], object]


@dataclass(frozen=True, slots=True)
class Setting:
    doc: str
    default: object  # a TOML-shaped value, a Derived, or _REQUIRED
    toml_name: str | None  # when the TOML key differs from the attribute name


@dataclass(frozen=True, slots=True)
class Scope:
    """What a `Derived` may look at: this table's values so far and the top level's values so far."""

    here: Mapping[str, Any]
    root: Mapping[str, Any]


class _Required:
    def __repr__(self) -> str:
        return "<required>"


_REQUIRED: Any = _Required()


def setting(doc: str, default: object = _REQUIRED, *, toml_name: str | None = None) -> dict[str, Setting]:
    """Field metadata declaring a configuration key: `field(metadata=setting(...))`."""
    return {_SETTING: Setting(doc, default, toml_name)}


@dataclass(frozen=True, slots=True)
class Range:
    """Inclusive bounds for an integer or a number of seconds."""

    low: int
    high: int | None = None


class _Invalid(ValueError):
    """A complaint that needs its own wording; the loader prefixes the key."""


@dataclass(frozen=True, slots=True)
class Check:
    """Validates and normalises a converted value; a plain ValueError means "must be {expected}"."""

    expected: str
    apply: Callable[[Any], Any]


_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_LOG_LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _domain_name(value: str) -> str:
    name = value[:-1] if value.endswith(".") else value  # the rooted spelling names the same domain
    if not name.isascii():
        # UTS #46 maps case, width variants and ideographic full stops before the A-label encoding.
        name = idna.uts46_remap(name, std3_rules=True)
        name = ".".join(lbl if lbl.isascii() else idna.alabel(lbl).decode("ascii") for lbl in name.split("."))
    name = name.lower()
    labels = name.split(".")
    # A numeric last label would make the name indistinguishable from an IPv4 address.
    if len(name) > 253 or not all(_LABEL_RE.fullmatch(lbl) for lbl in labels) or labels[-1].isdigit():
        raise ValueError(value)
    for lbl in labels:
        if lbl.startswith("xn--"):
            idna.ulabel(lbl)
    return name


def _ip_address(value: str) -> str:
    text = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    return str(ipaddress.ip_address(text))


def _log_label(value: str) -> str:
    # Names go into every log line; a restricted alphabet keeps them from forging log fields.
    if not _LOG_LABEL_RE.fullmatch(value):
        raise ValueError(value)
    return value


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def _queue_url(value: str) -> str:
    if value.startswith(POSTGRES_SCHEMES) and not any(c.isspace() for c in value):
        return value  # libpq reads the rest (host=/socket/dir in the query too); connecting checks it
    if not value.startswith("sqlite:///") or value == "sqlite:///":
        raise ValueError(value)
    return value


def _non_empty(value: tuple[object, ...]) -> tuple[object, ...]:
    if not value:
        raise ValueError(value)
    return value


@dataclass(frozen=True, slots=True)
class NextHop:
    """A parsed ``[delivery.route]`` next_hop or smarthost: where to connect, and whether MX applies."""

    host: str  # a lower-case domain, or an IP address without brackets when `literal`
    port: int | None
    literal: bool  # "[192.0.2.1]": connect to that address, no DNS at all
    mx: bool  # a bare "host": look up its MX records like a recipient domain

    def __str__(self) -> str:
        host = f"[{self.host}]" if self.literal else self.host
        return host if self.port is None else f"{host}:{self.port}"


@functools.lru_cache(maxsize=1024)
def parse_next_hop(value: str) -> NextHop:
    """Postfix transport syntax: ``[ip]:port``, ``[ip]``, ``host:port``, ``[host]`` or ``host``.

    A bare ``host`` goes through MX lookup; brackets or a port name the host to connect to.
    Cached: routing asks for the same few configured next hops for every recipient.
    """
    text, port = value, None
    head, sep, tail = value.rpartition(":")
    if sep and (head.endswith("]") or ("[" not in head and ":" not in head)):
        if not tail.isdigit() or not 1 <= int(tail) <= 65535:
            raise ValueError(value)
        text, port = head, int(tail)
    bracketed = text.startswith("[") and text.endswith("]")
    inner = text[1:-1] if bracketed else text
    try:
        address = str(ipaddress.ip_address(inner))
    except ValueError:
        name = _domain_name(inner)
        return NextHop(name, port, literal=False, mx=not bracketed and port is None)
    return NextHop(address, port, literal=True, mx=False)


def _next_hop(value: str) -> str:
    return str(parse_next_hop(value))


def _endpoint_address(value: str) -> str:
    # "IP" or "IP:port"; IPv6 with a port is bracketed: "[::1]:5353". Normalised to that form.
    try:
        return str(ipaddress.ip_address(value))  # a bare IPv6 address has colons but no port
    except ValueError:
        hop = parse_next_hop(value)
    if not hop.literal:
        raise ValueError(value)
    if hop.port is None:
        return hop.host
    return f"[{hop.host}]:{hop.port}" if ":" in hop.host else f"{hop.host}:{hop.port}"


def _lmtp_target(value: str) -> str:
    if value.startswith("unix:"):
        if not value[5:].startswith("/"):
            raise _Invalid(f"'{value}' must name an absolute socket path, e.g. unix:/run/dovecot/lmtp")
        return value
    hop = parse_next_hop(value)
    if hop.port is None:
        raise ValueError(value)
    return str(hop)


def _route_domain(value: str) -> str:
    if value.startswith("."):
        return "." + _domain_name(value[1:])
    return _domain_name(value)


def _policy_destination(value: str) -> str:
    # A domain and ".domain" name MX destinations; brackets name a relay host, as Postfix's
    # smtp_tls_policy_maps keys do ("[smtp.example.net]:587").
    if value.startswith("["):
        return _relay_key(parse_next_hop(value))
    return _route_domain(value)


def _relay_key(hop: NextHop) -> str:
    return f"[{hop.host}]" if hop.port is None else f"[{hop.host}]:{hop.port}"


def _requiretls_default(route: Mapping[str, Any]) -> str:
    # A hop on this machine (a content filter, a local relay) never crosses a network, so the
    # message's REQUIRETLS cannot be protected further there; Postfix defaults such hops the same way.
    try:
        hop = parse_next_hop(str(route.get("next_hop", "")))
    except ValueError:
        return "enforce"  # the next_hop's own check reports the mistake
    if hop.literal and ipaddress.ip_address(hop.host).is_loopback:
        return "opportunistic"
    return "opportunistic" if hop.host == "localhost" else "enforce"


def _local_part(value: str) -> str:
    if not value or "@" in value or any(c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in value):
        raise ValueError(value)
    return value


def _alias_target(value: str) -> str:
    if not value or any(c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in value):
        raise ValueError(value)
    return value


HOSTNAME = Check("a DNS name such as mail.example.org", _domain_name)
DOMAIN = Check("a domain name such as example.org", _domain_name)
IP_ADDRESS = Check("an IPv4 or IPv6 address such as 0.0.0.0 or ::", _ip_address)
LOG_LABEL = Check("up to 64 letters, digits, '.', '_' or '-'", _log_label)
QUEUE_URL = Check("sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DATABASE", _queue_url)
NON_EMPTY = Check("a non-empty array", _non_empty)
ROUTE_DOMAIN = Check("a domain such as example.org, or .example.org for its subdomains", _route_domain)
POLICY_DESTINATION = Check("a domain such as example.org, .example.org for its subdomains, or [host]:port "
                           "for a relay", _policy_destination)
NEXT_HOP = Check("[IP]:port, [IP], host:port, [host] or host", _next_hop)
ENDPOINT = Check("an IP address, optionally with a port, such as 127.0.0.1 or [::1]:53", _endpoint_address)
LMTP_TARGET = Check("unix:/path/to/socket or host:port", _lmtp_target)
LOCAL_PART = Check("the local part of an address, such as postmaster", _local_part)
ALIAS_TARGET = Check("a local user such as alice or an address such as alice@example.org", _alias_target)


def _report_sender(value: str) -> str:
    local, at, domain = value.rpartition("@")
    if not at or not local or any(c.isspace() or ord(c) < 0x20 or c in '\x7f<>"' for c in value):
        raise ValueError(value)
    return f"{local}@{_domain_name(domain)}"


REPORT_SENDER = Check("an address such as postmaster@mail.example.org", _report_sender)


def _one_line(value: str) -> str:
    if not value.strip() or len(value) > 200 or any(ord(c) < 0x20 or c == "\x7f" for c in value):
        raise ValueError(value)
    return value.strip()


ONE_LINE = Check("one line of text of at most 200 characters", _one_line)

# What useradd accepts by default (NAME_REGEX), so a name that passes here can be created as written.
_ACCOUNT_RE = re.compile(r"[a-z_][a-z0-9_-]{0,30}\$?")


def _account_name(value: str) -> str:
    if not _ACCOUNT_RE.fullmatch(value):
        raise ValueError(value)
    return value


ACCOUNT = Check("a system account name such as mailward", _account_name)

ListenerKind = Literal["mx", "submission", "submissions"]
# Outbound TLS security levels, weakest first; delivery.policy.SecurityLevel has the same values.
SecurityLevelName = Literal["none", "may", "encrypt", "dane", "dane-only", "verify", "secure"]
_LEVELS_DOC = ("none (never TLS), may (STARTTLS when offered), encrypt (TLS required, not "
               "authenticated), dane (DANE when the host has DNSSEC-secure TLSA records, otherwise may), "
               "dane-only (DANE or no delivery), verify (TLS with a certificate valid for the host name) or "
               "secure (verify, and the MX records must be DNSSEC-secure)")
# How a REQUIRETLS message (RFC 8689) may pass one next hop; like Postfix 3.11's smtp_requiretls_policy.
RequireTlsName = Literal["enforce", "encrypt", "opportunistic"]
_REQUIRETLS_DOC = ("how a message sent with REQUIRETLS (RFC 8689) may pass this next hop: enforce (only over "
                   "TLS authenticated by DANE, by MTA-STS or by verify/secure with MX records obtained "
                   "securely, and only to a server that offers REQUIRETLS; otherwise a 5.7.30 bounce), "
                   "encrypt (TLS required, any certificate; REQUIRETLS passed on where offered) or "
                   "opportunistic (like any other message: for internal hops such as content filters)")
SmarthostTls = Literal["implicit", "starttls"]
Mechanism = Literal["PLAIN", "LOGIN"]

_KIND_PORTS: dict[str, int] = {"mx": 25, "submission": 587, "submissions": 465}
_SUBMISSION_KINDS = ("submission", "submissions")
_DEFAULT_LISTENERS = [
    {"kind": kind, "address": address}
    for kind in ("mx", "submissions", "submission")
    for address in ("0.0.0.0", "::")
]


# --- the schema -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerConfig:
    kind: ListenerKind = field(metadata=setting(
        "mx: mail from the internet, STARTTLS when certificates exist, no AUTH; submission: users, "
        "STARTTLS then AUTH (RFC 6409); submissions: users over implicit TLS (RFC 8314)"))
    address: Annotated[str, IP_ADDRESS] = field(metadata=setting(
        "IP address to listen on; 0.0.0.0 is every IPv4 address, :: every IPv6 address", "0.0.0.0"))
    port: Annotated[int, Range(1, 65535)] = field(metadata=setting(
        "TCP port", Derived("25 for mx, 587 for submission, 465 for submissions",
                            lambda s: _KIND_PORTS[s.here["kind"]])))
    max_connections: Annotated[int, Range(1)] = field(metadata=setting(
        "simultaneous connections on this listener; more are refused with 421", 1000))
    max_connections_per_ip: Annotated[int, Range(1)] = field(metadata=setting(
        "simultaneous connections from one client address",
        Derived("20 for mx, 10 for submission kinds", lambda s: 20 if s.here["kind"] == "mx" else 10)))
    command_timeout: Annotated[float, Range(1, 3600)] = field(metadata=setting(
        "seconds to wait for the next command (RFC 5321 §4.5.3.2 asks for 5 minutes)", 300))
    data_timeout: Annotated[float, Range(1, 3600)] = field(metadata=setting(
        "seconds to wait for the next piece of message data", 600))
    handshake_timeout: Annotated[float, Range(1, 600)] = field(metadata=setting(
        "seconds a client has to complete the TLS handshake", 30))
    max_message_size: Annotated[int, Range(1024)] = field(metadata=setting(
        "largest message accepted, in bytes, announced with SIZE (RFC 1870)", 52428800))
    max_recipients: Annotated[int, Range(1)] = field(metadata=setting(
        "recipients per message; RFC 5321 §4.5.3.1.8 expects at least 100 to be accepted", 1000))
    bare_line_endings: Literal["reject", "normalize"] = field(metadata=setting(
        "message data with a bare CR or LF: reject it (closes SMTP smuggling) or normalize to CRLF",
        "reject"))
    name: Annotated[str, LOG_LABEL] = field(metadata=setting(
        "label for this listener in logs and metrics",
        Derived("kind-port, e.g. mx-25", lambda s: f"{s.here['kind']}-{s.here['port']}")))


@dataclass(frozen=True, slots=True, kw_only=True)
class CertificateConfig:
    cert: Path = field(metadata=setting(
        "PEM certificate chain, leaf first (certbot's fullchain.pem works)"))
    key: Path = field(metadata=setting(
        "PEM private key of that certificate (certbot's privkey.pem works)"))
    # A Python default too, so code that builds a pair without a rollover in mind stays as it was.
    next_key: Path | None = field(default=None, metadata=setting(
        "PEM key (private or public) or certificate that will replace this one at a planned key rollover; "
        "mailward check --self warns until the TLSA records of its names cover it as well, so both can "
        "be published ahead of the switch", None))


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsConfig:
    min_version: Literal["TLSv1.2", "TLSv1.3"] = field(metadata=setting(
        "oldest TLS version accepted by the listeners", "TLSv1.2"))
    certificates: tuple[CertificateConfig, ...] = field(metadata=setting(
        "certificate/key pairs, chosen by SNI; reloaded on SIGHUP; submission listeners need one",
        []))


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthConfig:
    users_file: Path = field(metadata=setting(
        "user database (managed with mailward user ...)",
        Derived("state_dir/users", lambda s: s.root["state_dir"] / "users")))
    mechanisms: Annotated[tuple[Mechanism, ...], NON_EMPTY] = field(metadata=setting(
        "SASL mechanisms offered on submission listeners, only once TLS is up", ["PLAIN", "LOGIN"]))
    max_failures_per_ip: Annotated[int, Range(1)] = field(metadata=setting(
        "failed logins from one client address before it is locked out", 10))
    max_failures_per_user: Annotated[int, Range(1)] = field(metadata=setting(
        "failed logins for one user before that user is locked out", 5))
    lockout_seconds: Annotated[float, Range(1, 86400)] = field(metadata=setting(
        "how long a lockout lasts, in seconds", 900))
    failure_delay: Annotated[float, Range(0, 60)] = field(metadata=setting(
        "seconds a failed login waits before its 535 reply; doubles with each recent failure", 0.5))
    max_failure_delay: Annotated[float, Range(0, 600)] = field(metadata=setting(
        "the most a failed login waits before its reply, in seconds", 8))
    verified_cache_seconds: Annotated[float, Range(0, 3600)] = field(metadata=setting(
        "how long a verified password is remembered (as an HMAC under a per-process key) so a "
        "client connecting once per message pays argon2 once; 0 checks every login in full", 300))


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueConfig:
    url: Annotated[str, QUEUE_URL] | None = field(metadata=setting(
        "queue location as a URL instead of path: sqlite:///PATH, relative to this file's directory, or "
        "postgresql://... (a libpq URL; postgresql:///DB?host=/run/postgresql for a unix socket) for a queue "
        "several nodes share; create its tables with `mailward queue migrate`", None))
    path: Path = field(metadata=setting(
        "SQLite queue database (unused with a postgresql:// url)",
        Derived("state_dir/queue/queue.db, or the PATH of a sqlite:/// url",
                lambda s: s.here["url"].removeprefix("sqlite:///")
                if s.here["url"] and s.here["url"].startswith("sqlite:///")
                else s.root["state_dir"] / "queue" / "queue.db")))

    @property
    def postgres_url(self) -> str | None:
        """The PostgreSQL URL when the queue is shared, None for the embedded SQLite queue."""
        return self.url if self.url is not None and self.url.startswith(POSTGRES_SCHEMES) else None


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = field(metadata=setting(
        "least severe log level written", "info"))
    format: Literal["human", "json"] = field(metadata=setting(
        "log line format: human text or one JSON object per line", "human"))


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsConfig:
    enabled: bool = field(metadata=setting(
        "serve Prometheus metrics over HTTP at http://address:port/metrics", False))
    address: Annotated[str, IP_ADDRESS] = field(metadata=setting(
        "address the metrics endpoint listens on; loopback unless allow_remote is set", "127.0.0.1"))
    port: Annotated[int, Range(1, 65535)] = field(metadata=setting(
        "port of the metrics endpoint", 9425))
    allow_remote: bool = field(metadata=setting(
        "allow a non-loopback address: the endpoint has no authentication and shows traffic "
        "patterns, so put a firewall in front of it", False))


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteConfig:
    domain: Annotated[str, ROUTE_DOMAIN] = field(metadata=setting(
        "recipient domain this route applies to; a leading '.' (\".example.org\") means its subdomains"))
    next_hop: Annotated[str, NEXT_HOP] = field(metadata=setting(
        "where its mail goes: [IP]:port or host:port connect there directly, host looks up the MX of host"))
    security: SecurityLevelName = field(metadata=setting(
        "TLS security level of this route's next hop (delivery.policy does not apply to routed "
        f"domains): {_LEVELS_DOC}", "may"))
    ca_file: Path | None = field(metadata=setting(
        "PEM CA certificates to verify the next hop against with security = verify or secure; default: "
        "the system's", None))
    requiretls: RequireTlsName = field(metadata=setting(
        _REQUIRETLS_DOC, Derived("opportunistic when next_hop is a loopback address such as "
                                 "[127.0.0.1]:10025, else enforce", lambda s: _requiretls_default(s.here))))


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyConfig:
    destination: Annotated[str, POLICY_DESTINATION] = field(metadata=setting(
        "where the level applies: a recipient domain delivered by MX (example.org), its subdomains "
        "(.example.org), or the smarthost as [host]:port; an exact domain beats the longest .suffix"))
    level: SecurityLevelName = field(metadata=setting(f"TLS security level: {_LEVELS_DOC}"))
    ca_file: Path | None = field(metadata=setting(
        "PEM CA certificates for level verify or secure; default: the system's", None))
    requiretls: RequireTlsName = field(metadata=setting(_REQUIRETLS_DOC, "enforce"))


@dataclass(frozen=True, slots=True, kw_only=True)
class SmarthostConfig:
    host: Annotated[str, NEXT_HOP] = field(metadata=setting(
        "relay host every non-local message is sent through, e.g. smtp.example.net (no MX lookup)"))
    tls: SmarthostTls = field(metadata=setting(
        "implicit: TLS from the first byte (RFC 8314, port 465); starttls: STARTTLS is required "
        "(port 587); the certificate is always verified against host", "implicit"))
    port: Annotated[int, Range(1, 65535)] = field(metadata=setting(
        "TCP port of the relay", Derived("465 for implicit, 587 for starttls",
                                         lambda s: 465 if s.here["tls"] == "implicit" else 587)))
    username: str | None = field(metadata=setting(
        "SMTP AUTH user name; AUTH is sent only over verified TLS", None))
    password_file: Path | None = field(metadata=setting(
        "file whose first line is the AUTH password, read at start-up; keep it readable only by "
        "mailward", None))
    ca_file: Path | None = field(metadata=setting(
        "PEM CA certificates the relay's certificate must chain to; default: the system's", None))


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryConfig:
    enabled: bool = field(metadata=setting(
        "false accepts and queues mail but delivers nothing (like Exim's queue_only), e.g. during a "
        "migration; queued mail goes out once this is true again and mailward restarts", True))
    concurrency: Annotated[int, Range(1, 10000)] = field(metadata=setting(
        "outbound connections open at once, over all destinations", 100))
    per_destination: Annotated[int, Range(1, 1000)] = field(metadata=setting(
        "outbound connections open at once to one destination (domain, route or smarthost)", 20))
    slow_start_initial: Annotated[int, Range(1, 1000)] = field(metadata=setting(
        "connections a destination starts with; one more per success up to per_destination, "
        "halved on failure (Postfix's slow start)", 2))
    connect_timeout: Annotated[float, Range(1, 600)] = field(metadata=setting(
        "seconds to set up a TCP connection or a TLS handshake", 30))
    command_timeout: Annotated[float, Range(1, 3600)] = field(metadata=setting(
        "seconds to wait for the greeting or a reply to a command (RFC 5321 §4.5.3.2)", 300))
    data_timeout: Annotated[float, Range(1, 3600)] = field(metadata=setting(
        "seconds to send the message content and wait for the reply to its end", 600))
    retry_initial: Annotated[float, Range(1, 86400)] = field(metadata=setting(
        "seconds before the first retry of a deferred recipient; doubles on each attempt", 300))
    retry_max: Annotated[float, Range(1, 604800)] = field(metadata=setting(
        "longest wait between two attempts, in seconds", 14400))
    max_lifetime: Annotated[float, Range(60, 31536000)] = field(metadata=setting(
        "seconds a recipient is retried before it fails with 4.4.7 and a bounce goes to the sender",
        432000))
    delay_warning: Annotated[float, Range(0, 31536000)] = field(metadata=setting(
        "seconds after which the sender is told once that delivery is delayed; 0 never tells", 14400))
    dead_host_seconds: Annotated[float, Range(0, 86400)] = field(metadata=setting(
        "seconds a host that refused or timed out is skipped (its recipients wait) before it is tried "
        "again", 300))
    lease_seconds: Annotated[float, Range(5, 86400)] = field(metadata=setting(
        "seconds a message stays claimed by this process, renewed while delivery runs; a crashed "
        "process's messages come back after it", 600))
    helo_name: Annotated[str, HOSTNAME] = field(metadata=setting(
        "name sent in EHLO/HELO", Derived("hostname", lambda s: s.root["hostname"])))
    port: Annotated[int, Range(1, 65535)] = field(metadata=setting(
        "TCP port of MX hosts and of routes that name none", 25))
    security: SecurityLevelName = field(metadata=setting(
        f"TLS security level for MX delivery where no delivery.policy row applies: {_LEVELS_DOC}", "dane"))
    may_retry_plaintext: bool = field(metadata=setting(
        "true: at level may, a failed TLS handshake is retried once in plaintext on the same host "
        "(Postfix's habit; logged as a downgrade); false defers instead, so whoever can break a "
        "handshake cannot make mail go in clear", False))
    routes: tuple[RouteConfig, ...] = field(metadata=setting(
        "per-domain next hops, like Postfix's transport map", [], toml_name="route"))
    policies: tuple[PolicyConfig, ...] = field(metadata=setting(
        "TLS security levels per destination, like Postfix's smtp_tls_policy_maps; routes carry "
        "their own security instead", [], toml_name="policy"))
    smarthost: SmarthostConfig | None = field(metadata=setting(
        "relay all non-local mail through this host instead of MX delivery", None))


@dataclass(frozen=True, slots=True, kw_only=True)
class DnsConfig:
    resolvers: tuple[Annotated[str, ENDPOINT], ...] = field(metadata=setting(
        "resolver addresses (IP or IP:port); empty uses the system's (/etc/resolv.conf)", []))
    timeout: Annotated[float, Range(1, 60)] = field(metadata=setting(
        "seconds to wait for one DNS answer", 5))


@dataclass(frozen=True, slots=True, kw_only=True)
class MtaStsConfig:
    enabled: bool = field(metadata=setting(
        "look up and apply the MTA-STS policies (RFC 8461) of recipient domains at level dane; false "
        "ignores them", True))
    ca_file: Path | None = field(metadata=setting(
        "PEM CA certificates for the policy fetch (https://mta-sts.<domain>) and for MX hosts under an "
        "enforced policy; default: the system's", None))
    fetch_timeout: Annotated[float, Range(1, 120)] = field(metadata=setting(
        "seconds a policy fetch may take; a slow or silent server counts as no policy (the policy "
        "itself is at most 64 KiB)", 10))


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsRptConfig:
    enabled: bool = field(metadata=setting(
        "tally outbound TLS sessions and send daily TLS reports (RFC 8460) to recipient domains that "
        "publish a _smtp._tls record", True))
    organization: Annotated[str, ONE_LINE] = field(metadata=setting(
        "organization-name in the reports", Derived("hostname", lambda s: s.root["hostname"])))
    contact: Annotated[str, ONE_LINE] = field(metadata=setting(
        "contact-info in the reports: an address or URL for questions about them",
        Derived("postmaster@hostname", lambda s: f"postmaster@{s.root['hostname']}")))
    sender: Annotated[str, REPORT_SENDER] = field(metadata=setting(
        "From: and envelope sender of reports sent by mail",
        Derived("postmaster@hostname", lambda s: f"postmaster@{s.root['hostname']}")))
    send_hour: Annotated[int, Range(0, 23)] = field(metadata=setting(
        "UTC hour at which the previous UTC day's reports are sent", 1))
    https_ca_file: Path | None = field(metadata=setting(
        "PEM CA certificates for https: report addresses; default: the system's", None))
    https_timeout: Annotated[float, Range(1, 300)] = field(metadata=setting(
        "seconds one HTTPS report upload may take", 30))


@dataclass(frozen=True, slots=True, kw_only=True)
class AliasConfig:
    name: Annotated[str, LOCAL_PART] = field(metadata=setting(
        "local part that is an alias, in every local domain, e.g. postmaster"))
    targets: Annotated[tuple[Annotated[str, ALIAS_TARGET], ...], NON_EMPTY] = field(metadata=setting(
        "local users or addresses the alias delivers to"))


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalConfig:
    maildir: Path = field(metadata=setting(
        "root of the Maildirs: each local user (a name in auth.users_file, or a directory made here) "
        "gets maildir/<user>/ (tmp, new, cur)",
        Derived("state_dir/mail", lambda s: s.root["state_dir"] / "mail")))
    lmtp: Annotated[str, LMTP_TARGET] | None = field(metadata=setting(
        "hand local mail to an LMTP server (RFC 2033) such as Dovecot instead of the Maildirs: "
        "unix:/path or host:port", None))
    aliases: tuple[AliasConfig, ...] = field(metadata=setting(
        "local parts delivered to other users or addresses", [], toml_name="alias"))
    catch_all: Annotated[str, ALIAS_TARGET] | None = field(metadata=setting(
        "user that receives mail for local parts that match no user or alias; unset refuses them",
        None))


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    hostname: Annotated[str, HOSTNAME] = field(metadata=setting(
        "this server's DNS name, used in the greeting, EHLO and Received headers",
        Derived("this system's name from socket.getfqdn()", lambda s: socket.getfqdn())))
    state_dir: Path = field(metadata=setting(
        "directory for the queue, users and pid file; relative to this file's directory",
        "/var/lib/mailward"))
    user: Annotated[str, ACCOUNT] | None = field(metadata=setting(
        "account to run as when started as root: the listeners are bound first (ports below 1024 "
        "need root), state_dir is given to this user and its primary group, then root is dropped "
        "for good; required when started as root (\"root\" keeps every privilege, e.g. in a container "
        "that confines it); ignored when not started as root", None))
    local_domains: tuple[Annotated[str, DOMAIN], ...] = field(metadata=setting(
        "domains whose mail is delivered here", []))
    relay_domains: tuple[Annotated[str, DOMAIN], ...] = field(metadata=setting(
        "domains the mx listener accepts mail for and relays onward", []))
    listeners: tuple[ListenerConfig, ...] = field(metadata=setting(
        "where SMTP is accepted",
        Derived("mx on port 25, submissions on 465 and submission on 587, each on 0.0.0.0 and ::",
                lambda s: _DEFAULT_LISTENERS),
        toml_name="listener"))
    tls: TlsConfig = field(metadata=setting("certificates and versions for every listener", {}))
    auth: AuthConfig = field(metadata=setting("SMTP AUTH on submission listeners", {}))
    queue: QueueConfig = field(metadata=setting("where accepted messages are kept until delivered", {}))
    log: LogConfig = field(metadata=setting("log output on stderr", {}))
    metrics: MetricsConfig = field(metadata=setting("the Prometheus /metrics endpoint", {}))
    delivery: DeliveryConfig = field(metadata=setting("outbound delivery: retries, limits, routes", {}))
    dns: DnsConfig = field(metadata=setting("how delivery resolves MX and address records", {}))
    mta_sts: MtaStsConfig = field(metadata=setting("MTA-STS policies of recipient domains (RFC 8461)", {}))
    local: LocalConfig = field(metadata=setting("delivery for local_domains: Maildir or LMTP", {}))
    tlsrpt: TlsRptConfig = field(metadata=setting("SMTP TLS reporting to recipient domains (RFC 8460)", {}))


# --- reading the schema ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Key:
    attr: str
    name: str  # as written in TOML
    setting: Setting
    hint: Any  # the resolved annotation, constraints included


def _keys(cls: type) -> list[_Key]:
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for f in dataclasses.fields(cls):
        s: Setting = f.metadata[_SETTING]
        out.append(_Key(f.name, s.toml_name or f.name, s, hints[f.name]))
    return out


def _strip_annotated(hint: Any) -> tuple[Any, tuple[Any, ...]]:
    if typing.get_origin(hint) is Annotated:
        base, *extras = typing.get_args(hint)
        return base, tuple(extras)
    return hint, ()


def _is_table(hint: Any) -> bool:
    base, _ = _strip_annotated(hint)
    if typing.get_origin(base) in (typing.Union, types.UnionType):  # an optional table
        args = [a for a in typing.get_args(base) if a is not type(None)]
        base = args[0] if len(args) == 1 else None
    return isinstance(base, type) and dataclasses.is_dataclass(base)


def _table_array_item(hint: Any) -> type | None:
    base, _ = _strip_annotated(hint)
    if typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0]
        if isinstance(item, type) and dataclasses.is_dataclass(item):
            return item
    return None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _show(value: object) -> str:
    """A value as the message quotes it: strings quoted, TOML spelling for the rest."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        text = "[" + ", ".join(_show(v) for v in value) + "]"
        return text if len(text) <= 60 else "an array"
    return str(value)


def _choices(options: tuple[Any, ...]) -> str:
    return ", ".join(repr(o) for o in options)


def _suggest(word: str, options: list[str]) -> str | None:
    """The one option closest to `word`; none when two tie, as a coin-flip guess would mislead."""
    folded = {o.lower(): o for o in options}
    scores = sorted(((difflib.SequenceMatcher(None, word.lower(), o).ratio(), o) for o in folded),
                    reverse=True)
    if not scores or scores[0][0] < 0.6 or (len(scores) > 1 and scores[1][0] == scores[0][0]):
        return None
    return folded[scores[0][1]]


# --- loading --------------------------------------------------------------------------------------

class _Loader:
    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir
        self.root: dict[str, Any] = {}

    def table(self, cls: type, raw: object, path: str) -> Any:
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must be a table, got {_show(raw)}.")
        keys = _keys(cls)
        names = [k.name for k in keys]
        for name in raw:
            if name not in names:
                self.unknown(_join(path, name), name, names)
        values: dict[str, Any] = {}
        if not path:
            self.root = values
        scope = Scope(values, self.root)
        for k in keys:
            key = _join(path, k.name)
            default = k.setting.default
            if k.name in raw:
                values[k.attr] = self.value(k.hint, raw[k.name], key)
            elif default is _REQUIRED:
                base, _ = _strip_annotated(k.hint)
                if typing.get_origin(base) is Literal:
                    options = _choices(typing.get_args(base))
                    raise ConfigError(f"{key} is missing; set it to one of {options}.")
                raise ConfigError(f"{key} is missing; add it: {k.setting.doc}.")
            elif isinstance(default, Derived):
                computed = default.compute(scope)
                try:
                    values[k.attr] = self.value(k.hint, computed, key)
                except ConfigError:
                    raise ConfigError(
                        f"{key} is not set and its default {_show(str(computed))} ({default.doc}) is "
                        f"not valid; set {key} in {self.source}.") from None
            else:
                values[k.attr] = self.value(k.hint, default, key)
        return cls(**values)

    def unknown(self, key: str, name: str, names: list[str]) -> typing.NoReturn:
        close = _suggest(name, names)
        if close is not None:
            hint = f"did you mean '{close}'?"
        else:
            hint = f"remove it (keys allowed here: {', '.join(names)})."
        raise ConfigError(f"unknown key '{key}' in {self.source}; {hint}")

    def value(self, hint: Any, raw: object, key: str) -> Any:
        base, extras = _strip_annotated(hint)
        checks = [e for e in extras if isinstance(e, Check)]
        bounds = next((e for e in extras if isinstance(e, Range)), None)
        origin = typing.get_origin(base)
        if origin in (typing.Union, types.UnionType):
            if raw is None:
                return None
            (base,) = [a for a in typing.get_args(base) if a is not type(None)]
            return self.value(base, raw, key)
        value = self.typed(base, raw, key, bounds, checks[0].expected if checks else None)
        for check in checks:
            try:
                value = check.apply(value)
            except _Invalid as exc:
                raise ConfigError(f"{key}: {exc}.") from None
            except ValueError:
                raise ConfigError(f"{key} must be {check.expected}, got {_show(raw)}.") from None
        return value

    def typed(self, base: Any, raw: object, key: str, bounds: Range | None, expected: str | None) -> Any:
        origin = typing.get_origin(base)
        if origin is Literal:
            options = typing.get_args(base)
            if isinstance(raw, str) and raw in options:
                return raw
            close = _suggest(raw, [str(o) for o in options]) if isinstance(raw, str) else None
            suffix = f"; did you mean '{close}'?" if close else "."
            raise ConfigError(f"{key} must be one of {_choices(options)}, got {_show(raw)}{suffix}")
        if origin is tuple:
            return self.array(typing.get_args(base)[0], raw, key)
        if isinstance(base, type) and dataclasses.is_dataclass(base):
            return self.table(base, raw, key)
        if base is bool:
            if isinstance(raw, bool):
                return raw
            raise ConfigError(f"{key} must be true or false, got {_show(raw)}.")
        if base is int:
            if isinstance(raw, int) and not isinstance(raw, bool) and _within(raw, bounds):
                return raw
            raise ConfigError(f"{key} must be {_numbers('an integer', bounds)}, got {_show(raw)}.")
        if base is float:
            if (isinstance(raw, int | float) and not isinstance(raw, bool) and math.isfinite(raw)
                    and _within(raw, bounds)):
                return float(raw)
            raise ConfigError(f"{key} must be {_numbers('a number of seconds', bounds)}, got {_show(raw)}.")
        if base is Path:
            if isinstance(raw, Path):
                return raw if raw.is_absolute() else self.base_dir / raw
            if isinstance(raw, str) and raw and "\0" not in raw:
                path = Path(raw)
                # Not resolved: certbot's live/ links must keep pointing at the renewed files.
                return path if path.is_absolute() else self.base_dir / path
            raise ConfigError(f"{key} must be a file path string, got {_show(raw)}.")
        if base is str:
            if isinstance(raw, str):
                return raw
            raise ConfigError(f"{key} must be {expected or 'a string'}, got {_show(raw)}.")
        raise TypeError(f"unsupported configuration type {base!r} for {key}")  # a schema bug

    def array(self, item: Any, raw: object, key: str) -> tuple[Any, ...]:
        is_tables = isinstance(item, type) and dataclasses.is_dataclass(item)
        if not isinstance(raw, list | tuple):
            if is_tables and isinstance(raw, dict):
                raise ConfigError(f"{key} must be an array of tables; write [[{key}]] instead of [{key}].")
            if isinstance(raw, str):
                name = key.rpartition(".")[2]
                raise ConfigError(f"{key} must be an array, got {_show(raw)}; write {name} = "
                                  f"[{_toml_string(raw)}].")
            raise ConfigError(f"{key} must be an array, got {_show(raw)}.")
        return tuple(self.value(item, v, f"{key}[{i}]") for i, v in enumerate(raw))


def _within(value: float, bounds: Range | None) -> bool:
    if bounds is None:
        return True
    return value >= bounds.low and (bounds.high is None or value <= bounds.high)


def _numbers(what: str, bounds: Range | None) -> str:
    if bounds is None:
        return what
    if bounds.high is None:
        return f"{what} of at least {bounds.low}"
    return f"{what} between {bounds.low} and {bounds.high}"


def config_from_dict(data: Mapping[str, Any], source: str, *, base_dir: Path | None = None) -> Config:
    """Validate parsed TOML; relative paths are taken relative to `base_dir` (default: the cwd)."""
    loader = _Loader(source, (base_dir or Path.cwd()).absolute())
    raw = dict(data)
    config: Config = loader.table(Config, raw, "")
    _check_whole(config, raw, loader)
    return config


def _check_whole(config: Config, raw: Mapping[str, Any], loader: _Loader) -> None:
    """Rules that span several keys."""
    listeners = config.listeners
    for i, lc in enumerate(listeners):
        for j, other in enumerate(listeners[:i]):
            if lc.port == other.port and _addresses_overlap(lc.address, other.address):
                raise ConfigError(
                    f"listener[{i}] ({_endpoint(lc)}) clashes with listener[{j}] ({_endpoint(other)}); "
                    "give one of them another address or port.")
    if not config.tls.certificates:
        needy = [(i, lc) for i, lc in enumerate(listeners) if lc.kind in _SUBMISSION_KINDS]
        if needy and "listener" not in raw:
            raise ConfigError(
                "the default listeners include submission (587) and submissions (465), which need "
                "tls.certificates; add [[tls.certificates]] cert=... key=..., declare [[listener]] "
                "tables, or run mailward serve --demo.")
        if needy:
            i, lc = needy[0]
            raise ConfigError(
                f"listener[{i}] ({lc.kind}) needs tls.certificates; add [[tls.certificates]] cert=... "
                "key=... or run mailward serve --demo.")
    queue = config.queue
    # Both may be given when they agree, so describe()'s output loads back as it is.
    if queue.url is not None and queue.postgres_url is None and "path" in raw.get("queue", {}):
        from_url = loader.value(Path, queue.url.removeprefix("sqlite:///"), "queue.url")
        if from_url != queue.path:
            raise ConfigError("queue.url and queue.path name different queue files; keep only one of them.")
    for i, domain in enumerate(config.relay_domains):
        if domain in config.local_domains:
            raise ConfigError(f"relay_domains[{i}] '{domain}' is also in local_domains; list each domain "
                              "in only one of them.")
    _check_delivery(config.delivery)
    _check_policies(config)
    _check_metrics(config)


def _check_metrics(config: Config) -> None:
    mc = config.metrics
    if not mc.enabled:
        return
    if not mc.allow_remote and not ipaddress.ip_address(mc.address).is_loopback:
        raise ConfigError(f"metrics.address {mc.address} is not a loopback address, and the endpoint has no "
                          "authentication; use 127.0.0.1 or ::1, or set metrics.allow_remote = true behind a "
                          "firewall.")
    for i, lc in enumerate(config.listeners):
        if lc.port == mc.port and _addresses_overlap(lc.address, mc.address):
            raise ConfigError(f"metrics.port {mc.port} clashes with listener[{i}] ({_endpoint(lc)}); give "
                              "the metrics endpoint another port.")


def match_domain(domain: str, patterns: Sequence[str]) -> int | None:
    """The index of the pattern that decides for `domain`: the domain itself, else the longest
    ".suffix" it ends with (Postfix's transport and TLS policy lookups); None when none does."""
    best: int | None = None
    for i, pattern in enumerate(patterns):
        if pattern == domain:
            return i
        if pattern.startswith(".") and domain.endswith(pattern) and (
                best is None or len(pattern) > len(patterns[best])):
            best = i
    return best


def relay_matches(key: str, host: str, port: int) -> bool:
    """Whether a "[host]" or "[host]:port" policy destination names the relay host:port."""
    hop = parse_next_hop(key)
    return hop.host == host and hop.port in (None, port)


def _check_delivery(dc: DeliveryConfig) -> None:
    if dc.per_destination > dc.concurrency:
        raise ConfigError(f"delivery.per_destination ({dc.per_destination}) exceeds delivery.concurrency "
                          f"({dc.concurrency}); lower per_destination or raise concurrency.")
    if dc.slow_start_initial > dc.per_destination:
        raise ConfigError(f"delivery.slow_start_initial ({dc.slow_start_initial}) exceeds "
                          f"delivery.per_destination ({dc.per_destination}); lower it.")
    if dc.retry_initial > dc.retry_max:
        raise ConfigError(f"delivery.retry_initial ({dc.retry_initial:g}) exceeds delivery.retry_max "
                          f"({dc.retry_max:g}); lower retry_initial or raise retry_max.")
    seen: dict[str, int] = {}
    for i, route in enumerate(dc.routes):
        if route.domain in seen:
            raise ConfigError(f"delivery.route[{i}] repeats the domain '{route.domain}' of "
                              f"delivery.route[{seen[route.domain]}]; keep one route per domain.")
        seen[route.domain] = i
    sh = dc.smarthost
    if sh is not None:
        if parse_next_hop(sh.host).port is not None:
            raise ConfigError("delivery.smarthost.host must not carry a port; set delivery.smarthost.port.")
        if (sh.username is None) != (sh.password_file is None):
            raise ConfigError("delivery.smarthost needs both username and password_file for AUTH, or "
                              "neither; set the missing one.")


def _check_policies(config: Config) -> None:
    """Each delivery.policy row must be able to apply, so a typo cannot silently leave a default."""
    dc = config.delivery
    route_domains = [r.domain for r in dc.routes]
    seen: dict[str, int] = {}
    for i, row in enumerate(dc.policies):
        key, name = row.destination, f"delivery.policy[{i}]"
        if key in seen:
            raise ConfigError(f"{name} repeats the destination '{key}' of delivery.policy[{seen[key]}]; keep "
                              "one row per destination.")
        seen[key] = i
        if row.ca_file is not None and row.level not in ("verify", "secure"):
            raise ConfigError(f"{name}.ca_file applies only to levels verify and secure, and the row's level "
                              f"is '{row.level}'; remove ca_file or change the level.")
        if key.startswith("["):
            _check_relay_row(dc, i, row)
            continue
        # Routes decide before the policy table: a row wholly inside a route's domains is dead.
        routed = next((j for j, r in enumerate(route_domains)
                       if r == key or (r.startswith(".") and key.endswith(r))), None)
        if routed is not None:
            raise ConfigError(f"{name} ('{key}') never applies because delivery.route[{routed}] routes that "
                              "domain; set security on that route instead.")
        if key in config.local_domains:
            raise ConfigError(f"{name} ('{key}') never applies because {key} is in local_domains, whose mail "
                              "stays here; remove the row.")
        if dc.smarthost is not None:
            raise ConfigError(f"{name} ('{key}') never applies because delivery.smarthost relays all mail "
                              "that is not local or routed; name the smarthost as [host]:port instead.")


def _check_relay_row(dc: DeliveryConfig, i: int, row: PolicyConfig) -> None:
    key, name = row.destination, f"delivery.policy[{i}]"
    for j, route in enumerate(dc.routes):
        hop = parse_next_hop(route.next_hop)
        if not hop.mx and relay_matches(key, hop.host, hop.port or dc.port):
            raise ConfigError(f"{name} ('{key}') names the next hop of delivery.route[{j}]; set security on "
                              "that route instead.")
    sh = dc.smarthost
    if sh is None:
        raise ConfigError(f"{name} ('{key}') names a relay, but no delivery.smarthost is set; name a "
                          "recipient domain, or remove the row.")
    host = parse_next_hop(sh.host).host
    if not relay_matches(key, host, sh.port):
        raise ConfigError(f"{name} ('{key}') names no relay: delivery.smarthost is [{host}]:{sh.port}; fix "
                          "the host or port, or remove the row.")
    if sh.username is not None and row.level not in ("verify", "secure"):
        raise ConfigError(f"{name} sets level '{row.level}' for the smarthost, but it logs in with AUTH, "
                          "which needs verified TLS; use verify or secure.")
    if sh.tls == "implicit" and row.level == "none":
        raise ConfigError(f"{name} sets level 'none' for a smarthost with tls = \"implicit\", which is TLS "
                          "from the first byte; use tls = \"starttls\" or another level.")


def _addresses_overlap(a: str, b: str) -> bool:
    # A wildcard bind takes the port on every address of its family, so a second bind would fail.
    x, y = ipaddress.ip_address(a), ipaddress.ip_address(b)
    return x.version == y.version and (x == y or x.is_unspecified or y.is_unspecified)


def _endpoint(lc: ListenerConfig) -> str:
    return f"[{lc.address}]:{lc.port}" if ":" in lc.address else f"{lc.address}:{lc.port}"


_TOML_POSITION_RE = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)$")


def load_config(path: Path | None = None) -> Config:
    """Read the file given, else $MAILWARD_CONFIG, else ./mailward.toml."""
    if path is None:
        env = os.environ.get(CONFIG_ENV)
        if env:
            path = Path(env)
            if not path.exists():
                raise ConfigError(
                    f"${CONFIG_ENV} names {path}, which does not exist; fix {CONFIG_ENV}, pass "
                    "--config FILE, or run mailward serve --demo for the embedded default.")
        else:
            path = DEFAULT_CONFIG_FILE
            if not path.exists():
                raise ConfigError(
                    f"no configuration file found: ${CONFIG_ENV} is not set and ./{DEFAULT_CONFIG_FILE} "
                    "does not exist; pass --config FILE or run mailward serve --demo for the embedded "
                    "default.")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist; check the --config path.") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory; pass the TOML file inside it.") from None
    except OSError as exc:
        raise ConfigError(f"configuration file {path} cannot be read ({exc.strerror}); let the mailward "
                          "user read it.") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (bad byte at offset {exc.start}); save it as "
                          "UTF-8.") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = " ".join(str(exc).split())
        match = _TOML_POSITION_RE.search(message)
        where = "at the end of the file"
        if match:
            message = message[: match.start()]
            if match[1]:
                where = f"line {match[1]}, column {match[2]}"
        raise ConfigError(f"{path} {where}: {message}; fix the TOML syntax.") from None
    return config_from_dict(raw, str(path), base_dir=path.parent)


def demo_toml(var_dir: Path) -> str:
    """The embedded configuration of `mailward serve --demo` as TOML: loopback only, unprivileged
    ports. `prepare_demo` writes it to var_dir/mailward.toml so `mailward queue ...` and
    `mailward sendmail` can be pointed at the running demo."""
    var = var_dir.absolute()

    def q(path: Path) -> str:
        return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'

    return f"""# Written by `mailward serve --demo` at every start: edits here are overwritten.
hostname = "localhost"
state_dir = {q(var)}
# Mail for these lands in state_dir/mail/<user>/new at once (local.maildir's default).
local_domains = ["localhost", "mailward.test"]

[[listener]]
kind = "mx"
address = "127.0.0.1"
port = 2525

[[listener]]
kind = "submissions"
address = "127.0.0.1"
port = 2465

[[listener]]
kind = "submission"
address = "127.0.0.1"
port = 2587

[[tls.certificates]]
cert = {q(var / "tls" / "cert.pem")}
key = {q(var / "tls" / "key.pem")}

# Prometheus metrics at http://127.0.0.1:2925/metrics
[metrics]
enabled = true
port = 2925

# "demo" is the demo user (demo@mailward.test): postmaster and every unknown local part land in
# state_dir/mail/demo/, so any test message can be seen there.
[local]
catch_all = "demo"

[[local.alias]]
name = "postmaster"
targets = ["demo"]
"""


def demo_config(var_dir: Path) -> Config:
    """The embedded configuration of `mailward serve --demo` (see demo_toml)."""
    return config_from_dict(tomllib.loads(demo_toml(var_dir)), "the demo configuration")


# --- start-up file checks -------------------------------------------------------------------------

def check_files(config: Config) -> None:
    """Check the files the configuration names and create state_dir; tls.py parses the PEM itself."""
    for i, pair in enumerate(config.tls.certificates):
        _check_readable(pair.cert, f"tls.certificates[{i}].cert",
                        "a PEM certificate chain (certbot's fullchain.pem works)")
        _check_readable(pair.key, f"tls.certificates[{i}].key",
                        "the PEM private key (certbot's privkey.pem works)")
        if pair.next_key is not None:
            _check_readable(pair.next_key, f"tls.certificates[{i}].next_key",
                            "the PEM key or certificate planned for the next rollover")
    state = config.state_dir
    try:
        state.mkdir(mode=0o750, parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"state_dir: {state} exists but is not a directory; point state_dir at a "
                          "directory.") from None
    except OSError as exc:
        raise ConfigError(f"state_dir: directory {state} cannot be created ({exc.strerror}); create it for "
                          "the mailward user or point state_dir elsewhere.") from None
    if not os.access(state, os.W_OK | os.X_OK):
        raise ConfigError(f"state_dir: directory {state} is not writable by this user; give the mailward "
                          "user write access or point state_dir elsewhere.")
    users_dir = config.auth.users_file.parent
    if not users_dir.is_dir():
        raise ConfigError(f"auth.users_file: directory {users_dir} does not exist; create it or point "
                          "users_file into an existing directory.")


def _check_readable(path: Path, key: str, what: str) -> None:
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError(f"{key}: {path} is a directory; point it at {what}.")
        # Opening a FIFO or device could block start-up, so only regular files are tried.
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{key}: {path} is not a regular file; point it at {what}.")
        os.close(os.open(path, os.O_RDONLY))
    except FileNotFoundError:
        raise ConfigError(f"{key}: file {path} does not exist; point it at {what}.") from None
    except PermissionError:
        raise ConfigError(f"{key}: file {path} is not readable by this user; grant the mailward user "
                          "read access, e.g. through a group.") from None
    except OSError as exc:
        raise ConfigError(f"{key}: file {path} cannot be opened ({exc.strerror}); point it at "
                          f"{what}.") from None


# --- describing -----------------------------------------------------------------------------------

def describe(config: Config) -> str:
    """The effective configuration as TOML, one `key = value  # doc` line per key."""
    lines = ["# mailward effective configuration; each comment gives the meaning and the default."]
    _describe_table(config, "", lines)
    return "\n".join(lines) + "\n"


def _describe_table(obj: object, path: str, lines: list[str]) -> None:
    later: list[tuple[_Key, Any]] = []
    for k in _keys(type(obj)):
        value = getattr(obj, k.attr)
        # TOML puts a table's own keys before its sub-tables, and an empty array of tables has no
        # [[header]] to carry it, so it is written inline.
        if (_is_table(k.hint) and value is not None) or (_table_array_item(k.hint) is not None and value):
            later.append((k, value))
            continue
        comment = f"  # {k.setting.doc}{_default_note(k.setting.default)}"
        if value is None:
            lines.append(f"# {k.name} = (not set){comment}")
        else:
            lines.append(f"{k.name} = {_toml(value)}{comment}")
    for k, value in later:
        full = _join(path, k.name)
        note = f"  # {k.setting.doc}{_default_note(k.setting.default)}"
        items = (value,) if _is_table(k.hint) else value
        header = f"[{full}]" if _is_table(k.hint) else f"[[{full}]]"
        for item in items:
            lines += ["", header + note]
            _describe_table(item, full, lines)


def _default_note(default: object) -> str:
    if isinstance(default, Derived):
        return f" (default: {default.doc})"
    if default is _REQUIRED:
        return " (required)"
    if default is None or isinstance(default, dict):
        return ""
    return f" (default: {_toml(default)})"


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str | Path):
        return _toml_string(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
