"""Fuzz DANE: TLSA rdata off the wire and the chain a server presents (delivery/dane.py).

Input layout (atheris.FuzzedDataProvider): up to four TLSA rdata blobs, each parsed the way the
resolver does (dnspython from wire) and turned into TlsaRecords as delivery/dns.py does; a flag
that adds a record matching the real test chain (so the DANE-EE and DANE-TA paths are reached);
then the chain: the real leaf and CA made at start-up, with any of them replaced by fuzzed DER or
a copy with fuzzed bytes written over it; then the reference names. Records come from DNS and
chains from whatever host answers on port 25: verify_chain must turn every input into a verdict.

Invariants: verify_chain never raises; effective records are usable and a subset of the records;
a verified verdict names an effective record and the depth it matched at, DANE-EE only at the
leaf; an unverified one carries an RFC 8460 failure type and a reason.

Run: python fuzz/fuzz_tlsa.py [libFuzzer flags] [corpus dirs]
"""

from __future__ import annotations

import datetime
import sys

import atheris

with atheris.instrument_imports(include=["mailward"]):
    import dns.exception
    import dns.rdata
    import dns.rdataclass
    import dns.rdatatype
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from mailward.delivery.dane import association_data, effective_records, verify_chain
    from mailward.delivery.policy import TlsaRecord

FAILURES = {"validation-failure", "certificate-host-mismatch", "certificate-expired", "tlsa-invalid"}


def _make_chain() -> tuple[bytes, bytes]:
    """A CA and a leaf for mx.example.test it signed: the well-formed chain the fuzzer bends."""
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.example.test")]))
            .issuer_name(ca_name).public_key(leaf_key.public_key()).serial_number(2)
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("mx.example.test"),
                                                        x509.DNSName("*.example.test")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    der = serialization.Encoding.DER
    return leaf.public_bytes(der), ca.public_bytes(der)


LEAF, CA = _make_chain()
REAL = {0: x509.load_der_x509_certificate(LEAF), 1: x509.load_der_x509_certificate(CA)}


def _record(fdp: atheris.FuzzedDataProvider) -> TlsaRecord | None:
    wire = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 100))
    try:
        rdata = dns.rdata.from_wire(dns.rdataclass.IN, dns.rdatatype.TLSA, wire, 0, len(wire))
    except (dns.exception.DNSException, ValueError):
        return None  # the resolver would have refused the whole answer
    return TlsaRecord(rdata.usage, rdata.selector, rdata.mtype, bytes(rdata.cert))


def _chain(fdp: atheris.FuzzedDataProvider) -> list[bytes]:
    chain = []
    for depth in range(fdp.ConsumeIntInRange(0, 3)):
        how = fdp.ConsumeIntInRange(0, 3)
        real = LEAF if depth == 0 else CA
        if how == 0:
            chain.append(real)
        elif how == 1:
            chain.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 600)))
        else:  # the real certificate with a few bytes changed: parses more often, breaks deeper
            at = fdp.ConsumeIntInRange(0, len(real) - 1)
            patch = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 8))
            chain.append(real[:at] + patch + real[at + len(patch):])
    return chain


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    records = [r for r in (_record(fdp) for _ in range(fdp.ConsumeIntInRange(0, 4))) if r is not None]
    if fdp.ConsumeBool():
        usage, selector, mtype = 2 + fdp.ConsumeIntInRange(0, 1), fdp.ConsumeIntInRange(0, 1), \
            fdp.ConsumeIntInRange(0, 2)
        target = REAL[0] if usage == 3 else REAL[1]
        records.append(TlsaRecord(usage, selector, mtype, association_data(target, selector, mtype)))
    chain = _chain(fdp)
    names = [fdp.ConsumeUnicodeNoSurrogates(30) for _ in range(fdp.ConsumeIntInRange(0, 2))]
    names = names or ["mx.example.test"]

    effective = effective_records(records)
    assert all(r.usable and r in records for r in effective), effective
    verdict = verify_chain(records, chain, names)
    if verdict.verified:
        assert verdict.record in effective and verdict.depth is not None, verdict
        assert (verdict.record.usage == 3 and verdict.depth == 0) or verdict.record.usage == 2, verdict
        assert verdict.failure is None, verdict
    else:
        assert verdict.failure in FAILURES and verdict.reason, verdict


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
