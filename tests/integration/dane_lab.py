"""DANE destinations for the DNSSEC lab (dnssec.py): certificates made at set-up and the zones whose
TLSA records name them.

``dane.test`` is signed and anchored; ``unsigned.test`` is not. TLSA records sit at
``_PORT._tcp.<host>`` where PORT is the lab's shared SMTP port (the `[delivery] port` of the
sending mailward), so every peer listens on its own loopback address with that one port:

* EE_EXPIRED: a mailward whose leaf (from a private CA) expired a month ago; DANE-EE 3 1 1.
* EE_SELF: a mailward with a self-signed leaf naming nothing the lab uses; DANE-EE 3 1 1, and the
  peer behind most other cases (unusable records, a TLSA that matches nothing, insecure zones).
* TA: a mailward whose leaf comes from a private CA that it sends along; DANE-TA 2 0 1 and 2 1 1.
  The leaf names ta201.dane.test and ta-spki.dane.test (the latter a next-hop domain, which counts
  for DANE-TA only because the MX RRset is secure).
* SNI: a mailward whose default certificate is a decoy; only a client that sends SNI
  target.dane.test (the TLSA base domain of the alias-mx CNAME) gets the certificate its TLSA
  record names.
* STRIP: a test's proxy that removes STARTTLS from EHLO replies, in front of EE_SELF.
* CLEAR: Postfix's smtp-sink, which never offers STARTTLS.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

EE_EXPIRED = "127.0.53.20"
EE_SELF = "127.0.53.21"
TA = "127.0.53.22"
SNI = "127.0.53.23"
STRIP = "127.0.53.24"
CLEAR = "127.0.53.25"
ADDRESSES = (EE_EXPIRED, EE_SELF, TA, SNI, STRIP, CLEAR)

SIGNED = "dane.test"
UNSIGNED = "unsigned.test"
# RRsets whose signature the lab breaks after signing: the validator answers SERVFAIL (bogus).
BROKEN_TLSA_HOST = "bogus-tlsa.dane.test"


@dataclass(frozen=True)
class Pem:
    """A certificate chain file (leaf first) and its key file, as [[tls.certificates]] takes them."""

    cert: Path
    key: Path

    @property
    def leaf(self) -> x509.Certificate:
        return x509.load_pem_x509_certificates(self.cert.read_bytes())[0]

    @property
    def chain(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(self.cert.read_bytes())


@dataclass(frozen=True)
class DaneCerts:
    expired: Pem  # leaf expired, issued by a private CA (sent along)
    selfsigned: Pem
    ta: Pem  # leaf + the DANE-TA anchor
    ta_anchor: x509.Certificate
    decoy: Pem  # the SNI peer's default certificate
    target: Pem  # the SNI peer's certificate for target.dane.test


def tlsa(cert: x509.Certificate, usage: int, selector: int, mtype: int) -> str:
    """TLSA RDATA in zone-file form for `cert`, e.g. "3 1 1 ab12..."."""
    if selector == 0:
        data = cert.public_bytes(serialization.Encoding.DER)
    else:
        data = cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = {1: hashlib.sha256, 2: hashlib.sha512}[mtype](data).hexdigest()
    return f"{usage} {selector} {mtype} {digest}"


def make_certificates(directory: Path) -> DaneCerts:
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    year = dt.timedelta(days=365)
    ca_a_key, ca_a = _ca("DANE lab CA A", now - year, now + year)
    ta_key, ta_anchor = _ca("DANE lab trust anchor", now - year, now + year)
    expired = _leaf(directory, "expired", "expired.example", ["expired.example"], ca_a, ca_a_key,
                    now - dt.timedelta(days=60), now - dt.timedelta(days=30))
    selfsigned = _leaf(directory, "selfsigned", "selfsigned.example", ["selfsigned.example"], None, None,
                       now - dt.timedelta(hours=1), now + year)
    ta = _leaf(directory, "ta", "ta201.dane.test", ["ta201.dane.test", "ta-spki.dane.test"], ta_anchor,
               ta_key, now - dt.timedelta(hours=1), now + year)
    decoy = _leaf(directory, "decoy", "decoy.example", ["decoy.example"], None, None,
                  now - dt.timedelta(hours=1), now + year)
    target = _leaf(directory, "target", "target.dane.test", ["target.dane.test"], None, None,
                   now - dt.timedelta(hours=1), now + year)
    return DaneCerts(expired, selfsigned, ta, ta_anchor, decoy, target)


def signed_zone(port: int, certs: DaneCerts, nsd: str) -> str:
    t = f"_{port}._tcp"
    ee_self = tlsa(certs.selfsigned.leaf, 3, 1, 1)
    no_match = "3 1 1 " + "5a" * 32
    return f"""\
$ORIGIN {SIGNED}.
$TTL 300
@                 SOA   ns hostmaster 1 3600 600 86400 300
@                 NS    ns
ns                A     {nsd}
; --- hosts and their TLSA records
ee-expired        A     {EE_EXPIRED}
{t}.ee-expired    TLSA  {tlsa(certs.expired.leaf, 3, 1, 1)}
ee-self           A     {EE_SELF}
{t}.ee-self       TLSA  {ee_self}
ta201             A     {TA}
{t}.ta201         TLSA  {tlsa(certs.ta_anchor, 2, 0, 1)}
ta211             A     {TA}
{t}.ta211         TLSA  {tlsa(certs.ta_anchor, 2, 1, 1)}
ta-wrongname      A     {TA}
{t}.ta-wrongname  TLSA  {tlsa(certs.ta_anchor, 2, 0, 1)}
nomatch           A     {EE_SELF}
{t}.nomatch       TLSA  {no_match}
pkix              A     {EE_SELF}
{t}.pkix          TLSA  {tlsa(certs.selfsigned.leaf, 1, 1, 1)}
{t}.pkix          TLSA  {tlsa(certs.selfsigned.leaf, 0, 0, 1)}
pkix-plain        A     {CLEAR}
{t}.pkix-plain    TLSA  {tlsa(certs.selfsigned.leaf, 1, 1, 1)}
bogus-tlsa        A     {CLEAR}
{t}.bogus-tlsa    TLSA  {ee_self}
stripped          A     {STRIP}
{t}.stripped      TLSA  {ee_self}
notlsa-mx         A     {EE_SELF}
target            A     {SNI}
{t}.target        TLSA  {tlsa(certs.target.leaf, 3, 1, 1)}
; an alias whose chain is secure: TLSA at the target (the base domain, and the SNI)
alias-mx          CNAME target
; a secure alias into an unsigned zone: TLSA at the alias's own name
alias-out         CNAME mx-alias-target.{UNSIGNED}.
{t}.alias-out     TLSA  {ee_self}
; --- destinations
expired           MX    10 ee-expired
selfsigned        MX    10 ee-self
ta-cert           MX    10 ta201
ta-spki           MX    10 ta211
ta-mismatch       MX    10 ta-wrongname
nomatch-only      MX    10 nomatch
fallback          MX    10 nomatch
fallback          MX    20 ee-self
; REQUIRETLS: the better MX (Postfix in test_requiretls.py) offers no REQUIRETLS, the next does
rtls-fallback     MX    10 ta201
rtls-fallback     MX    20 ee-self
bogus             MX    10 bogus-tlsa
pkix-only         MX    10 pkix
pkix-nostarttls   MX    10 pkix-plain
strip             MX    10 stripped
notlsa            MX    10 notlsa-mx
cname             MX    10 alias-mx
cname-insecure    MX    10 alias-out
cname-unsigned    MX    10 alias-in.{UNSIGNED}.
; no MX: the domain itself, with its own TLSA records
implicit          A     {EE_SELF}
{t}.implicit      TLSA  {ee_self}
"""


def unsigned_zone(port: int, nsd: str) -> str:
    t = f"_{port}._tcp"
    return f"""\
$ORIGIN {UNSIGNED}.
$TTL 300
@                 SOA   ns hostmaster 1 3600 600 86400 300
@                 NS    ns
ns                A     {nsd}
; opportunistic TLS; the TLSA record matches nothing and, being insecure, must change nothing
tls               MX    10 mx-tls
mx-tls            A     {EE_SELF}
{t}.mx-tls        TLSA  3 1 1 {"5a" * 32}
clear             MX    10 mx-clear
mx-clear          A     {CLEAR}
mx-alias-target   A     {EE_SELF}
; an insecure alias of a signed host with TLSA records, named by a secure MX RRset: no DANE
alias-in          CNAME target.{SIGNED}.
; an insecure MX RRset naming a signed host with a matching TLSA record
insecure-mx       MX    10 ee-self.{SIGNED}.
; an insecure alias of a signed domain without MX: the chain, not the target, decides
implicit-alias    CNAME implicit.{SIGNED}.
"""


def break_signature(signed_text: str, owner: str, rdtype: str) -> str:
    """The zone with the RRSIG over `owner`'s `rdtype` RRset made invalid (one bit flipped)."""
    out, hits = [], 0
    for line in signed_text.splitlines():
        fields = line.split()
        if len(fields) > 12 and fields[0].lower() == f"{owner}." and fields[3:5] == ["RRSIG", rdtype]:
            sig = bytearray(base64.b64decode("".join(fields[12:])))
            sig[len(sig) // 2] ^= 0x01
            line = "\t".join([*fields[:12], base64.b64encode(bytes(sig)).decode()])
            hits += 1
        out.append(line)
    if hits != 1:
        raise RuntimeError(f"expected one RRSIG {rdtype} at {owner}, found {hits}")
    return "\n".join(out) + "\n"


# --- certificates -----------------------------------------------------------------------------------

def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mailward DANE lab"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str, not_before: dt.datetime,
        not_after: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(directory: Path, stem: str, cn: str, names: list[str], issuer: x509.Certificate | None,
          issuer_key: ec.EllipticCurvePrivateKey | None, not_before: dt.datetime,
          not_after: dt.datetime) -> Pem:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(_name(cn))
               .issuer_name(issuer.subject if issuer else _name(cn))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after)
               .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    if issuer is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    pem = Pem(directory / f"{stem}.pem", directory / f"{stem}.key")
    chain = [cert] + ([issuer] if issuer is not None else [])
    pem.cert.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
    pem.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    pem.key.chmod(0o600)
    return pem
