"""Malformed and oversized input against a running mailward: each probe must get the reply RFC 5321,
3030 or 4954 prescribes (or a closed connection), a good client must still be served, and the
server's memory must stay bounded however much garbage arrives.

Figures: each class reports how many probes were sent and how many were answered as required; the
memory figure is the server's RSS (from /proc) before and after everything here.
"""

from __future__ import annotations

import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from hostile import RecordProperty, Tally, good_client_delivers, open_session, rss_kib
from mailward_server import KINDS, MailwardServer
from smtp_peer import Peer, Reply

MAX_SIZE = 100_000
LINE_LONG = (500, "5.5.2")
SYNTAX = (501, "5.5.4")


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailwardServer]:
    """One server for the whole module: what one probe does to it, the next must not notice."""
    srv = MailwardServer(tmp_path_factory.mktemp("hostile"),
                         extra_toml='[local]\ncatch_all = "alice"\n',
                         listener_toml=dict.fromkeys(KINDS, f"max_message_size = {MAX_SIZE}\n"
                                                           "handshake_timeout = 3"),
                         log_level="info")
    srv.write_config()
    srv.start()
    yield srv
    assert srv.stop() == 0
    assert "Traceback" not in srv.log(), srv.log()


@pytest.fixture(scope="module")
def memory(hostile_server: MailwardServer) -> Iterator[dict[str, int]]:
    """RSS before the first probe (after one warm-up message), and its peak while they run,
    sampled every 20 ms."""
    assert good_client_delivers(hostile_server, "warm-up")
    figures = {"before": rss_kib(hostile_server.pid), "peak": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            try:
                figures["peak"] = max(figures["peak"], rss_kib(hostile_server.pid))
            except (OSError, AssertionError):  # the server is stopping
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    yield figures
    stop.set()
    sampler.join(5)


def reply_or_closed(peer: Peer) -> Reply | None:
    try:
        return peer.reply()
    except (ConnectionError, ssl.SSLError, TimeoutError):
        return None


def probe(tally: Tally, server: MailwardServer, kind: str, what: str, data: bytes,
          expected: Callable[[Reply | None], bool], *, mail: bool = False, setup: bytes = b"",
          skip: int = 0) -> None:
    """Send `data` on a fresh session (with an open transaction if `mail`), check the reply (after
    `skip` others), then that the session still works (NOOP) or was closed with 421."""
    try:
        with open_session(server, kind) as peer:
            if mail:
                sender = "x@foreign.test" if kind == "mx" else "alice@example.test"
                assert peer.cmd(f"MAIL FROM:<{sender}>").code == 250
                assert peer.cmd("RCPT TO:<victim@example.test>").code == 250
            if setup:
                peer.send(setup)
                first = peer.reply()
                assert first.code in (334, 354), first
            peer.send(data)
            for _ in range(skip):
                reply_or_closed(peer)
            r = reply_or_closed(peer)
            ok = expected(r)
            after = None if r is None or r.code == 421 else reply_or_closed_noop(peer)
            ok = ok and (r is None or r.code == 421 or after == 250)
            tally.check(ok, f"{kind} {what}: {r} then NOOP {after}")
    except (OSError, AssertionError) as exc:
        tally.check(False, f"{kind} {what}: {exc!r}")


def reply_or_closed_noop(peer: Peer) -> int | None:
    try:
        return peer.cmd("NOOP").code
    except (ConnectionError, ssl.SSLError, TimeoutError):
        return None


def is_(code: int, enhanced: str) -> Callable[[Reply | None], bool]:
    return lambda r: r is not None and r.code == code and r.first.startswith(enhanced + " ")


def garbage_probe(tally: Tally, server: MailwardServer, kind: str, what: str, blob: bytes) -> None:
    """Garbage holds any number of "lines": every one must be refused (5xx) until our NOOP is
    answered, or the server ends the session with 421 (too many errors) or just closes."""
    try:
        with open_session(server, kind) as peer:
            try:
                peer.send(blob + b"\r\nNOOP\r\n")
            except OSError:
                # The server ended the session (421 after too many errors) while the garbage was
                # still being written: a closed connection is an allowed answer.
                tally.check(True, f"{kind} {what}")
                return
            seen: list[str] = []
            for _ in range(blob.count(b"\n") + 3):
                r = reply_or_closed(peer)
                seen.append(str(r)[:40])
                if r is None or r.code == 421 or (r.code, r.first) == (250, "2.0.0 Ok"):
                    ok = r is None or r.code == 250 or reply_or_closed(peer) is None
                    break
                if not 500 <= r.code < 600:
                    ok = False
                    break
            else:
                ok = False
            tally.check(ok, f"{kind} {what}: {seen[-3:]}")
    except (OSError, AssertionError) as exc:
        tally.check(False, f"{kind} {what}: {exc!r}")


def finish(tally: Tally, server: MailwardServer, record_property: RecordProperty) -> None:
    tally.check(good_client_delivers(server), "a good client after the probes was not served")
    tally.record(record_property)


# --- the probes --------------------------------------------------------------------------------------

def test_over_long_lines(hostile_server: MailwardServer, memory: dict[str, int],
                         record_property: RecordProperty) -> None:
    tally = Tally("over-long lines")
    for kind in KINDS:
        for n in (513, 5_000, 100_000, 2_000_000):
            probe(tally, hostile_server, kind, f"NOOP of {n} octets", b"NOOP " + b"x" * n + b"\r\n",
                  is_(*LINE_LONG))
        for n in (999, 100_000):
            # Inside DATA the limit is 998 octets of text (RFC 5321 §4.5.3.1.6), answered at the end.
            probe(tally, hostile_server, kind, f"DATA line of {n}", b"y" * n + b"\r\n.\r\n",
                  is_(*LINE_LONG), mail=True, setup=b"DATA\r\n")
    with open_session(hostile_server, "submissions") as peer:
        # Only 998-octet lines are fine, as the other side of the limit.
        r = peer.send_message("alice@example.test", ["bob@example.org"], b"z" * 998 + b"\r\n")
        tally.check(r.code == 250, f"a 998-octet line refused: {r}")
    finish(tally, hostile_server, record_property)


def test_binary_garbage_and_nul_bytes(hostile_server: MailwardServer, memory: dict[str, int],
                                      record_property: RecordProperty) -> None:
    rng = random.Random(8)
    garbage = Tally("binary garbage")
    for kind in KINDS:
        for i in range(6):
            blob = bytes(rng.randrange(256) for _ in range(rng.choice((10, 300, 4000, 70_000))))
            garbage_probe(garbage, hostile_server, kind, f"garbage #{i} ({len(blob)} octets)", blob)
    finish(garbage, hostile_server, record_property)

    nul = Tally("NUL bytes")
    for kind in KINDS:
        for what, line in [("NOOP", b"NOOP\x00\r\n"), ("in a verb", b"NO\x00OP\r\n"),
                           ("EHLO", b"EHLO a\x00b.example\r\n"),
                           ("RSET", b"\x00RSET\r\n"), ("alone", b"\x00\r\n")]:
            probe(nul, hostile_server, kind, f"NUL {what}", line, is_(500, "5.5.2"))
        probe(nul, hostile_server, kind, "NUL in MAIL", b"MAIL FROM:<a\x00b@example.test>\r\n",
              is_(500, "5.5.2"))
        probe(nul, hostile_server, kind, "NUL in RCPT", b"RCPT TO:<vic\x00tim@example.test>\r\n",
              is_(500, "5.5.2"), mail=True)
    finish(nul, hostile_server, record_property)


def test_invalid_utf8(hostile_server: MailwardServer, memory: dict[str, int],
                      record_property: RecordProperty) -> None:
    tally = Tally("invalid UTF-8")
    bad = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf"]
    for kind in KINDS:
        for i, seq in enumerate(bad):
            for utf8 in (False, True):
                param = b" SMTPUTF8" if utf8 else b""
                # A reverse-path that is not UTF-8 is a bad argument of a known command.
                probe(tally, hostile_server, kind, f"MAIL #{i} smtputf8={utf8}",
                      b"MAIL FROM:<a" + seq + b"@example.test>" + param + b"\r\n", is_(*SYNTAX))
            probe(tally, hostile_server, kind, f"RCPT #{i}",
                  b"RCPT TO:<vic" + seq + b"tim@example.test>\r\n", is_(*SYNTAX), mail=True)
            probe(tally, hostile_server, kind, f"verb #{i}", b"NO" + seq + b"OP\r\n", is_(500, "5.5.2"))
    # In message content the octets are the message's business: stored as sent, never mangled.
    for utf8 in (False, True):
        with open_session(hostile_server, "submissions") as peer:
            body = b"Subject: caf\xe9 \xff\r\n\r\n\xc3\x28 body\r\n"
            assert peer.cmd("MAIL FROM:<alice@example.test>" + (" SMTPUTF8" if utf8 else "")).code == 250
            assert peer.cmd("RCPT TO:<bob@example.org>").code == 250
            assert peer.cmd("DATA").code == 354
            peer.send(body + b".\r\n")
            r = peer.reply()
            tally.check(r.code == 250, f"invalid UTF-8 in content, smtputf8={utf8}: {r}")
    finish(tally, hostile_server, record_property)


def test_huge_ehlo(hostile_server: MailwardServer, memory: dict[str, int],
                   record_property: RecordProperty) -> None:
    tally = Tally("huge EHLO arguments")
    for kind in KINDS:
        for n in (600, 65_536, 1_000_000):
            probe(tally, hostile_server, kind, f"EHLO of {n}", b"EHLO " + b"h" * n + b"\r\n", is_(*LINE_LONG))
        # Longest that fits the line: taken as a name (RFC 5321 §4.1.4 says not to refuse on it),
        # and the trace header must not carry it as a domain.
        probe(tally, hostile_server, kind, "EHLO of 500", b"EHLO " + b"h" * 500 + b"\r\n",
              lambda r: r is not None and r.code == 250)
        probe(tally, hostile_server, kind, "EHLO with spaces", b"EHLO a b c\r\n", is_(*SYNTAX))
    finish(tally, hostile_server, record_property)


def test_ten_thousand_recipients(hostile_server: MailwardServer, memory: dict[str, int],
                                 record_property: RecordProperty) -> None:
    """10,000 RCPT pipelined: the first 1000 (the listener's limit) accepted, the rest 452 4.5.3
    (RFC 5321 §4.5.3.1.10), and a good client served meanwhile."""
    tally = Tally("10,000 RCPT commands")
    with open_session(hostile_server, "mx") as peer:
        assert peer.cmd("MAIL FROM:<many@foreign.test>").code == 250
        during: list[bool] = []
        good = threading.Thread(target=lambda: during.append(good_client_delivers(hostile_server, "during")))
        batch = 500
        for start in range(0, 10_000, batch):
            peer.send(b"".join(b"RCPT TO:<r%d@example.test>\r\n" % i for i in range(start, start + batch)))
            if start == 5_000:
                good.start()
            for i in range(start, start + batch):
                r = peer.reply()
                want = (250, "2.1.5") if i < 1000 else (452, "4.5.3")
                tally.check((r.code, r.first[:5]) == want, f"RCPT {i}: {r}")
        good.join(30)
        tally.check(during == [True], "a good client during the flood was not served")
        assert peer.cmd("DATA").code == 354
        peer.send(b"Subject: many\r\n\r\nmany\r\n.\r\n")
        r = peer.reply()
        tally.check(r.code == 250, f"the message to 1000 recipients: {r}")
    finish(tally, hostile_server, record_property)


def test_data_past_size(hostile_server: MailwardServer, memory: dict[str, int],
                        record_property: RecordProperty) -> None:
    tally = Tally("DATA/BDAT past SIZE")
    big = (b"w" * 70 + b"\r\n") * (MAX_SIZE // 72 + 10)
    for kind in KINDS:
        probe(tally, hostile_server, kind, "SIZE= too big", b"MAIL FROM:<alice@example.test> SIZE=%d\r\n"
              % (MAX_SIZE + 1), is_(552, "5.3.4"))
        probe(tally, hostile_server, kind, "SIZE= absurd", b"MAIL FROM:<alice@example.test> SIZE=%s\r\n"
              % (b"9" * 40), lambda r: r is not None and r.code in (501, 552, 555))
        probe(tally, hostile_server, kind, "DATA past SIZE", big + b".\r\n", is_(552, "5.3.4"),
              mail=True, setup=b"DATA\r\n")
        probe(tally, hostile_server, kind, "BDAT past SIZE", b"BDAT %d LAST\r\n" % len(big) + big,
              is_(552, "5.3.4"), mail=True)
        # The first chunk fits (250, skipped); the second crosses the limit.
        probe(tally, hostile_server, kind, "BDAT chunks past SIZE",
              (b"BDAT 60000\r\n" + b"v" * 60000) + (b"BDAT 60000 LAST\r\n" + b"v" * 60000),
              is_(552, "5.3.4"), mail=True, skip=1)
    finish(tally, hostile_server, record_property)


def test_bdat_sizes_that_lie(hostile_server: MailwardServer, memory: dict[str, int],
                             record_property: RecordProperty) -> None:
    """RFC 3030: the count decides. Octets past it are commands, a bad count is a syntax error,
    a count the server will not store is still read (and dropped) before the 552."""
    tally = Tally("BDAT sizes that lie")
    for kind in KINDS:
        # Declares 10, sends 16: the last 6 octets are a command line, answered after the message.
        probe(tally, hostile_server, kind, "count too small", b"BDAT 10 LAST\r\n0123456789RSET\r\n",
              lambda r: r is not None and r.code == 250 and r.first.startswith("2.0.0 Ok: queued"),
              mail=True)
        for arg in (b"-1", b"1e3", b"0x10", b"9" * 16, b"", b"10 LAST extra", b"10 FIRST"):
            probe(tally, hostile_server, kind, f"BDAT {arg!r}", b"BDAT " + arg + b"\r\n", is_(*SYNTAX),
                  mail=True)
        probe(tally, hostile_server, kind, "count past SIZE", b"BDAT 300000 LAST\r\n" + b"u" * 300_000,
              is_(552, "5.3.4"), mail=True)
        # A count of nearly a petabyte: read and dropped as it comes, nothing answered meanwhile.
        with open_session(hostile_server, kind) as peer:
            sender = "x@foreign.test" if kind == "mx" else "alice@example.test"
            assert peer.cmd(f"MAIL FROM:<{sender}>").code == 250
            assert peer.cmd("RCPT TO:<victim@example.test>").code == 250
            peer.send(b"BDAT 999999999999999 LAST\r\n" + b"u" * 1_000_000)
            tally.check(peer.pending(0.5) is None, f"{kind}: a reply before the chunk was complete")
        probe(tally, hostile_server, kind, "BDAT without MAIL", b"BDAT 5 LAST\r\nabcde",
              is_(503, "5.5.1"))
    finish(tally, hostile_server, record_property)


def test_auth_blobs(hostile_server: MailwardServer, memory: dict[str, int],
                    record_property: RecordProperty) -> None:
    tally = Tally("AUTH blobs")
    for kind in ("submission", "submissions"):
        def fresh(kind: str = kind) -> Peer:
            peer = Peer(hostile_server.port(kind), ca=hostile_server.ca, implicit_tls=kind == "submissions")
            peer.ehlo()
            if kind == "submission":
                peer.starttls()
                peer.ehlo()
            return peer

        cases: list[tuple[str, bytes, bytes, tuple[int, str]]] = [
            ("initial not base64", b"AUTH PLAIN !!notbase64!!\r\n", b"", (501, "5.5.2")),
            ("initial with padding inside", b"AUTH PLAIN AG=FsaWNl\r\n", b"", (501, "5.5.2")),
            ("initial over 512 octets", b"AUTH PLAIN " + b"A" * 600 + b"\r\n", b"", LINE_LONG),
            ("initial gigantic", b"AUTH PLAIN " + b"A" * 20_000 + b"\r\n", b"", LINE_LONG),
            ("response not base64", b"AUTH PLAIN\r\n", b"%%%\r\n", (501, "5.5.2")),
            ("response binary", b"AUTH LOGIN\r\n", b"\xff\xfe\x00\r\n", (501, "5.5.2")),
            ("response gigantic", b"AUTH PLAIN\r\n", b"QUFB" * 5_000 + b"\r\n", (500, "5.5.6")),
            ("response huge, no CRLF", b"AUTH PLAIN\r\n", b"QUFB" * 1_000_000 + b"\r\n", (500, "5.5.6")),
            ("mechanism not UTF-8", b"AUTH X-\xff\r\n", b"", SYNTAX),
            ("unknown mechanism", b"AUTH CRAM-MD5\r\n", b"", (504, "5.5.4")),
            ("mechanism too long", b"AUTH " + b"M" * 100 + b"\r\n", b"", (504, "5.5.4")),
        ]
        for what, command, response, want in cases:
            try:
                with fresh() as peer:
                    peer.send(command)
                    r = reply_or_closed(peer)
                    if response:
                        assert r is not None and r.code == 334, r
                        peer.send(response)
                        r = reply_or_closed(peer)
                    ok = r is not None and (r.code, r.first[:5]) == want
                    noop = reply_or_closed_noop(peer)
                    tally.check(ok and noop == 250, f"{kind} {what}: {r}, then NOOP {noop}")
            except (OSError, AssertionError) as exc:
                tally.check(False, f"{kind} {what}: {exc!r}")
    finish(tally, hostile_server, record_property)


def test_tls_client_hello_garbage(hostile_server: MailwardServer, memory: dict[str, int],
                                  record_property: RecordProperty) -> None:
    """Whatever arrives instead of a ClientHello on 465 (and after STARTTLS on 587): the server
    closes without answering in SMTP, within its handshake timeout, and keeps serving."""
    tally = Tally("TLS ClientHello garbage")
    rng = random.Random(465)
    hellos = {
        "random": bytes(rng.randrange(256) for _ in range(600)),
        "HTTP": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        "SSLv2 hello": bytes.fromhex("802b0103010012000000100000030000060000" + "00" * 30),
        "record too long": b"\x16\x03\x01\xff\xff" + b"\x01" * 1000,
        "handshake length lies": b"\x16\x03\x01\x00\x30\x01\xff\xff\xff" + b"\x03\x03" + b"\x00" * 43,
        "truncated hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 20,
        "alert": b"\x15\x03\x03\x00\x02\x02\x28",
        "zeros": b"\x00" * 5000,
        "change cipher spec first": b"\x14\x03\x03\x00\x01\x01",
    }
    def send(kind: str, data: bytes) -> tuple[bytes, float] | str:
        start = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", hostile_server.port(kind)), timeout=10) as s:
                if kind == "submission":
                    s.sendall(b"EHLO x\r\n")
                    # Greeting and EHLO reply, then STARTTLS's 220: read up to it exactly.
                    seen = b""
                    while b"250 " not in seen:
                        seen += s.recv(10000)
                    s.sendall(b"STARTTLS\r\n")
                    assert s.recv(1000).startswith(b"220 ")
                s.sendall(data)
                got = b""
                while chunk := s.recv(65536):
                    got += chunk
        except (ConnectionResetError, BrokenPipeError):
            got = b""
        except (OSError, AssertionError) as exc:
            return repr(exc)
        return got, time.monotonic() - start

    # All at once: the slow ones wait out the handshake timeout side by side.
    jobs = {(kind, what): (kind, data) for what, data in hellos.items()
            for kind in ("submissions", "submission")}
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {key: pool.submit(send, *args) for key, args in jobs.items()}
        during = good_client_delivers(hostile_server, "during TLS garbage")
        outcomes = {key: f.result() for key, f in futures.items()}
    for (kind, what), outcome in outcomes.items():
        if isinstance(outcome, str):
            tally.check(False, f"{kind} {what}: {outcome}")
            continue
        got, took = outcome
        # A TLS alert record is a fine answer; SMTP text is not.
        ok = (got == b"" or got[:1] == b"\x15") and took < 8  # handshake_timeout is 3 s
        tally.check(ok, f"{kind} {what}: {got[:60]!r} after {took:.1f}s")
    tally.check(during, "a good client during the garbage was not served")
    finish(tally, hostile_server, record_property)


def test_memory_stays_bounded(hostile_server: MailwardServer, memory: dict[str, int],
                              record_property: RecordProperty) -> None:
    """Runs last in this module: the RSS growth over every probe above."""
    assert good_client_delivers(hostile_server, "last")
    after = rss_kib(hostile_server.pid)
    growth = after - memory["before"]
    peak = max(memory["peak"], after)
    record_property("hostile_note", f"server RSS over the malformed-input probes: {memory['before']} kB "
                                    f"-> {after} kB ({growth:+d} kB), peak {peak} kB")
    # Several MB of garbage went through; none of it may stay, and it may never be held whole.
    assert growth < 40_000, f"RSS grew by {growth} kB"
    assert peak - memory["before"] < 60_000, f"RSS peaked {peak - memory['before']} kB above the start"
