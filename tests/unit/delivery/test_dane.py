"""DANE chain matching (RFC 7672 §3, RFC 7671 §5 and §9) against chains built here with real keys."""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailward.delivery.dane import association_data, effective_records, name_matches, verify_chain
from mailward.delivery.policy import TlsaRecord

NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)


def issue(cn: str, *, issuer: Issued | None = None, ca: bool = False, names: tuple[str, ...] = (),
          not_before: datetime.datetime = NOW - 30 * DAY,
          not_after: datetime.datetime = NOW + 30 * DAY) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(issuer.cert.subject if issuer else subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(not_before)
               .not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                                        critical=False)
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    return Issued(cert, key)


def tlsa(usage: int, selector: int, mtype: int, cert: x509.Certificate) -> TlsaRecord:
    return TlsaRecord(usage, selector, mtype, association_data(cert, selector, mtype))


@pytest.fixture(scope="module")
def pki() -> dict[str, Issued]:
    root = issue("Test Root", ca=True)
    inter = issue("Test Intermediate", issuer=root, ca=True)
    leaf = issue("mx.example.net", issuer=inter, names=("mx.example.net", "*.mail.example.net"))
    other_root = issue("Other Root", ca=True)
    return {
        "root": root, "inter": inter, "leaf": leaf, "other_root": other_root,
        "expired_leaf": issue("mx.example.net", issuer=inter, names=("mx.example.net",),
                              not_before=NOW - 60 * DAY, not_after=NOW - DAY),
        "leaf_by_leaf": issue("mx.example.net", issuer=leaf, names=("mx.example.net",)),
        "self_signed": issue("mx.example.net"),
        "cn_only": issue("cn.example.net", issuer=inter),
    }


def test_association_data_of_each_selector_and_matching_type(pki: dict[str, Issued]) -> None:
    cert = pki["leaf"].cert
    der = cert.public_bytes(serialization.Encoding.DER)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    assert association_data(cert, 0, 0) == der
    assert association_data(cert, 1, 0) == spki
    assert association_data(cert, 0, 1) == hashlib.sha256(der).digest()
    assert association_data(cert, 1, 2) == hashlib.sha512(spki).digest()
    with pytest.raises(ValueError):
        association_data(cert, 2, 1)


@pytest.mark.parametrize("selector,mtype", [(s, m) for s in (0, 1) for m in (0, 1, 2)])
def test_dane_ee_matches_the_leaf_in_every_form(pki: dict[str, Issued], selector: int, mtype: int) -> None:
    verdict = verify_chain([tlsa(3, selector, mtype, pki["leaf"].cert)],
                           [pki["leaf"].der, pki["inter"].der], ["mx.example.net"], NOW)
    assert verdict.verified and verdict.depth == 0


def test_dane_ee_ignores_names_and_expiry(pki: dict[str, Issued]) -> None:
    verdict = verify_chain([tlsa(3, 1, 1, pki["expired_leaf"].cert)], [pki["expired_leaf"].der],
                           ["unrelated.example.org"], NOW)
    assert verdict.verified


def test_dane_ee_never_matches_above_the_leaf(pki: dict[str, Issued]) -> None:
    verdict = verify_chain([tlsa(3, 1, 1, pki["inter"].cert)], [pki["leaf"].der, pki["inter"].der],
                           ["mx.example.net"], NOW)
    assert not verdict.verified and verdict.failure == "validation-failure"


@pytest.mark.parametrize("anchor", ["inter", "root"])
def test_dane_ta_at_intermediate_or_root(pki: dict[str, Issued], anchor: str) -> None:
    chain = [pki["leaf"].der, pki["inter"].der, pki["root"].der]
    verdict = verify_chain([tlsa(2, 0, 1, pki[anchor].cert)], chain, ["mx.example.net"], NOW)
    assert verdict.verified
    assert verdict.depth == (1 if anchor == "inter" else 2)


def test_dane_ta_must_be_sent_by_the_server(pki: dict[str, Issued]) -> None:
    # RFC 7672 §3.1.2: the anchor must be in the chain; a root the server left out does not count.
    verdict = verify_chain([tlsa(2, 1, 1, pki["root"].cert)], [pki["leaf"].der, pki["inter"].der],
                           ["mx.example.net"], NOW)
    assert not verdict.verified


def test_dane_ta_never_matches_the_leaf_itself(pki: dict[str, Issued]) -> None:
    verdict = verify_chain([tlsa(2, 1, 1, pki["leaf"].cert)], [pki["leaf"].der, pki["inter"].der],
                           ["mx.example.net"], NOW)
    assert not verdict.verified


@pytest.mark.parametrize("names,ok", [
    (["mx.example.net"], True),
    (["MX.Example.NET."], True),
    (["example.net", "mx.example.net"], True),  # next-hop domain first, MX host second
    (["a.mail.example.net"], True),  # one-label wildcard
    (["a.b.mail.example.net"], False),
    (["mail.example.net"], False),
    (["mx.example.org"], False),
])
def test_dane_ta_checks_the_reference_names(pki: dict[str, Issued], names: list[str], ok: bool) -> None:
    verdict = verify_chain([tlsa(2, 1, 1, pki["inter"].cert)], [pki["leaf"].der, pki["inter"].der],
                           names, NOW)
    assert verdict.verified is ok
    if not ok:
        assert verdict.failure == "certificate-host-mismatch"


def test_dane_ta_uses_the_common_name_only_without_dns_names(pki: dict[str, Issued]) -> None:
    chain = [pki["cn_only"].der, pki["inter"].der]
    assert verify_chain([tlsa(2, 1, 1, pki["inter"].cert)], chain, ["cn.example.net"], NOW).verified
    assert not verify_chain([tlsa(2, 1, 1, pki["inter"].cert)], chain, ["mx.example.net"], NOW).verified


def test_dane_ta_rejects_an_expired_leaf(pki: dict[str, Issued]) -> None:
    verdict = verify_chain([tlsa(2, 1, 1, pki["inter"].cert)], [pki["expired_leaf"].der, pki["inter"].der],
                           ["mx.example.net"], NOW)
    assert not verdict.verified and verdict.failure == "certificate-expired"


def test_dane_ta_rejects_a_chain_that_does_not_lead_to_the_anchor(pki: dict[str, Issued]) -> None:
    # The server sends a certificate matching the record, but the leaf was not issued under it.
    chain = [pki["leaf"].der, pki["other_root"].der]
    verdict = verify_chain([tlsa(2, 1, 1, pki["other_root"].cert)], chain, ["mx.example.net"], NOW)
    assert not verdict.verified and "not signed" in verdict.reason


def test_dane_ta_rejects_an_issuer_that_is_not_a_ca(pki: dict[str, Issued]) -> None:
    chain = [pki["leaf_by_leaf"].der, pki["leaf"].der, pki["inter"].der]
    verdict = verify_chain([tlsa(2, 1, 1, pki["inter"].cert)], chain, ["mx.example.net"], NOW)
    assert not verdict.verified and "not a CA" in verdict.reason


def test_a_self_signed_leaf_needs_dane_ee(pki: dict[str, Issued]) -> None:
    chain = [pki["self_signed"].der]
    assert verify_chain([tlsa(3, 1, 1, pki["self_signed"].cert)], chain, [], NOW).verified
    assert not verify_chain([tlsa(2, 1, 1, pki["self_signed"].cert)], chain, ["mx.example.net"], NOW).verified


def test_only_the_strongest_digest_counts(pki: dict[str, Issued]) -> None:
    good256 = tlsa(3, 1, 1, pki["leaf"].cert)
    stale512 = TlsaRecord(3, 1, 2, b"\x00" * 64)
    chain = [pki["leaf"].der]
    # RFC 7671 §9: with a SHA-512 record present, a matching SHA-256 one is not enough.
    assert not verify_chain([good256, stale512], chain, [], NOW).verified
    assert verify_chain([good256, stale512, tlsa(3, 1, 2, pki["leaf"].cert)], chain, [], NOW).verified
    # Agility is per usage and selector: a SHA-512 record under selector 0 leaves selector 1 alone.
    assert verify_chain([good256, TlsaRecord(3, 0, 2, b"\x00" * 64)], chain, [], NOW).verified
    # Full(0) is not a digest and always counts.
    assert verify_chain([tlsa(3, 1, 0, pki["leaf"].cert), stale512], chain, [], NOW).verified


def test_unusable_and_malformed_records_are_ignored(pki: dict[str, Issued]) -> None:
    leaf = pki["leaf"].cert
    unusable = [
        tlsa(1, 1, 1, leaf),  # PKIX-EE
        tlsa(0, 1, 1, pki["inter"].cert),  # PKIX-TA
        TlsaRecord(3, 1, 1, association_data(leaf, 1, 1)[:31]),  # short digest
        TlsaRecord(3, 1, 2, association_data(leaf, 1, 1)),  # SHA-256 data under SHA-512
        TlsaRecord(3, 2, 1, association_data(leaf, 1, 1)),  # unknown selector
        TlsaRecord(3, 1, 3, association_data(leaf, 1, 1)),  # unknown matching type
        TlsaRecord(3, 1, 0, b""),
    ]
    assert effective_records(unusable) == ()
    verdict = verify_chain(unusable, [pki["leaf"].der], ["mx.example.net"], NOW)
    assert not verdict.verified and verdict.failure == "tlsa-invalid"
    # A malformed stronger record does not disable a good weaker one.
    assert verify_chain([tlsa(3, 1, 1, leaf), TlsaRecord(3, 1, 2, b"\x01" * 10)],
                        [pki["leaf"].der], [], NOW).verified


def test_garbage_and_empty_chains_are_failures_not_crashes(pki: dict[str, Issued]) -> None:
    records = [tlsa(3, 1, 1, pki["leaf"].cert)]
    assert verify_chain(records, [], [], NOW).reason == "the server sent no certificate"
    verdict = verify_chain(records, [b"\x30\x03\x02\x01\x00"], [], NOW)
    assert not verdict.verified and verdict.failure == "validation-failure"


@pytest.mark.parametrize("pattern,name,ok", [
    ("mx.example.net", "mx.example.net", True),
    ("*.example.net", "mx.example.net", True),
    ("*.example.net", "example.net", False),
    ("*.example.net", "a.b.example.net", False),
    ("*.net", "example.net", False),  # a wildcard never covers a whole registrable name
    ("m*.example.net", "mx.example.net", False),  # partial-label wildcards are not honoured
    ("*", "mx", False),
])
def test_name_matches(pattern: str, name: str, ok: bool) -> None:
    assert name_matches(pattern, name) is ok


def test_certificates_a_hostile_server_bent_are_failures_not_crashes(pki: dict[str, Issued]) -> None:
    """Found by fuzz/fuzz_tlsa.py: a leaf whose public key cannot be read made SPKI matching raise
    ValueError, and an unknown X.509 version raised InvalidVersion, which is no ValueError."""
    leaf, inter = pki["leaf"].der, pki["inter"].der
    point = pki["leaf"].cert.public_key().public_bytes(serialization.Encoding.X962,
                                                       serialization.PublicFormat.UncompressedPoint)
    assert leaf.count(point) == 1
    bad_key = leaf.replace(point, b"\x05" + point[1:])  # not a point encoding at all
    x509.load_der_x509_certificate(bad_key)  # loads: the key is only read when asked for
    records = [tlsa(3, 1, 1, pki["leaf"].cert), tlsa(2, 1, 1, pki["inter"].cert)]
    verdict = verify_chain(records, [bad_key, inter], ["mx.example.net"], NOW)
    assert not verdict.verified and verdict.failure is not None
    version = b"\xa0\x03\x02\x01\x02"  # [0] EXPLICIT INTEGER 2, i.e. v3
    assert leaf.count(version) == 1
    verdict = verify_chain(records, [leaf.replace(version, b"\xa0\x03\x02\x01\x23"), inter],
                           ["mx.example.net"], NOW)
    assert not verdict.verified and verdict.failure == "validation-failure"
    assert "cannot be parsed" in verdict.reason
