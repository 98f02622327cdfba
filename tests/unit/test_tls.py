"""Server/client contexts exercised with real OpenSSL handshakes over memory BIOs (no sockets)."""

from __future__ import annotations

import datetime as dt
import logging
import os
import ssl
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mailward import tls
from mailward.tls import CertificateError, CertPair, ServerTls

# --- helpers ---------------------------------------------------------------------------------


class HandshakeFailed(Exception):
    def __init__(self, side: str, error: ssl.SSLError) -> None:
        super().__init__(f"{side}: {error}")
        self.side = side
        self.error = error


@dataclass
class Conn:
    client: ssl.SSLObject
    server: ssl.SSLObject
    c_in: ssl.MemoryBIO
    c_out: ssl.MemoryBIO
    s_in: ssl.MemoryBIO
    s_out: ssl.MemoryBIO

    def pump(self):
        self.s_in.write(self.c_out.read())
        self.c_in.write(self.s_out.read())

    def read_tickets(self):
        # TLS 1.3 tickets arrive after the handshake; the client sees them on its next read.
        self.pump()
        with pytest.raises(ssl.SSLWantReadError):
            self.client.read(1)

    def peer_cert(self) -> x509.Certificate:
        der = self.client.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)


def start(
    client_ctx: ssl.SSLContext,
    server_ctx: ssl.SSLContext,
    server_hostname: str | None = None,
    session: ssl.SSLSession | None = None,
) -> Conn:
    bios = [ssl.MemoryBIO() for _ in range(4)]
    client = client_ctx.wrap_bio(bios[0], bios[1], server_hostname=server_hostname, session=session)
    server = server_ctx.wrap_bio(bios[2], bios[3], server_side=True)
    return Conn(client, server, *bios)


def finish(conn: Conn) -> Conn:
    client_done = server_done = False
    for _ in range(10):
        if not client_done:
            try:
                conn.client.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                raise HandshakeFailed("client", exc) from exc
        conn.s_in.write(conn.c_out.read())
        if not server_done:
            try:
                conn.server.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                raise HandshakeFailed("server", exc) from exc
        conn.c_in.write(conn.s_out.read())
        if client_done and server_done:
            return conn
    raise AssertionError("handshake did not finish")


def handshake(client_ctx, server_ctx, server_hostname=None, session=None) -> Conn:
    return finish(start(client_ctx, server_ctx, server_hostname, session))


def client(*, maximum: ssl.TLSVersion | None = None, ciphers: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if maximum is not None:
        ctx.maximum_version = maximum
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    return ctx


def write_pair(directory: Path, leaf: trustme.LeafCert, stem: str = "") -> CertPair:
    directory.mkdir(parents=True, exist_ok=True)
    pair = CertPair(cert=directory / f"{stem}fullchain.pem", key=directory / f"{stem}privkey.pem")
    pair.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(pair.key))
    return pair


def cert_of(pair: CertPair) -> x509.Certificate:
    return x509.load_pem_x509_certificates(pair.cert.read_bytes())[0]


def assert_one_sentence(message: str) -> None:
    assert "\n" not in message
    assert message.endswith(".")
    assert ". " not in message


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def certs(ca):
    """Leaves issued once per module: generating RSA keys is the slow part."""
    return {
        "a": ca.issue_cert("a.example"),
        "a2": ca.issue_cert("a.example"),
        "b": ca.issue_cert("b.example", "mx.b.example"),
        "wild": ca.issue_cert("*.c.example"),
        "mail-ec": ca.issue_cert("mail.example"),
        "mail-rsa": ca.issue_cert("mail.example", key_type=trustme.KeyType.RSA),
    }


# --- server context policy -------------------------------------------------------------------


def test_server_context_settings(tmp_path, certs):
    ctx = ServerTls([write_pair(tmp_path, certs["a"])]).context
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    for flag in (
        ssl.OP_NO_COMPRESSION,
        ssl.OP_CIPHER_SERVER_PREFERENCE,
        ssl.OP_NO_RENEGOTIATION,
        ssl.OP_SINGLE_ECDH_USE,  # 0 on OpenSSL 3, where every ECDH key is single-use anyway
    ):
        assert ctx.options & flag == flag
    assert not ctx.options & ssl.OP_NO_TICKET
    assert ctx.num_tickets == tls.NUM_TICKETS
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12
    for cipher in tls12:
        assert cipher["kea"] == "kx-ecdhe", cipher["name"]
        assert cipher["aead"], cipher["name"]
        assert cipher["symmetric"] in {"aes-128-gcm", "aes-256-gcm", "chacha20-poly1305"}


def test_tls13_handshake_and_facts(tmp_path, certs):
    server = ServerTls([write_pair(tmp_path, certs["a"])])
    conn = handshake(client(), server.context)
    facts = tls.tls_facts(conn.client)
    assert facts.version == "TLSv1.3"
    assert facts.cipher.startswith("TLS_")
    assert facts.bits in {128, 256}
    assert tls.tls_facts(conn.server) == facts


def test_tls12_facts(tmp_path, certs):
    server = ServerTls([write_pair(tmp_path, certs["a"])])
    ctx = client(maximum=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES256-GCM-SHA384")
    conn = handshake(ctx, server.context)
    assert tls.tls_facts(conn.server) == tls.TlsFacts("TLSv1.2", "ECDHE-ECDSA-AES256-GCM-SHA384", 256)


def test_tls_facts_before_handshake(tmp_path, certs):
    server = ServerTls([write_pair(tmp_path, certs["a"])])
    conn = start(client(), server.context)
    with pytest.raises(ValueError, match="not completed"):
        tls.tls_facts(conn.server)


def test_tls11_client_refused(tmp_path, certs):
    server = ServerTls([write_pair(tmp_path, certs["a"])])
    ctx = client()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises(HandshakeFailed) as info:
        handshake(ctx, server.context)
    if info.value.side == "client":
        pytest.skip(f"this OpenSSL cannot even offer TLS 1.1: {info.value.error}")
    assert info.value.error.reason == "UNSUPPORTED_PROTOCOL"


@pytest.mark.parametrize(
    "cipher", ["ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA", "AES128-GCM-SHA256"]
)
def test_tls12_weak_cipher_client_refused(tmp_path, certs, cipher):
    server = ServerTls([write_pair(tmp_path, certs["a"])])
    ctx = client(maximum=ssl.TLSVersion.TLSv1_2, ciphers=cipher)
    with pytest.raises(HandshakeFailed) as info:
        handshake(ctx, server.context)
    assert info.value.side == "server"
    assert info.value.error.reason == "NO_SHARED_CIPHER"


# --- SNI and key types -----------------------------------------------------------------------


def test_sni_selects_certificate(tmp_path, certs):
    a = write_pair(tmp_path / "a", certs["a"])
    b = write_pair(tmp_path / "b", certs["b"])
    wild = write_pair(tmp_path / "wild", certs["wild"])
    server = ServerTls([a, b, wild])
    assert server.names() == ["*.c.example", "a.example", "b.example", "mx.b.example"]
    expected = {
        "a.example": a,
        "b.example": b,
        "MX.B.Example.": b,
        "x.c.example": wild,
        "c.example": a,
        "y.x.c.example": a,
        "unknown.example": a,
        None: a,
    }
    for sni, pair in expected.items():
        conn = handshake(client(), server.context, server_hostname=sni)
        assert conn.peer_cert() == cert_of(pair), sni


@pytest.mark.parametrize("order", [("mail-ec", "mail-rsa"), ("mail-rsa", "mail-ec")])
@pytest.mark.parametrize("sni", [None, "mail.example"])
def test_rsa_and_ecdsa_for_one_name(tmp_path, certs, order, sni):
    pairs = [write_pair(tmp_path / name, certs[name]) for name in order]
    default = write_pair(tmp_path / "a", certs["a"])
    if sni is not None:
        pairs.insert(0, default)
    server = ServerTls(pairs)
    assert {info.key_type for info in server.certificates() if "mail.example" in info.names} == {
        "rsa",
        "ecdsa",
    }

    modern = handshake(client(), server.context, server_hostname=sni)
    assert isinstance(modern.peer_cert().public_key(), ec.EllipticCurvePublicKey)

    rsa_only = client(maximum=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-RSA-AES128-GCM-SHA256")
    legacy = handshake(rsa_only, server.context, server_hostname=sni)
    assert isinstance(legacy.peer_cert().public_key(), rsa.RSAPublicKey)
    assert tls.tls_facts(legacy.client).cipher == "ECDHE-RSA-AES128-GCM-SHA256"


def test_two_certificates_of_one_key_type_for_same_names_refused(tmp_path, certs):
    first = write_pair(tmp_path / "1", certs["a"])
    second = write_pair(tmp_path / "2", certs["a2"])
    with pytest.raises(CertificateError) as info:
        ServerTls([first, second])
    assert str(first.cert) in str(info.value)
    assert str(second.cert) in str(info.value)
    assert_one_sentence(str(info.value))


def test_certificate_info(tmp_path, certs):
    server = ServerTls(
        [write_pair(tmp_path / "b", certs["b"]), write_pair(tmp_path / "r", certs["mail-rsa"])]
    )
    first, second = server.certificates()
    assert first.names == frozenset({"b.example", "mx.b.example"})
    assert (first.key_type, second.key_type) == ("ecdsa", "rsa")
    assert first.not_before < dt.datetime.now(dt.UTC) < first.not_after


def test_common_name_used_without_san(tmp_path, ca):
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Legacy.Example")]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(ca_key, tls.hashes.SHA256())  # type: ignore[arg-type]
    )
    pair = CertPair(tmp_path / "c.pem", tmp_path / "k.pem")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    assert ServerTls([pair]).names() == ["legacy.example"]


# --- loading errors and reload ---------------------------------------------------------------


def test_missing_files_named(tmp_path, certs):
    pair = write_pair(tmp_path, certs["a"])
    for missing in (CertPair(tmp_path / "nope.pem", pair.key), CertPair(pair.cert, tmp_path / "nokey.pem")):
        with pytest.raises(CertificateError) as info:
            ServerTls([missing])
        absent = missing.cert if missing.cert.name == "nope.pem" else missing.key
        assert f"{absent} does not exist" in str(info.value)
        assert_one_sentence(str(info.value))


def test_directory_instead_of_file(tmp_path, certs):
    pair = write_pair(tmp_path / "p", certs["a"])
    with pytest.raises(CertificateError, match="is a directory") as info:
        ServerTls([CertPair(tmp_path, pair.key)])
    assert_one_sentence(str(info.value))


def test_unreadable_key(tmp_path, certs, monkeypatch):
    pair = write_pair(tmp_path, certs["a"])
    pair.key.chmod(0)
    if os.geteuid() == 0:  # root reads whatever the mode, so make the refusal explicit
        real_read = Path.read_bytes

        def refuse(self):
            if self == pair.key:
                raise PermissionError(13, "Permission denied", str(self))
            return real_read(self)

        monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(CertificateError, match="permission denied") as info:
        ServerTls([pair])
    assert str(pair.key) in str(info.value)
    assert_one_sentence(str(info.value))


def test_garbage_files(tmp_path, certs):
    pair = write_pair(tmp_path, certs["a"])
    junk = tmp_path / "junk.pem"
    junk.write_text("not a pem file\n")
    with pytest.raises(CertificateError, match="holds no PEM certificate") as info:
        ServerTls([CertPair(junk, pair.key)])
    assert_one_sentence(str(info.value))
    with pytest.raises(CertificateError, match="holds no readable PEM private key") as info:
        ServerTls([CertPair(pair.cert, junk)])
    assert_one_sentence(str(info.value))


def test_encrypted_key_refused_without_prompt(tmp_path, certs):
    pair = write_pair(tmp_path, certs["a"])
    key = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
    pair.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(CertificateError, match="passphrase") as info:
        ServerTls([pair])
    assert_one_sentence(str(info.value))


def test_key_encrypted_after_inspection_never_prompts(tmp_path, certs, monkeypatch):
    pair = write_pair(tmp_path, certs["a"])
    plain_key = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
    pair.key.write_bytes(
        plain_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    # As if the file were swapped between our inspection and OpenSSL's read.
    monkeypatch.setattr(tls, "_read_private_key", lambda path: plain_key)
    with pytest.raises(CertificateError, match="passphrase") as info:
        ServerTls([pair])
    assert str(pair.key) in str(info.value)


def test_mismatched_key(tmp_path, certs):
    pair = write_pair(tmp_path / "a", certs["a"])
    other = write_pair(tmp_path / "b", certs["b"])
    with pytest.raises(CertificateError) as info:
        ServerTls([CertPair(pair.cert, other.key)])
    message = str(info.value)
    assert message.startswith(f"the key in {other.key} does not match the certificate in {pair.cert};")
    assert_one_sentence(message)


def test_empty_list_refused():
    with pytest.raises(CertificateError, match="no TLS certificate"):
        ServerTls([])


def test_reload_swaps_certificates(tmp_path, certs):
    pair = write_pair(tmp_path, certs["a"])
    server = ServerTls([pair])
    old_ctx = server.context
    in_flight = start(client(), server.context)

    write_pair(tmp_path, certs["b"])
    assert handshake(client(), server.context).peer_cert() == certs_leaf(certs["a"])
    server.reload()
    assert server.context is not old_ctx
    assert server.names() == ["b.example", "mx.b.example"]
    assert handshake(client(), server.context).peer_cert() == certs_leaf(certs["b"])
    # A connection that began before the reload keeps the certificate it started with.
    assert finish(in_flight).peer_cert() == certs_leaf(certs["a"])


def test_reload_with_broken_key_keeps_old_contexts(tmp_path, certs):
    pair = write_pair(tmp_path, certs["a"])
    other = write_pair(tmp_path / "other", certs["b"])
    server = ServerTls([pair])
    before = server.context

    pair.key.write_bytes(other.key.read_bytes())
    with pytest.raises(CertificateError) as info:
        server.reload()
    assert_one_sentence(str(info.value))
    assert "does not match" in str(info.value)
    assert server.context is before
    assert handshake(client(), server.context).peer_cert() == certs_leaf(certs["a"])

    pair.key.write_text("-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    with pytest.raises(CertificateError):
        server.reload()
    assert server.context is before


def certs_leaf(leaf: trustme.LeafCert) -> x509.Certificate:
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())


def test_expired_certificate_warned_once(tmp_path, ca, caplog):
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    leaf = ca.issue_cert("old.example", not_before=past - dt.timedelta(days=90), not_after=past)
    server = ServerTls([write_pair(tmp_path, leaf)])
    server.reload()
    expired = [r for r in caplog.records if r.name == "mailward.tls" and "expired" in r.getMessage()]
    assert len(expired) == 1
    assert expired[0].levelno == logging.WARNING
    # Still served: renewing is the operator's call.
    assert handshake(client(), server.context).peer_cert() == certs_leaf(leaf)


# --- resumption and peer chain ---------------------------------------------------------------


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize("sni", [None, "b.example"])
def test_session_resumption(tmp_path, certs, version, sni):
    server = ServerTls([write_pair(tmp_path / "a", certs["a"]), write_pair(tmp_path / "b", certs["b"])])
    ctx = client(maximum=version)
    first = handshake(ctx, server.context, server_hostname=sni)
    assert tls.tls_facts(first.client).version == version.name.replace("v1_", "v1.")
    first.read_tickets()
    session = first.client.session
    assert session is not None and session.has_ticket
    second = handshake(ctx, server.context, server_hostname=sni, session=session)
    assert second.client.session_reused
    assert second.server.session_reused


def test_peer_chain_returns_leaf_and_intermediate(tmp_path, ca):
    intermediate = ca.create_child_ca()
    leaf = intermediate.issue_cert("chain.example")
    server = ServerTls([write_pair(tmp_path, leaf)])
    conn = handshake(client(), server.context, server_hostname="chain.example")
    chain = tls.peer_chain(conn.client)
    assert all(isinstance(der, bytes) for der in chain)
    assert [x509.load_der_x509_certificate(der) for der in chain] == [
        certs_leaf(leaf),
        x509.load_pem_x509_certificate(intermediate.cert_pem.bytes()),
    ]
    # The server saw no client certificate.
    assert tls.peer_chain(conn.server) == []


def test_chain_trusted_judges_the_chain_and_not_the_names(tmp_path, ca):
    # Postfix's "Trusted": the chain leads to a CA in the store, whatever names the leaf carries.
    intermediate = ca.create_child_ca()
    leaf = intermediate.issue_cert("whatever.example")
    chain = [x509.load_pem_x509_certificate(b.bytes()).public_bytes(serialization.Encoding.DER)
             for b in leaf.cert_chain_pems]
    roots = tmp_path / "roots.pem"
    ca.cert_pem.write_to_path(str(roots))
    assert tls.chain_trusted(chain, roots)
    assert not tls.chain_trusted(chain[:1], roots)  # the intermediate is missing
    assert not tls.chain_trusted(chain)  # a private CA is not among the system's
    other = tmp_path / "other.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    assert not tls.chain_trusted(chain, other)
    expired = ca.issue_cert("old.example", not_after=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    old = [x509.load_pem_x509_certificate(b.bytes()).public_bytes(serialization.Encoding.DER)
           for b in expired.cert_chain_pems]
    assert not tls.chain_trusted(old, roots)
    assert not tls.chain_trusted([], roots) and not tls.chain_trusted([b"not DER"], roots)
    assert not tls.chain_trusted(chain, tmp_path / "missing.pem")


# --- client contexts and the demo certificate ------------------------------------------------


def test_client_context_opportunistic():
    ctx = tls.client_context(verify=False)
    assert ctx.verify_mode == ssl.CERT_NONE
    assert not ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_client_context_verifies(tmp_path):
    pair = tls.make_demo_certificate(tmp_path, "mx.demo.example")
    server = ServerTls([pair])
    ctx = tls.client_context(verify=True, cafile=tls.demo_ca_path(tmp_path))
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    for name in ("mx.demo.example", "localhost", "127.0.0.1", "::1"):
        handshake(ctx, server.context, server_hostname=name)
    with pytest.raises(HandshakeFailed) as info:
        handshake(ctx, server.context, server_hostname="other.example")
    assert info.value.side == "client"
    assert isinstance(info.value.error, ssl.SSLCertVerificationError)
    untrusting = tls.client_context(verify=True, cafile=None)
    with pytest.raises(HandshakeFailed):
        handshake(untrusting, server.context, server_hostname="mx.demo.example")


def test_demo_certificate_files(tmp_path):
    directory = tmp_path / "demo"
    pair = tls.make_demo_certificate(directory, "mx.demo.example")
    assert pair == CertPair(directory / "cert.pem", directory / "key.pem")
    assert stat.S_IMODE(pair.key.stat().st_mode) == 0o600
    chain = x509.load_pem_x509_certificates(pair.cert.read_bytes())
    ca_cert = x509.load_pem_x509_certificate(tls.demo_ca_path(directory).read_bytes())
    assert len(chain) == 2
    assert chain[1] == ca_cert
    leaf = chain[0]
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(ca_cert.public_key(), ec.EllipticCurvePublicKey)
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert dt.timedelta(days=360) < lifetime < dt.timedelta(days=370)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mx.demo.example", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert not any(p.name.startswith(".") for p in directory.iterdir())


def test_demo_certificate_idempotent(tmp_path, monkeypatch):
    pair = tls.make_demo_certificate(tmp_path, "mx.demo.example")
    before = pair.cert.read_bytes(), pair.key.read_bytes(), tls.demo_ca_path(tmp_path).read_bytes()
    assert tls.make_demo_certificate(tmp_path, "mx.demo.example") == pair
    assert (pair.cert.read_bytes(), pair.key.read_bytes(), tls.demo_ca_path(tmp_path).read_bytes()) == before

    tls.make_demo_certificate(tmp_path, "other.demo.example")
    assert pair.cert.read_bytes() != before[0]
    assert ServerTls([pair]).names() == ["localhost", "other.demo.example"]

    current = pair.cert.read_bytes()
    monkeypatch.setattr(tls, "DEMO_MIN_REMAINING", dt.timedelta(days=400))
    tls.make_demo_certificate(tmp_path, "other.demo.example")
    assert pair.cert.read_bytes() != current


def test_demo_certificate_replaces_mismatched_key(tmp_path):
    pair = tls.make_demo_certificate(tmp_path, "mx.demo.example")
    pair.key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    tls.make_demo_certificate(tmp_path, "mx.demo.example")
    ServerTls([pair])


def test_min_version_tls13_refuses_tls12(tmp_path: Path) -> None:
    pair = tls.make_demo_certificate(tmp_path, "localhost")
    server = tls.ServerTls([pair], min_version="TLSv1.3")
    assert server.context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert tls.ServerTls([pair]).context.minimum_version == ssl.TLSVersion.TLSv1_2
