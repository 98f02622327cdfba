"""Where a recipient's mail goes and what TLS each connection must have: one pure decision.

Two functions, both free of I/O so they are tested row by row from a table (DESIGN principle 3):

* `destination_for(domain, config)` is the local routing table: local delivery, a configured route
  (Postfix transport-map style), the smarthost, or the MX hosts of the domain. A `Destination` is
  also the unit of connection reuse and of the per-destination concurrency limit.
* `plan(destination, facts, requiretls=..., tlsa=..., sts=...)` turns the DNS facts (hosts in
  preference order, their addresses, DNSSEC status) into the ordered list of `Candidate`
  connections, each with the `TlsRequirement` the attempt must meet, or one `Refusal` saying why
  no connection may be made (Null MX, no address, REQUIRETLS without an authenticated path).

Security levels use Postfix's vocabulary. This version enforces none, may, encrypt and verify
(and secure, as verify over a DNSSEC-secure MX set). `dane`, the design default for MX delivery,
is evaluated from `tlsa` facts per RFC 7672; until those lookups exist the caller passes none and
`dane` behaves as `may`, exactly as RFC 7672 prescribes for a domain without secure TLSA records.
`dane-only` without usable TLSA facts refuses. MTA-STS (RFC 8461) enters through `sts`: an enforced
policy keeps only matching MX hosts and demands PKIX verification against the MX host name.
DANE outranks MTA-STS: a host with secure TLSA facts is judged by them alone.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from mailward.config import Config, NextHop, parse_next_hop

__all__ = [
    "Candidate",
    "Destination",
    "DestinationKind",
    "HostFacts",
    "Plan",
    "Refusal",
    "RouteFacts",
    "SecurityLevel",
    "StsFacts",
    "TlsRequirement",
    "TlsaFacts",
    "TlsaRecord",
    "VerifyMode",
    "destination_for",
    "literal_facts",
    "plan",
    "sts_matches",
]


class SecurityLevel(enum.Enum):
    """Outbound TLS levels, weakest first (DESIGN.md "Outbound TLS security levels")."""

    NONE = "none"  # never STARTTLS
    MAY = "may"  # STARTTLS when offered, plaintext otherwise
    ENCRYPT = "encrypt"  # TLS required, certificate not checked
    DANE = "dane"  # DANE when secure usable TLSA exist, else MTA-STS when enforced, else may
    DANE_ONLY = "dane-only"  # DANE or nothing
    VERIFY = "verify"  # PKIX chain and host name
    SECURE = "secure"  # verify, and the MX set must be DNSSEC-secure

    def __str__(self) -> str:
        return self.value


VerifyMode = Literal["none", "pkix", "dane"]
DestinationKind = Literal["local", "mx", "route", "smarthost"]


# --- routing --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Destination:
    """Where one group of recipients goes; `key` identifies it for reuse and concurrency limits."""

    key: str
    kind: DestinationKind
    domain: str  # the next-hop domain: recipient domain (mx), or the route's/smarthost's host
    next_hop: NextHop | None = None  # an explicit host or address; None looks up MX of `domain`
    port: int = 25
    level: SecurityLevel = SecurityLevel.DANE
    implicit_tls: bool = False  # TLS from the first byte (smarthost on 465)
    ca_file: Path | None = None
    authenticate: bool = False  # send AUTH (smarthost with credentials)

    @property
    def uses_mx(self) -> bool:
        return self.next_hop is None or self.next_hop.mx

    @property
    def lookup_name(self) -> str:
        """The name DNS is asked about: the domain for MX, else the next-hop host."""
        return self.domain if self.next_hop is None else self.next_hop.host


LOCAL = Destination(key="local", kind="local", domain="", level=SecurityLevel.NONE)


def destination_for(domain: str, config: Config) -> Destination:
    """Route a recipient domain (lower-case A-labels, or an address literal, as queued).

    Order: local domains, then a route for the domain itself, then the longest ".suffix" route,
    then the smarthost, then MX delivery. A domain-less recipient (<postmaster>) is local.
    """
    dc = config.delivery
    if not domain or domain in config.local_domains:
        return LOCAL
    route = None
    for r in dc.routes:
        if r.domain == domain:
            route = r
            break
    if route is None:
        suffixes = [r for r in dc.routes if r.domain.startswith(".") and domain.endswith(r.domain)]
        if suffixes:
            route = max(suffixes, key=lambda r: len(r.domain))
    if route is not None:
        hop = parse_next_hop(route.next_hop)
        if hop.mx:
            return Destination(
                key=f"route:{hop}", kind="route", domain=hop.host, next_hop=None, port=dc.port,
                level=SecurityLevel(route.security), ca_file=route.ca_file,
            )
        return Destination(
            key=f"route:{hop}", kind="route", domain=hop.host, next_hop=hop, port=hop.port or dc.port,
            level=SecurityLevel(route.security), ca_file=route.ca_file,
        )
    sh = dc.smarthost
    if sh is not None:
        hop = replace(parse_next_hop(sh.host), port=sh.port, mx=False)
        return Destination(
            key=f"smarthost:{hop}", kind="smarthost", domain=hop.host, next_hop=hop, port=sh.port,
            level=SecurityLevel.VERIFY, implicit_tls=sh.tls == "implicit", ca_file=sh.ca_file,
            authenticate=sh.username is not None,
        )
    if domain.startswith("["):
        # RFC 5321 §4.1.3 address literal: that address, no DNS, opportunistic TLS.
        text = domain[1:-1]
        text = text[5:] if text.lower().startswith("ipv6:") else text
        hop = NextHop(text, None, literal=True, mx=False)
        return Destination(key=f"mx:{domain}", kind="mx", domain=domain, next_hop=hop, port=dc.port,
                           level=SecurityLevel.MAY)
    return Destination(key=f"mx:{domain}", kind="mx", domain=domain, port=dc.port)


# --- facts ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostFacts:
    """One next-hop host as DNS described it."""

    name: str  # MX exchange (or the host itself for implicit MX / explicit hosts), no trailing dot
    addresses: tuple[str, ...]  # IPv6 and IPv4, in the order to try
    preference: int = 0
    secure: bool = False  # its address records validated (DNSSEC)


@dataclass(frozen=True, slots=True)
class RouteFacts:
    """What DNS said about a destination, already sorted as RFC 5321 §5.1 asks."""

    hosts: tuple[HostFacts, ...]
    null_mx: bool = False  # RFC 7505: the domain accepts no mail
    mx_secure: bool = False  # the MX RRset validated (DNSSEC)
    implicit_mx: bool = False  # no MX: the domain's own address records


def literal_facts(destination: Destination) -> RouteFacts:
    """Facts for an explicit address: no DNS involved."""
    hop = destination.next_hop
    assert hop is not None and hop.literal
    return RouteFacts(hosts=(HostFacts(name=hop.host, addresses=(hop.host,)),))


@dataclass(frozen=True, slots=True)
class TlsaRecord:
    """One TLSA record (RFC 6698): usage, selector, matching type, association data."""

    usage: int
    selector: int
    matching_type: int
    data: bytes

    @property
    def usable(self) -> bool:
        # RFC 7672 §3.1: only DANE-TA(2) and DANE-EE(3) count for SMTP; §5: known selectors and
        # matching types only. PKIX-TA/EE (0, 1) are treated as unusable, as Postfix does, and so
        # is a digest of the wrong length (malformed, §2.2.3).
        if self.usage not in (2, 3) or self.selector not in (0, 1):
            return False
        expected = {0: None, 1: 32, 2: 64}
        if self.matching_type not in expected:
            return False
        length = expected[self.matching_type]
        return len(self.data) > 0 if length is None else len(self.data) == length


@dataclass(frozen=True, slots=True)
class TlsaFacts:
    """The TLSA lookup for one MX host (hook for DANE, RFC 7672 §2.2.3)."""

    status: Literal["secure", "insecure", "bogus"]  # bogus: SERVFAIL, timeout, failed validation
    records: tuple[TlsaRecord, ...] = ()
    base_domain: str | None = None  # the TLSA base domain, also the SNI name (§8.1)

    @property
    def usable(self) -> tuple[TlsaRecord, ...]:
        return tuple(r for r in self.records if r.usable)


@dataclass(frozen=True, slots=True)
class StsFacts:
    """A valid MTA-STS policy for the next-hop domain (hook for RFC 8461)."""

    mode: Literal["enforce", "testing", "none"]
    mx: tuple[str, ...] = ()  # patterns; "*.example.net" matches exactly one more label


def sts_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: an MX pattern match; a wildcard covers one left-most label only."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        head, dot, rest = host.partition(".")
        return bool(head) and bool(dot) and rest == pattern[2:]
    return pattern == host


# --- the decision ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsRequirement:
    """What one connection must achieve before any envelope data is sent."""

    level: SecurityLevel  # the effective level for this host (e.g. "may" for "dane" without TLSA)
    starttls: bool  # ask for STARTTLS when the server offers it
    required: bool  # no TLS, no delivery over this connection
    verify: VerifyMode = "none"
    verify_name: str | None = None  # reference identity for PKIX, and the SNI name
    ca_file: Path | None = None
    implicit: bool = False  # TLS before the greeting
    # `may` only: a failed handshake is retried on the same host without STARTTLS, like
    # Postfix and unlike a policy that demands TLS.
    plaintext_after_failed_handshake: bool = False
    tlsa: tuple[TlsaRecord, ...] = ()  # DANE: the records the peer must match
    dane_names: tuple[str, ...] = ()  # DANE-TA reference identifiers (RFC 7672 §3.2.2)
    reason: str = ""  # why this level applies, for logs and `policy show`

    @property
    def authenticated(self) -> bool:
        return self.verify != "none"


@dataclass(frozen=True, slots=True)
class Candidate:
    """One address of one host to try, in order."""

    host: str
    address: str
    port: int
    tls: TlsRequirement

    @property
    def relay(self) -> str:
        """Postfix's relay= notation: host[address]:port."""
        return f"{self.host}[{self.address}]:{self.port}"


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why no connection may be made: fail at once or wait and try again."""

    permanent: bool
    status: str  # enhanced status code
    reason: str

    @property
    def reply(self) -> str:
        return f"{self.status} {self.reason}"


@dataclass(frozen=True, slots=True)
class Plan:
    destination: Destination
    candidates: tuple[Candidate, ...] = ()
    refusal: Refusal | None = None
    skipped: tuple[str, ...] = field(default=())  # hosts left out, with why (logs, `policy show`)


def plan(
    destination: Destination,
    facts: RouteFacts,
    *,
    requiretls: bool = False,
    tlsa: Mapping[str, TlsaFacts] | None = None,
    sts: StsFacts | None = None,
) -> Plan:
    """Decide which addresses may carry the mail and with what TLS.

    `tlsa` maps MX host names to their TLSA lookups (DANE; None: not looked up). `sts` is the
    domain's valid MTA-STS policy, if any. Both are consulted only at the `dane` levels, which is
    where DANE and MTA-STS apply; an explicit level such as a route's `verify` is taken as is.
    """
    if facts.null_mx:
        return Plan(destination, refusal=Refusal(
            True, "5.1.10", f"Null MX: {destination.domain} does not accept mail (RFC 7505)"))
    level = destination.level
    candidates: list[Candidate] = []
    skipped: list[str] = []
    for host in facts.hosts:
        requirement, why_not = _requirement(destination, facts, host, level, tlsa, sts)
        if requirement is None:
            skipped.append(f"{host.name}: {why_not}")
            continue
        if requiretls and not requirement.authenticated:
            # RFC 8689 §4.2.1: a REQUIRETLS message goes only over authenticated TLS.
            skipped.append(f"{host.name}: REQUIRETLS needs authenticated TLS, level is {requirement.level}")
            continue
        if not host.addresses:
            skipped.append(f"{host.name}: no address records")
            continue
        candidates.extend(Candidate(host.name, a, destination.port, requirement) for a in host.addresses)
    if candidates:
        return Plan(destination, tuple(candidates), skipped=tuple(skipped))
    return Plan(destination, refusal=_no_candidates(destination, facts, requiretls, skipped),
                skipped=tuple(skipped))


def _no_candidates(destination: Destination, facts: RouteFacts, requiretls: bool,
                   skipped: Sequence[str]) -> Refusal:
    name = destination.domain
    if not facts.hosts:
        return Refusal(False, "4.4.4", f"no mail host for {name}")
    detail = "; ".join(skipped)
    if requiretls and any("REQUIRETLS" in s for s in skipped):
        # Deferred, not bounced: the path may become authenticated (DNSSEC, MTA-STS) before
        # the message expires; expiry then bounces it.
        return Refusal(False, "5.7.30", f"REQUIRETLS support required: no authenticated TLS path to "
                                        f"{name} ({detail})")
    if all("no address records" in s for s in skipped):
        return Refusal(False, "4.4.4", f"no address for any mail host of {name}")
    return Refusal(False, "4.7.5", f"no mail host of {name} meets the TLS policy ({detail})")


def _requirement(
    destination: Destination,
    facts: RouteFacts,
    host: HostFacts,
    level: SecurityLevel,
    tlsa: Mapping[str, TlsaFacts] | None,
    sts: StsFacts | None,
) -> tuple[TlsRequirement | None, str]:
    """The TLS requirement for one host, or None and the reason it may not be used."""
    ca = destination.ca_file
    implicit = destination.implicit_tls
    if level is SecurityLevel.NONE:
        return TlsRequirement(level, starttls=False, required=False, reason="policy: none"), ""
    if level is SecurityLevel.MAY:
        return _may("policy: may", implicit), ""
    if level is SecurityLevel.ENCRYPT:
        return TlsRequirement(level, starttls=True, required=True, implicit=implicit,
                              reason="policy: encrypt"), ""
    if level in (SecurityLevel.VERIFY, SecurityLevel.SECURE):
        if level is SecurityLevel.SECURE and destination.uses_mx and not facts.mx_secure:
            return None, "level secure needs a DNSSEC-secure MX set"
        return TlsRequirement(level, starttls=True, required=True, verify="pkix", verify_name=host.name,
                              ca_file=ca, implicit=implicit, reason=f"policy: {level}"), ""
    # dane / dane-only: RFC 7672 first, then MTA-STS, then opportunistic.
    dane = _dane(destination, facts, host, tlsa)
    if dane is not None:
        return dane
    if level is SecurityLevel.DANE_ONLY:
        return None, "dane-only and no secure usable TLSA records"
    if sts is not None and sts.mode == "enforce":
        if not any(sts_matches(p, host.name) for p in sts.mx):
            return None, "not listed in the MTA-STS policy"
        return TlsRequirement(SecurityLevel.VERIFY, starttls=True, required=True, verify="pkix",
                              verify_name=host.name, reason="MTA-STS enforce"), ""
    reason = "no TLSA lookup" if tlsa is None else "no secure TLSA records"
    return _may(f"dane: {reason}, opportunistic", implicit), ""


def _may(reason: str, implicit: bool) -> TlsRequirement:
    return TlsRequirement(SecurityLevel.MAY, starttls=True, required=False, implicit=implicit,
                          plaintext_after_failed_handshake=True, reason=reason)


def _dane(
    destination: Destination,
    facts: RouteFacts,
    host: HostFacts,
    tlsa: Mapping[str, TlsaFacts] | None,
) -> tuple[TlsRequirement | None, str] | None:
    """RFC 7672 §2.2: the DANE verdict for a host, or None when DANE does not apply to it."""
    if tlsa is None:
        return None
    # §2.2.1/§2.2.2: DANE needs a secure MX set (or no MX at all) and secure address records.
    if destination.uses_mx and not (facts.mx_secure or facts.implicit_mx):
        return None
    if not host.secure:
        return None
    found = tlsa.get(host.name)
    if found is None or found.status == "insecure":
        return None
    if found.status == "bogus":
        return None, "TLSA lookup failed or is bogus (RFC 7672 §2.1.1)"
    if not found.records:
        return None
    usable = found.usable
    if not usable:
        # §2.2.3: secure but unusable records still make TLS mandatory, unauthenticated.
        return TlsRequirement(SecurityLevel.ENCRYPT, starttls=True, required=True,
                              reason="dane: only unusable TLSA records"), ""
    base = found.base_domain or host.name
    # §3.2.2: the TLSA base domain, the MX host as named, and with a secure MX RRset also the
    # next-hop domain (Postfix's "nexthop, hostname").
    names = [base, host.name]
    if destination.uses_mx and facts.mx_secure:
        names.append(destination.domain)
    return TlsRequirement(SecurityLevel.DANE, starttls=True, required=True, verify="dane",
                          verify_name=base, tlsa=usable, dane_names=tuple(dict.fromkeys(names)),
                          reason="dane: secure TLSA records"), ""
