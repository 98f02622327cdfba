"""`mailward tlsa`: the record printed matches what OpenSSL computes from the same certificate."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mailward.cli import main
from mailward.tls import make_demo_certificate


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_certificate(tmp_path_factory.mktemp("tls"), "mx.example.net").cert


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["tlsa", *args])
    out, err = capsys.readouterr()
    return code, out.strip(), err.strip()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl command not installed")
def test_3_1_1_matches_openssl(chain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The digest an operator would get by hand: openssl x509 -pubkey | openssl pkey -pubin -outform DER.
    pubkey = subprocess.run(["openssl", "x509", "-in", str(chain), "-noout", "-pubkey"],
                            capture_output=True, check=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pubkey,
                         capture_output=True, check=True).stdout
    code, out, _ = run(capsys, "--cert", str(chain))
    assert code == 0
    assert out == f"_25._tcp.mx.example.net. IN TLSA 3 1 1 {hashlib.sha256(der).hexdigest()}"


def test_dane_ta_names_the_top_of_the_chain(chain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = x509.load_pem_x509_certificates(chain.read_bytes())[-1]
    digest = hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)).hexdigest()
    code, out, _ = run(capsys, "--cert", str(chain), "--usage", "2", "--selector", "0",
                       "--host", "mail.example.org", "--port", "465")
    assert code == 0 and out == f"_465._tcp.mail.example.org. IN TLSA 2 0 1 {digest}"


def test_leaf_only_file_cannot_give_a_dane_ta_record(chain: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    leaf = x509.load_pem_x509_certificates(chain.read_bytes())[0]
    path = tmp_path / "leaf.pem"
    path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    code, out, err = run(capsys, "--cert", str(path), "--usage", "2")
    assert code == 2 and out == "" and "full chain" in err


@pytest.mark.parametrize("content,phrase", [(None, "cannot read"), (b"not a certificate\n", "no PEM")])
def test_bad_files_get_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    content: bytes | None, phrase: str) -> None:
    path = tmp_path / "cert.pem"
    if content is not None:
        path.write_bytes(content)
    code, out, err = run(capsys, "--cert", str(path))
    assert code == 2 and out == "" and phrase in err and err.count("\n") == 0
