"""mailward check's pure parts: TLSA and certificate description, the exit status, the text form and
the JSON a script gets when the check cannot run. No sockets."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from rich.console import Console

from mailward.check import EXIT_STATUS, exit_status, render, run
from mailward.check.domain import dane_findings
from mailward.check.parts import describe_certificate, describe_record
from mailward.check.selfcheck import read_next_key
from mailward.delivery.dane import association_data
from mailward.delivery.policy import Destination, TlsaFacts, TlsaRecord


def leaf() -> x509.Certificate:
    ca = trustme.CA()
    pem = ca.issue_cert("mx.example.org").cert_chain_pems[0].bytes()
    return x509.load_pem_x509_certificate(pem)


def test_records_say_why_they_are_not_used() -> None:
    ee = describe_record(TlsaRecord(3, 1, 1, bytes(32)))
    assert (ee["meaning"], ee["usable"], ee["why_unusable"]) == ("DANE-EE SPKI SHA2-256", True, None)
    pkix = describe_record(TlsaRecord(1, 1, 1, bytes(32)))
    assert not pkix["usable"] and "RFC 7672 §3.1.3" in pkix["why_unusable"]
    short = describe_record(TlsaRecord(3, 1, 2, bytes(32)))
    assert short["why_unusable"] == "SHA2-512 data must be 64 bytes, not 32"
    assert "not defined" in describe_record(TlsaRecord(3, 7, 1, bytes(32)))["why_unusable"]
    # RFC 7671 §9: beside a SHA2-512 record of the same usage and selector, the SHA2-256 one is ignored.
    weak, strong = TlsaRecord(3, 1, 1, bytes(32)), TlsaRecord(3, 1, 2, bytes(64))
    assert describe_record(weak, (strong,))["ignored"] is not None
    assert describe_record(strong, (strong,))["ignored"] is None


def test_certificate_description_and_matches_by_index() -> None:
    cert = leaf()
    der = cert.public_bytes(serialization.Encoding.DER)
    spki = TlsaRecord(3, 1, 1, association_data(cert, 1, 1))
    other = TlsaRecord(3, 1, 1, bytes(32))
    full = TlsaRecord(3, 0, 2, association_data(cert, 0, 2))
    described = describe_certificate(der, 0, (other, spki, full))
    assert described["tlsa_matches"] == [1, 2]  # two records of one kind stay apart
    assert described["names"] == ["mx.example.org"]
    assert described["key"].startswith(("ECDSA", "RSA"))
    assert described["expired"] is False
    later = dt.datetime(9999, 1, 1, tzinfo=dt.UTC)
    assert describe_certificate(der, 0, now=later)["expired"] is True
    assert "cannot be parsed" in describe_certificate(b"junk", 1)["error"]


def report(verdict: str) -> dict[str, Any]:
    host = {"name": "mx.example.org", "preference": 10, "addresses": ["192.0.2.7"], "dnssec": "secure",
            "verdict": "Verified", "reason": "delivery would use it: Verified TLSv1.3/X (dane 3 1 1)",
            "tlsa": {"status": "secure", "owner": "_25._tcp.mx.example.org.", "records": [
                dict(describe_record(TlsaRecord(3, 1, 1, bytes(32))), matches=[0])]},
            "tlsa_skipped": None, "mta_sts_match": None, "connections": []}
    return {"schema": 1, "kind": "mx", "domain": "example.org", "verdict": verdict,
            "reason": "mail would go to [x] over Verified TLS", "level": "dane",
            "level_source": "delivery.security, the default",
            "dns": {"consulted": True, "resolvers": "127.0.0.1:53", "dnssec_trusted": True,
                    "mx": {"status": "secure", "null_mx": False, "implicit": False}},
            "mta_sts": {"consulted": False, "reason": "MTA-STS is off", "policy": None},
            "tlsrpt": {"rua": ["mailto:tlsrpt@example.org"], "error": None}, "mx": [host],
            "findings": [{"severity": "warning", "host": "mx.example.org", "text": "a [bracketed] warning"}]}


@pytest.mark.parametrize("verdict", ["secure", "insecure", "defer", "error"])
def test_exit_status(verdict: str) -> None:
    assert exit_status(report(verdict)) == {"secure": 0, "insecure": 1, "defer": 2, "error": 3}[verdict]
    assert EXIT_STATUS[verdict] == exit_status(report(verdict))


def test_text_form() -> None:
    console = Console(record=True, width=200, force_terminal=True, highlight=False)
    for line in render(report("secure")):
        console.print(line)
    text = console.export_text(clear=False)
    assert "example.org: SECURE" in text
    assert "MX 10 mx.example.org: Verified" in text
    assert "3 1 1 000000000000000000000000... (DANE-EE SPKI SHA2-256; usable, matches certificate 0)" in text
    assert "TLS-RPT: mailto:tlsrpt@example.org" in text
    assert "a [bracketed] warning" in text  # markup in data is escaped, not interpreted
    assert "\x1b[" in console.export_text(styles=True)  # coloured on a terminal


def test_hosts_not_found_by_mx_are_not_labelled_as_mx() -> None:
    console = Console(record=True, width=200, highlight=False)
    explicit = dict(report("secure"), destination={"key": "smarthost", "kind": "smarthost",
                                                   "next_hop": "[192.0.2.25]:587"})
    submission = dict(report("secure"), kind="submission", port=465)
    for r in (explicit, submission):
        for line in render(r):
            console.print(line)
        text = console.export_text()
        assert "host mx.example.org: Verified" in text and "MX 10" not in text


def test_a_check_that_cannot_run_says_so_in_one_sentence(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "mailward.toml"
    config.write_text(f'hostname = "mx.example.test"\nstate_dir = "{tmp_path}"\n'
                      '[[listener]]\nkind = "mx"\naddress = "127.0.0.1"\n'
                      '[dns]\nresolvers = ["127.0.0.1:9"]\n')
    args = argparse.Namespace(config=str(config), domain="not a domain", json=False, host=None, port=None,
                              ca_file=None, self_check=False)
    assert run(args) == 3
    err = capsys.readouterr().err
    assert err.startswith("mailward: ") and err.count("\n") == 1
    assert run(argparse.Namespace(**{**vars(args), "json": True})) == 3
    out = json.loads(capsys.readouterr().out)
    assert {"schema", "domain", "verdict", "reason", "mx", "findings"} <= set(out)
    assert out["verdict"] == "error"
    missing = argparse.Namespace(**{**vars(args), "config": str(tmp_path / "none.toml")})
    assert run(missing) == 3


def test_a_dane_ta_chain_without_its_anchor_is_called_out() -> None:
    cert = leaf()
    anchor = TlsaRecord(2, 0, 1, bytes(32))
    entry = {"relay": "mx.example.org[192.0.2.7]:25", "dane": {"verified": False, "reason": "no match"},
             "certificates": [describe_certificate(cert.public_bytes(serialization.Encoding.DER), 0,
                                                   (anchor,))]}
    found: dict[str, Any] = {"findings": []}
    dane_findings(found, {"name": "mx.example.org"}, entry, TlsaFacts("secure", (anchor,), "mx.example.org"),
                   Destination(key="mx:example.org", kind="mx", domain="example.org"))
    (finding,) = found["findings"]
    assert finding["severity"] == "error" and "sends only its own certificate" in finding["text"]


def test_a_next_key_may_be_a_private_key_a_public_key_or_a_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    issued = ca.issue_cert("mx.example.org")
    cert = x509.load_pem_x509_certificate(issued.cert_chain_pems[0].bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    private, public, chain = tmp_path / "key.pem", tmp_path / "pub.pem", tmp_path / "cert.pem"
    issued.private_key_pem.write_to_path(str(private))
    public.write_bytes(cert.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    chain.write_bytes(b"".join(p.bytes() for p in issued.cert_chain_pems))
    assert read_next_key(private) == (spki, [])
    assert read_next_key(public) == (spki, [])
    found, ders = read_next_key(chain)
    assert found == spki and ders[0] == cert.public_bytes(serialization.Encoding.DER)
