"""`mailward check DOMAIN`: the plan delivery makes for a recipient domain, a probe of every planned
address, the verdict delivery would reach and the common DANE and MTA-STS mistakes by name.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.exception
import dns.message

from mailward import policytool
from mailward.check.parts import (
    SCHEMA,
    CheckError,
    describe_record,
    note,
    probe,
    probe_settings,
    requirement_report,
    tlsa_owner,
)
from mailward.config import Config
from mailward.delivery.attempt import AttemptSettings
from mailward.delivery.dane import effective_records
from mailward.delivery.dns import DnsError, DnsResolver
from mailward.delivery.mtasts import MtaSts, StsLookup, for_delivery, sts_facts
from mailward.delivery.policy import (
    Destination,
    RouteFacts,
    SecurityLevel,
    StsFacts,
    TlsaFacts,
    dane_unavailable,
    sts_matches,
)
from mailward.queue import StsPolicyRecord, sqlite_store
from mailward.reports.tlsrpt import TlsRptRecordError, select_tlsrpt_record

# --- the domain ---------------------------------------------------------------------------------------


class QueuedPolicies:
    """The MTA-STS policies the server keeps in its queue database, read only: an unexpired cached
    policy binds delivery (RFC 8461 §5.1) even where the TXT record is gone or a refresh fails, so
    it binds the check too; what the check fetches is not stored, the server's state stays its own."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def load_sts_policy(self, domain: str) -> StsPolicyRecord | None:
        def read() -> StsPolicyRecord | None:
            if not self.path.is_file():
                return None
            try:
                conn = sqlite3.connect(self.path.absolute().as_uri() + "?mode=ro", uri=True)
            except sqlite3.Error:
                return None
            try:
                return sqlite_store.load_sts_policy(conn, domain)
            except sqlite3.Error:
                return None  # no such table yet: an older or empty queue holds no policy
            finally:
                conn.close()

        return await asyncio.to_thread(read)

    async def save_sts_policy(self, policy: StsPolicyRecord) -> None:
        return None


class _RecordingSts(MtaSts):
    """The Deliverer's MtaSts, remembering each lookup so the report can show what was found."""

    def __init__(self, resolver: DnsResolver, config: Config) -> None:
        # What `mtasts.for_delivery` builds for the Deliverer, over the queue's cache.
        super().__init__(resolver, QueuedPolicies(config.queue.path), ca_file=config.mta_sts.ca_file,
                         timeout=config.mta_sts.fetch_timeout)
        self.seen: dict[str, StsLookup] = {}

    async def lookup(self, domain: str, *, refetch: bool = False) -> StsLookup:
        found = await super().lookup(domain, refetch=refetch)
        self.seen[domain.lower().rstrip(".")] = found
        return found


def recording_sts(config: Config, resolver: DnsResolver) -> _RecordingSts | None:
    if for_delivery(config, resolver, None) is None:  # the Deliverer would have none either
        return None
    return _RecordingSts(resolver, config)


async def _resolver_answers(resolver: DnsResolver) -> bool:
    """Whether any configured resolver answers at all (any response code): when none does, the
    check cannot tell anything about the domain."""
    query = dns.message.make_query(".", "NS")
    for address, port in resolver.servers:
        try:
            await dns.asyncquery.udp(query, address, port=port, timeout=min(resolver.timeout, 3.0))
        except (dns.exception.DNSException, OSError):
            continue
        return True
    return False


async def _tlsrpt(resolver: DnsResolver, domain: str) -> dict[str, Any]:
    name = f"_smtp._tls.{domain}"
    try:
        found = await resolver.txt(name)
    except DnsError as exc:
        return {"name": name, "records": [], "rua": [], "error": f"the lookup failed ({exc})"}
    texts = [t.decode("ascii", "replace") for t in found]
    try:
        record = select_tlsrpt_record(found)
    except TlsRptRecordError as exc:
        return {"name": name, "records": texts, "rua": [], "error": str(exc)}
    return {"name": name, "records": texts, "rua": list(record.rua), "error": None}


def _sts_report(dest: Destination, sts: _RecordingSts | None) -> dict[str, Any]:
    if sts is None:
        return {"consulted": False, "reason": "MTA-STS is off (mta_sts.enabled = false)", "policy": None}
    found = sts.seen.get(dest.domain)
    if found is None:
        why = ("MTA-STS applies to MX delivery at level dane only" if dest.kind == "mx"
               else f"mail for this domain goes to the {dest.kind}, where MTA-STS does not apply")
        return {"consulted": False, "reason": why, "policy": None}
    policy = found.policy
    return {"consulted": True, "reason": None, "failure": found.failure, "detail": found.detail or None,
            "from_cache": found.from_cache,
            "policy": None if policy is None else {"mode": policy.mode, "mx": list(policy.mx),
                                                   "max_age": policy.max_age, "text": policy.text}}


async def check_domain(domain: str, config: Config, resolver: DnsResolver, *,
                       mta_sts: MtaSts | None = None,
                       settings: AttemptSettings | None = None) -> dict[str, Any]:
    """The whole report for one recipient domain; raises CheckError when it cannot be made."""
    recording = mta_sts if isinstance(mta_sts, _RecordingSts) else None

    async def sts(dest: Destination, facts: RouteFacts) -> StsFacts | None:
        return await sts_facts(mta_sts, config, dest, facts)

    surveyed = await policytool.survey(domain, config, resolver, resolvers=resolver.labels,
                                       dnssec_trusted=resolver.trust_ad, sts=sts)
    dest = surveyed.destination
    base = surveyed.report
    if dest.kind == "local":
        raise CheckError(f"{domain} is in local_domains: mailward delivers its mail itself, so there is no "
                         "remote server to check; give a remote domain.")
    dns_part = dict(base["dns"])
    # A failed lookup defers delivery; but when no resolver answers at all, nothing was checked.
    if not dns_part.get("consulted") and base["destination"]["next_hop"] is None and (
            not resolver.servers or not await _resolver_answers(resolver)):
        raise CheckError(f"no DNS resolver answers ({resolver.labels}); start the resolver or fix "
                         "dns.resolvers.")
    hosts: list[dict[str, Any]] = [dict(h) for h in dns_part.pop("hosts", [])]
    if not hosts and surveyed.facts is not None:
        # An address literal: the plan's host came from no DNS answer.
        hosts = [{"name": h.name, "preference": h.preference, "addresses": list(h.addresses),
                  "dnssec": "insecure", "error": None, "tlsa": None, "tlsa_skipped": dns_part.get("reason")}
                 for h in surveyed.facts.hosts]
    report: dict[str, Any] = {
        "schema": SCHEMA, "kind": "mx", "domain": domain, "verdict": "error", "reason": "",
        "level": base["level"], "level_source": base["source"], "destination": base["destination"],
        "dns": dns_part, "mta_sts": _sts_report(dest, recording),
        # TLS-RPT belongs to a recipient domain, not to a route's host or an address literal.
        "tlsrpt": await _tlsrpt(resolver, dest.domain) if dest.kind == "mx" and dest.next_hop is None
        else None,
        "plan": base["plan"], "mx": hosts, "delivery": None, "findings": []}
    if not resolver.trust_ad:
        note(report, "warning", f"resolver {resolver.labels} is not on loopback, so mailward trusts no "
                                "DNSSEC status from it: DANE is unavailable (run a validating resolver "
                                "such as Unbound on 127.0.0.1)")
    decision = surveyed.decision
    settings = settings or probe_settings(config)
    ca_file = config.mta_sts.ca_file
    for host in hosts:
        await _check_host(report, host, dest, surveyed, resolver, settings, ca_file)
    _sts_findings(report)
    # What the Deliverer's _connect does: the first planned address that opens gets the mail.
    if decision is None or decision.refusal is not None:
        refusal = None if decision is None else decision.refusal
        if refusal is None:
            report["verdict"], report["reason"] = "defer", "no delivery plan could be made"
        elif refusal.permanent:
            report["verdict"] = "error"
            report["reason"] = f"mail would be returned to its sender: {refusal.reply}"
        else:
            report["verdict"], report["reason"] = "defer", f"mail would wait: {refusal.reply}"
        return report
    probes = {(c["relay"]): c for h in hosts for c in h.get("connections", [])}
    last: str | None = None
    for candidate in decision.candidates:
        entry = probes.get(candidate.relay)
        if entry is None:
            continue
        if entry["accepted"]:
            report["delivery"] = {"relay": candidate.relay, "tls": entry["outcome"],
                                  "level": candidate.tls.level.value}
            secure = entry["verdict"] == "Verified"
            report["verdict"] = "secure" if secure else "insecure"
            how = entry["outcome"] or "plaintext"
            report["reason"] = (f"mail would go to {candidate.relay} over {how}" + (
                "" if secure else f", because {candidate.tls.reason}"))
            return report
        last = entry["error"] or last
    report["verdict"] = "defer"
    report["reason"] = f"mail would wait: {last or 'no mail host could be reached'}"
    return report


async def _check_host(report: dict[str, Any], host: dict[str, Any], dest: Destination,
                      surveyed: policytool.Survey, resolver: DnsResolver, settings: AttemptSettings,
                      ca_file: Path | None) -> None:
    name = host["name"]
    decision = surveyed.decision
    facts = surveyed.facts
    lookup = surveyed.tlsa.get(name)
    records = lookup.records if lookup is not None else ()
    effective = effective_records(records)
    if host.get("tlsa") is not None and lookup is not None:
        host["tlsa"] = dict(host["tlsa"], owner=tlsa_owner(lookup.base_domain or name, dest.port),
                            records=[describe_record(r, effective) for r in records])
    host["tlsa_ignored"] = None
    if lookup is None and facts is not None and dest.level in (SecurityLevel.DANE, SecurityLevel.DANE_ONLY):
        await _unused_tlsa(report, host, dest, facts, resolver)
    candidates = [] if decision is None else [c for c in decision.candidates if c.host == name]
    prefix = f"{name}: "
    skipped = [] if decision is None else [s[len(prefix):] for s in decision.skipped if s.startswith(prefix)]
    host["skipped"] = skipped[0] if skipped else None
    host["requirement"] = requirement_report(candidates[0].tls) if candidates else None
    sts = report["mta_sts"].get("policy")
    host["mta_sts_match"] = None if sts is None else any(sts_matches(p, name) for p in sts["mx"])
    if lookup is not None and lookup.status == "bogus":
        note(report, "error", f"the TLSA lookup at {tlsa_owner(lookup.base_domain or name, dest.port)} "
                              "failed or is bogus, so delivery never uses this host (RFC 7672 §2.1.1); "
                              "fix the zone's DNSSEC signatures", name)
    if lookup is not None and lookup.status == "secure" and records and not lookup.usable:
        note(report, "warning", "its DNSSEC-secure TLSA records are all unusable for SMTP, so TLS is "
                                "required but not authenticated; publish a DANE-EE record such as "
                                f"'{tlsa_owner(lookup.base_domain or name, dest.port)} IN TLSA 3 1 1 ...'",
                                name)
    # PKIX is described against the CAs delivery would use: the policy's, else MTA-STS's.
    host["connections"] = list(await asyncio.gather(*(
        probe(c, settings, ca_file=c.tls.ca_file or ca_file, records=records) for c in candidates)))
    if not candidates:
        host["verdict"] = "Unreachable"
        refusal = None if decision is None else decision.refusal
        host["reason"] = (f"delivery would not use it: {host['skipped']}" if host["skipped"]
                          else f"delivery would not connect: {refusal.reply}" if refusal is not None
                          else "delivery would not connect")
        return
    chosen = next((c for c in host["connections"] if c["accepted"]), host["connections"][0])
    if host.get("tlsa") is not None:
        for i, record in enumerate(host["tlsa"]["records"]):
            record["matches"] = [c["depth"] for c in chosen["certificates"] if i in c["tlsa_matches"]]
    host["verdict"] = chosen["verdict"]
    host["reason"] = (f"delivery would use it: {chosen['outcome']}" if chosen["accepted"]
                      else f"delivery would not use it: {chosen['error']}")
    for entry in host["connections"]:
        dane_findings(report, host, entry, lookup, dest)


async def _unused_tlsa(report: dict[str, Any], host: dict[str, Any], dest: Destination, facts: RouteFacts,
                       resolver: DnsResolver) -> None:
    """TLSA records published where RFC 7672 forbids using them: looked up for this report only."""
    name = host["name"]
    hf = next((h for h in facts.hosts if h.name == name), None)
    why = None if hf is None else dane_unavailable(dest, facts, hf)
    if why is None:
        return
    found = await resolver.tlsa(name, dest.port)
    if not found.records:
        return
    owner = tlsa_owner(found.base_domain or name, dest.port)
    host["tlsa_ignored"] = {"owner": owner, "status": found.status, "why": why,
                            "records": [describe_record(r) for r in found.records]}
    note(report, "warning", f"TLSA records are published at {owner}, but delivery does not use them "
                            f"because {why} (RFC 7672 §2.2); sign the zone or remove the records", name)


def dane_findings(report: dict[str, Any], host: dict[str, Any], entry: dict[str, Any],
                   lookup: TlsaFacts | None, dest: Destination) -> None:
    dane = entry["dane"]
    if dane is None or dane["verified"] or lookup is None:
        return
    name = host["name"]
    certs = entry["certificates"]
    owner = tlsa_owner(lookup.base_domain or name, dest.port)
    records = lookup.records
    usable = effective_records(records)
    ee = [r for r in usable if r.usage == 3]
    ta = [r for r in usable if r.usage == 2]

    def matched(cert: dict[str, Any], usage: int) -> bool:
        return any(records[i].usage == usage for i in cert["tlsa_matches"])

    leaf = certs[0] if certs else None
    if ee and leaf is not None and "error" not in leaf and not matched(leaf, 3):
        since = leaf.get("not_before", "")[:10]
        note(report, "error", f"no DANE-EE record at {owner} matches the certificate {entry['relay']} "
                              f"presents (issued {since}): if it was renewed with a new key, the TLSA "
                              "records were not updated (the usual Let's Encrypt rollover failure). "
                              f"Publish '{owner} IN TLSA 3 1 1 {_spki_digest(leaf)}' beside the old "
                              "record, or renew with the old key (certbot --reuse-key)", name)
    if ta and not any(matched(c, 2) for c in certs[1:]):
        if len(certs) <= 1:
            note(report, "error", f"{entry['relay']} sends only its own certificate, but DANE-TA records "
                                  "name a CA certificate the server must send along (RFC 7672 §3.1.2); "
                                  "configure the full chain (certbot's fullchain.pem)", name)
        else:
            note(report, "error", f"no DANE-TA record at {owner} matches a CA certificate {entry['relay']} "
                                  "sends; the chain changed (a new intermediate?) or the record is "
                                  "stale", name)
    if not any(f["severity"] == "error" and f["host"] == name for f in report["findings"]):
        note(report, "error", f"DANE authentication of {entry['relay']} fails: {dane['reason']}", name)


def _spki_digest(cert: dict[str, Any]) -> str:
    return str(cert.get("spki_sha256", ""))


def _sts_findings(report: dict[str, Any]) -> None:
    sts = report["mta_sts"]
    policy = sts.get("policy")
    if sts.get("failure"):
        note(report, "warning", f"the MTA-STS policy could not be had ({sts['failure']}: {sts['detail']})")
    if policy is None or policy["mode"] == "none":
        return
    for host in report["mx"]:
        if host["mta_sts_match"] is False:
            refused = "MTA-STS" in (host["skipped"] or "")
            # Under enforce a host DANE authenticates is still used (DANE outranks MTA-STS), but a
            # sender that knows only MTA-STS would pass it over.
            effect = ("so delivery does not use it" if refused
                      else "which testing mode only reports" if policy["mode"] == "testing"
                      else "so senders without DANE pass it over")
            note(report, "error" if refused else "warning",
              f"the MTA-STS policy's mx patterns ({', '.join(policy['mx'])}) do not cover this MX "
              f"host, {effect}; add it to the policy", host["name"])


