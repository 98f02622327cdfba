"""`mailward check --host H --port 465|587` against a mailward test server, `--self` against the DANE
lab's TLSA records, and the exit status when the check cannot run."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from dnssec import DnsLab
from mailward_server import MailwardServer, free_port

from conftest import MakeServer, require_tool
from mailward.check.submission import legacy_tls

SUBMIT = "127.0.58.1"  # ports 465 and 587 of its own loopback address (root only)


def check(server: MailwardServer, *args: str) -> tuple[int, Any]:
    result = server.cli("check", *args, "--json", check=False)
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def submission_server(make_server: MakeServer, tmp_path: Path) -> tuple[MailwardServer, Path]:
    ca = trustme.CA(organization_name="mailward check lab")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    issued = ca.issue_cert(SUBMIT)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    for pem in issued.cert_chain_pems:
        pem.write_to_path(str(cert), append=True)
    issued.private_key_pem.write_to_path(str(key))
    return make_server(address=SUBMIT, submissions=465, submission=587, certificates=((cert, key),)), ca_file


def test_submission_ports(make_server: MakeServer, tmp_path: Path) -> None:
    server, ca_file = submission_server(make_server, tmp_path)
    for port in (465, 587):
        status, report = check(server, "--host", SUBMIT, "--port", str(port), "--ca-file", str(ca_file))
        assert (status, report["verdict"], report["kind"]) == (0, "secure", "submission"), report
        (conn,) = report["mx"][0]["connections"]
        assert conn["verdict"] == "Verified" and conn["tls"]["protocol"] in ("TLSv1.2", "TLSv1.3")
        assert any(k.startswith("AUTH") for k in conn["ehlo_tls"])
        assert conn["legacy_tls"] is None  # TLS 1.0 and 1.1 were offered and refused
        assert conn["pkix"]["trusted"] and conn["pkix"]["name_matches"]  # an IP address SAN
        if port == 587:
            assert conn["starttls"] is True
            assert not any(k.startswith("AUTH") for k in conn["ehlo"])  # no AUTH before TLS
    # Without the CA the certificate is not trusted: a client must refuse, the check says insecure.
    status, report = check(server, "--host", SUBMIT, "--port", "465")
    assert (status, report["verdict"]) == (1, "insecure"), report
    assert any("does not chain to a trusted CA" in f["text"] for f in report["findings"])


def test_other_ports_with_tls_named(server: MailwardServer) -> None:
    # `make run` listens on 2465 and 2587: --tls says how such a port speaks TLS.
    for port, tls in ((server.submissions, "implicit"), (server.submission, "starttls")):
        status, report = check(server, "--host", "127.0.0.1", "--port", str(port), "--tls", tls,
                               "--ca-file", str(server.ca))
        assert (status, report["verdict"]) == (0, "secure"), report
        (conn,) = report["mx"][0]["connections"]
        assert conn["starttls"] is (True if tls == "starttls" else None), conn  # None: implicit TLS


def test_exit_statuses_when_nothing_answers_or_the_input_is_wrong(make_server: MakeServer) -> None:
    server = make_server(start=False)
    # Nothing listens on 587 of this address: a client could not submit now.
    status, report = check(server, "--host", "127.0.58.2", "--port", "587")
    assert (status, report["verdict"]) == (2, "defer"), report
    # The test server's resolver is a loopback port where nothing answers.
    status, report = check(server, "example.org")
    assert (status, report["verdict"]) == (3, "error") and "no DNS resolver answers" in report["reason"]
    result = server.cli("check", "not a domain", check=False)
    assert result.returncode == 3 and result.stderr.count("\n") == 1, result.stderr
    result = server.cli("check", "--host", SUBMIT, "--port", "2525", check=False)
    assert result.returncode == 3 and "--port 465" in result.stderr


def renewed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for `name` with a fresh key: a renewal with a new key."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=90))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def self_check(make_server: MakeServer, lab: DnsLab, pair: tuple[Path, Path],
               next_key: Path | None = None) -> tuple[int, Any]:
    server = make_server(start=False, certificates=(pair,), extra_toml=lab.dns_toml)
    if next_key is not None:
        text = server.config_path.read_text()
        line = f'key = "{pair[1]}"\n'
        server.config_path.write_text(text.replace(line, line + f'next_key = "{next_key}"\n'))
    return check(server, "--self", "--port", str(lab.smtp_port))


def test_self_check_and_the_rollover_warning(make_server: MakeServer, dns_lab: DnsLab,
                                             tmp_path: Path) -> None:
    assert dns_lab.dane is not None
    target = (dns_lab.dane.target.cert, dns_lab.dane.target.key)  # TLSA 3 1 1 at target.dane.test
    status, report = self_check(make_server, dns_lab, target)
    assert (status, report["verdict"]) == (0, "secure"), report["findings"]
    (name,) = report["certificates"][0]["names"]
    assert (name["name"], name["status"], name["current_matches"]) == ("target.dane.test", "secure", True)
    texts = [f["text"] for f in report["findings"]]
    assert any("before a key rollover, set tls.certificates[0].next_key" in t for t in texts), texts

    # A next key planned but not yet published: the rollover would break DANE.
    _, next_key = renewed(tmp_path, "target.dane.test")
    status, report = self_check(make_server, dns_lab, target, next_key)
    assert (status, report["verdict"]) == (1, "insecure"), report["findings"]
    assert report["certificates"][0]["names"][0]["next_matches"] is False
    warnings = [f["text"] for f in report["findings"] if f["severity"] == "warning"]
    assert any("has no TLSA record" in w and "IN TLSA 3 1 1 " in w for w in warnings), warnings

    # Renewed with a new key, TLSA not updated: DANE senders defer now.
    (tmp_path / "new").mkdir()
    status, report = self_check(make_server, dns_lab, renewed(tmp_path / "new", "target.dane.test"))
    assert (status, report["verdict"]) == (2, "defer"), report["findings"]
    assert any("matches no TLSA record" in f["text"] for f in report["findings"])


def test_a_server_that_accepts_tls_1_1_is_found(tmp_path: Path) -> None:
    openssl = require_tool("openssl")
    cert, key = renewed(tmp_path, "old.example")
    port = free_port()
    server = subprocess.Popen([openssl, "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(cert),
                               "-key", str(key), "-cipher", "DEFAULT:@SECLEVEL=0", "-quiet"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "openssl s_server did not start"
                time.sleep(0.05)
        found = asyncio.run(legacy_tls("old.example", "127.0.0.1", port, implicit=True, helo="check.test",
                                       timeout=5))
        assert found in ("TLSv1", "TLSv1.1")
    finally:
        server.terminate()
        server.wait(5)
