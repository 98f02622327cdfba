"""STARTTLS command injection (CVE-2011-0411 class, RFC 3207 §4.2) over real sockets.

Whatever a client sent in plaintext after STARTTLS must never be executed: not before the
handshake, and above all not after it as if it had arrived under TLS.
"""

from __future__ import annotations

import contextlib
import re
import ssl
import time
from pathlib import Path

import pytest
from hostile import RawSink, RecordProperty, Tally
from mailward_server import PASSWORD, USER, MailwardServer
from smtp_peer import Peer, plain_auth

from conftest import MakeServer

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


# --- figures for the hostile-input summary -----------------------------------------------------------

# Commands a client pipelines behind STARTTLS in one write; after the handshake none may have run.
INJECTED_COMMANDS = {
    "RSET": b"RSET\r\n",
    "MAIL": b"MAIL FROM:<a@b.example>\r\n",
    "MAIL+RCPT+DATA": b"MAIL FROM:<a@b.example>\r\nRCPT TO:<postmaster@example.test>\r\nDATA\r\n",
    "EHLO": b"EHLO injected.example\r\n",
    "AUTH": f"AUTH PLAIN {plain_auth(USER, PASSWORD)}\r\n".encode(),
    "QUIT": b"QUIT\r\n",
    "STARTTLS again": b"STARTTLS\r\n",
    "NOOP x50": b"NOOP\r\n" * 50,
}


def test_injection_matrix(server: MailwardServer, record_property: RecordProperty) -> None:
    """Every command above, pipelined behind STARTTLS on 25 and 587, in the same write and (for a
    second round) behind EHLO too: the only reply before the handshake is 220, after it our NOOP
    gets the first reply, the session has no EHLO, AUTH or transaction from the injection."""
    tally = Tally("STARTTLS command injection")
    for kind in STARTTLS_KINDS:
        for what, injected in INJECTED_COMMANDS.items():
            for with_ehlo in (False, True):
                label = f"{kind} {what}{' with EHLO' if with_ehlo else ''}"
                try:
                    with Peer(server.port(kind), ca=server.ca) as peer:
                        if with_ehlo:
                            peer.send(b"EHLO x\r\nSTARTTLS\r\n" + injected)
                            assert peer.reply().code == 250
                        else:
                            peer.ehlo("x")
                            peer.send(b"STARTTLS\r\n" + injected)
                        ok = peer.reply().code == 220 and peer.pending(0.2) is None
                        peer.wrap_tls()
                        noop = peer.cmd("NOOP")
                        ok = ok and (noop.code, noop.first) == (250, "2.0.0 Ok") and peer.pending(0.1) is None
                        ehlo = peer.ehlo("x")
                        ok = ok and "STARTTLS" not in ehlo.lines and (kind == "mx") != any(
                            ln.startswith("AUTH") for ln in ehlo.lines)  # not authenticated already
                        rcpt = peer.cmd("RCPT TO:<postmaster@example.test>")
                        ok = ok and rcpt.code == 503
                        tally.check(ok, f"{label}: NOOP {noop}, RCPT {rcpt}")
                except (OSError, AssertionError, ssl.SSLError) as exc:
                    tally.check(False, f"{label}: {exc!r}")
    assert server.stop() == 0
    assert server.messages() == []
    tally.record(record_property)


# Replies a hostile next hop appends, in the same write, to its 220 for STARTTLS. Taken as
# answers they would make the client believe the message was accepted (or refused) in clear.
INJECTED_REPLIES = {
    "fake EHLO": b"250-evil.test\r\n250 AUTH PLAIN\r\n",
    "fake transaction": (b"250 evil.test\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n"
                         b"250 2.0.0 Ok: INJECTED\r\n"),
    "421": b"421 4.3.0 injected shutdown\r\n",
    "550": b"550 5.7.1 injected refusal\r\n",
    "second 220": b"220 2.0.0 Ready to start TLS\r\n",
}


def delivery_status(server: MailwardServer, rcpt: str) -> str | None:
    """The status word of the Postfix-style delivery line for `rcpt`, with its reply."""
    for line in server.log_since_start().splitlines():
        m = re.search(rf"to=<{re.escape(rcpt)}>,.* status=(\w+) \((.*)\)$", line)
        if m:
            return f"{m.group(1)} {m.group(2)}"
    return None


def test_response_injection_against_the_delivery_client(make_server: MakeServer, tmp_path: Path,
                                                        record_property: RecordProperty) -> None:
    """A hostile next hop appends replies after its STARTTLS 220 (or after its greeting): the
    delivery client discards them, delivers over TLS with the peer's real reply, and never falls
    back to cleartext because of them."""
    tally = Tally("STARTTLS response injection (client)")
    with contextlib.ExitStack() as stack:
        sinks = {what: stack.enter_context(RawSink(tmp_path / f"s{i}", tls=True, starttls_suffix=extra))
                 for i, (what, extra) in enumerate(INJECTED_REPLIES.items())}
        # Replies after the greeting, before EHLO: a client that took them as the EHLO reply
        # would see no STARTTLS and, at level may, send in clear.
        greeting = stack.enter_context(RawSink(tmp_path / "greet", tls=True,
                                               greeting_suffix=b"250-evil.test\r\n250 8BITMIME\r\n"))
        # A second EHLO reply without STARTTLS behind the real one, for a client that reads the
        # latest capabilities it saw.
        after_ehlo = stack.enter_context(RawSink(tmp_path / "ehlo", tls=True,
                                                 ehlo_suffix=b"250-evil.test\r\n250 8BITMIME\r\n"))
        routes = "".join(f'[[delivery.route]]\ndomain = "inj{i}.test"\nnext_hop = "[127.0.0.1]:{s.port}"\n'
                         f'security = "encrypt"\n' for i, s in enumerate(sinks.values()))
        for domain, sink in (("greet.test", greeting), ("ehlo.test", after_ehlo)):
            routes += (f'[[delivery.route]]\ndomain = "{domain}"\nnext_hop = "[127.0.0.1]:{sink.port}"\n'
                       'security = "may"\n')
        server = make_server(deliver=True, extra_toml="[delivery]\n" + routes)
        with Peer(server.submissions, ca=server.ca, implicit_tls=True) as peer:
            peer.ehlo()
            assert peer.login(USER, PASSWORD).code == 235
            rcpts = [f"r@inj{i}.test" for i in range(len(sinks))] + ["r@greet.test", "r@ehlo.test"]
            for rcpt in rcpts:
                body = f"Subject: to {rcpt}\r\n\r\ninjection test\r\n".encode()
                assert peer.send_message(USER, [rcpt], body).code == 250
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(delivery_status(server, r) is None for r in rcpts):
            time.sleep(0.1)
        for i, (what, sink) in enumerate(sinks.items()):
            status = delivery_status(server, f"r@inj{i}.test") or "no delivery line"
            ok = (status.startswith("sent ") and "real-1" in status and "INJECTED" not in status
                  and [m.tls for m in sink.messages] == [True])
            tally.check(ok, f"after STARTTLS 220, {what}: {status}; sink got {len(sink.messages)}")
        for where, domain, sink in (("the greeting", "greet.test", greeting),
                                    ("the EHLO reply", "ehlo.test", after_ehlo)):
            status = delivery_status(server, f"r@{domain}") or "no delivery line"
            # Refusing the session (deferred) or ignoring the junk and using TLS are both safe;
            # a message in clear is the failure, and so is an internal error.
            ok = all(m.tls for m in sink.messages) and (
                (status.startswith("deferred") and "broke the protocol" in status)
                or (status.startswith("sent") and len(sink.messages) == 1))
            tally.check(ok, f"after {where}: {status}; sink got {[m.tls for m in sink.messages]}")
        server.stop()
    tally.record(record_property)
