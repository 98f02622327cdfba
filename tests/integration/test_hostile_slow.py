"""Slow clients (slowloris): a byte every half second, or nothing at all, at every stage of a session.

The listeners run with 2-second timeouts. A command line, a line of message content, a BDAT chunk
or a TLS handshake that is not complete within its timeout ends the session (421 4.4.2 where SMTP
is spoken), however steadily the bytes trickle in. Meanwhile the slow clients hold their
connection slots and nothing more: the per-address limit stops a further one, everyone else is
served, and the memory they cost is measured.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from hostile import RecordProperty, Tally, good_client_delivers, rss_kib
from mailward_server import KINDS, PASSWORD, USER, MailwardServer
from smtp_peer import Peer, Reply

from conftest import MakeServer

TIMEOUT = 2.0
SETTINGS = (f"command_timeout = {TIMEOUT}\ndata_timeout = {TIMEOUT}\nhandshake_timeout = {TIMEOUT}\n"
            "max_connections_per_ip = 3")
DRIP = 0.5  # seconds between bytes
CLIENT_HELLO_START = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)) * 4


def drip(sock: socket.socket | ssl.SSLSocket, data: bytes, limit: float = 10.0) -> tuple[float, bytes]:
    """Send `data` one byte per DRIP until the server closes; seconds until then and what came back."""
    start = time.monotonic()
    got = b""
    sock.settimeout(DRIP)
    for i in range(int(limit / DRIP)):
        try:
            sock.sendall(data[i % len(data):][:1])
        except OSError:
            break
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except (OSError, ssl.SSLError):
            break
        if not chunk:
            break
        got += chunk
    return time.monotonic() - start, got


def session(server: MailwardServer, kind: str, source: str) -> Peer:
    peer = Peer(server.port(kind), ca=server.ca, implicit_tls=kind == "submissions", source=source)
    peer.ehlo()
    if kind == "submission":
        peer.starttls()
        peer.ehlo()
    return peer


def authed(server: MailwardServer, kind: str, source: str) -> Peer:
    peer = session(server, kind, source)
    assert peer.login(USER, PASSWORD).code == 235
    return peer


def command_drip(kind: str) -> Callable[[MailwardServer, str], tuple[float, bytes]]:
    def run(server: MailwardServer, source: str) -> tuple[float, bytes]:
        with session(server, kind, source) as peer:
            return drip(peer.sock, b"NOOP and never the end of the line ")
    return run


def data_drip(server: MailwardServer, source: str) -> tuple[float, bytes]:
    with authed(server, "submissions", source) as peer:
        assert peer.cmd(f"MAIL FROM:<{USER}>").code == 250
        assert peer.cmd("RCPT TO:<bob@example.org>").code == 250
        assert peer.cmd("DATA").code == 354
        return drip(peer.sock, b"Subject: one byte at a time, no line ever complete ")


def data_lines_too_slow(server: MailwardServer, source: str) -> tuple[float, bytes]:
    """Each content line takes 2.5 s to arrive: every line is over the limit."""
    with authed(server, "submission", source) as peer:
        assert peer.cmd(f"MAIL FROM:<{USER}>").code == 250
        assert peer.cmd("RCPT TO:<bob@example.org>").code == 250
        assert peer.cmd("DATA").code == 354
        return drip(peer.sock, b"abc\r\n")


def data_stall(server: MailwardServer, source: str) -> tuple[float, bytes]:
    with authed(server, "submissions", source) as peer:
        assert peer.cmd(f"MAIL FROM:<{USER}>").code == 250
        assert peer.cmd("RCPT TO:<bob@example.org>").code == 250
        assert peer.cmd("DATA").code == 354
        peer.send(b"Subject: never finished\r\n\r\nhalf a li")
        data, took = peer.wait_closed(10)
        return took, data


def bdat_drip(server: MailwardServer, source: str) -> tuple[float, bytes]:
    with session(server, "mx", source) as peer:
        assert peer.cmd("MAIL FROM:<x@foreign.test>").code == 250
        assert peer.cmd("RCPT TO:<postmaster@example.test>").code == 250
        peer.send(b"BDAT 1000 LAST\r\n")
        return drip(peer.sock, b"x")


def hello_drip(kind: str) -> Callable[[MailwardServer, str], tuple[float, bytes]]:
    def run(server: MailwardServer, source: str) -> tuple[float, bytes]:
        with socket.create_connection(("127.0.0.1", server.port(kind)), timeout=10,
                                      source_address=(source, 0)) as s:
            if kind == "submission":
                s.sendall(b"EHLO x\r\n")
                seen = b""
                while b"250 " not in seen:
                    seen += s.recv(4096)
                s.sendall(b"STARTTLS\r\n")
                assert s.recv(4096).startswith(b"220 ")
            return drip(s, CLIENT_HELLO_START)
    return run


SLOW: dict[str, tuple[Callable[[MailwardServer, str], tuple[float, bytes]], bool]] = {
    # name: (client, whether the server still speaks SMTP to say 421)
    "command drip on 25": (command_drip("mx"), True),
    "command drip on 587 under TLS": (command_drip("submission"), True),
    "command drip on 465": (command_drip("submissions"), True),
    "DATA drip on 465": (data_drip, True),
    "DATA lines too slow on 587": (data_lines_too_slow, True),
    "DATA never finished on 465": (data_stall, True),
    "BDAT drip on 25": (bdat_drip, True),
    "ClientHello drip on 465": (hello_drip("submissions"), False),
    "ClientHello drip after STARTTLS": (hello_drip("submission"), False),
}


def test_slow_clients_are_dropped_at_their_timeouts(make_server: MakeServer,
                                                    record_property: RecordProperty) -> None:
    server = make_server(listener_toml=dict.fromkeys(KINDS, SETTINGS), log_level="info")
    tally = Tally("slow clients dropped")
    with ThreadPoolExecutor(len(SLOW)) as pool:
        futures = {name: pool.submit(client, server, f"127.0.3.{i + 1}")
                   for i, (name, (client, _)) in enumerate(SLOW.items())}
        time.sleep(0.5)
        tally.check(good_client_delivers(server, "during slow clients"), "good client during slow clients")
        for name, future in futures.items():
            try:
                took, got = future.result()
            except (OSError, AssertionError) as exc:
                tally.check(False, f"{name}: {exc!r}")
                continue
            speaks_smtp = SLOW[name][1]
            said = got.endswith(b"421 4.4.2 Timeout exceeded, closing connection\r\n") or not speaks_smtp
            tally.check(TIMEOUT - 0.6 <= took < TIMEOUT + 2.5 and said, f"{name}: dropped after {took:.1f}s "
                        f"with {got[-80:]!r}")
    assert server.stop() == 0
    assert server.messages()[0][1].find(b"during slow clients") > 0
    assert len(server.messages()) == 1, "a message cut off by a timeout was queued"
    tally.record(record_property)


def test_slow_clients_hold_only_their_slots(make_server: MakeServer,
                                            record_property: RecordProperty) -> None:
    """Slow clients from one address fill its 3 slots and no more; 60 from 60 addresses cost the
    server a bounded amount of memory each; every slot comes back when they are dropped."""
    server = make_server(listener_toml=dict.fromkeys(KINDS, SETTINGS), log_level="info")
    tally = Tally("slow clients: slots")
    assert good_client_delivers(server, "warm-up")
    before = rss_kib(server.pid)
    stop = threading.Event()
    held: list[socket.socket] = []
    try:
        for i in range(60):
            s = socket.create_connection(("127.0.0.1", server.mx), timeout=5,
                                         source_address=(f"127.0.4.{i // 3 + 1}", 0))
            held.append(s)
        for s in held:
            tally.check(s.recv(100).startswith(b"220 "), "a slow client was not greeted")
        # A fourth from an address already holding three is refused at once.
        with Peer(server.mx, source="127.0.4.1", greeting=False) as extra:
            data, _ = extra.wait_closed(5)
            tally.check(data.startswith(b"421 4.7.0"), f"a fourth connection from one address: {data!r}")
        during = rss_kib(server.pid)
        tally.check(good_client_delivers(server, "during 60 slow clients"), "good client during")
        per_connection = (during - before) / len(held)
        record_property("hostile_note", f"60 idle slow connections cost {during - before} kB of server RSS "
                                        f"({per_connection:.0f} kB each)")
        tally.check(per_connection < 512, f"{per_connection:.0f} kB per idle connection")
        # All are dropped at the command timeout, and their slots come back.
        time.sleep(TIMEOUT + 1)
        for s in held:
            s.settimeout(2)
            try:
                closed = s.recv(100).startswith(b"421 4.4.2") and s.recv(100) == b""
            except OSError:
                closed = True
            tally.check(closed, "a slow client outlived the command timeout")
        with Peer(server.mx, source="127.0.4.1") as again:
            tally.check(again.greeting.code == 220, f"slot not freed: {again.greeting}")
    finally:
        stop.set()
        for s in held:
            s.close()
    assert server.stop() == 0
    tally.record(record_property)


def test_slow_but_steady_content_is_not_a_slow_client(make_server: MakeServer,
                                                      record_property: RecordProperty) -> None:
    """A message that takes longer than data_timeout to arrive, at a steady 100 kB/s, gets its
    answer: 250 when it fits, and 552 5.3.4 (not a 421 timeout, which would make the sender retry
    for days) when it is over the size limit and its content is being read only to be dropped."""
    server = make_server(listener_toml=dict.fromkeys(KINDS, SETTINGS + "\nmax_message_size = 300000"),
                         log_level="info")
    tally = Tally("slow clients: steady content")
    line = b"s" * 78 + b"\r\n"

    def send(method: str, size: int) -> tuple[Reply, float]:
        with authed(server, "submissions", "127.0.0.1") as peer:
            assert peer.cmd(f"MAIL FROM:<{USER}>").code == 250
            assert peer.cmd("RCPT TO:<bob@example.org>").code == 250
            content = b"Subject: steady\r\n\r\n" + line * (size // len(line))
            if method == "DATA":
                assert peer.cmd("DATA").code == 354
                data = content + b".\r\n"
            else:
                data = b"BDAT %d LAST\r\n" % len(content) + content
            start = time.monotonic()
            for at in range(0, len(data), 10_000):  # 10 kB every 0.1 s
                peer.send(data[at:at + 10_000])
                time.sleep(0.1)
            return peer.reply(), time.monotonic() - start

    # The oversized ones spend over TIMEOUT after the limit, when nothing is stored any more.
    cases = {("BDAT", 280_000): (250, "2.0.0"), ("DATA", 560_000): (552, "5.3.4"),
             ("BDAT", 560_000): (552, "5.3.4")}
    with ThreadPoolExecutor(len(cases)) as pool:
        futures = {case: pool.submit(send, *case) for case in cases}
        for (method, size), future in futures.items():
            r, took = future.result()
            want = cases[(method, size)]
            tally.check((r.code, r.first[:5]) == want and took > TIMEOUT,
                        f"{method} of {size} octets over {took:.1f}s: {r}")
    assert server.stop() == 0
    tally.record(record_property)
