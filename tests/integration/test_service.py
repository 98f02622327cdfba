"""The process: SIGHUP certificate reload, SIGTERM drain, start-up errors, config check, users."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from mailward_server import PASSWORD, USER, MailwardServer
from smtp_peer import Peer, dot_stuff

from conftest import MakeServer
from mailward.tls import make_demo_certificate

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


def one_sentence(stderr: str) -> str:
    """The one error line of a failed command, log lines aside; no traceback, no second line."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not LOG_LINE.match(ln)]
    assert len(lines) == 1, f"expected one error line, got:\n{stderr}"
    [line] = lines
    assert line.startswith("mailward: ") and line.endswith((".", "?")), line
    return line


def install_certificate(server: MailwardServer, name: str) -> tuple[Path, bytes]:
    """Put a certificate for `name` (from a fresh CA) in place of the server's files.

    Returns the new CA file and the new leaf in DER.
    """
    fresh = server.root / f"tls-{name}-{uuid.uuid4().hex[:6]}"
    pair = make_demo_certificate(fresh, name)
    for src, dst in ((pair.key, server.key), (pair.cert, server.cert)):
        tmp = dst.with_suffix(".new")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    leaf = x509.load_pem_x509_certificates(pair.cert.read_bytes())[0]
    return fresh / "demo-ca.pem", leaf.public_bytes(Encoding.DER)


def served_certificate(port: int, ca: Path, name: str, *, starttls: bool = False) -> bytes:
    """The leaf a new connection gets, verified against `ca` for `name`."""
    with Peer(port, ca=ca, implicit_tls=not starttls, server_hostname=name) as peer:
        if starttls:
            peer.ehlo()
            peer.starttls()
        assert peer.tls is not None
        der = peer.tls.getpeercert(binary_form=True)
        assert der is not None
        return der


def count(text: str, needle: str) -> int:
    return text.count(needle)


def test_sighup_and_reload_command_swap_certificates(server: MailwardServer) -> None:
    old_ca = server.ca
    old_der = served_certificate(server.submissions, old_ca, "localhost")
    # A session that is open across the reloads keeps its TLS session and keeps working.
    with Peer(server.submissions, ca=old_ca, implicit_tls=True) as open_peer:
        open_peer.ehlo()
        assert open_peer.login(USER, PASSWORD).code == 235

        new_ca, new_der = install_certificate(server, "mail.example.test")
        server.send_signal(signal.SIGHUP)
        server.wait_for_log("TLS certificates reloaded: localhost, mail.example.test")
        assert new_der != old_der
        assert served_certificate(server.submissions, new_ca, "mail.example.test") == new_der
        assert served_certificate(server.submission, new_ca, "mail.example.test", starttls=True) == new_der
        assert served_certificate(server.mx, new_ca, "mail.example.test", starttls=True) == new_der
        with pytest.raises(ssl.SSLCertVerificationError):
            served_certificate(server.submissions, old_ca, "localhost")

        third_ca, third_der = install_certificate(server, "smtp.example.test")
        p = server.cli("reload")
        assert p.returncode == 0 and f"pid {server.pid}" in p.stdout, p
        server.wait_for_log("TLS certificates reloaded: localhost, smtp.example.test")
        assert served_certificate(server.submissions, third_ca, "smtp.example.test") == third_der

        r = open_peer.send_message(USER, ["bob@example.org"],
                                   b"Subject: across reloads\r\n\r\nstill here\r\n")
        assert r.code == 250, r
        assert open_peer.cmd("QUIT").code == 221

    assert server.stop() == 0
    [(_, body)] = server.messages()
    assert body.endswith(b"\r\n\r\nstill here\r\n")


def test_bad_new_certificate_keeps_the_old_one(server: MailwardServer) -> None:
    before = served_certificate(server.submissions, server.ca, "localhost")
    good_cert, good_key = server.cert.read_bytes(), server.key.read_bytes()
    other = make_demo_certificate(server.root / "other", "other.example.test")
    cases = [
        (b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n", good_key),
        (other.cert.read_bytes(), good_key),  # a certificate without its key
        (good_cert, b"garbage"),
    ]
    for i, (cert, key) in enumerate(cases, 1):
        server.cert.write_bytes(cert)
        server.key.write_bytes(key)
        server.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while count(server.log_since_start(), "TLS reload failed") < i and time.monotonic() < deadline:
            time.sleep(0.05)
        assert served_certificate(server.submissions, server.ca, "localhost") == before
    log = server.log_since_start()
    errors = [ln for ln in log.splitlines() if " ERROR " in ln]
    assert len(errors) == len(cases), errors
    for line in errors:
        assert "TLS reload failed, keeping the previous certificates: " in line, line
        assert line.rstrip().endswith("."), line
    assert "Traceback" not in log
    assert "TLS certificates reloaded" not in log


def test_sigterm_drains_a_transaction_in_flight(server: MailwardServer) -> None:
    lines = b"".join(b"line %d of the draining message\r\n" % i for i in range(500))
    body = b"Subject: drain\r\n\r\n" + lines
    with Peer(server.submissions, ca=server.ca, implicit_tls=True) as busy, Peer(server.mx) as idle, \
            Peer(server.submissions, greeting=False) as no_hello, Peer(server.submission) as mid_starttls:
        idle.ehlo()
        mid_starttls.ehlo()
        assert mid_starttls.cmd("STARTTLS").code == 220
        busy.ehlo()
        assert busy.login(USER, PASSWORD).code == 235
        assert busy.cmd(f"MAIL FROM:<{USER}>").code == 250
        assert busy.cmd("RCPT TO:<bob@example.org>").code == 250
        assert busy.cmd("DATA").code == 354
        stuffed = dot_stuff(body)
        busy.send(stuffed[: len(stuffed) // 2])

        server.send_signal(signal.SIGTERM)
        server.wait_for_log("shutting down")
        # An idle session is told at once, and closed.
        r = idle.reply()
        assert (r.code, r.first) == (421, "4.3.2 Service shutting down, closing connection"), r
        assert idle.pending(5) == b""
        # Before its handshake, a TLS connection cannot be told anything in SMTP: it is closed.
        for peer in (no_hello, mid_starttls):
            data, _ = peer.wait_closed(5)
            assert data == b"", f"plaintext written where TLS was expected: {data!r}"
        # No new connections.
        deadline = time.monotonic() + 3
        while True:
            try:
                with socket.create_connection(("127.0.0.1", server.mx), timeout=2) as s:
                    s.settimeout(2)
                    greeting = s.recv(100)
                    assert not greeting.startswith(b"220"), greeting
            except ConnectionRefusedError:
                break
            except (ConnectionResetError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
            time.sleep(0.05)

        assert server.proc is not None and server.proc.poll() is None, "exited with a transaction open"
        busy.send(stuffed[len(stuffed) // 2:] + b".\r\n")
        r = busy.reply()
        assert r.code == 250 and "queued as" in r.text, r
        finished = time.monotonic()
        r = busy.reply()
        assert (r.code, r.first) == (421, "4.3.2 Service shutting down, closing connection"), r
        code = server.proc.wait(timeout=5)
        assert code == 0
        assert time.monotonic() - finished < 5
    server.proc = None
    [(msg, stored)] = server.messages()
    assert stored.endswith(body) and msg.envelope.auth_user == USER


def serve(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailward.cli", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=30, cwd=config.parent)


def test_startup_errors_are_one_sentence(make_server: MakeServer) -> None:
    server = make_server(start=False)
    good = server.config_text()
    cases: dict[str, tuple[str, str]] = {
        "missing certificate": (good.replace(str(server.cert), str(server.root / "nope.pem")),
                                "tls.certificates[0].cert: file "),
        "garbage certificate": (good.replace(str(server.cert), str(server.root / "garbage.pem")),
                                "holds no PEM certificate"),
        "unknown key": (good.replace('hostname = "mx', 'hostnme = "mx'), "hostname"),
        "bad value": (good.replace(f"port = {server.mx}", "port = 70000"), "65535"),
        "bad kind": (good.replace('kind = "mx"', 'kind = "smtp"'), "listener[0].kind"),
        "syntax error": (good + "\n[[listener]\n", "fix the TOML syntax"),
        # A socket directory where no server listens: refused at once, without DNS or network.
        "queue url": (f'queue = {{ url = "postgresql:///mail?host={server.root}" }}\n' + good,
                      "cannot connect to PostgreSQL"),
    }
    (server.root / "garbage.pem").write_text("this is not a certificate\n")
    for name, (text, needle) in cases.items():
        config = server.root / f"{name.replace(' ', '-')}.toml"
        config.write_text(text)
        p = serve(config)
        assert p.returncode != 0, (name, p)
        line = one_sentence(p.stderr)
        assert needle in line, (name, line)

    # Not UTF-8, a directory where the file should be, and no file at all.
    latin1 = server.root / "latin1.toml"
    latin1.write_bytes(good.encode() + b'\n# caf\xe9\n')
    for config in (latin1, server.root / "state", server.root / "absent.toml"):
        p = serve(config)
        assert p.returncode != 0
        assert str(config) in one_sentence(p.stderr)

    # A port already taken by another program.
    with socket.socket() as other:
        other.bind(("127.0.0.1", server.submission))
        other.listen()
        p = serve(server.config_path)
    assert p.returncode != 0
    line = one_sentence(p.stderr)
    assert f"127.0.0.1:{server.submission}" in line and "already in use" in line, line

    # With nothing running, `reload` says so.
    p = server.cli("reload", check=False)
    assert p.returncode != 0
    one_sentence(p.stderr)


def test_config_check_prints_effective_values(make_server: MakeServer) -> None:
    server = make_server(start=False, listener_toml={"mx": "max_connections = 7"},
                         extra_toml="[auth]\nmax_failures_per_ip = 4\n")
    p = server.cli("config", "check")
    assert p.returncode == 0, p
    out = p.stdout
    for expected in ('hostname = "mx.example.test"', f"port = {server.mx}", "max_connections = 7",
                     "max_connections_per_ip = 20", "command_timeout = 300", "max_failures_per_ip = 4",
                     'min_version = "TLSv1.2"', f'users_file = "{server.users_path}"',
                     'local_domains = ["example.test"]'):
        assert expected in out, expected
    # Every key carries its meaning, and the output is itself a valid configuration.
    assert "# simultaneous connections on this listener" in out
    parsed = tomllib.loads(out)
    assert [lc["kind"] for lc in parsed["listener"]] == ["mx", "submission", "submissions"]
    copy = server.root / "described.toml"
    copy.write_text(out)
    assert server.cli("config", "check", config=copy).stdout == out

    bad = server.root / "bad.toml"
    bad.write_text(server.config_text().replace("[log]", "[logs]"))
    p = server.cli("config", "check", config=bad, check=False)
    assert p.returncode != 0
    assert "logs" in one_sentence(p.stderr)


def login(server: MailwardServer, user: str, password: str) -> int:
    with Peer(server.submissions, ca=server.ca, implicit_tls=True) as peer:
        peer.ehlo()
        r = peer.login(user, password)
        if r.code == 235:
            assert peer.send_message(user, ["carol@example.net"], b"Subject: hi\r\n\r\nhi\r\n").code == 250
        return r.code


def test_user_commands_take_effect_without_restart(server: MailwardServer) -> None:
    bob, pw1, pw2 = "bob@example.test", "first password for bob", "second password for bob"
    assert login(server, bob, pw1) == 535
    p = server.cli("user", "add", bob, "--password-stdin", stdin=pw1 + "\n")
    assert p.stdout.strip() == f"user {bob} added"
    listed = server.cli("user", "list").stdout.splitlines()
    assert sorted(ln.split("\t")[0] for ln in listed) == [USER, bob]
    assert login(server, bob, pw1) == 235

    server.cli("user", "passwd", bob, "--password-stdin", stdin=pw2 + "\n")
    assert login(server, bob, pw1) == 535
    assert login(server, bob, pw2) == 235

    server.cli("user", "del", bob)
    assert login(server, bob, pw2) == 535
    assert [ln.split("\t")[0] for ln in server.cli("user", "list").stdout.splitlines()] == [USER]

    p = server.cli("user", "add", "carol@example.test", "--password-stdin", stdin="short\n", check=False)
    assert p.returncode != 0 and "8 characters" in one_sentence(p.stderr)
    # No terminal to prompt on (a new session has none) and no --password-stdin.
    p = subprocess.run([sys.executable, "-m", "mailward.cli", "user", "add", "dave@example.test",
                        "--config", str(server.config_path)], input="", capture_output=True, text=True,
                       timeout=60, start_new_session=True)
    assert p.returncode != 0 and "--password-stdin" in one_sentence(p.stderr)
    p = server.cli("user", "add", USER, "--password-stdin", stdin=PASSWORD + "\n", check=False)
    assert p.returncode != 0
    one_sentence(p.stderr)
    assert login(server, USER, PASSWORD) == 235

    assert server.stop() == 0
    senders = sorted(m.envelope.auth_user or "" for m, _ in server.messages())
    assert senders == [USER, bob, bob]
    users_file = server.users_path.read_text()
    assert pw1 not in users_file and pw2 not in users_file and "$argon2id$" in users_file
    assert server.users_path.stat().st_mode & 0o077 == 0
