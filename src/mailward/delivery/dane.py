"""DANE authentication of a server's certificate chain against its TLSA records (RFC 7672, 7671).

Pure: DER certificates and TLSA records in, one `DaneVerdict` out, so every rule is table-tested.
The handshake itself runs without PKIX verification (CERT_NONE) and hands the chain the server
sent (`tls.peer_chain`) to `verify_chain`.

Written here rather than taken from a library because neither Python's `ssl` nor `cryptography`
exposes OpenSSL's DANE support, and no maintained Python package implements RFC 7672 matching.

Rules:
* Usable records only: DANE-TA(2) and DANE-EE(3) (RFC 7672 §3.1), selectors Cert(0) and SPKI(1),
  matching types Full(0), SHA2-256(1) and SHA2-512(2) with the right data length; the rest is
  ignored (RFC 7672 §2.2.3 "unusable"), as is every record under usage PKIX-TA/EE (0, 1).
* Digest agility (RFC 7671 §9): for each usage and selector, only records with the strongest digest
  present are compared, so an attacker cannot downgrade a zone that publishes SHA-512 to a weaker
  SHA-256 record. Full(0) records are not digests and always count.
* DANE-EE(3) matches the leaf only and checks neither names nor validity dates (RFC 7672 §3.1.1):
  the DNSSEC signature bounds the binding.
* DANE-TA(2) matches a certificate the server sent above the leaf (RFC 7672 §3.1.2 requires the
  server to send the trust anchor), then the leaf must chain to it (signatures, issuer names, CA
  basic constraints), every certificate below the anchor must be within its validity dates, and the
  leaf must carry one of the reference names (RFC 7672 §3.2.3: the TLSA base domain, and with a
  secure MX RRset also the next-hop domain), wildcards covering exactly one left-most label.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from mailward.delivery.policy import TlsaRecord

__all__ = ["DaneFailure", "DaneVerdict", "association_data", "effective_records", "matching_data",
           "name_matches", "verify_chain"]

# The RFC 8460 result types a DANE failure is reported as.
DaneFailure = Literal["validation-failure", "certificate-host-mismatch", "certificate-expired",
                      "tlsa-invalid"]

DANE_TA = 2
DANE_EE = 3
_DIGEST_STRENGTH = {1: 1, 2: 2}


@dataclass(frozen=True, slots=True)
class DaneVerdict:
    """The outcome of matching one chain: verified, or why not (for the log and TLS-RPT)."""

    verified: bool
    reason: str
    record: TlsaRecord | None = None  # the record that matched
    depth: int | None = None  # where in the chain it matched, 0 = leaf
    failure: DaneFailure | None = None


def effective_records(records: Iterable[TlsaRecord]) -> tuple[TlsaRecord, ...]:
    """The records a chain is compared with: well-formed ones, weaker digests dropped (§9)."""
    usable = [r for r in records if r.usable]
    strongest: dict[tuple[int, int], int] = {}
    for r in usable:
        if r.matching_type:
            key = (r.usage, r.selector)
            strongest[key] = max(strongest.get(key, 0), _DIGEST_STRENGTH[r.matching_type])
    return tuple(r for r in usable if r.matching_type == 0
                 or _DIGEST_STRENGTH[r.matching_type] == strongest[(r.usage, r.selector)])


def association_data(cert: x509.Certificate, selector: int, matching_type: int) -> bytes:
    """What a TLSA record with this selector and matching type holds for `cert` (RFC 6698 §2.1)."""
    if selector == 0:
        content = cert.public_bytes(serialization.Encoding.DER)
    elif selector == 1:
        content = cert.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
    else:
        raise ValueError(f"unknown TLSA selector {selector}")
    return matching_data(content, matching_type)


def matching_data(content: bytes, matching_type: int) -> bytes:
    """The selected content as a TLSA record of this matching type holds it (RFC 6698 §2.1.3); also
    for a bare public key, whose record (selector 1) can be published before any certificate exists."""
    if matching_type == 0:
        return content
    if matching_type == 1:
        return hashlib.sha256(content).digest()
    if matching_type == 2:
        return hashlib.sha512(content).digest()
    raise ValueError(f"unknown TLSA matching type {matching_type}")


def _matches(record: TlsaRecord, cert: x509.Certificate) -> bool:
    try:
        return association_data(cert, record.selector, record.matching_type) == record.data
    except (ValueError, UnsupportedAlgorithm):
        # A certificate whose public key cannot be read (the server sends whatever it likes)
        # matches no SPKI record; found by fuzz/fuzz_tlsa.py.
        return False


def name_matches(pattern: str, name: str) -> bool:
    """RFC 6125 §6.4.3 as RFC 7672 §3.2.3 narrows it: `*` only as the whole left-most label."""
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if pattern.startswith("*."):
        head, dot, rest = name.partition(".")
        return bool(head) and bool(dot) and rest == pattern[2:] and "." in rest
    return pattern == name and "*" not in pattern


def _dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names: list[str] = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    except ValueError:  # malformed extensions: no name can be trusted from this certificate
        return []
    if names:
        return names
    # Only without DNS SANs does the subject CN count (RFC 6125 §6.4.4).
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except (x509.ExtensionNotFound, ValueError):  # absent or malformed: not a CA
        return False


def _valid_at(cert: x509.Certificate, now: datetime.datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _chain_to_anchor(chain: Sequence[x509.Certificate], anchor: int) -> str | None:
    """Why the certificates 0..anchor do not form a signed path, or None when they do."""
    for depth in range(anchor):
        child, issuer = chain[depth], chain[depth + 1]
        if not _is_ca(issuer):
            return f"certificate {depth + 1} in the chain is not a CA"
        try:
            child.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
            return f"certificate {depth} is not signed by certificate {depth + 1} ({exc or 'bad signature'})"
    return None


def verify_chain(
    records: Iterable[TlsaRecord],
    chain_der: Sequence[bytes],
    names: Sequence[str],
    now: datetime.datetime | None = None,
) -> DaneVerdict:
    """Authenticate the chain a server sent (leaf first) with its TLSA records.

    `names` are the reference identifiers for DANE-TA (TLSA base domain first); DANE-EE ignores
    them. `now` (aware, UTC) defaults to the current time.
    """
    effective = effective_records(records)
    if not effective:
        return DaneVerdict(False, "no usable TLSA records", failure="tlsa-invalid")
    if not chain_der:
        return DaneVerdict(False, "the server sent no certificate", failure="validation-failure")
    try:
        chain = [x509.load_der_x509_certificate(der) for der in chain_der]
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is no ValueError
        return DaneVerdict(False, f"the server's certificate cannot be parsed ({exc})",
                           failure="validation-failure")
    now = now or datetime.datetime.now(datetime.UTC)

    leaf = chain[0]
    for record in effective:
        if record.usage == DANE_EE and _matches(record, leaf):
            return DaneVerdict(True, "DANE-EE matched the leaf certificate", record, 0)

    why_not = "no TLSA record matches the certificate chain"
    failure: DaneFailure = "validation-failure"
    for depth in range(1, len(chain)):
        for record in effective:
            if record.usage != DANE_TA or not _matches(record, chain[depth]):
                continue
            broken = _chain_to_anchor(chain, depth)
            if broken is not None:
                why_not = f"DANE-TA matched certificate {depth}, but {broken}"
                continue
            # The anchor is vouched for by DNSSEC; what it signed must still be in date.
            expired = next((d for d in range(depth) if not _valid_at(chain[d], now)), None)
            if expired is not None:
                why_not, failure = (f"DANE-TA matched certificate {depth}, but certificate {expired} "
                                    "is outside its validity period"), "certificate-expired"
                continue
            presented = _dns_names(leaf)
            if not any(name_matches(p, n) for p in presented for n in names):
                return DaneVerdict(
                    False, f"DANE-TA matched, but the certificate names {', '.join(presented) or 'nothing'} "
                    f"and not {', '.join(names)}", record, depth, "certificate-host-mismatch")
            return DaneVerdict(True, f"DANE-TA matched certificate {depth} of the chain", record, depth)
    return DaneVerdict(False, why_not, failure=failure)
