"""Pieces every form of `mailward check` uses: decoding TLSA records and certificates, and
probing one address exactly as delivery connects to it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from mailward.config import Config
from mailward.delivery.attempt import AttemptError, AttemptSettings, Session, SessionTrace, TlsOutcome
from mailward.delivery.dane import (
    association_data,
    name_matches,
    verify_chain,
)
from mailward.delivery.policy import (
    Candidate,
    SecurityLevel,
    TlsaRecord,
    TlsRequirement,
)
from mailward.tls import chain_trusted, peer_chain, tls_facts

SCHEMA = 1
DomainVerdict = Literal["secure", "insecure", "defer", "error"]
HostVerdict = Literal["Verified", "Trusted", "Untrusted", "Plaintext", "Unreachable"]
EXIT_STATUS: dict[str, int] = {"secure": 0, "insecure": 1, "defer": 2, "error": 3}
RENEWAL_WARNING = dt.timedelta(days=21)  # certbot renews 30 days ahead; later than this is overdue

USAGES = {0: "PKIX-TA", 1: "PKIX-EE", 2: "DANE-TA", 3: "DANE-EE"}
SELECTORS = {0: "Cert", 1: "SPKI"}
MATCHING = {0: "Full", 1: "SHA2-256", 2: "SHA2-512"}
DIGEST_LENGTH = {1: 32, 2: 64}


class CheckError(Exception):
    """The check could not run; one sentence saying what and how to fix it (exit status 3)."""


# --- small parts ------------------------------------------------------------------------------------


def note(report: dict[str, Any], severity: Literal["error", "warning", "info"], text: str,
             host: str | None = None) -> None:
    report["findings"].append({"severity": severity, "host": host, "text": text})


def tlsa_owner(base: str, port: int) -> str:
    return f"_{port}._tcp.{base.rstrip('.')}."


def describe_record(record: TlsaRecord, effective: Sequence[TlsaRecord] = ()) -> dict[str, Any]:
    """One TLSA record decoded: what it names, and whether SMTP may use it and why not."""
    meaning = " ".join((USAGES.get(record.usage, f"usage {record.usage}"),
                        SELECTORS.get(record.selector, f"selector {record.selector}"),
                        MATCHING.get(record.matching_type, f"matching type {record.matching_type}")))
    why: str | None = None
    if record.usage in (0, 1):
        why = "PKIX-TA and PKIX-EE records are not used for SMTP (RFC 7672 §3.1.3)"
    elif record.usage not in USAGES:
        why = f"usage {record.usage} is not defined"
    elif record.selector not in SELECTORS:
        why = f"selector {record.selector} is not defined"
    elif record.matching_type not in MATCHING:
        why = f"matching type {record.matching_type} is not defined"
    elif not record.usable:
        want = DIGEST_LENGTH.get(record.matching_type)
        why = (f"{MATCHING[record.matching_type]} data must be {want} bytes, not {len(record.data)}"
               if want else "the record holds no data")
    ignored = None
    if record.usable and effective and record not in effective:
        ignored = "a stronger digest is published for the same usage and selector (RFC 7671 §9)"
    return {"usage": record.usage, "selector": record.selector, "matching_type": record.matching_type,
            "data": record.data.hex(), "meaning": meaning, "usable": record.usable, "why_unusable": why,
            "ignored": ignored, "matches": []}


def _key_description(key: object) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448"
    if isinstance(key, dsa.DSAPublicKey):
        return f"DSA {key.key_size}"
    return type(key).__name__


def dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [str(n) for n in san.value.get_values_for_type(x509.DNSName)]


def ip_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [str(n) for n in san.value.get_values_for_type(x509.IPAddress)]


def spki_der(key: object) -> bytes:
    public = key.public_key() if hasattr(key, "public_key") else key
    return public.public_bytes(serialization.Encoding.DER,  # type: ignore[no-any-return,union-attr]
                               serialization.PublicFormat.SubjectPublicKeyInfo)


def describe_certificate(der: bytes, depth: int, records: Sequence[TlsaRecord] = (),
                         now: dt.datetime | None = None) -> dict[str, Any]:
    """A certificate of a chain: names, validity, key, and which TLSA records match it."""
    now = now or dt.datetime.now(dt.UTC)
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        return {"depth": depth, "error": f"cannot be parsed ({exc})", "tlsa_matches": []}
    # Indexes into `records`: two records of one kind (the old key and the new) must stay apart.
    matches = [i for i, r in enumerate(records) if r.selector in SELECTORS and r.matching_type in MATCHING
               and association_data(cert, r.selector, r.matching_type) == r.data]
    return {
        "depth": depth,
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "names": dns_names(cert),
        "ip_addresses": ip_names(cert),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "expired": now > cert.not_valid_after_utc,
        "key": _key_description(cert.public_key()),
        "spki_sha256": hashlib.sha256(spki_der(cert.public_key())).hexdigest(),
        "tlsa_matches": matches,
    }


def _capabilities(caps: Any) -> list[str] | None:
    if caps is None:
        return None
    return [f"{k} {v}".strip() for k, v in caps.keywords.items()]


def _host_verdict(outcome: TlsOutcome | None) -> HostVerdict:
    if outcome is None or not outcome.active:
        return "Plaintext"
    if outcome.trust == "Verified":
        return "Verified"
    if outcome.trust == "Trusted":
        return "Trusted"
    return "Untrusted"  # Untrusted, and Anonymous (no certificate at all)


def requirement_report(tls: TlsRequirement) -> dict[str, Any]:
    return {"level": tls.level.value, "required": tls.required, "verify": tls.verify,
            "verify_name": tls.verify_name, "implicit": tls.implicit, "reason": tls.reason}


def probe_settings(config: Config) -> AttemptSettings:
    dc = config.delivery
    # No credentials, ever: the check authenticates to no one.
    return AttemptSettings(helo_name=dc.helo_name, connect_timeout=dc.connect_timeout,
                           command_timeout=dc.command_timeout, data_timeout=dc.data_timeout)


# --- one connection ----------------------------------------------------------------------------------


async def probe(candidate: Candidate, settings: AttemptSettings, *, ca_file: Path | None = None,
                records: Sequence[TlsaRecord] = ()) -> dict[str, Any]:
    """Open a session exactly as delivery would, describe it, QUIT. The entry's `accepted` says
    whether delivery would send mail over it, `outcome` is delivery's own TLS summary."""
    entry: dict[str, Any] = {
        "address": candidate.address, "port": candidate.port, "relay": candidate.relay,
        "requirement": requirement_report(candidate.tls), "connected": False, "banner": None, "ehlo": None,
        "ehlo_tls": None, "starttls": None, "tls": None, "certificates": [], "certificates_from": None,
        "pkix": None, "dane": None, "accepted": False, "outcome": None, "error": None,
        "plaintext_retry": None, "verdict": "Unreachable"}
    trace = SessionTrace()
    outcome: TlsOutcome | None = None
    try:
        session = await Session.open(candidate, settings, trace=trace)
    except AttemptError as exc:
        entry["error"] = exc.reply
        outcome = exc.tls
        if exc.retry_plaintext:
            # delivery.may_retry_plaintext: the Deliverer tries once more without STARTTLS.
            retry = SessionTrace()
            try:
                again = await Session.open(candidate, settings, plaintext=True, trace=retry)
            except AttemptError as exc2:
                entry["plaintext_retry"] = exc2.reply
            else:
                entry["plaintext_retry"] = "would be delivered in plaintext after the failed handshake"
                entry["accepted"], outcome = True, again.tls
                await again.close()
    else:
        entry["accepted"], outcome = True, session.tls
        await session.close()
    seen = trace.session
    chain: list[bytes] = []
    if seen is not None:
        greeting = seen.client.greeting
        entry["connected"] = True  # TCP; on 465 the handshake comes before any greeting
        entry["banner"] = None if greeting is None else " ".join(str(greeting).split())
        before = trace.before_tls
        entry["ehlo"] = _capabilities(before)
        entry["starttls"] = None if before is None or candidate.tls.implicit else before.starttls
        if seen.client.tls_active:
            entry["ehlo_tls"] = _capabilities(seen.client.capabilities)
        sslobj = seen.stream.ssl_object
        if sslobj is not None:
            facts = tls_facts(sslobj)
            group = getattr(sslobj, "group", None)  # not every Python's ssl module reports it
            entry["tls"] = {"protocol": facts.version, "cipher": facts.cipher, "bits": facts.bits,
                            "group": group() if callable(group) else None}
            chain = peer_chain(sslobj)
            entry["certificates_from"] = "session"
    if not chain and entry["connected"] and outcome is not None and outcome.failure and \
            "certificate verification failed" in outcome.failure:
        # The handshake refused the certificate before its chain could be read; fetch it over a
        # second connection that verifies nothing, for display only.
        chain = await _fetch_chain(candidate, settings)
        entry["certificates_from"] = "a second connection that verified nothing" if chain else None
    entry["certificates"] = [describe_certificate(der, i, records) for i, der in enumerate(chain)]
    if chain:
        reference = candidate.tls.verify_name or candidate.host
        leaf = entry["certificates"][0]
        entry["pkix"] = {"trusted": chain_trusted(chain, ca_file), "reference_name": reference,
                         "name_matches": reference in leaf.get("ip_addresses", [])
                         or any(name_matches(n, reference) for n in leaf.get("names", [])),
                         "ca_file": None if ca_file is None else str(ca_file)}
        if candidate.tls.verify == "dane":
            verdict = verify_chain(candidate.tls.tlsa, chain, candidate.tls.dane_names)
            r = verdict.record
            entry["dane"] = {"verified": verdict.verified, "reason": verdict.reason, "depth": verdict.depth,
                             "record": None if r is None else f"{r.usage} {r.selector} {r.matching_type}"}
    entry["outcome"] = None if outcome is None else outcome.summary()
    if entry["accepted"]:
        entry["verdict"] = _host_verdict(outcome)
    elif entry["connected"] and (outcome is not None and (outcome.active or outcome.failure)):
        # Reached, but delivery refuses what the connection proved (DANE or PKIX failed, STARTTLS
        # missing where TLS is required); a failed handshake counts as unreachable.
        if outcome.active or chain:
            entry["verdict"] = "Untrusted"
        elif outcome.failure and ("STARTTLS" in outcome.failure):
            entry["verdict"] = "Plaintext"
    return entry


async def _fetch_chain(candidate: Candidate, settings: AttemptSettings) -> list[bytes]:
    tls = candidate.tls
    look = replace(candidate, tls=TlsRequirement(SecurityLevel.ENCRYPT, starttls=True, required=True,
                                                 verify_name=tls.verify_name, implicit=tls.implicit))
    trace = SessionTrace()
    try:
        session = await Session.open(look, settings, trace=trace)
    except AttemptError:
        return []
    sslobj = session.stream.ssl_object
    chain = [] if sslobj is None else peer_chain(sslobj)
    await session.close()
    return chain


