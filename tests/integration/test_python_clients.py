"""Python's smtplib with verifying TLS contexts, a pipelining client and BDAT (CHUNKING) by hand."""

from __future__ import annotations

import smtplib
import ssl
import uuid

from checks import check_envelope, check_received
from mailward_server import PASSWORD, USER, MailwardServer
from smtp_peer import Peer, dot_stuff, plain_auth, verifying_context


def body_for(marker: str) -> bytes:
    return (f"From: {USER}\r\nTo: bob@example.org\r\nSubject: {marker}\r\n\r\n{marker}\r\n"
            ".starts with a dot\r\n" + "y" * 998 + "\r\n").encode()


def tls_of(sock: object) -> tuple[str, str]:
    assert isinstance(sock, ssl.SSLSocket)
    version, cipher = sock.version(), sock.cipher()
    assert version is not None and cipher is not None
    return version, cipher[0]


def test_smtp_ssl_on_465_with_verified_certificate(server: MailwardServer) -> None:
    marker = uuid.uuid4().hex
    ctx = verifying_context(server.ca)
    with smtplib.SMTP_SSL("localhost", server.submissions, context=ctx, timeout=10) as smtp:
        tls = tls_of(smtp.sock)
        code, _ = smtp.ehlo("client.example")
        assert code == 250
        assert "PLAIN" in smtp.esmtp_features["auth"] and "LOGIN" in smtp.esmtp_features["auth"]
        assert "starttls" not in smtp.esmtp_features, "STARTTLS makes no sense under implicit TLS"
        smtp.login(USER, PASSWORD)
        refused = smtp.sendmail(USER, ["bob@example.org"], body_for(marker))
        assert refused == {}

    assert server.stop() == 0
    [(msg, body)] = server.messages()
    assert body.endswith(body_for(marker))
    check_envelope(msg, sender=USER, recipients=["bob@example.org"], listener="submissions",
                   auth_user=USER, tls=tls)
    check_received(body, protocol="ESMTPSA", tls=tls, recipient="bob@example.org")


def test_smtp_starttls_on_587_tls12_and_tls13(server: MailwardServer) -> None:
    """Both versions, so the trace header is checked with OpenSSL's TLS 1.2 names too."""
    sent = {}
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        marker = uuid.uuid4().hex
        ctx = verifying_context(server.ca)
        ctx.minimum_version = ctx.maximum_version = version
        with smtplib.SMTP("localhost", server.submission, timeout=10) as smtp:
            smtp.ehlo("client.example")
            assert "auth" not in smtp.esmtp_features
            smtp.starttls(context=ctx)
            tls = tls_of(smtp.sock)
            smtp.ehlo("client.example")
            assert "starttls" not in smtp.esmtp_features
            smtp.login(USER, PASSWORD)
            assert smtp.sendmail(USER, ["bob@example.org"], body_for(marker)) == {}
        sent[marker] = tls
    assert {v for v, _ in sent.values()} == {"TLSv1.2", "TLSv1.3"}

    assert server.stop() == 0
    stored = server.messages()
    assert len(stored) == 2
    for msg, body in stored:
        [marker] = [m for m in sent if m.encode() in body]
        assert body.endswith(body_for(marker))
        check_envelope(msg, sender=USER, recipients=["bob@example.org"], listener="submission",
                       auth_user=USER, tls=sent[marker])
        check_received(body, protocol="ESMTPSA", tls=sent[marker], recipient="bob@example.org")


def test_pipelined_transactions(server: MailwardServer) -> None:
    """RFC 2920: a whole transaction in one write; replies come back in order, one per command."""
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    with Peer(server.submissions, ca=server.ca, implicit_tls=True) as peer:
        assert "PIPELINING" in peer.ehlo().lines
        peer.send(f"AUTH PLAIN {plain_auth(USER, PASSWORD)}\r\n"
                  f"MAIL FROM:<{USER}>\r\nRCPT TO:<bob@example.org>\r\nRCPT TO:<carol@example.net>\r\n"
                  "DATA\r\n")
        codes = [peer.reply().code for _ in range(5)]
        assert codes == [235, 250, 250, 250, 354]
        # The end of one message, a whole second transaction and QUIT, in a single segment.
        peer.send(dot_stuff(body_for(first)) + b".\r\n" +
                  f"MAIL FROM:<{USER}>\r\nRCPT TO:<dave@example.org>\r\nDATA\r\n".encode())
        r = peer.reply()
        assert r.code == 250 and "queued as" in r.text, r
        assert [peer.reply().code for _ in range(3)] == [250, 250, 354]
        peer.send(dot_stuff(body_for(second)) + b".\r\nQUIT\r\n")
        assert peer.reply().code == 250
        assert peer.reply().code == 221
        assert peer.pending(2.0) == b"", "the server must close after QUIT"
    # On 25 a refused recipient in the middle of a pipelined group spoils nothing else.
    with Peer(server.mx) as peer:
        peer.ehlo()
        peer.send("MAIL FROM:<x@foreign.test>\r\nRCPT TO:<relay@foreign.test>\r\n"
                  "RCPT TO:<postmaster@example.test>\r\nDATA\r\n")
        replies = [peer.reply() for _ in range(4)]
        assert [r.code for r in replies] == [250, 554, 250, 354], replies
        peer.send(b"Subject: mx\r\n\r\nvia mx\r\n.\r\n")
        assert peer.reply().code == 250

    assert server.stop() == 0
    stored = server.messages()
    by_rcpts = {tuple(sorted(r.recipient.address for r in m.recipients)): (m, b) for m, b in stored}
    assert set(by_rcpts) == {("bob@example.org", "carol@example.net"), ("dave@example.org",),
                             ("postmaster@example.test",)}
    assert by_rcpts[("bob@example.org", "carol@example.net")][1].endswith(body_for(first))
    assert by_rcpts[("dave@example.org",)][1].endswith(body_for(second))
    assert by_rcpts[("postmaster@example.test",)][1].endswith(b"\r\n\r\nvia mx\r\n")


def test_bdat_chunking(server: MailwardServer) -> None:
    marker = uuid.uuid4().hex
    text = body_for(marker)
    # The first chunk ends between CR and LF; the line structure must survive the cut.
    cut = text.index(b"\r\n", 40) + 1
    binary = bytes(range(256)) * 4 + b"bare\nLF and bare\rCR kept as they are\x00"
    with Peer(server.submissions, ca=server.ca, implicit_tls=True) as peer:
        ehlo = peer.ehlo().lines
        assert "CHUNKING" in ehlo and "BINARYMIME" in ehlo
        assert peer.login(USER, PASSWORD).code == 235
        assert peer.cmd(f"MAIL FROM:<{USER}>").code == 250
        assert peer.cmd("RCPT TO:<bob@example.org>").code == 250
        peer.send(f"BDAT {cut}\r\n".encode() + text[:cut])
        r = peer.reply()
        assert r.code == 250 and "octets received" in r.text, r
        peer.send(f"BDAT {len(text) - cut} LAST\r\n".encode() + text[cut:])
        r = peer.reply()
        assert r.code == 250 and "queued as" in r.text, r
        # BODY=BINARYMIME: octets are taken as sent, NUL and bare line ends included (RFC 3030).
        assert peer.cmd(f"MAIL FROM:<{USER}> BODY=BINARYMIME").code == 250
        assert peer.cmd("RCPT TO:<carol@example.net>").code == 250
        assert peer.cmd("DATA").code == 503, "DATA is not allowed for BINARYMIME"
        peer.send(f"BDAT {len(binary)} LAST\r\n".encode() + binary)
        assert peer.reply().code == 250
        # BDAT 0 LAST ends a message whose chunks were all sent before.
        assert peer.cmd(f"MAIL FROM:<{USER}>").code == 250
        assert peer.cmd("RCPT TO:<erin@example.org>").code == 250
        peer.send(b"BDAT 15\r\nSubject: zero\r\n")
        assert peer.reply().code == 250
        assert peer.cmd("BDAT 0 LAST").code == 250
        assert peer.cmd("QUIT").code == 221

    assert server.stop() == 0
    stored = {m.recipients[0].recipient.address: (m, b) for m, b in server.messages()}
    assert len(stored) == 3
    msg, body = stored["bob@example.org"]
    assert body.endswith(text) and msg.envelope.body_type == "7BIT"
    msg, body = stored["carol@example.net"]
    assert msg.envelope.body_type == "BINARYMIME"
    assert body.endswith(binary)
    assert stored["erin@example.org"][1].endswith(b"\r\nSubject: zero\r\n")


def test_large_message_over_tls_and_plaintext(server: MailwardServer) -> None:
    """Several MiB pass the stream's flow control (reading pauses above 256 KiB) unharmed."""
    line = b"0123456789" * 9 + b"\r\n"
    big = b"Subject: big\r\n\r\n" + b"".join(b"%07d " % i + line for i in range(60_000))  # ~6 MiB
    with smtplib.SMTP_SSL("localhost", server.submissions, context=verifying_context(server.ca),
                          timeout=30) as smtp:
        smtp.login(USER, PASSWORD)
        assert smtp.sendmail(USER, ["bob@example.org"], big) == {}
    with smtplib.SMTP("localhost", server.mx, timeout=30) as smtp:
        assert smtp.sendmail("x@foreign.test", ["postmaster@example.test"], big) == {}
    assert server.stop() == 0
    stored = server.messages()
    assert len(stored) == 2
    for msg, body in stored:
        assert body.endswith(big) and msg.size == len(body)
