"""Resource limits with small values: connections, timeouts, message size, AUTH brute force."""

from __future__ import annotations

import socket
import ssl
import time

import pytest
from mailward_server import KINDS, PASSWORD, USER, MailwardServer
from smtp_peer import Peer, dot_stuff, plain_auth

from conftest import MakeServer

TOO_MANY = (421, "4.7.0 Too many connections, try again later")
TIMEOUT = (421, "4.4.2 Timeout exceeded, closing connection")


def admitted(server: MailwardServer, kind: str, source: str) -> Peer:
    peer = Peer(server.port(kind), ca=server.ca, implicit_tls=kind == "submissions", source=source)
    assert peer.greeting.code == 220, peer.greeting
    return peer


def assert_refused(server: MailwardServer, kind: str, source: str) -> None:
    """25/587 answer 421 4.7.0 in plaintext and close; 465 has no TLS yet, so it just closes."""
    with Peer(server.port(kind), source=source, greeting=False) as peer:
        data, _ = peer.wait_closed(5)
    if kind == "submissions":
        assert data == b"", data
    else:
        assert data == b"%d %s\r\n" % (TOO_MANY[0], TOO_MANY[1].encode()), data


@pytest.mark.parametrize("kind", KINDS)
def test_connection_limits_per_listener_and_per_client(make_server: MakeServer, kind: str) -> None:
    server = make_server(listener_toml={kind: "max_connections = 3\nmax_connections_per_ip = 2"})
    peers = [admitted(server, kind, "127.0.0.1"), admitted(server, kind, "127.0.0.1")]
    try:
        assert_refused(server, kind, "127.0.0.1")  # a third from the same address
        peers.append(admitted(server, kind, "127.0.0.2"))  # another address still gets in
        assert_refused(server, kind, "127.0.0.3")  # but the listener is full
        # Other listeners are not affected by this one's limit.
        other = next(k for k in KINDS if k != kind)
        admitted(server, other, "127.0.0.1").close()
        # A slot freed is a slot available again.
        peers.pop(0).close()
        deadline = time.monotonic() + 5
        while True:
            try:
                peers.append(admitted(server, kind, "127.0.0.3"))
                break
            except (ConnectionError, ssl.SSLError, AssertionError):
                assert time.monotonic() < deadline, "a closed connection never freed its slot"
                time.sleep(0.1)
    finally:
        for p in peers:
            p.close()
    log = server.log_since_start()
    assert "per-client connection limit" in log and "listener connection limit" in log


TIMEOUTS = "command_timeout = 2\ndata_timeout = 2\nhandshake_timeout = 2"


def test_timeouts(make_server: MakeServer) -> None:
    """All clients stall at once; each must be dropped about when its own timeout says."""
    server = make_server(listener_toml=dict.fromkeys(KINDS, TIMEOUTS))
    stalled: dict[str, tuple[Peer, float]] = {}
    try:
        idle = Peer(server.mx)
        idle.ehlo()
        stalled["idle on 25"] = (idle, time.monotonic())

        idle_tls = Peer(server.submissions, ca=server.ca, implicit_tls=True)
        stalled["idle on 465"] = (idle_tls, time.monotonic())

        mid_data = Peer(server.submissions, ca=server.ca, implicit_tls=True)
        mid_data.ehlo()
        assert mid_data.login(USER, PASSWORD).code == 235
        assert mid_data.cmd(f"MAIL FROM:<{USER}>").code == 250
        assert mid_data.cmd("RCPT TO:<bob@example.org>").code == 250
        assert mid_data.cmd("DATA").code == 354
        mid_data.send(b"Subject: never finished\r\n\r\nhalf a li")
        stalled["mid-DATA on 465"] = (mid_data, time.monotonic())

        mid_bdat = Peer(server.mx)
        mid_bdat.ehlo()
        assert mid_bdat.cmd("MAIL FROM:<x@foreign.test>").code == 250
        assert mid_bdat.cmd("RCPT TO:<postmaster@example.test>").code == 250
        mid_bdat.send(b"BDAT 1000 LAST\r\nSubject: short of 1000 octets\r\n")
        stalled["mid-BDAT on 25"] = (mid_bdat, time.monotonic())

        no_hello = Peer(server.submissions, greeting=False)
        stalled["no ClientHello on 465"] = (no_hello, time.monotonic())

        half_hello = Peer(server.submissions, greeting=False)
        half_hello.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello's first bytes
        stalled["half a ClientHello on 465"] = (half_hello, time.monotonic())

        after_starttls = Peer(server.submission)
        after_starttls.ehlo()
        assert after_starttls.cmd("STARTTLS").code == 220
        stalled["no ClientHello after STARTTLS"] = (after_starttls, time.monotonic())

        for name, (peer, since) in stalled.items():
            data, _ = peer.wait_closed(10)
            elapsed = time.monotonic() - since
            assert 1.5 <= elapsed < 6, f"{name}: dropped after {elapsed:.1f}s"
            if name.startswith(("idle", "mid")):
                reply = b"%d %s\r\n" % (TIMEOUT[0], TIMEOUT[1].encode())
                assert data == reply, f"{name}: {data!r}"
            else:
                assert data == b"", f"{name}: {data!r}"
    finally:
        for peer, _ in stalled.values():
            peer.close()
    assert server.stop() == 0
    assert server.messages() == [], "a message cut off by a timeout was queued"
    assert server.log().count("]: timeout\n") == 4
    assert server.log().count("TLS handshake failed: timeout\n") == 3


def test_message_size_limit(make_server: MakeServer) -> None:
    server = make_server(listener_toml=dict.fromkeys(KINDS, "max_message_size = 4096"))
    big = b"Subject: big\r\n\r\n" + b"z" * 70 + b"\r\n"
    big *= 100
    small = b"Subject: small\r\n\r\nsmall enough\r\n"
    with Peer(server.submissions, ca=server.ca, implicit_tls=True) as peer:
        assert "SIZE 4096" in peer.ehlo().lines
        assert peer.login(USER, PASSWORD).code == 235
        r = peer.cmd(f"MAIL FROM:<{USER}> SIZE=100000")
        assert (r.code, r.first) == (552, "5.3.4 Message size exceeds fixed limit"), r
        # A client that understates SIZE (or sends none) is stopped by the bytes themselves.
        assert peer.cmd(f"MAIL FROM:<{USER}> SIZE=1000").code == 250
        assert peer.cmd("RCPT TO:<bob@example.org>").code == 250
        assert peer.cmd("DATA").code == 354
        peer.send(dot_stuff(big) + b".\r\n")
        r = peer.reply()
        assert (r.code, r.first) == (552, "5.3.4 Message size exceeds fixed limit"), r
        # The same with BDAT.
        assert peer.cmd(f"MAIL FROM:<{USER}>").code == 250
        assert peer.cmd("RCPT TO:<bob@example.org>").code == 250
        peer.send(b"BDAT %d LAST\r\n" % len(big) + big)
        r = peer.reply()
        assert (r.code, r.first) == (552, "5.3.4 Message size exceeds fixed limit"), r
        # The session is still usable.
        assert peer.send_message(USER, ["bob@example.org"], small).code == 250
    assert server.stop() == 0
    [(_, body)] = server.messages()
    assert body.endswith(small)


def timed_auth(peer: Peer, user: str, password: str) -> tuple[int, str, float]:
    start = time.monotonic()
    r = peer.cmd(f"AUTH PLAIN {plain_auth(user, password)}")
    return r.code, r.first, time.monotonic() - start


def test_auth_brute_force_slows_down_then_locks_out(make_server: MakeServer) -> None:
    server = make_server(extra_toml="[auth]\nmax_failures_per_ip = 3\nmax_failures_per_user = 3\n"
                                    "lockout_seconds = 60\n")
    # Credential stuffing from one address: a different user each time, so only the address counts.
    with Peer(server.submissions, ca=server.ca, implicit_tls=True, source="127.0.0.5") as peer:
        peer.ehlo()
        times = []
        for i in range(3):
            code, first, took = timed_auth(peer, f"victim{i}@example.test", "guess")
            assert (code, first) == (535, "5.7.8 Authentication credentials invalid")
            times.append(took)
        assert times[0] >= 0.4 and times[1] >= times[0] + 0.3 and times[2] >= times[1] + 0.6, times
        code, first, took = timed_auth(peer, USER, PASSWORD)  # even the right password
        assert (code, first) == (454, "4.7.0 Temporary authentication failure")
        assert took < 0.4, "a locked-out client must not cost the server a password check"
    # The lockout is per address: alice elsewhere is fine.
    with Peer(server.submissions, ca=server.ca, implicit_tls=True, source="127.0.0.6") as peer:
        peer.ehlo()
        assert peer.login(USER, PASSWORD).code == 235

    # Guessing one user's password from many addresses locks that user.
    for i in range(3):
        with Peer(server.submission, ca=server.ca, source=f"127.0.1.{i + 1}") as peer:
            peer.ehlo()
            peer.starttls()
            peer.ehlo()
            assert timed_auth(peer, USER, f"guess {i}")[0] == 535
    with Peer(server.submissions, ca=server.ca, implicit_tls=True, source="127.0.0.7") as peer:
        peer.ehlo()
        code, first, _ = timed_auth(peer, USER, PASSWORD)
        assert (code, first) == (454, "4.7.0 Temporary authentication failure")
    log = server.log_since_start()
    assert "locked out" in log and PASSWORD not in log


def test_per_ip_limit_is_not_bypassed_by_tls_state(make_server: MakeServer) -> None:
    """A refused 465 connection costs no handshake: closing happens before any TLS."""
    server = make_server(listener_toml={"submissions": "max_connections_per_ip = 1"})
    ctx = ssl.create_default_context(cafile=str(server.ca))
    with admitted(server, "submissions", "127.0.0.1"), \
            socket.create_connection(("127.0.0.1", server.submissions), timeout=5) as raw, \
            pytest.raises((ssl.SSLError, ConnectionError)):
        ctx.wrap_socket(raw, server_hostname="localhost")
