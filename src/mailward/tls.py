"""TLS for mailward: server contexts (certificates, SNI, reload), client contexts, peer facts.

This module owns every `ssl.SSLContext` mailward builds and the certificate files behind them.
All cryptography is OpenSSL's, through the standard `ssl` module; the `cryptography` package is
used only to read certificates (names, key type, expiry) so that a bad file is reported in one
sentence, to mint the demo certificate, and to say whether an unverified peer's chain would have
verified (`chain_trusted`, for the log). Nothing here performs I/O on connections: the
asyncio drivers wrap `SSLObject`s from these contexts.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import ipaddress
import logging
import os
import ssl
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError

from mailward.queue import TlsFacts  # the queue's model records what TLS gave

__all__ = [
    "TLS12_CIPHERS",
    "CertInfo",
    "CertPair",
    "CertificateError",
    "ServerTls",
    "TlsFacts",
    "chain_trusted",
    "client_context",
    "demo_ca_path",
    "make_demo_certificate",
    "peer_chain",
    "tls_facts",
]

log = logging.getLogger("mailward.tls")

# TLS 1.2 only: forward secrecy (ECDHE) and AEAD. TLS 1.3 suites are OpenSSL's defaults, all AEAD.
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
# Python's `set_ecdh_curve` accepts a single group, which would lock out clients without it, so
# the list is only applied where the interpreter offers `set_groups`; elsewhere OpenSSL's default
# list (X25519, P-256, X448, P-521, P-384, ...) already covers these.
SERVER_GROUPS = "X25519:P-256:P-384"
# One TLS 1.3 ticket per handshake: SMTP clients reconnect serially, and each resumption hands
# out a fresh ticket, so more would only cost bytes and ticket encryptions.
NUM_TICKETS = 1

DEMO_VALIDITY = dt.timedelta(days=365)
DEMO_MIN_REMAINING = dt.timedelta(days=7)
DEMO_CA_FILE = "demo-ca.pem"
DEMO_CERT_FILE = "cert.pem"
DEMO_KEY_FILE = "key.pem"


class CertificateError(Exception):
    """A certificate or key file is unusable; the message is one sentence saying how to fix it."""


@dataclass(frozen=True)
class CertPair:
    """A certificate chain file (leaf first, e.g. certbot's fullchain.pem) and its key file."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class CertInfo:
    """What was found in one loaded pair."""

    pair: CertPair
    names: frozenset[str]
    key_type: str
    not_before: dt.datetime
    not_after: dt.datetime


@dataclass(frozen=True)
class _Routing:
    """One generation of server contexts; replaced as a whole by reload()."""

    default: ssl.SSLContext
    by_name: dict[str, ssl.SSLContext]
    certificates: tuple[CertInfo, ...]


class ServerTls:
    """Server-side SSL contexts for one listener set, with SNI selection and atomic reload.

    Pairs whose certificates name the same set of DNS names share one context, so an RSA and an
    ECDSA certificate for the same names are both offered and OpenSSL picks by the client's
    signature algorithms. A client sending no SNI, or an unknown name, gets the first pair.
    """

    def __init__(self, pairs: Sequence[CertPair], *, min_version: str = "TLSv1.2") -> None:
        if min_version not in ("TLSv1.2", "TLSv1.3"):
            raise ValueError(f"min_version must be TLSv1.2 or TLSv1.3, not {min_version!r}")
        self._min_version = ssl.TLSVersion[min_version.replace(".", "_")]
        self._pairs = tuple(pairs)
        self._lock = threading.Lock()
        self._expiry_reported: set[tuple[Path, dt.datetime]] = set()
        self._routing = self._build()

    @property
    def context(self) -> ssl.SSLContext:
        """The context for the next connection; read it per connection so reloads take effect."""
        return self._routing.default

    def reload(self) -> None:
        """Rebuild from the same files; on any error keep serving the old certificates and raise.

        Connections already open keep their SSLObject and are unaffected. New contexts also bring
        new session-ticket keys, so a reload rotates them.
        """
        with self._lock:
            routing = self._build()
            self._routing = routing

    def names(self) -> list[str]:
        """The DNS names (possibly wildcards) that SNI can select."""
        return sorted(self._routing.by_name)

    def certificates(self) -> tuple[CertInfo, ...]:
        """What each configured pair holds, in configuration order."""
        return self._routing.certificates

    def _build(self) -> _Routing:
        if not self._pairs:
            raise CertificateError("no TLS certificate is configured; add at least one certificate/key pair.")
        infos = [self._inspect(pair) for pair in self._pairs]
        groups: dict[frozenset[str], list[CertInfo]] = {}
        for info in infos:
            group = groups.setdefault(info.names, [])
            for other in group:
                if other.key_type == info.key_type:
                    raise CertificateError(
                        f"TLS certificates {other.pair.cert} and {info.pair.cert} are both "
                        f"{info.key_type} certificates for the same names; configure only one of them."
                    )
            group.append(info)

        contexts: dict[frozenset[str], ssl.SSLContext] = {}
        for names, members in groups.items():
            ctx = _new_server_context()
            ctx.minimum_version = self._min_version
            for info in members:
                _load_pair(ctx, info.pair)
            contexts[names] = ctx

        by_name: dict[str, ssl.SSLContext] = {}
        for info in infos:
            if not info.names and info is not infos[0]:
                log.warning(
                    "TLS certificate %s names no DNS host, so no client can select it by SNI",
                    info.pair.cert,
                )
            for name in sorted(info.names):
                # The first configured certificate claiming a name keeps it.
                by_name.setdefault(name, contexts[info.names])
        default = contexts[infos[0].names]
        callback = _sni_selector(default, by_name)
        for ctx in contexts.values():
            ctx.sni_callback = callback
        for info in infos:
            log.info(
                "TLS certificate %s: %s key, names %s, valid until %s",
                info.pair.cert,
                info.key_type,
                ",".join(sorted(info.names)) or "(none)",
                info.not_after.isoformat(),
            )
        return _Routing(default=default, by_name=by_name, certificates=tuple(infos))

    def _inspect(self, pair: CertPair) -> CertInfo:
        chain = _read_certificates(pair.cert)
        key = _read_private_key(pair.key)
        leaf = chain[0]
        if _spki(leaf.public_key()) != _spki(key.public_key()):
            raise CertificateError(
                f"the key in {pair.key} does not match the certificate in {pair.cert}; configure the key "
                "issued with this certificate (for certbot, privkey.pem beside fullchain.pem)."
            )
        info = CertInfo(
            pair=pair,
            names=_dns_names(leaf),
            key_type=_key_type(key, pair.cert),
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
        )
        self._report_validity(info)
        return info

    def _report_validity(self, info: CertInfo) -> None:
        # Expiry is the operator's business (and DANE-EE peers ignore it), so warn, once per file
        # and expiry date, rather than refuse to start.
        now = dt.datetime.now(dt.UTC)
        if info.not_before <= now < info.not_after:
            return
        marker = (info.pair.cert, info.not_after)
        if marker in self._expiry_reported:
            return
        self._expiry_reported.add(marker)
        if now >= info.not_after:
            log.warning(
                "TLS certificate %s expired on %s; clients that check it will refuse the connection, "
                "renew it and reload",
                info.pair.cert,
                info.not_after.isoformat(),
            )
        else:
            log.warning(
                "TLS certificate %s is not valid before %s; check the clock or the certificate",
                info.pair.cert,
                info.not_before.isoformat(),
            )


def _sni_selector(
    default: ssl.SSLContext, by_name: dict[str, ssl.SSLContext]
) -> Callable[[ssl.SSLObject, str | None, ssl.SSLContext], None]:
    def select(ssl_object: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        # Must never raise: an exception here aborts the handshake with an internal error.
        if not server_name:
            return
        ctx = _lookup(by_name, server_name)
        if ctx is not None and ctx is not default:
            ssl_object.context = ctx

    return select


def _lookup(by_name: dict[str, ssl.SSLContext], server_name: str) -> ssl.SSLContext | None:
    name = server_name.lower().rstrip(".")
    ctx = by_name.get(name)
    if ctx is not None:
        return ctx
    _, dot, parent = name.partition(".")
    # A wildcard covers exactly one left-most label (RFC 6125 6.4.3).
    if dot and parent:
        return by_name.get("*." + parent)
    return None


def _new_server_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= (
        ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_NO_COMPRESSION
        | ssl.OP_NO_RENEGOTIATION
        | ssl.OP_SINGLE_ECDH_USE  # already implied by OpenSSL >= 1.1; kept explicit for older builds
    )
    set_groups = getattr(ctx, "set_groups", None)
    if set_groups is not None:
        set_groups(SERVER_GROUPS)
    ctx.num_tickets = NUM_TICKETS
    return ctx


def _passphrase_refuser(key: Path) -> Callable[[], bytes]:
    # Never let OpenSSL prompt on a terminal for a passphrase; _read_private_key already refused
    # encrypted keys, so this only guards a file replaced between the two reads.
    def refuse() -> bytes:
        raise CertificateError(
            f"TLS key file {key} is encrypted with a passphrase; store it unencrypted with mode 0600."
        )

    return refuse


def _load_pair(ctx: ssl.SSLContext, pair: CertPair) -> None:
    try:
        ctx.load_cert_chain(pair.cert, pair.key, password=_passphrase_refuser(pair.key))
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if reason == "KEY_VALUES_MISMATCH":
            raise CertificateError(
                f"the key in {pair.key} does not match the certificate in {pair.cert}; configure the key "
                "issued with this certificate (for certbot, privkey.pem beside fullchain.pem)."
            ) from exc
        if reason.endswith("KEY_TOO_SMALL"):
            raise CertificateError(
                f"OpenSSL refuses the key in {pair.key} as too weak; issue a certificate with an ECDSA "
                "P-256 key or an RSA key of at least 2048 bits."
            ) from exc
        if reason.endswith("MD_TOO_WEAK"):
            raise CertificateError(
                f"OpenSSL refuses {pair.cert} because it is signed with a weak digest; reissue it signed "
                "with SHA-256 or better."
            ) from exc
        raise CertificateError(
            f"OpenSSL refused {pair.cert} with key {pair.key} ({reason}); check that both are PEM files "
            "from the same issuance."
        ) from exc
    except OSError as exc:
        raise _file_error("certificate or key", pair.cert, exc) from exc


def _read_file(kind: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _file_error(kind, path, exc) from exc


def _file_error(kind: str, path: Path, exc: OSError) -> CertificateError:
    if isinstance(exc, FileNotFoundError):
        return CertificateError(
            f"TLS {kind} file {path} does not exist; check the path in the configuration."
        )
    if isinstance(exc, PermissionError):
        return CertificateError(
            f"TLS {kind} file {path} cannot be read: permission denied; "
            "make it readable by the user mailward runs as."
        )
    if isinstance(exc, IsADirectoryError):
        return CertificateError(
            f"TLS {kind} file {path} is a directory; configure the PEM file inside it instead."
        )
    return CertificateError(f"TLS {kind} file {path} cannot be read: {exc.strerror or exc}; check the file.")


def _read_certificates(path: Path) -> list[x509.Certificate]:
    data = _read_file("certificate", path)
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        chain = []
    if not chain:
        raise CertificateError(
            f"TLS certificate file {path} holds no PEM certificate; it should contain the certificate "
            "followed by its chain (for certbot, fullchain.pem)."
        )
    return chain


_PrivateKey = (
    rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey
)
_PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey


def _read_private_key(path: Path) -> _PrivateKey:
    data = _read_file("key", path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise CertificateError(
            f"TLS key file {path} is encrypted with a passphrase; store it unencrypted with mode 0600."
        ) from exc
    except ValueError as exc:
        raise CertificateError(
            f"TLS key file {path} holds no readable PEM private key; it should be the unencrypted key "
            "issued with the certificate (for certbot, privkey.pem)."
        ) from exc
    except Exception as exc:  # cryptography raises UnsupportedAlgorithm for exotic keys
        raise CertificateError(
            f"TLS key file {path} holds a key type mailward cannot use; use an ECDSA, RSA or Ed25519 key."
        ) from exc
    if not isinstance(key, _PrivateKey):
        raise CertificateError(
            f"TLS key file {path} holds a key type mailward cannot use; use an ECDSA, RSA or Ed25519 key."
        )
    return key


def _spki(public_key: object) -> bytes:
    if not isinstance(public_key, _PublicKey):
        return b""
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _key_type(key: _PrivateKey, cert: Path) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "rsa"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ecdsa"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    if isinstance(key, ed448.Ed448PrivateKey):
        return "ed448"
    raise CertificateError(f"TLS certificate {cert} has a key type mailward cannot serve; use ECDSA or RSA.")


def _dns_names(cert: x509.Certificate) -> frozenset[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    else:
        names = san.get_values_for_type(x509.DNSName)
    return frozenset(n.lower().rstrip(".") for n in names if n)


def tls_facts(sslobj: ssl.SSLObject | ssl.SSLSocket) -> TlsFacts:
    """Protocol, cipher and secret bits of a completed handshake."""
    version = sslobj.version()
    cipher = sslobj.cipher()
    if version is None or cipher is None:
        raise ValueError("the TLS handshake has not completed")
    name, _protocol, bits = cipher
    return TlsFacts(version=version, cipher=name, bits=bits)


def peer_chain(sslobj: ssl.SSLObject | ssl.SSLSocket) -> list[bytes]:
    """The DER certificates the peer sent, leaf first, not verified; [] if none (e.g. resumed)."""
    if sys.version_info >= (3, 13):
        return list(sslobj.get_unverified_chain())
    # Before 3.13 the method exists only on the C-level object; it yields certificate objects.
    import _ssl

    inner = getattr(sslobj, "_sslobj", None)
    if inner is None:
        return []
    chain = inner.get_unverified_chain()
    if not chain:
        return []
    return [bytes(cert.public_bytes(_ssl.ENCODING_DER)) for cert in chain]


def chain_trusted(chain_der: Sequence[bytes], cafile: Path | None = None) -> bool:
    """Whether a chain a peer sent (leaf first) leads to a CA in `cafile` (default: the system's
    trust store) by PKIX rules, whatever names the leaf carries: Postfix's "Trusted" as opposed to
    "Untrusted" TLS. It only describes a connection whose certificate nothing required checked;
    where verification is required, OpenSSL decides during the handshake."""
    store = _trust_store(cafile)
    if store is None or not chain_der:
        return False
    try:
        leaf, *intermediates = [x509.load_der_x509_certificate(der) for der in chain_der]
        # A client verifier checks no subject name; permitting any end-entity extensions drops its
        # clientAuth requirement, so a server certificate is judged on its chain alone.
        verifier = (PolicyBuilder().store(store)
                    .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                                        ee_policy=ExtensionPolicy.permit_all())
                    .build_client_verifier())
        verifier.verify(leaf, intermediates)
    except (ValueError, VerificationError):
        return False
    return True


@functools.lru_cache(maxsize=8)
def _trust_store(cafile: Path | None) -> Store | None:
    # Parsed once per file: the system bundle holds well over a hundred certificates.
    if cafile is None:
        paths = ssl.get_default_verify_paths()
        cafile = Path(paths.cafile or paths.openssl_cafile)
    try:
        text = cafile.read_bytes()
    except OSError:
        return None
    certs: list[x509.Certificate] = []
    end = b"-----END CERTIFICATE-----"
    for block in text.split(end)[:-1]:
        # One by one, so a single odd root in a system bundle costs only itself (and its warning
        # about, say, a non-positive serial number is not ours to raise).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                certs.append(x509.load_pem_x509_certificate(block + end))
            except ValueError:
                continue
    return Store(certs) if certs else None


def client_context(*, verify: bool, cafile: Path | None = None) -> ssl.SSLContext:
    """A client context: verified (CA file or system roots, host name checked) or opportunistic."""
    if verify:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def demo_ca_path(directory: Path) -> Path:
    """Where make_demo_certificate writes the CA that clients of the demo server should trust."""
    return directory / DEMO_CA_FILE


def make_demo_certificate(directory: Path, hostname: str) -> CertPair:
    """A self-made CA and an ECDSA leaf for `hostname`, localhost, 127.0.0.1 and ::1.

    Existing files are reused while they cover `hostname` and stay valid for a week more.
    """
    directory.mkdir(parents=True, exist_ok=True)
    pair = CertPair(cert=directory / DEMO_CERT_FILE, key=directory / DEMO_KEY_FILE)
    ca_path = demo_ca_path(directory)
    if _demo_files_usable(pair, ca_path, hostname):
        return pair

    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    not_before = now - dt.timedelta(hours=1)  # tolerate small clock skew on the client
    not_after = now + DEMO_VALIDITY
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mailward demo"),
            x509.NameAttribute(NameOID.COMMON_NAME, "mailward demo CA"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _dns_form(hostname))]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_demo_san(hostname)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    key_pem = leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    # Key first, chain second: a crash in between leaves a mismatch that the next run replaces.
    _write_atomically(pair.key, key_pem, 0o600)
    _write_atomically(pair.cert, leaf_cert.public_bytes(pem) + ca_cert.public_bytes(pem), 0o644)
    _write_atomically(ca_path, ca_cert.public_bytes(pem), 0o644)
    log.info("made demo certificate %s for %s; clients should trust %s", pair.cert, hostname, ca_path)
    return pair


def _dns_form(hostname: str) -> str:
    name = hostname.rstrip(".")
    try:
        return name.encode("ascii").decode().lower()
    except UnicodeEncodeError:
        import idna

        return idna.encode(name, uts46=True).decode()


def _demo_san(hostname: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    hosts = [hostname, "localhost"]
    seen: set[str] = set()
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        dns = _dns_form(host)
        if dns not in seen:
            seen.add(dns)
            names.append(x509.DNSName(dns))
    for ip in ("127.0.0.1", "::1"):
        address = x509.IPAddress(ipaddress.ip_address(ip))
        if address not in names:
            names.append(address)
    return names


def _demo_files_usable(pair: CertPair, ca_path: Path, hostname: str) -> bool:
    try:
        chain = x509.load_pem_x509_certificates(pair.cert.read_bytes())
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
        key = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return False
    leaf = chain[0]
    if _spki(leaf.public_key()) != _spki(key.public_key()):
        return False
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    if leaf.not_valid_after_utc - dt.datetime.now(dt.UTC) < DEMO_MIN_REMAINING:
        return False
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return set(_demo_san(hostname)).issubset(set(san))


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
