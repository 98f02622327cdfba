"""`mailward policy show DOMAIN`: the TLS security level for a destination, where it was configured,
and, when DNS answers, what delivery would do with each of its hosts right now.

Built from delivery's own parts (`policy.destination_for`, `dns.DnsResolver`, `policy.plan`), so
what it prints is the decision the Deliverer would take, not a second opinion. The configured part
needs no network; the live part asks the configured resolvers only (`dns.resolvers`, else the
system's), for MX, address and TLSA records, and never connects to a mail host.

`--json` prints one object; fields may be added, none removed::

    {"domain": "example.org",
     "destination": {"key": "mx:example.org", "kind": "mx",   # local | mx | route | smarthost
                     "next_hop": null,                        # "[192.0.2.1]:25" for an explicit host
                     "lookup": "example.org", "port": 25},
     "level": "dane", "source": "delivery.security, the default",  # the configured level and where
     "may_retry_plaintext": false,
     "dns": {"consulted": true,     # false: "reason" says why not (--no-dns, or no answer from the
                                    # resolvers); "plan" is then null, or the deferral DNS causes
             "resolvers": "127.0.0.1:53", "dnssec_trusted": true,
             "error": null,         # a lookup that failed; "plan" then holds the refusal
             "mx": {"status": "secure", "null_mx": false, "implicit": false},  # null: no MX lookup
             "hosts": [{"name": "mx.example.org", "preference": 10, "addresses": ["192.0.2.7"],
                        "dnssec": "secure", "error": null,
                        "tlsa": {"status": "secure", "base_domain": "mx.example.org",
                                 "records": [{"usage": 3, "selector": 1, "matching_type": 1,
                                              "data": "hex", "usable": true}]},
                        "tlsa_skipped": null}]},  # why no TLSA lookup was made, when "tlsa" is null
     "plan": {"candidates": [{"relay": "mx.example.org[192.0.2.7]:25", "host": "...", "address": "...",
                              "port": 25, "level": "dane", "required": true, "verify": "dane",
                              "verify_name": "mx.example.org", "plaintext_retry": false,
                              "reason": "dane from ...: DNSSEC-secure TLSA records"}],
              "skipped": ["host: why"],
              "refusal": null}}  # or {"permanent": false, "status": "4.7.5", "reason": "..."}
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from mailward.config import Config, parse_next_hop
from mailward.delivery import lookup_tlsa
from mailward.delivery.dns import DnsPermanentError, DnsResolver, DnsTemporaryError, HostAddresses, NextHops
from mailward.delivery.policy import (
    Candidate,
    Destination,
    Plan,
    Refusal,
    RouteFacts,
    SecurityLevel,
    StsFacts,
    TlsaFacts,
    dane_unavailable,
    destination_for,
    literal_facts,
    plan,
)

__all__ = ["Lookups", "Survey", "format_text", "inspect", "normalise_domain", "run", "survey"]

EXIT_OK = 0
EXIT_USAGE = 2

LEVEL_MEANING = {
    SecurityLevel.NONE: "never TLS",
    SecurityLevel.MAY: "STARTTLS when offered, plaintext when not",
    SecurityLevel.ENCRYPT: "TLS required, the certificate is not checked",
    SecurityLevel.DANE: "DANE where the host has DNSSEC-secure TLSA records, otherwise as may",
    SecurityLevel.DANE_ONLY: "DANE or no delivery",
    SecurityLevel.VERIFY: "TLS required, with a certificate valid for the host name",
    SecurityLevel.SECURE: "as verify, and the MX records must be DNSSEC-secure",
}


class Lookups(Protocol):
    """What the live part asks of `dns.DnsResolver`."""

    async def next_hops(self, domain: str) -> NextHops: ...

    async def addresses(self, host: str) -> HostAddresses: ...

    async def tlsa(self, host: str, port: int = 25) -> TlsaFacts: ...


class PolicyToolError(Exception):
    """A mistake in the command line; one sentence."""


def normalise_domain(text: str) -> str:
    """The domain as the queue keeps it: lower-case A-labels, or an address literal; an address's
    domain part is taken."""
    domain = text.rpartition("@")[2].strip()
    if domain.startswith("[") and domain.endswith("]"):
        inner = domain[1:-1].lower()
        try:
            ipaddress.ip_address(inner.removeprefix("ipv6:"))
        except ValueError:
            pass
        else:
            return f"[{inner}]"
    try:
        hop = parse_next_hop(domain)
    except ValueError:
        hop = None
    if hop is None or not hop.mx:
        raise PolicyToolError(f"'{text}' is not a domain; give one such as example.org (or an address, or an "
                              "address literal such as [192.0.2.7]).")
    return hop.host


# --- the report ------------------------------------------------------------------------------------


# How `survey` gets MTA-STS facts for a destination, as the Deliverer does (`mtasts.sts_facts`).
StsSource = Callable[[Destination, RouteFacts], Awaitable[StsFacts | None]]


@dataclass(frozen=True, slots=True)
class Survey:
    """The report and the decision behind it, for `mailward check` to connect by."""

    destination: Destination
    report: dict[str, Any]
    facts: RouteFacts | None = None  # None: no DNS facts (local, no resolver, or a failed lookup)
    decision: Plan | None = None
    tlsa: dict[str, TlsaFacts] = field(default_factory=dict)  # the TLSA lookups the plan consulted


async def inspect(domain: str, config: Config, resolver: Lookups | None, *, no_dns: str | None = None,
                  resolvers: str = "", dnssec_trusted: bool = False) -> dict[str, Any]:
    """The report for `domain`. `resolver` None (with `no_dns` saying why) leaves DNS out."""
    return (await survey(domain, config, resolver, no_dns=no_dns, resolvers=resolvers,
                         dnssec_trusted=dnssec_trusted)).report


async def survey(domain: str, config: Config, resolver: Lookups | None, *, no_dns: str | None = None,
                 resolvers: str = "", dnssec_trusted: bool = False,
                 sts: StsSource | None = None) -> Survey:
    """As `inspect`, keeping the `Plan`. `sts` gives the MTA-STS facts as the Deliverer gets them
    (`mtasts.sts_facts`); without it the plan leaves MTA-STS out."""
    dest = destination_for(domain, config)
    hop = dest.next_hop
    report: dict[str, Any] = {
        "domain": domain,
        "destination": {"key": dest.key, "kind": dest.kind,
                        "next_hop": None if hop is None or hop.mx else str(hop),
                        "lookup": None if dest.kind == "local" else dest.lookup_name,
                        "port": None if dest.kind == "local" else dest.port},
        "level": dest.level.value,
        "source": dest.level_source,
        "may_retry_plaintext": dest.may_retry_plaintext,
    }
    if dest.kind == "local":
        report["dns"] = {"consulted": False, "reason": "local delivery makes no SMTP connection"}
        report["plan"] = None
        return Survey(dest, report)
    if hop is not None and hop.literal:
        report["dns"] = {"consulted": False, "reason": "an address literal needs no DNS"}
        decision = plan(dest, literal_facts(dest))
        report["plan"] = _plan(decision)
        return Survey(dest, report, literal_facts(dest), decision)
    if resolver is None:
        report["dns"] = {"consulted": False, "reason": no_dns or "no resolver"}
        report["plan"] = None
        return Survey(dest, report)
    dns: dict[str, Any] = {"consulted": True, "resolvers": resolvers, "dnssec_trusted": dnssec_trusted,
                           "error": None, "mx": None, "hosts": []}
    report["dns"] = dns
    try:
        facts_or_refusal = await _route_facts(dest, resolver, dns)
    except DnsTemporaryError as exc:
        # An unreachable resolver and a SERVFAIL look alike from here, and to the Deliverer: it waits.
        report["dns"] = {"consulted": False, "reason": str(exc), "resolvers": resolvers}
        decision = Plan(dest, refusal=Refusal(
            False, exc.status, f"DNS lookup for {dest.lookup_name} failed: {exc}"))
        report["plan"] = _plan(decision)
        return Survey(dest, report, decision=decision)
    if isinstance(facts_or_refusal, Refusal):
        decision = Plan(dest, refusal=facts_or_refusal)
        report["plan"] = _plan(decision)
        return Survey(dest, report, decision=decision)
    facts = facts_or_refusal
    # The Deliverer's own lookup: the same hosts, and a failure counts as bogus.
    tlsa = await lookup_tlsa(resolver, dest, facts) or {}
    for host, entry in zip(facts.hosts, dns["hosts"], strict=True):
        lookup = tlsa.get(host.name)
        entry["tlsa"] = None if lookup is None else _tlsa(lookup)
        entry["tlsa_skipped"] = None if lookup is not None else _why_no_tlsa(dest, facts, host)
    sts_found = None if sts is None else await sts(dest, facts)
    decision = plan(dest, facts, tlsa=tlsa if dest.level in _DANE_LEVELS else None, sts=sts_found)
    report["plan"] = _plan(decision)
    return Survey(dest, report, facts, decision, tlsa)


_DANE_LEVELS = (SecurityLevel.DANE, SecurityLevel.DANE_ONLY)


async def _route_facts(dest: Destination, resolver: Lookups, dns: dict[str, Any]) -> RouteFacts | Refusal:
    """As the Deliverer gets them, recording what DNS said in `dns`."""
    name = dest.lookup_name
    try:
        if dest.uses_mx:
            hops = await resolver.next_hops(name)
            dns["mx"] = {"status": hops.status, "null_mx": hops.null_mx, "implicit": hops.implicit}
            dns["hosts"] = [_host(h.host, h.preference) for h in hops.hosts]
            return hops.facts()
        host = await resolver.addresses(name)
        dns["hosts"] = [_host(host, 0)]
        return host.route_facts()
    except DnsPermanentError as exc:
        dns["error"] = str(exc)
        if dest.kind == "mx":
            return Refusal(True, exc.status, str(exc))
        # A route or smarthost the operator named: their mistake to fix, not the sender's.
        return Refusal(False, "4.4.4", f"next hop of {dest.key}: {exc}")


def _host(host: HostAddresses, preference: int) -> dict[str, Any]:
    return {"name": host.name, "preference": preference, "addresses": list(host.addresses),
            "dnssec": host.status, "error": host.error, "tlsa": None, "tlsa_skipped": None}


def _tlsa(facts: TlsaFacts) -> dict[str, Any]:
    return {"status": facts.status, "base_domain": facts.base_domain,
            "records": [{"usage": r.usage, "selector": r.selector, "matching_type": r.matching_type,
                         "data": r.data.hex(), "usable": r.usable} for r in facts.records]}


def _why_no_tlsa(dest: Destination, facts: RouteFacts, host: Any) -> str:
    if dest.level not in _DANE_LEVELS:
        return f"level {dest.level} does not use DANE"
    return dane_unavailable(dest, facts, host) or "not looked up"


def _plan(decision: Plan) -> dict[str, Any]:
    refusal = decision.refusal
    return {
        "candidates": [_candidate(c) for c in decision.candidates],
        "skipped": list(decision.skipped),
        "refusal": None if refusal is None else {"permanent": refusal.permanent, "status": refusal.status,
                                                 "reason": refusal.reason},
    }


def _candidate(c: Candidate) -> dict[str, Any]:
    tls = c.tls
    return {"relay": c.relay, "host": c.host, "address": c.address, "port": c.port, "level": tls.level.value,
            "required": tls.required, "verify": tls.verify, "verify_name": tls.verify_name,
            "plaintext_retry": tls.plaintext_after_failed_handshake, "reason": tls.reason}


# --- text ------------------------------------------------------------------------------------------


def format_text(report: dict[str, Any]) -> str:
    dest = report["destination"]
    kind = {"local": "local delivery", "mx": "MX delivery", "route": "a configured route",
            "smarthost": "the smarthost"}[dest["kind"]]
    head = f"{report['domain']}: {kind}"
    if dest["kind"] != "local":
        head += f" ({dest['key']}, port {dest['port']})"
    level = SecurityLevel(report["level"])
    lines = [head, f"level: {level} ({LEVEL_MEANING[level]})", f"  set by {report['source']}"]
    if level in (SecurityLevel.MAY, SecurityLevel.DANE):
        if report["may_retry_plaintext"]:
            lines.append("  a failed TLS handshake is retried in plaintext "
                         "(delivery.may_retry_plaintext = true)")
        else:
            lines.append("  a failed TLS handshake defers the mail; it is never retried in plaintext")
    dns = report["dns"]
    if not dns["consulted"]:
        lines.append(f"DNS was not consulted: {dns['reason'].rstrip('.')}.")
    else:
        trust = ("DNSSEC status trusted" if dns["dnssec_trusted"]
                 else "not on loopback, so every answer counts as insecure")
        lines.append(f"DNS (resolver {dns['resolvers']}, {trust}):")
        mx = dns["mx"]
        if mx is not None:
            what = ("Null MX" if mx["null_mx"] else "none, the domain's own addresses" if mx["implicit"]
                    else "found")
            lines.append(f"  MX records: {what}, {mx['status']}")
        for h in dns["hosts"]:
            lines.append(f"  {h['preference']:>3} {h['name']}: {', '.join(h['addresses']) or 'no addresses'} "
                         f"({h['dnssec']}){'; ' + h['error'] if h['error'] else ''}")
            lines.append(f"      TLSA: {_tlsa_text(h)}")
        if dns["error"]:
            lines.append(f"  lookup failed: {dns['error']}")
    decision = report["plan"]
    if decision is not None:
        lines.append("Delivery now:")
        for c in decision["candidates"]:
            lines.append(f"  {c['relay']}: {_requirement_text(c)}")
            lines.append(f"      because {c['reason']}")
        for s in decision["skipped"]:
            lines.append(f"  not used: {s}")
        refusal = decision["refusal"]
        if refusal is not None:
            what = "fails" if refusal["permanent"] else "is deferred"
            lines.append(f"  the mail {what}: {refusal['status']} {refusal['reason']}")
    return "\n".join(lines) + "\n"


def _tlsa_text(host: dict[str, Any]) -> str:
    tlsa = host["tlsa"]
    if tlsa is None:
        return f"not looked up: {host['tlsa_skipped']}"
    if tlsa["status"] == "bogus":
        return "lookup failed or bogus: the host is not used (RFC 7672 §2.1.1)"
    records = tlsa["records"]
    if not records:
        return f"none ({tlsa['status']} denial)"
    shown = ", ".join(f"{r['usage']} {r['selector']} {r['matching_type']}"
                      f"{'' if r['usable'] else ' (unusable)'}" for r in records)
    base = tlsa["base_domain"]
    return f"{tlsa['status']}, {shown}" + (f"; base domain {base}" if base else "")


def _requirement_text(c: dict[str, Any]) -> str:
    level = c["level"]
    if level == "none":
        return "none: plaintext"
    if level == "may":
        retry = "retried in plaintext" if c["plaintext_retry"] else "deferred"
        return f"may: STARTTLS when offered; a failed handshake is {retry}"
    if level == "encrypt":
        return "encrypt: TLS required, not authenticated"
    if c["verify"] == "dane":
        return f"dane: TLS required, authenticated by the TLSA records (SNI {c['verify_name']})"
    return f"{level}: TLS required, certificate verified for {c['verify_name']}"


# --- the command -----------------------------------------------------------------------------------


def run(args: argparse.Namespace, config: Config) -> int:
    try:
        domain = normalise_domain(args.domain)
    except PolicyToolError as exc:
        print(f"mailward: {exc}", file=sys.stderr)
        return EXIT_USAGE
    report = asyncio.run(_inspect_live(domain, config, use_dns=not args.no_dns))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        sys.stdout.write(format_text(report))
    return EXIT_OK


async def _inspect_live(domain: str, config: Config, *, use_dns: bool) -> dict[str, Any]:
    if not use_dns:
        return await inspect(domain, config, None, no_dns="--no-dns was given")
    resolver = DnsResolver(config.dns.resolvers, timeout=config.dns.timeout)
    return await inspect(domain, config, resolver, resolvers=resolver.labels,
                         dnssec_trusted=resolver.trust_ad)
