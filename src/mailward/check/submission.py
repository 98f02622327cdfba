"""`mailward check --host H --port 465|587`: a submission server as a mail client should insist on
it (RFC 8314).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mailward.check.parts import SCHEMA, CheckError, note, probe, probe_settings, requirement_report
from mailward.config import Config
from mailward.delivery.dns import DnsError, DnsPermanentError, DnsResolver
from mailward.delivery.policy import (
    Candidate,
    SecurityLevel,
    TlsRequirement,
)

# --- a submission server -----------------------------------------------------------------------------


async def check_submission(host: str, port: int, config: Config, resolver: DnsResolver, *,
                           ca_file: Path | None = None) -> dict[str, Any]:
    """Implicit TLS (465) or STARTTLS (587) to `host`, as a mail client should insist on it
    (RFC 8314): a certificate valid for the name, TLS 1.2 or newer, AUTH only after TLS."""
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        literal = None
    if literal is not None:
        addresses: Sequence[str] = (str(literal),)
    else:
        try:
            found = await resolver.addresses(host)
        except DnsPermanentError:
            raise CheckError(f"host {host} does not exist (NXDOMAIN); check the name.") from None
        except DnsError as exc:
            raise CheckError(f"the addresses of {host} cannot be looked up: {exc}") from None
        if not found.addresses:
            raise CheckError(f"host {host} has no address records; check the name.")
        addresses = found.addresses
    implicit = port == 465
    requirement = TlsRequirement(SecurityLevel.VERIFY, starttls=True, required=True, verify="pkix",
                                 verify_name=host.strip("[]"), ca_file=ca_file, implicit=implicit,
                                 reason="a submission client must verify the server (RFC 8314 §5)")
    settings = probe_settings(config)
    entry: dict[str, Any] = {"name": host, "preference": 0, "addresses": list(addresses), "tlsa": None,
                             "skipped": None, "requirement": requirement_report(requirement)}
    report: dict[str, Any] = {"schema": SCHEMA, "kind": "submission", "domain": host, "port": port,
                              "verdict": "error", "reason": "", "mx": [entry], "findings": [],
                              "delivery": None}
    connections = [await probe(Candidate(host.strip("[]"), a, port, requirement), settings, ca_file=ca_file)
                   for a in addresses]
    entry["connections"] = connections
    first = next((c for c in connections if c["accepted"]), connections[0])
    entry["verdict"] = first["verdict"]
    entry["reason"] = first["error"] or first["outcome"]
    problems: list[str] = []
    for c in connections:
        before = c["ehlo"] or []
        if not implicit and any(k.split()[0] in ("AUTH", "AUTH=") for k in before):
            problems.append(f"{c['relay']} offers AUTH before STARTTLS: passwords may be sent in clear "
                            "(RFC 8314 §5, RFC 4954 §4)")
        tls = c["tls"]
        if tls is not None and tls["protocol"] not in ("TLSv1.2", "TLSv1.3"):
            problems.append(f"{c['relay']} negotiated {tls['protocol']}; TLS 1.2 is the minimum (RFC 8996)")
        pkix = c["pkix"]
        if not c["accepted"] and pkix is not None:
            if not pkix["name_matches"]:
                problems.append(f"the certificate of {c['relay']} is not valid for {host} (names: "
                                f"{', '.join(c['certificates'][0].get('names', [])) or 'none'})")
            if not pkix["trusted"]:
                problems.append(f"the certificate of {c['relay']} does not chain to a trusted CA"
                                + ("" if ca_file is None else f" in {ca_file}"))
    for text in problems:
        note(report, "error", text, host)
    if any(c["accepted"] for c in connections):
        auth = [k for k in (first["ehlo_tls"] or []) if k.split()[0] == "AUTH"]
        if not auth:
            note(report, "info", "no AUTH offered after TLS: users cannot log in here", host)
        report["verdict"] = "insecure" if problems else "secure"
        report["reason"] = (f"{first['outcome']}" + (f"; {problems[0]}" if problems else
                                                     "; AUTH is offered only over TLS"))
    elif any(c["connected"] for c in connections) and problems:
        report["verdict"] = "insecure"
        report["reason"] = problems[0]
    else:
        report["verdict"] = "defer"
        report["reason"] = f"a client could not submit: {first['error']}"
    return report


