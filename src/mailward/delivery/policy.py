"""Where a recipient's mail goes and what TLS each connection must have: one pure decision.

Two functions, both free of I/O so they are tested row by row from a table (DESIGN principle 3):

* `destination_for(domain, config)` is the local routing table: local delivery, a configured route
  (Postfix transport-map style), the smarthost, or the MX hosts of the domain. A `Destination` is
  also the unit of connection reuse and of the per-destination concurrency limit.
* `plan(destination, facts, requiretls=..., tlsa=..., sts=...)` turns the DNS facts (hosts in
  preference order, their addresses, DNSSEC status) into the ordered list of `Candidate`
  connections, each with the `TlsRequirement` the attempt must meet, or one `Refusal` saying why
  no connection may be made (Null MX, no address, REQUIRETLS without an authenticated path).

Security levels use Postfix's vocabulary (DESIGN.md "Outbound TLS security levels"). The level of
a destination comes from one place: a route's own `security`, else for MX delivery the
`[[delivery.policy]]` row for the domain (exact, then the longest ".suffix"), else
`delivery.security` (default `dane`); the smarthost is `verify` unless a `[host]:port` row names it.
`dane` and `dane-only` are evaluated from `tlsa` facts per RFC 7672; without secure TLSA records
`dane` behaves as `may` and `dane-only` refuses. MTA-STS (RFC 8461) enters through `sts`: an
enforced policy keeps only matching MX hosts and demands PKIX verification against the MX host name.
DANE outranks MTA-STS: a host with secure TLSA facts is judged by them alone.

No level lets a connection fall back to plaintext once TLS was tried and failed, except `may` when
the operator opted in with `delivery.may_retry_plaintext` (Exim's `tls_tempfail_tryclear` and
Postfix retry in clear by default; an attacker who can break a handshake then reads the mail).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from mailward.config import (
    Config,
    DeliveryConfig,
    NextHop,
    RequireTlsName,
    match_domain,
    parse_next_hop,
    relay_matches,
)

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
    "dane_unavailable",
    "destination_for",
    "literal_facts",
    "plan",
    "sts_matches",
    "tlsa_hosts",
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
    # Where `level` was configured, for people. Not part of equality: routes of several domains
    # to one next hop at one level still share connections, and say the first route's name.
    level_source: str = field(default="delivery.security, the default", compare=False)
    may_retry_plaintext: bool = False  # delivery.may_retry_plaintext: `may` retries in clear
    requiretls: RequireTlsName = "enforce"  # how REQUIRETLS messages may pass this hop (RFC 8689)

    @property
    def uses_mx(self) -> bool:
        return self.next_hop is None or self.next_hop.mx

    @property
    def lookup_name(self) -> str:
        """The name DNS is asked about: the domain for MX, else the next-hop host."""
        return self.domain if self.next_hop is None else self.next_hop.host


LOCAL = Destination(key="local", kind="local", domain="", level=SecurityLevel.NONE,
                    level_source="local_domains: delivered here without SMTP")


def destination_for(domain: str, config: Config) -> Destination:
    """Route a recipient domain (lower-case A-labels, or an address literal, as queued).

    Order: local domains, then a route for the domain itself, then the longest ".suffix" route,
    then the smarthost, then MX delivery. A domain-less recipient (<postmaster>) is local.
    The level follows the same order: the route's `security`, the smarthost's `[host]:port`
    policy row (else verify), the domain's policy row (exact, then longest ".suffix"), and
    finally `delivery.security`.
    """
    dc = config.delivery
    if not domain or domain in config.local_domains:
        return LOCAL
    retry = dc.may_retry_plaintext
    i = match_domain(domain, [r.domain for r in dc.routes])
    if i is not None:
        route = dc.routes[i]
        hop = parse_next_hop(route.next_hop)
        source = f"delivery.route[{i}] for {route.domain}"
        level = SecurityLevel(route.security)
        if hop.mx:
            return Destination(
                key=f"route:{hop}", kind="route", domain=hop.host, next_hop=None, port=dc.port,
                level=level, ca_file=route.ca_file, level_source=source, may_retry_plaintext=retry,
                requiretls=route.requiretls,
            )
        return Destination(
            key=f"route:{hop}", kind="route", domain=hop.host, next_hop=hop, port=hop.port or dc.port,
            level=level, ca_file=route.ca_file, level_source=source, may_retry_plaintext=retry,
            requiretls=route.requiretls,
        )
    sh = dc.smarthost
    if sh is not None:
        hop = replace(parse_next_hop(sh.host), port=sh.port, mx=False)
        level, ca_file, source, requiretls = _relay_level(dc, hop.host, sh.port)
        return Destination(
            key=f"smarthost:{hop}", kind="smarthost", domain=hop.host, next_hop=hop, port=sh.port,
            level=level, implicit_tls=sh.tls == "implicit", ca_file=ca_file or sh.ca_file,
            authenticate=sh.username is not None, level_source=source, may_retry_plaintext=retry,
            requiretls=requiretls,
        )
    if domain.startswith("["):
        # RFC 5321 §4.1.3 address literal: that address, no DNS; only the global level names it.
        text = domain[1:-1]
        text = text[5:] if text.lower().startswith("ipv6:") else text
        hop = NextHop(text, None, literal=True, mx=False)
        return Destination(key=f"mx:{domain}", kind="mx", domain=domain, next_hop=hop, port=dc.port,
                           level=SecurityLevel(dc.security),
                           level_source="delivery.security, the default for address literals",
                           may_retry_plaintext=retry)
    level, ca_file, source, requiretls = _domain_level(dc, domain)
    return Destination(key=f"mx:{domain}", kind="mx", domain=domain, port=dc.port, level=level,
                       ca_file=ca_file, level_source=source, may_retry_plaintext=retry, requiretls=requiretls)


_Level = tuple[SecurityLevel, Path | None, str, RequireTlsName]


def _domain_level(dc: DeliveryConfig, domain: str) -> _Level:
    """An MX destination's level: its policy row (exact, then longest ".suffix"), else the default."""
    j = match_domain(domain, [p.destination for p in dc.policies])
    if j is None:
        return SecurityLevel(dc.security), None, "delivery.security, the default", "enforce"
    row = dc.policies[j]
    return (SecurityLevel(row.level), row.ca_file, f"delivery.policy[{j}] for {row.destination}",
            row.requiretls)


def _relay_level(dc: DeliveryConfig, host: str, port: int) -> _Level:
    """The smarthost's level: a "[host]:port" row, else a "[host]" row, else verify."""
    rows = [(j, p) for j, p in enumerate(dc.policies)
            if p.destination.startswith("[") and relay_matches(p.destination, host, port)]
    if not rows:
        return SecurityLevel.VERIFY, None, "delivery.smarthost, always verified", "enforce"
    j, row = max(rows, key=lambda r: not r[1].destination.endswith("]"))  # a port beats no port
    return (SecurityLevel(row.level), row.ca_file, f"delivery.policy[{j}] for {row.destination}",
            row.requiretls)


# --- facts ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostFacts:
    """One next-hop host as DNS described it."""

    name: str  # MX exchange (or the host itself for implicit MX / explicit hosts), no trailing dot
    addresses: tuple[str, ...]  # IPv6 and IPv4, in the order to try
    preference: int = 0
    secure: bool = False  # its address records validated (DNSSEC)
    alias_secure: bool = False  # the name is a validated CNAME, whatever its target's status


@dataclass(frozen=True, slots=True)
class RouteFacts:
    """What DNS said about a destination, already sorted as RFC 5321 §5.1 asks."""

    hosts: tuple[HostFacts, ...]
    null_mx: bool = False  # RFC 7505: the domain accepts no mail
    mx_secure: bool = False  # the MX RRset validated (DNSSEC)
    implicit_mx: bool = False  # no MX: the domain's own address records
    canonical_domain: str | None = None  # the next-hop domain after a secure CNAME expansion, if any


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
    ca_file: Path | None = None  # the Web PKI roots MX certificates are checked against; None: system's
    # A policy is announced but could not be had, and none is cached (mode "none" then): MTA-STS
    # does not apply (RFC 8461 §3.3), but a REQUIRETLS message that needs it waits for it.
    unavailable: bool = False


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
    # `may` with delivery.may_retry_plaintext only: a failed handshake is retried on the same host
    # without STARTTLS. Off by default: it hands the mail to whoever can break the handshake.
    plaintext_after_failed_handshake: bool = False
    tlsa: tuple[TlsaRecord, ...] = ()  # DANE: the records the peer must match
    dane_names: tuple[str, ...] = ()  # DANE-TA reference identifiers (RFC 7672 §3.2.2)
    reason: str = ""  # why this level applies, for logs and `policy show`
    # The connection carries REQUIRETLS messages under `enforce`: a server that does not offer
    # REQUIRETLS after TLS is passed over for the next (RFC 8689 §4.2.1). Also keeps such
    # connections apart from others when they are parked for reuse.
    requiretls: bool = False

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
    tls_optional: bool = False,
    tlsa: Mapping[str, TlsaFacts] | None = None,
    sts: StsFacts | None = None,
) -> Plan:
    """Decide which addresses may carry the mail and with what TLS.

    `tlsa` maps host names to their TLSA lookups (DANE; None: not looked up; `tlsa_hosts` says
    which hosts to look up). `sts` is the domain's valid MTA-STS policy, if any. Both are consulted
    only at the `dane` levels, which is where DANE and MTA-STS apply; an explicit level such as
    `verify` is taken as is. Hosts keep their MX preference order whatever their TLS: a worse MX
    with TLSA records never pre-empts a better one without (RFC 7672 §2.2.1).

    `requiretls` plans a message sent with REQUIRETLS, as the destination's `requiretls` mode says
    (RFC 8689 §4.2.1 under `enforce`). `tls_optional` plans a message whose sender wrote
    `TLS-Required: No` (RFC 8689 §5): the destination's own DANE and MTA-STS policies are not
    enforced for it, so level `dane` becomes `may`; levels the operator chose stay as they are,
    and REQUIRETLS outranks the header.
    """
    if facts.null_mx:
        return Plan(destination, refusal=Refusal(
            True, "5.1.10", f"Null MX: {destination.domain} does not accept mail (RFC 7505)"))
    mode = destination.requiretls if requiretls else None
    level = destination.level
    if tls_optional and not requiretls and level is SecurityLevel.DANE:
        level = SecurityLevel.MAY
        destination = replace(destination, level=level,
                              level_source=f"TLS-Required: No in the message, not {destination.level_source}")
    if level is SecurityLevel.SECURE and destination.uses_mx and not facts.mx_secure:
        # Without DNSSEC an attacker chooses the MX host, and then PKIX proves only that host's name.
        return Plan(destination, refusal=Refusal(
            False, "4.7.5", f"level secure ({destination.level_source}) needs DNSSEC-secure MX records, "
                            f"and those of {destination.domain} are not"))
    candidates: list[Candidate] = []
    skipped: list[str] = []
    waiting = False  # a host may yet qualify for REQUIRETLS: the MTA-STS policy could not be had
    for host in facts.hosts:
        requirement, why_not = _requirement(destination, facts, host, level, tlsa, sts)
        if requirement is None:
            skipped.append(f"{host.name}: {why_not}")
            continue
        if mode is not None:
            requirement, why_not = _for_requiretls(mode, destination, facts, host, requirement, sts)
            if requirement is None:
                skipped.append(f"{host.name}: {why_not}")
                waiting = waiting or why_not == _STS_AWAITED
                continue
        if not host.addresses:
            skipped.append(f"{host.name}: no address records")
            continue
        candidates.extend(Candidate(host.name, a, destination.port, requirement) for a in host.addresses)
    if candidates:
        return Plan(destination, tuple(candidates), skipped=tuple(skipped))
    return Plan(destination, refusal=_no_candidates(destination, facts, requiretls and not waiting, skipped),
                skipped=tuple(skipped))


# Not a verdict on the host: the policy that could authenticate it is announced but could not be
# fetched now, so the message is deferred rather than returned (a passing fault, RFC 8461 §3.3).
_STS_AWAITED = "REQUIRETLS waits for the domain's MTA-STS policy, announced but not fetched yet"


def _for_requiretls(
    mode: RequireTlsName,
    destination: Destination,
    facts: RouteFacts,
    host: HostFacts,
    requirement: TlsRequirement,
    sts: StsFacts | None,
) -> tuple[TlsRequirement | None, str]:
    """A host's requirement for a REQUIRETLS message under the destination's mode, or None and
    why the host may not carry it."""
    if mode == "opportunistic":
        return requirement, ""
    if mode == "encrypt":
        if not requirement.starttls and not requirement.implicit:
            return None, f"REQUIRETLS (encrypt) needs TLS, level is {requirement.level}"
        if requirement.required:
            return requirement, ""
        return replace(requirement, level=SecurityLevel.ENCRYPT, required=True,
                       plaintext_after_failed_handshake=False,
                       reason=f"{requirement.reason}; REQUIRETLS (encrypt) makes TLS mandatory"), ""
    # enforce, RFC 8689 §4.2.1: authenticated TLS (DANE, or PKIX per MTA-STS or the operator's
    # verify/secure), to a host whose name was obtained securely: a forged insecure MX answer
    # would otherwise choose a host whose certificate PKIX happily verifies.
    if not requirement.authenticated:
        if sts is not None and sts.unavailable:
            return None, _STS_AWAITED
        return None, f"REQUIRETLS needs authenticated TLS, level is {requirement.level}"
    if requirement.verify == "pkix" and destination.uses_mx and not facts.mx_secure:
        covered = sts is not None and sts.mode == "enforce" and any(sts_matches(p, host.name) for p in sts.mx)
        if not covered:
            return None, ("REQUIRETLS needs MX records obtained securely (DNSSEC or an enforced "
                          "MTA-STS policy), and these are neither")
    return replace(requirement, requiretls=True), ""


def tlsa_hosts(destination: Destination, facts: RouteFacts) -> tuple[str, ...]:
    """The hosts whose TLSA records `plan` would consult: at the dane levels, hosts that DANE can
    apply to (RFC 7672 §2.2.1, §2.2.2). Other hosts need no TLSA lookup, and must not get one
    where their address records are insecure (broken nameservers, §2.2.2)."""
    if destination.level not in (SecurityLevel.DANE, SecurityLevel.DANE_ONLY):
        return ()
    return tuple(h.name for h in facts.hosts if dane_unavailable(destination, facts, h) is None)


def _no_candidates(destination: Destination, facts: RouteFacts, requiretls: bool,
                   skipped: Sequence[str]) -> Refusal:
    name = destination.domain
    if not facts.hosts:
        return Refusal(False, "4.4.4", f"no mail host for {name}")
    detail = "; ".join(skipped)
    if requiretls and skipped and all("REQUIRETLS" in s for s in skipped):
        # Every host is ruled out by what REQUIRETLS demands, not by a passing fault: the message
        # goes back to its sender now (RFC 8689 §4.2.1), as Postfix does once all MX are exhausted.
        # A host left out for a transient reason (a failed TLSA lookup) makes this a deferral below.
        return Refusal(True, "5.7.30", f"REQUIRETLS support required: no authenticated TLS path to "
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
    origin = f"{level} from {destination.level_source}"
    if level is SecurityLevel.NONE:
        return TlsRequirement(level, starttls=False, required=False, reason=origin), ""
    if level is SecurityLevel.MAY:
        return _may(destination, origin), ""
    if level is SecurityLevel.ENCRYPT:
        return TlsRequirement(level, starttls=True, required=True, implicit=implicit, reason=origin), ""
    if level in (SecurityLevel.VERIFY, SecurityLevel.SECURE):
        return TlsRequirement(level, starttls=True, required=True, verify="pkix", verify_name=host.name,
                              ca_file=ca, implicit=implicit, reason=origin), ""
    # dane / dane-only: RFC 7672 first, then MTA-STS, then opportunistic.
    dane = _dane(destination, facts, host, tlsa, origin)
    if isinstance(dane, tuple):
        requirement = dane[0]
        if level is SecurityLevel.DANE_ONLY and requirement is not None and not requirement.authenticated:
            # Postfix's dane-only: records that cannot authenticate are as good as none.
            return None, "dane-only, and its DNSSEC-secure TLSA records are all unusable"
        return dane
    if level is SecurityLevel.DANE_ONLY:
        return None, f"dane-only, and {dane}"
    if sts is not None and sts.mode == "enforce":
        if not any(sts_matches(p, host.name) for p in sts.mx):
            return None, "not listed in the MTA-STS policy"
        return TlsRequirement(SecurityLevel.VERIFY, starttls=True, required=True, verify="pkix",
                              verify_name=host.name, ca_file=sts.ca_file, implicit=implicit,
                              reason=f"{origin}: MTA-STS policy in enforce mode"), ""
    return _may(destination, f"{origin}: {dane}, so opportunistic TLS"), ""


def _may(destination: Destination, reason: str) -> TlsRequirement:
    # An implicit-TLS connection has no plaintext to fall back to.
    retry = destination.may_retry_plaintext and not destination.implicit_tls
    return TlsRequirement(SecurityLevel.MAY, starttls=True, required=False, implicit=destination.implicit_tls,
                          plaintext_after_failed_handshake=retry, reason=reason)


def dane_unavailable(destination: Destination, facts: RouteFacts, host: HostFacts) -> str | None:
    """Why DANE cannot apply to this host whatever its TLSA records say, or None when it can."""
    # §2.2.1: an attacker who forges an insecure MX answer chooses the hosts, so their TLSA records
    # prove nothing about the destination. The next-hop domain as its own host (implicit MX, or an
    # MX naming the domain itself) was not chosen by that answer, so §2.2.2 applies to it.
    if destination.uses_mx and not (facts.mx_secure or facts.implicit_mx or host.name == destination.domain):
        return "the MX records are not DNSSEC-secure"
    # §2.2.2: TLSA only for hosts whose address records are secure, or whose own name is a secure
    # alias (TLSA at that name then; Postfix does the same).
    if not (host.secure or host.alias_secure):
        return "its address records are not DNSSEC-secure"
    return None


def _dane(
    destination: Destination,
    facts: RouteFacts,
    host: HostFacts,
    tlsa: Mapping[str, TlsaFacts] | None,
    origin: str,
) -> tuple[TlsRequirement | None, str] | str:
    """RFC 7672 §2.2 for one host: the requirement (or None and why the host is unusable) when
    DANE decides; otherwise the reason DANE does not apply, for the fallback to say."""
    unavailable = dane_unavailable(destination, facts, host)
    if unavailable is not None:
        return unavailable
    found = None if tlsa is None else tlsa.get(host.name)
    if found is None:
        return "no TLSA lookup was made"
    if found.status == "insecure":
        return "its TLSA records are not DNSSEC-secure"
    if found.status == "bogus":
        # §2.1.1: a failed lookup is never "no records": the host is unusable, the next MX or a defer.
        return None, "TLSA lookup failed or is bogus (RFC 7672 §2.1.1)"
    if not found.records:
        return "it has no TLSA records (DNSSEC-secure denial)"
    implicit = destination.implicit_tls
    usable = found.usable
    if not usable:
        # §2.2.3: secure but unusable records still make TLS mandatory, unauthenticated.
        return TlsRequirement(SecurityLevel.ENCRYPT, starttls=True, required=True, implicit=implicit,
                              reason=f"{origin}: only unusable TLSA records, so TLS without "
                                     "authentication"), ""
    base = found.base_domain or host.name
    # §3.2.2: the TLSA base domain, the MX host as named, and with a secure MX RRset also the
    # next-hop domain and its CNAME expansion (Postfix's "nexthop, hostname").
    names = [base, host.name]
    if destination.uses_mx and facts.mx_secure:
        names.append(destination.domain)
        if facts.canonical_domain:
            names.append(facts.canonical_domain)
    return TlsRequirement(SecurityLevel.DANE, starttls=True, required=True, verify="dane",
                          verify_name=base, tlsa=usable, dane_names=tuple(dict.fromkeys(names)),
                          implicit=implicit, reason=f"{origin}: DNSSEC-secure TLSA records"), ""
