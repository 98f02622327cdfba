"""`mailward check --self`: this server's certificates against the TLSA records of its names, now
and after a planned key rollover.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mailward.check.parts import (
    RENEWAL_WARNING,
    SCHEMA,
    CheckError,
    describe_certificate,
    describe_record,
    dns_names,
    note,
    spki_der,
    tlsa_owner,
)
from mailward.config import Config
from mailward.delivery.dane import effective_records, matching_data, name_matches, verify_chain
from mailward.delivery.dns import DnsResolver

# --- this server's own certificates -------------------------------------------------------------------


def read_next_key(path: Path) -> tuple[bytes | None, list[bytes]]:
    """(SPKI DER, certificate chain DER) of a next-key file: a certificate chain, a public key or a
    private key; the chain is empty for a bare key."""
    data = path.read_bytes()
    if b"-----BEGIN CERTIFICATE-----" in data:
        certs = x509.load_pem_x509_certificates(data)
        return spki_der(certs[0].public_key()), [c.public_bytes(serialization.Encoding.DER) for c in certs]
    if b"PUBLIC KEY-----" in data:
        return spki_der(serialization.load_pem_public_key(data)), []
    return spki_der(serialization.load_pem_private_key(data, password=None)), []


async def check_self(config: Config, resolver: DnsResolver, *, port: int = 25) -> dict[str, Any]:
    """Each configured certificate against the TLSA records of the names it serves, now and after
    the configured key rollover (`tls.certificates[].next_key`)."""
    report: dict[str, Any] = {"schema": SCHEMA, "kind": "self", "domain": config.hostname, "verdict": "error",
                              "reason": "", "mx": [], "certificates": [], "findings": []}
    if not config.tls.certificates:
        raise CheckError("no tls.certificates are configured; add [[tls.certificates]] to compare them with "
                         "TLSA records.")
    covered = False
    worst = 0  # 0 secure, 1 insecure, 2 defer
    for i, pair in enumerate(config.tls.certificates):
        key = f"tls.certificates[{i}]"
        try:
            chain = x509.load_pem_x509_certificates(pair.cert.read_bytes())
        except (OSError, ValueError) as exc:
            raise CheckError(f"{key}.cert: {pair.cert} cannot be read as PEM certificates ({exc}); "
                             "point it at the chain the listeners serve.") from None
        chain_der = [c.public_bytes(serialization.Encoding.DER) for c in chain]
        leaf = chain[0]
        next_spki: bytes | None = None
        next_chain: list[bytes] = []
        if pair.next_key is not None:
            try:
                next_spki, next_chain = read_next_key(pair.next_key)
            except (OSError, ValueError, TypeError) as exc:
                raise CheckError(f"{key}.next_key: {pair.next_key} holds no PEM certificate or key ({exc}); "
                                 "point it at the next key or certificate.") from None
        names = [n for n in dns_names(leaf) if not n.startswith("*.")]
        covered = covered or any(name_matches(n, config.hostname) for n in dns_names(leaf))
        entry: dict[str, Any] = {
            "cert": str(pair.cert), "certificate": describe_certificate(chain_der[0], 0),
            "next_key": None if pair.next_key is None else str(pair.next_key),
            "next_spki_sha256": None if next_spki is None else hashlib.sha256(next_spki).hexdigest(),
            "names": []}
        report["certificates"].append(entry)
        remaining = leaf.not_valid_after_utc - dt.datetime.now(dt.UTC)
        if remaining < RENEWAL_WARNING:
            note(report, "warning", f"{key} ({pair.cert}) expires on {leaf.not_valid_after_utc:%Y-%m-%d}: "
                                    "renew it; with DANE-EE 3 1 1 records a renewal that keeps the key "
                                    "keeps them valid")
            worst = max(worst, 1)
        for name in names:
            found = await resolver.tlsa(name, port)
            owner = tlsa_owner(found.base_domain or name, port)
            usable = found.usable
            now_ok = verify_chain(found.records, chain_der, [name]) if usable else None
            after: bool | None = None
            if next_spki is not None and usable:
                if next_chain:
                    after = verify_chain(found.records, next_chain, [name]).verified
                else:
                    # A bare key: only SPKI records (selector 1) can name it ahead of its certificate,
                    # and a DANE-TA record covers whatever key its CA signs next.
                    after = any(r.selector == 1 and matching_data(next_spki, r.matching_type) == r.data
                                for r in effective_records(found.records) if r.usage == 3) or \
                        any(r.usage == 2 for r in usable)
            entry["names"].append({
                "name": name, "owner": owner, "status": found.status,
                "records": [describe_record(r, effective_records(found.records)) for r in found.records],
                "current_matches": None if now_ok is None else now_ok.verified,
                "current_reason": None if now_ok is None else now_ok.reason,
                "next_matches": after})
            spki_hex = hashlib.sha256(spki_der(leaf.public_key())).hexdigest()
            if found.status == "bogus":
                note(report, "error", f"the TLSA lookup at {owner} fails or is bogus: DANE senders defer "
                                      "mail to this name; fix the zone's DNSSEC", name)
                worst = 2
            elif found.status != "secure" or not found.records:
                note(report, "info", f"no DNSSEC-secure TLSA records at {owner}: DANE does not protect "
                                     f"mail to {name}; publish '{owner} IN TLSA 3 1 1 {spki_hex}'", name)
                worst = max(worst, 1)
            elif not usable:
                note(report, "warning", f"the TLSA records at {owner} are all unusable for SMTP; publish "
                                        f"'{owner} IN TLSA 3 1 1 {spki_hex}'", name)
                worst = max(worst, 1)
            elif now_ok is not None and not now_ok.verified:
                note(report, "error", f"the certificate {pair.cert} matches no TLSA record at {owner} "
                                      f"({now_ok.reason}): DANE senders defer mail to {name} now; publish "
                                      f"'{owner} IN TLSA 3 1 1 {spki_hex}'", name)
                worst = 2
            if after is False and next_spki is not None:
                note(report, "warning", f"the next key ({pair.next_key}) has no TLSA record at {owner} yet: "
                                        "switching to it now would break DANE; publish "
                                        f"'{owner} IN TLSA 3 1 1 {hashlib.sha256(next_spki).hexdigest()}' "
                                        "beside the current record and wait two TTLs", name)
                worst = max(worst, 1)
            elif after is None and pair.next_key is None and now_ok is not None and now_ok.verified and \
                    all(r.usage == 3 for r in usable) and len(effective_records(usable)) == 1:
                note(report, "info", f"only the current key is published at {owner}: before a key "
                                     f"rollover, set {key}.next_key and publish its record too", name)
    if not covered:
        note(report, "warning", f"no configured certificate names hostname {config.hostname}")
    report["verdict"] = ("secure", "insecure", "defer")[worst]
    report["reason"] = {0: "every name's TLSA records match the certificate served (and the next key)",
                        1: "mail arrives, but DANE is absent for a name or a planned rollover would break it",
                        2: "senders that use DANE would defer mail to this server now"}[worst]
    return report


