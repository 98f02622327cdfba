"""swaks, a real SMTP client, against the three listeners: what is accepted, refused and queued."""

from __future__ import annotations

import re
import subprocess
import uuid

import pytest
from checks import check_envelope, check_received
from mailward_server import PASSWORD, USER, MailwardServer
from smtp_peer import Peer, plain_auth

from conftest import require_tool


@pytest.fixture(scope="module")
def swaks_bin() -> str:
    return require_tool("swaks")


def run_swaks(swaks_bin: str, server: MailwardServer, port: int, *args: str,
              data: bytes | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [swaks_bin, "--server", f"127.0.0.1:{port}", "--helo", "client.example", "--timeout", "15",
           "--tls-verify", "--tls-ca-path", str(server.ca), *args]
    if data is not None:
        path = server.root / f"data-{uuid.uuid4().hex}.eml"
        path.write_bytes(data)
        cmd += ["--data", f"@{path}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def tls_seen(out: str) -> tuple[str, str]:
    """(version, cipher) as swaks reports the handshake it made."""
    m = re.search(r"=== TLS started with cipher (TLSv1\.[23]):(\S+):\d+", out)
    assert m, out
    return m.group(1), m.group(2)


def message(marker: str) -> bytes:
    """A message whose body would show truncation, lost dot-stuffing or altered line ends."""
    lines = [f"From: {USER}", "To: bob@example.org", f"Subject: {marker}", "", marker,
             ".leading dot survives dot-stuffing", "..two dots", "", "x" * 900]
    lines += [f"line {i} of {marker}" for i in range(400)]
    # No final newline: swaks ends the data with CRLF . CRLF itself.
    return "\n".join(lines).encode()


def crlf(data: bytes) -> bytes:
    """The data as it must be stored: CRLF line ends, the last line ended."""
    return data.replace(b"\n", b"\r\n") + b"\r\n"


def replies(out: str) -> list[str]:
    """Server lines from swaks' transcript, e.g. '530 5.7.0 Must issue a STARTTLS command first'."""
    return [m.group(1) for m in re.finditer(r"^<[-~]?\*{0,2}\s+(\d{3}[ -].*)$", out, re.M)]


def test_465_implicit_tls_auth_plain_and_login(swaks_bin: str, server: MailwardServer) -> None:
    sent = {}
    for mech in ("PLAIN", "LOGIN"):
        marker = f"via-465-{mech}-{uuid.uuid4().hex}"
        data = message(marker)
        p = run_swaks(swaks_bin, server, server.submissions, "--tls-on-connect", "--auth", mech,
                      "--auth-user", USER, "--auth-password", PASSWORD, "--from", USER,
                      "--to", "bob@example.org", data=data)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "235 2.7.0 Authentication successful" in p.stdout
        assert re.search(r"250 2\.0\.0 Ok: queued as [0-9A-Z]{14}", p.stdout), p.stdout
        sent[marker] = (data, tls_seen(p.stdout))

    assert server.stop() == 0
    stored = server.messages()
    assert len(stored) == len(sent)
    for msg, body in stored:
        marker = next(m for m in sent if m.encode() in body)
        data, tls = sent.pop(marker)
        assert body.endswith(crlf(data)), "the body was altered"
        check_envelope(msg, sender=USER, recipients=["bob@example.org"], listener="submissions",
                       auth_user=USER, tls=tls)
        check_received(body, protocol="ESMTPSA", tls=tls, recipient="bob@example.org")
        assert body.index(b"\r\n\r\n") > body.index(b"Received:"), "Received: must be a header"


def test_587_starttls_then_auth(swaks_bin: str, server: MailwardServer) -> None:
    marker = f"via-587-{uuid.uuid4().hex}"
    data = message(marker)
    p = run_swaks(swaks_bin, server, server.submission, "--tls", "--auth", "LOGIN", "--auth-user", USER,
                  "--auth-password", PASSWORD, "--from", USER,
                  "--to", "bob@example.org,carol@example.net", data=data)
    assert p.returncode == 0, p.stdout + p.stderr
    tls = tls_seen(p.stdout)

    assert server.stop() == 0
    [(msg, body)] = server.messages()
    assert body.endswith(crlf(data))
    check_envelope(msg, sender=USER, recipients=["bob@example.org", "carol@example.net"],
                   listener="submission", auth_user=USER, tls=tls)
    check_received(body, protocol="ESMTPSA", tls=tls)


def test_25_local_domain_with_and_without_tls(swaks_bin: str, server: MailwardServer) -> None:
    plain_marker, tls_marker = f"plain-{uuid.uuid4().hex}", f"tls-{uuid.uuid4().hex}"
    p = run_swaks(swaks_bin, server, server.mx, "--from", "someone@foreign.test",
                  "--to", "postmaster@example.test", data=message(plain_marker))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "250-STARTTLS" in p.stdout and "AUTH" not in p.stdout, "port 25 must offer STARTTLS, never AUTH"
    p = run_swaks(swaks_bin, server, server.mx, "--tls", "--from", "someone@foreign.test",
                  "--to", "Alice@EXAMPLE.test", data=message(tls_marker))
    assert p.returncode == 0, p.stdout + p.stderr
    tls = tls_seen(p.stdout)

    assert server.stop() == 0
    stored = {m.envelope.tls is not None: (m, body) for m, body in server.messages()}
    assert len(stored) == 2
    msg, body = stored[False]
    assert body.endswith(crlf(message(plain_marker)))
    check_envelope(msg, sender="someone@foreign.test", recipients=["postmaster@example.test"],
                   listener="mx", auth_user=None, tls=None)
    check_received(body, protocol="ESMTP", tls=None, recipient="postmaster@example.test")
    msg, body = stored[True]
    assert body.endswith(crlf(message(tls_marker)))
    # Queued under the domain the relay check saw; the local part keeps its case (RFC 5321 §2.4).
    check_envelope(msg, sender="someone@foreign.test", recipients=["Alice@example.test"], listener="mx",
                   auth_user=None, tls=tls)
    check_received(body, protocol="ESMTPS", tls=tls)


def test_587_without_starttls_offers_no_auth_and_refuses_mail(swaks_bin: str,
                                                                server: MailwardServer) -> None:
    p = run_swaks(swaks_bin, server, server.submission, "--quit-after", "EHLO")
    assert p.returncode == 0, p.stdout + p.stderr
    ehlo = [r for r in replies(p.stdout) if r.startswith("250")]
    assert any("STARTTLS" in r for r in ehlo), p.stdout
    assert not any("AUTH" in r for r in ehlo), "AUTH must not be advertised before TLS (RFC 4954)"

    p = run_swaks(swaks_bin, server, server.submission, "--from", USER, "--to", "bob@example.org")
    assert p.returncode == 23, p.stdout + p.stderr  # 23: error in the MAIL transaction
    assert "530 5.7.0 Must issue a STARTTLS command first" in replies(p.stdout)

    # swaks will not send AUTH that was not advertised; a hostile client will, credentials and all.
    with Peer(server.submission) as peer:
        peer.ehlo()
        r = peer.cmd(f"AUTH PLAIN {plain_auth(USER, PASSWORD)}")
        assert (r.code, r.first) == (530, "5.7.0 Must issue a STARTTLS command first")
        r = peer.cmd("AUTH LOGIN")
        assert r.code == 530, r
        r = peer.cmd(f"MAIL FROM:<{USER}>")
        assert (r.code, r.first) == (530, "5.7.0 Must issue a STARTTLS command first")
        r = peer.cmd("RCPT TO:<bob@example.org>")
        assert r.code == 503, r

    assert server.stop() == 0
    assert server.messages() == []
    assert f"AUTH {USER} ok" not in server.log()


def test_wrong_password_is_535(swaks_bin: str, server: MailwardServer) -> None:
    for mech in ("PLAIN", "LOGIN"):
        p = run_swaks(swaks_bin, server, server.submissions, "--tls-on-connect", "--auth", mech,
                      "--auth-user", USER, "--auth-password", "wrong password", "--from", USER,
                      "--to", "bob@example.org")
        assert p.returncode == 28, p.stdout + p.stderr  # 28: error in the AUTH transaction
        assert "535 5.7.8 Authentication credentials invalid" in replies(p.stdout)
    # An unknown user gets the very same answer: no user enumeration.
    p = run_swaks(swaks_bin, server, server.submission, "--tls", "--auth", "PLAIN",
                  "--auth-user", "nobody@example.test", "--auth-password", PASSWORD,
                  "--from", "nobody@example.test", "--to", "bob@example.org")
    assert p.returncode == 28, p.stdout + p.stderr
    assert "535 5.7.8 Authentication credentials invalid" in replies(p.stdout)
    assert server.stop() == 0
    assert server.messages() == []
    assert PASSWORD not in server.log() and "wrong password" not in server.log()


def test_sender_not_owned_is_553(swaks_bin: str, server: MailwardServer) -> None:
    for sender in ("mallory@example.test", "alice@example.org", "alice@sub.example.test"):
        p = run_swaks(swaks_bin, server, server.submissions, "--tls-on-connect", "--auth", "PLAIN",
                      "--auth-user", USER, "--auth-password", PASSWORD, "--from", sender,
                      "--to", "bob@example.org")
        assert p.returncode == 23, p.stdout + p.stderr
        assert "553 5.7.1 Sender address not owned by the authenticated user" in replies(p.stdout)
    # The login's own address with the domain in another case is still its own.
    p = run_swaks(swaks_bin, server, server.submissions, "--tls-on-connect", "--auth", "PLAIN",
                  "--auth-user", USER, "--auth-password", PASSWORD, "--from", "alice@EXAMPLE.TEST",
                  "--to", "bob@example.org")
    assert p.returncode == 0, p.stdout
    assert server.stop() == 0
    [(msg, _)] = server.messages()
    assert msg.envelope.sender == "alice@EXAMPLE.TEST" and msg.envelope.auth_user == USER


def test_ehlo_name_cannot_forge_the_trace_header(swaks_bin: str, server: MailwardServer) -> None:
    """The EHLO argument is the client's word only; it must not reshape our Received: header."""
    names = {"x;by(evil": "unknown", "Bücher.Example": "xn--bcher-kva.example",
             "[127.0.0.1]": "[127.0.0.1]", "a)b": "unknown"}
    for helo in names:
        p = run_swaks(swaks_bin, server, server.mx, "--helo", helo, "--from", "someone@foreign.test",
                      "--to", "postmaster@example.test", "--header", f"Subject: {helo}")
        assert p.returncode == 0, p.stdout + p.stderr
    assert server.stop() == 0
    stored = server.messages()
    assert len(stored) == len(names)
    for msg, body in stored:
        helo = msg.envelope.client_helo
        hdr = check_received(body, protocol="ESMTP", tls=None, recipient="postmaster@example.test")
        assert hdr.startswith(f"Received: from {names[helo]} ([127.0.0.1])"), hdr
