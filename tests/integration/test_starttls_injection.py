"""STARTTLS command injection (CVE-2011-0411 class, RFC 3207 §4.2) over real sockets.

Whatever a client sent in plaintext after STARTTLS must never be executed: not before the
handshake, and above all not after it as if it had arrived under TLS.
"""

from __future__ import annotations

import ssl

import pytest
from mailward_server import MailwardServer
from smtp_peer import Peer

STARTTLS_KINDS = ["mx", "submission"]


def assert_only_noop_reply(peer: Peer) -> None:
    """After the handshake, our NOOP must get the first reply, and nothing else may arrive."""
    r = peer.cmd("NOOP")
    assert (r.code, r.first) == (250, "2.0.0 Ok"), f"an injected command was executed under TLS: {r}"
    assert peer.pending(0.5) is None, "a stray reply arrived after the handshake"


@pytest.mark.parametrize("kind", STARTTLS_KINDS)
def test_commands_pipelined_after_starttls_are_discarded(server: MailwardServer, kind: str) -> None:
    with Peer(server.port(kind), ca=server.ca) as peer:
        peer.send(b"EHLO x\r\nSTARTTLS\r\nRSET\r\n")  # one write, one TCP segment
        assert peer.reply().code == 250
        r = peer.reply()
        assert r.code == 220, r
        assert peer.pending(0.3) is None, "the injected RSET was answered in plaintext"
        peer.wrap_tls()
        assert_only_noop_reply(peer)
        # The pre-TLS EHLO is forgotten too (RFC 3207 §4.2): MAIL needs a new EHLO.
        r = peer.cmd("MAIL FROM:<a@b.example>")
        assert (r.code, r.first) == (503, "5.5.1 Send EHLO or HELO first"), r
    assert server.stop() == 0
    assert server.messages() == []


@pytest.mark.parametrize("kind", STARTTLS_KINDS)
def test_mail_pipelined_after_starttls_starts_no_transaction(server: MailwardServer, kind: str) -> None:
    with Peer(server.port(kind), ca=server.ca) as peer:
        peer.ehlo("x")
        peer.send(b"STARTTLS\r\nMAIL FROM:<a@b.example>\r\n")
        r = peer.reply()
        assert r.code == 220, r
        assert peer.pending(0.3) is None, "the injected MAIL was answered in plaintext"
        peer.wrap_tls()
        assert_only_noop_reply(peer)
        ehlo = peer.ehlo("x")
        assert "STARTTLS" not in ehlo.lines
        # Had the injected MAIL run, a transaction would be open and RCPT accepted.
        r = peer.cmd("RCPT TO:<postmaster@example.test>")
        assert (r.code, r.first) == (503, "5.5.1 Need MAIL command"), r
    assert server.stop() == 0
    assert server.messages() == []


@pytest.mark.parametrize("kind", STARTTLS_KINDS)
def test_plaintext_between_220_and_client_hello_breaks_the_handshake(server: MailwardServer,
                                                                      kind: str) -> None:
    with Peer(server.port(kind), ca=server.ca) as peer:
        peer.ehlo("x")
        assert peer.cmd("STARTTLS").code == 220
        peer.send(b"NOOP\r\n")
        # The server sees a broken ClientHello: it may close at once, but never answer in SMTP.
        assert peer.pending(0.5) in (None, b""), "plaintext sent after 220 was executed"
        with pytest.raises((ssl.SSLError, ConnectionError)):
            peer.wrap_tls()
    server.wait_for_log("TLS handshake failed")
    assert server.stop() == 0
    assert server.messages() == []


def test_plaintext_smtp_on_implicit_tls_port_gets_no_smtp_reply(server: MailwardServer) -> None:
    with Peer(server.submissions, greeting=False) as peer:
        peer.send(b"EHLO x\r\nMAIL FROM:<alice@example.test>\r\n")
        data, _ = peer.wait_closed(10)
        assert b"250" not in data and b"220" not in data, data
    server.wait_for_log("TLS handshake failed")
    assert server.stop() == 0
    assert server.messages() == []
