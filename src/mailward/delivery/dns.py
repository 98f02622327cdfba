"""DNS for outbound delivery: next hops (MX, implicit MX, Null MX), host addresses and TLSA records,
each answer with its DNSSEC status.

`DnsResolver` owns every DNS question delivery asks and the rules for reading the answers:

* Next hops per RFC 5321 §5.1: MX hosts by preference, in random order among equal preferences;
  no MX means the domain's own addresses (implicit MX); an MX RRset whose only exchange is "." is
  a Null MX (RFC 7505), reported so delivery fails at once. Each host's IPv6 and IPv4 addresses.
  CNAMEs are followed by the resolver and the chain is recorded.
* Errors: NXDOMAIN of the asked name is permanent (`DnsPermanentError`); SERVFAIL, a timeout, an
  unreachable resolver or a malformed answer is temporary (`DnsTemporaryError`) and never counts as
  "no record".
* DNSSEC status: "secure" comes from the AD bit of a validating resolver, trusted only when every
  resolver is on loopback (as Postfix requires); otherwise every answer is "insecure" and DANE is
  unavailable. "bogus" stands for an answer that could not be had or validated (SERVFAIL, timeout,
  malformed): indeterminate, never "no record".
* TXT records (for MTA-STS discovery) follow the same status and caching rules.
* Answers are cached for their TTL in a bounded cache; failures are not cached.

Nothing here decides policy: `NextHops.facts()` and `HostAddresses.facts()` hand `policy.plan` the
facts it reads, and `tlsa()` returns `policy.TlsaFacts` for DANE (RFC 7672).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdata
import dns.rdatatype
import dns.resolver
from dns.rdtypes.ANY.MX import MX
from dns.rdtypes.ANY.TLSA import TLSA
from dns.rdtypes.ANY.TXT import TXT
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA

from mailward.config import parse_next_hop
from mailward.delivery.policy import HostFacts, RouteFacts, TlsaFacts, TlsaRecord
from mailward.metrics import DnsLookup, emit

__all__ = [
    "DnsError",
    "DnsPermanentError",
    "DnsResolver",
    "DnsTemporaryError",
    "DnssecStatus",
    "Exchange",
    "HostAddresses",
    "MailHost",
    "NextHops",
]

log = logging.getLogger("mailward.delivery")

DnssecStatus = Literal["secure", "insecure", "bogus"]

CACHE_ENTRIES = 10_000  # answers kept; the least recently used goes first
CACHE_MAX_TTL = 3600  # a resolver restart or a zone change is seen within the hour at the latest
EDNS_PAYLOAD = 1232  # the DNS flag day 2020 size: no IP fragmentation


# --- errors ---------------------------------------------------------------------------------------


class DnsError(Exception):
    """A lookup gave no usable answer. The text is one sentence saying what happened."""

    def __init__(self, reason: str, *, status: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status  # the enhanced status code a delivery failure carries


class DnsPermanentError(DnsError):
    """The name does not exist (NXDOMAIN), or has no way to receive mail: delivery fails at once."""

    def __init__(self, reason: str, *, status: str = "5.1.2") -> None:
        super().__init__(reason, status=status)


class DnsTemporaryError(DnsError):
    """SERVFAIL (which includes DNSSEC bogus), timeout, unreachable resolver, malformed answer."""

    def __init__(self, reason: str, *, status: str = "4.4.3") -> None:
        super().__init__(reason, status=status)


# --- results --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostAddresses:
    """The addresses of one host name (an MX exchange, or the domain itself for implicit MX)."""

    name: str  # as asked, lower case, no trailing dot
    addresses: tuple[str, ...]  # IPv6 first, then IPv4: the order to try
    status: DnssecStatus  # "secure" only when the A and the AAAA answers both validated
    cname_chain: tuple[str, ...] = ()  # from `name` through every alias to the canonical name; () if none
    error: str | None = None  # why there are no addresses, when the lookup failed or found nothing
    alias_secure: bool = False  # `name` is a validated CNAME, whatever the status of its target

    @property
    def canonical(self) -> str:
        """The name after CNAME expansion."""
        return self.cname_chain[-1] if self.cname_chain else self.name

    def facts(self, preference: int = 0) -> HostFacts:
        return HostFacts(name=self.name, addresses=self.addresses, preference=preference,
                         secure=self.status == "secure", alias_secure=self.alias_secure)

    def route_facts(self) -> RouteFacts:
        """Facts for an explicit next-hop host (a route or smarthost named without MX lookup)."""
        return RouteFacts(hosts=(self.facts(),))


@dataclass(frozen=True, slots=True)
class MailHost:
    """One MX host with its preference and addresses."""

    preference: int
    host: HostAddresses


@dataclass(frozen=True, slots=True)
class NextHops:
    """Where mail for a domain goes, in the order to try (RFC 5321 §5.1)."""

    domain: str
    hosts: tuple[MailHost, ...]
    status: DnssecStatus  # of the MX answer (or of its denial, for implicit MX)
    null_mx: bool = False  # RFC 7505: the domain accepts no mail
    implicit: bool = False  # no MX records: the domain's own addresses
    cname_chain: tuple[str, ...] = ()  # the domain's own CNAME expansion, if any

    def facts(self) -> RouteFacts:
        secure = self.status == "secure"
        # The AD bit covers the CNAME chain too, so a secure answer makes its target a DANE-TA name.
        canonical = self.cname_chain[-1] if secure and self.cname_chain else None
        return RouteFacts(hosts=tuple(h.host.facts(h.preference) for h in self.hosts),
                          null_mx=self.null_mx, mx_secure=secure, implicit_mx=self.implicit,
                          canonical_domain=canonical)


@dataclass(frozen=True, slots=True)
class _Lookup:
    """One answered question: records of the asked type (after CNAMEs), or a proven absence."""

    name: str
    rdtype: dns.rdatatype.RdataType
    outcome: Literal["answer", "nodata", "nxdomain"]
    records: tuple[dns.rdata.Rdata, ...]
    canonical: str
    cname_chain: tuple[str, ...]
    ttl: int
    status: DnssecStatus


# The transport: send one question, return the response (NOERROR or NXDOMAIN) or raise
# DnsTemporaryError. Tests pass their own, built from dns.message.from_text.
Exchange = Callable[[dns.name.Name, dns.rdatatype.RdataType], Awaitable[dns.message.Message]]


# --- the resolver ---------------------------------------------------------------------------------


class DnsResolver:
    """MX, address and TLSA lookups with DNSSEC status, over the configured resolvers."""

    def __init__(
        self,
        resolvers: Sequence[str] = (),
        *,
        timeout: float = 5.0,
        exchange: Exchange | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        cache_entries: int = CACHE_ENTRIES,
    ) -> None:
        """`resolvers` as in `dns.resolvers` ("IP" or "IP:port"; empty: /etc/resolv.conf).

        `exchange` replaces the network (tests); the resolver addresses still decide whether the
        AD bit is trusted.
        """
        self.timeout = timeout
        self.rng = rng or random.Random()
        self.clock = clock
        self._cache: OrderedDict[tuple[str, int], tuple[float, _Lookup]] = OrderedDict()
        self._cache_entries = cache_entries
        self._inflight: dict[tuple[str, int], asyncio.Task[_Lookup]] = {}
        self._hint = "check dns.resolvers" if resolvers else "check /etc/resolv.conf or set dns.resolvers"
        self._broken: str | None = None  # why no lookup can be made at all
        servers: list[tuple[str, int]] = []
        self._resolver: dns.asyncresolver.Resolver | None = None
        if resolvers:
            for text in resolvers:
                hop = parse_next_hop(text)
                servers.append((hop.host, hop.port or 53))
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [dns.nameserver.Do53Nameserver(a, p) for a, p in servers]
        else:
            try:
                self._resolver = dns.asyncresolver.Resolver(configure=True)
            except (dns.exception.DNSException, OSError) as exc:
                self._broken = (f"no DNS resolver: /etc/resolv.conf cannot be used ({exc}); "
                                "set dns.resolvers")
            else:
                servers = [(str(ns), 53) for ns in self._resolver.nameservers]
        self.servers = tuple(servers)
        self.labels = ", ".join(_label(a, p) for a, p in servers) or "(none)"
        # dnspython names a server "Do53:address@port" in its error lists.
        self._names = {str(dns.nameserver.Do53Nameserver(a, p)): _label(a, p) for a, p in servers}
        self.trust_ad = bool(servers) and all(_is_loopback(a) for a, _ in servers)
        if self._resolver is not None:
            r = self._resolver
            r.lifetime = timeout
            # Each resolver gets a share of the time; a lone one gets a second try.
            r.timeout = timeout / max(2, len(servers))
            r.cache = None  # ours keeps the DNSSEC status with the answer
            # RFC 6840 §5.7: AD (and DO) in the query make a validating resolver report validation.
            r.flags = dns.flags.RD | dns.flags.AD
            r.use_edns(0, dns.flags.DO, EDNS_PAYLOAD)
        self._exchange: Exchange = exchange or self._network_exchange
        if servers and not self.trust_ad:
            log.warning("DNSSEC status is not trusted because resolver %s is not on loopback: DANE is "
                        "unavailable and every DNS answer counts as insecure; run a validating resolver "
                        "(such as Unbound) on 127.0.0.1 and list it in dns.resolvers", self.labels)

    # --- public lookups ---

    async def next_hops(self, domain: str) -> NextHops:
        """The MX hosts of `domain` with their addresses, in the order to try.

        Raises DnsPermanentError when the domain does not exist or has neither MX nor address
        records, or none of its MX hosts exists; DnsTemporaryError when the MX lookup fails, or no
        MX host has addresses and some host's lookup failed.
        """
        name = _name(domain)
        mx = await self._lookup(name, dns.rdatatype.MX)
        shown = _text(name)
        if mx.outcome == "nxdomain":
            raise DnsPermanentError(f"domain {shown} does not exist (NXDOMAIN)")
        exchanges = _mx_records(mx.records)
        if mx.outcome == "answer" and not exchanges:
            return NextHops(shown, (), mx.status, null_mx=True, cname_chain=mx.cname_chain)
        if mx.outcome == "nodata":
            # RFC 5321 §5.1: no MX, so the domain itself is the host, preference 0. It keeps its own
            # name, CNAMEs followed and recorded, because DANE asks whether that name's chain is
            # secure (RFC 7672 §2.2.2): an insecure alias of a signed host proves nothing.
            host = await self._host(name)
            if not host.addresses:
                raise DnsPermanentError(f"domain {shown} has no MX and no address records", status="5.4.4")
            return NextHops(shown, (MailHost(0, host),), mx.status, implicit=True, cname_chain=mx.cname_chain)
        ordered = sorted(exchanges.items(), key=lambda item: (item[1], self.rng.random()))
        looked_up = await asyncio.gather(*(self._host_or_error(host) for host, _ in ordered))
        hosts = tuple(MailHost(pref, host) for (_, pref), host in zip(ordered, looked_up, strict=True))
        if not any(h.host.addresses for h in hosts):
            detail = "; ".join(f"{h.host.name}: {h.host.error}" for h in hosts)
            if any(h.host.status == "bogus" for h in hosts):
                raise DnsTemporaryError(f"no MX host of {shown} could be looked up ({detail})")
            raise DnsPermanentError(f"no MX host of {shown} has an address ({detail})", status="5.4.4")
        return NextHops(shown, hosts, mx.status, cname_chain=mx.cname_chain)

    async def addresses(self, host: str) -> HostAddresses:
        """The IPv6 and IPv4 addresses of `host` (an empty tuple when it has none).

        Raises DnsPermanentError when the name does not exist; DnsTemporaryError when either
        lookup fails, since half an answer could hide the addresses DANE relies on.
        """
        return await self._host(_name(host))

    async def tlsa(self, host: str, port: int = 25) -> TlsaFacts:
        """The TLSA records at _port._tcp.<host> with their status; never raises.

        RFC 7672 §2.2.2: when `host` is an alias whose address records validated, the TLSA base
        domain is first the CNAME-expanded name, and the name as given only when the expanded
        name securely has no TLSA records; a secure alias of an insecure target has TLSA only at
        the name as given. A lookup that fails is "bogus" (§2.1.1: the host must not be used
        without TLS, never "no records"). Callers look up TLSA only for hosts whose address records
        are secure, or that are secure aliases (`policy.tlsa_hosts`).
        """
        try:
            name = _name(host)
        except DnsPermanentError:
            return TlsaFacts("bogus", base_domain=host)
        bases = [name]
        try:
            addresses = await self._host(name)
        except DnsError:
            addresses = None
        if addresses is not None and addresses.status == "secure" and addresses.canonical != _text(name):
            bases.insert(0, _name(addresses.canonical))
        for base in bases:
            shown = _text(base)
            try:
                answer = await self._lookup(dns.name.from_text(f"_{port}._tcp", base), dns.rdatatype.TLSA)
            except DnsError:
                return TlsaFacts("bogus", base_domain=shown)
            records = tuple(TlsaRecord(r.usage, r.selector, r.mtype, bytes(r.cert))
                            for r in answer.records if isinstance(r, TLSA))
            if answer.status != "secure":
                return TlsaFacts("insecure", records, base_domain=shown)
            if records:
                return TlsaFacts("secure", records, base_domain=shown)
        return TlsaFacts("secure", (), base_domain=_text(name))

    async def txt(self, name: str) -> tuple[bytes, ...]:
        """The TXT records at `name`, each record's strings joined (RFC 7208 §3.3 style, as MTA-STS
        §3.1 and TLS-RPT expect); () when the name or the records do not exist.

        Raises DnsTemporaryError when the lookup fails: a failure is never "no record".
        """
        answer = await self._lookup(_name(name), dns.rdatatype.TXT)
        return tuple(b"".join(r.strings) for r in answer.records if isinstance(r, TXT))

    # --- hosts ---

    async def _host(self, name: dns.name.Name) -> HostAddresses:
        v6, v4 = await asyncio.gather(self._lookup(name, dns.rdatatype.AAAA),
                                      self._lookup(name, dns.rdatatype.A), return_exceptions=True)
        # Both questions run to the end; either failing fails the host.
        if isinstance(v6, BaseException):
            raise v6
        if isinstance(v4, BaseException):
            raise v4
        shown = _text(name)
        if v6.outcome == "nxdomain" or v4.outcome == "nxdomain":
            raise DnsPermanentError(f"host {shown} does not exist (NXDOMAIN)")
        six = [r.address for r in v6.records if isinstance(r, AAAA)]
        four = [r.address for r in v4.records if isinstance(r, A)]
        # Postfix's smtp_randomize_addresses: spread load over a host's addresses.
        self.rng.shuffle(six)
        self.rng.shuffle(four)
        status: DnssecStatus = "secure" if v6.status == v4.status == "secure" else "insecure"
        chain = v4.cname_chain or v6.cname_chain
        alias_secure = status == "secure" and bool(chain)
        if chain and status != "secure" and self.trust_ad:
            # The AD bit covers the whole chain. Whether the alias itself validated decides if TLSA
            # records at its own name count (RFC 7672 §2.2.2; Postfix asks the same CNAME question).
            try:
                alias_secure = (await self._lookup(name, dns.rdatatype.CNAME)).status == "secure"
            except DnsError:
                # Unknown is not "insecure" (§2.1.1): the TLSA lookup, whose own status counts, decides.
                alias_secure = True
        return HostAddresses(shown, tuple(six + four), status, cname_chain=chain,
                             error=None if six or four else "no address records", alias_secure=alias_secure)

    async def _host_or_error(self, name: dns.name.Name) -> HostAddresses:
        """An MX host's addresses; a failed lookup leaves the host without addresses, with why."""
        shown = _text(name)
        try:
            return await self._host(name)
        except DnsTemporaryError as exc:
            return HostAddresses(shown, (), "bogus", error=str(exc))
        except DnsPermanentError as exc:
            return HostAddresses(shown, (), "insecure", error=str(exc))

    # --- one question, cached ---

    async def _lookup(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> _Lookup:
        key = (_text(name), int(rdtype))
        now = self.clock()
        cached = self._cache.get(key)
        if cached is not None:
            expires, lookup = cached
            if expires > now:
                self._cache.move_to_end(key)
                return lookup
            del self._cache[key]
        task = self._inflight.get(key)
        if task is None:
            # Concurrent deliveries to hosts shared by many domains ask once.
            task = asyncio.ensure_future(self._ask(name, rdtype))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._settle(key, t))
        return await asyncio.shield(task)

    def _settle(self, key: tuple[str, int], task: asyncio.Task[_Lookup]) -> None:
        self._inflight.pop(key, None)
        if task.cancelled() or task.exception() is not None:
            return  # a failure is never remembered as an answer
        lookup = task.result()
        ttl = min(lookup.ttl, CACHE_MAX_TTL)
        if ttl <= 0:
            return
        self._cache[key] = (self.clock() + ttl, lookup)
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_entries:
            self._cache.popitem(last=False)

    async def _ask(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> _Lookup:
        if self._broken is not None:
            raise DnsTemporaryError(self._broken)
        started = time.perf_counter()
        ok = False
        try:
            response = await self._exchange(name, rdtype)
            ok = True
        finally:
            rtype = dns.rdatatype.to_text(rdtype)
            emit(DnsLookup(query=f"{rtype} {_text(name)}", rdtype=rtype,
                           seconds=time.perf_counter() - started, ok=ok))
        return _interpret(name, rdtype, response, trust_ad=self.trust_ad, resolver=self.labels)

    async def _network_exchange(self, name: dns.name.Name,
                                rdtype: dns.rdatatype.RdataType) -> dns.message.Message:
        assert self._resolver is not None
        what = f"{dns.rdatatype.to_text(rdtype)} {_text(name)}"
        try:
            answer = await self._resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:
            response = (exc.kwargs.get("responses") or {}).get(name)
            if not isinstance(response, dns.message.Message):
                raise DnsTemporaryError(f"the lookup of {what} failed ({exc})") from None
            return response
        except dns.resolver.LifetimeTimeout:
            raise DnsTemporaryError(f"no answer from resolver {self.labels} within {self.timeout:g}s "
                                    f"for {what}; {self._hint}") from None
        except dns.resolver.NoNameservers as exc:
            raise DnsTemporaryError(_describe_failures(exc.kwargs.get("errors") or [], what, self._hint,
                                                       self._names)) from None
        except dns.exception.DNSException as exc:
            raise DnsTemporaryError(f"the lookup of {what} failed ({exc})") from None
        return answer.response


def _interpret(name: dns.name.Name, rdtype: dns.rdatatype.RdataType, response: dns.message.Message, *,
               trust_ad: bool, resolver: str = "the resolver") -> _Lookup:
    """Read one response: its records of `rdtype` after CNAMEs, or a proven absence, and status.

    SERVFAIL (a validating resolver's answer to bogus data) and any other failure rcode are
    temporary, as is a response that does not answer the question.
    """
    what = f"{dns.rdatatype.to_text(rdtype)} {_text(name)}"
    rcode = response.rcode()
    if rcode == dns.rcode.SERVFAIL:
        raise DnsTemporaryError(f"resolver {resolver} answered SERVFAIL for {what} (the domain's DNS is "
                                "broken or fails DNSSEC validation)")
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        raise DnsTemporaryError(f"resolver {resolver} answered {dns.rcode.to_text(rcode)} for {what}")
    question = response.question[0] if len(response.question) == 1 else None
    if (not isinstance(response, dns.message.QueryMessage) or question is None or question.name != name
            or question.rdtype != rdtype):
        raise DnsTemporaryError(f"resolver {resolver} sent a malformed answer for {what} "
                                "(it answers another question)")
    try:
        chain = response.resolve_chaining()
    except (dns.exception.DNSException, dns.message.ChainTooLong) as exc:
        raise DnsTemporaryError(f"resolver {resolver} sent a malformed answer for {what} ({exc})") from None
    status: DnssecStatus = "secure" if trust_ad and response.flags & dns.flags.AD else "insecure"
    aliases = [_text(rrset.name) for rrset in chain.cnames]
    canonical = _text(chain.canonical_name)
    cname_chain = (*aliases, canonical) if aliases else ()
    if rcode == dns.rcode.NXDOMAIN:
        return _Lookup(_text(name), rdtype, "nxdomain", (), canonical, cname_chain, chain.minimum_ttl, status)
    records = tuple(chain.answer) if chain.answer is not None else ()
    return _Lookup(_text(name), rdtype, "answer" if records else "nodata", records, canonical, cname_chain,
                   chain.minimum_ttl, status)


# --- small parts ----------------------------------------------------------------------------------


def _name(text: str) -> dns.name.Name:
    try:
        return dns.name.from_text(text.rstrip(".").lower() + ".")
    except dns.exception.DNSException as exc:
        raise DnsPermanentError(f"{text!r} is not a valid domain name ({exc})") from None


def _text(name: dns.name.Name) -> str:
    return str(name.to_text(omit_final_dot=True)).lower()


def _mx_records(records: Sequence[dns.rdata.Rdata]) -> dict[dns.name.Name, int]:
    """Exchange -> lowest preference, without "." (RFC 7505 §3: not a host, whatever else is there)."""
    hosts: dict[dns.name.Name, int] = {}
    for r in records:
        if not isinstance(r, MX) or r.exchange == dns.name.root:
            continue
        exchange = r.exchange.canonicalize()
        hosts[exchange] = min(r.preference, hosts.get(exchange, r.preference))
    return hosts


def _label(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _describe_failures(errors: Sequence[tuple[object, ...]], what: str, hint: str,
                       names: dict[str, str]) -> str:
    """One sentence from dnspython's per-server failures (server, tcp, port, error, response)."""
    parts: list[str] = []
    for entry in errors:
        server, error = str(entry[0]), entry[3]
        label = names.get(server, server)
        if isinstance(error, OSError):
            parts.append(f"resolver {label} is unreachable ({error.strerror or error}); {hint}")
        elif error == "SERVFAIL":
            parts.append(f"resolver {label} answered SERVFAIL for {what} (the domain's DNS is broken or "
                         "fails DNSSEC validation)")
        elif isinstance(error, str):
            parts.append(f"resolver {label} answered {error} for {what}; {hint}")
        else:
            parts.append(f"resolver {label} sent no usable answer for {what} ({error})")
    return "; ".join(dict.fromkeys(parts)) or f"no resolver answered for {what}; {hint}"
