"""Shared pieces of the hostile-input suite (test_hostile_*.py).

`Tally` counts what a test tried and how much of it the server handled correctly; the counts go to
the test report (`record_property("hostile", ...)`) and tests/conftest.py prints them as a table
at the end of the run. `RawSink` is a loopback SMTP peer that records the exact bytes a client
sends, and can misbehave on purpose (inject replies after its greeting or after STARTTLS).
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mailward_server import PASSWORD, USER, MailwardServer
from smtp_peer import Peer

from mailward.tls import make_demo_certificate

RecordProperty = Callable[[str, object], None]


@dataclass
class Tally:
    """N tried, N handled for one class of hostile input; failures keep what went wrong."""

    name: str
    tried: int = 0
    handled: int = 0
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> bool:
        self.tried += 1
        if ok:
            self.handled += 1
        else:
            self.failures.append(what)
        return ok

    def record(self, record_property: RecordProperty) -> None:
        """Report the figures, then fail the test if anything was not handled."""
        record_property("hostile", (self.name, self.tried, self.handled))
        assert self.tried > 0, f"{self.name}: nothing was tried"
        assert not self.failures, f"{self.name}: {len(self.failures)} not handled:\n" + "\n".join(
            self.failures[:30])


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc (kB as the kernel reports it)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def good_client_delivers(server: MailwardServer, subject: str = "good client") -> bool:
    """A well-behaved user submits one message on 465; True if it was queued."""
    body = f"From: {USER}\r\nSubject: {subject}\r\n\r\nfine\r\n".encode()
    try:
        with Peer(server.submissions, ca=server.ca, implicit_tls=True, timeout=15) as peer:
            peer.ehlo()
            if peer.login(USER, PASSWORD).code != 235:
                return False
            return peer.send_message(USER, ["bob@example.org"], body).code == 250
    except (OSError, AssertionError):
        return False


def open_session(server: MailwardServer, kind: str) -> Peer:
    """A session ready for MAIL: EHLO, STARTTLS and AUTH wherever the listener needs them."""
    peer = Peer(server.port(kind), ca=server.ca, implicit_tls=kind == "submissions")
    peer.ehlo()
    if kind == "submission":
        peer.starttls()
        peer.ehlo()
    if kind != "mx":
        r = peer.login(USER, PASSWORD)
        assert r.code == 235, r
    return peer


# --- a recording, optionally hostile, SMTP peer --------------------------------------------------------

@dataclass
class RawMessage:
    mail: str
    rcpts: list[str]
    raw: bytes  # DATA content exactly as it came over the wire, up to and including CRLF.CRLF
    tls: bool


class RawSink:
    """A minimal SMTP server on 127.0.0.1 for delivery tests: one thread per connection.

    It answers PIPELINING-style like a real server but keeps the DATA content byte for byte, so
    tests can look for bare CR or LF on the wire. `greeting_suffix` and `starttls_suffix` are
    appended, in the same write, to the greeting and to the 220 for STARTTLS, and `ehlo_suffix`
    to the first EHLO reply: replies the client never asked for (response injection).
    """

    def __init__(self, root: Path, *, tls: bool = False, greeting_suffix: bytes = b"",
                 starttls_suffix: bytes = b"", ehlo_suffix: bytes = b"") -> None:
        self.greeting_suffix = greeting_suffix
        self.starttls_suffix = starttls_suffix
        self.ehlo_suffix = ehlo_suffix
        self.messages: list[RawMessage] = []
        self.commands: list[str] = []
        self._context: ssl.SSLContext | None = None
        if tls:
            pair = make_demo_certificate(root / "sink-tls", "localhost")
            self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._context.load_cert_chain(pair.cert, pair.key)
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = int(self._sock.getsockname()[1])
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._accept = threading.Thread(target=self._accept_loop, daemon=True)

    def __enter__(self) -> RawSink:
        self._accept.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._accept.join(5)
        for t in self._threads:
            t.join(5)
        self._sock.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        wire = _Wire(conn, self._stop)
        with contextlib.suppress(OSError), conn:
            conn.settimeout(0.2)
            try:
                self._session(wire)
            finally:
                wire.sock.close()  # the TLS socket, if STARTTLS replaced the plain one

    def _session(self, wire: _Wire) -> None:
        wire.send(b"220 sink.test ESMTP\r\n" + self.greeting_suffix)
        tls, mail, rcpts = False, "", []
        while True:
            line = wire.line()
            if line is None:
                return
            verb = line[:4].upper()
            with self._lock:
                self.commands.append(line.decode("utf-8", "replace"))
            if verb in (b"EHLO", b"HELO"):
                caps = [b"sink.test", b"PIPELINING", b"8BITMIME", b"SMTPUTF8", b"SIZE 10000000"]
                if self._context is not None and not tls:
                    caps.append(b"STARTTLS")
                wire.send(b"".join(b"250%s%s\r\n" % (b"-" if i < len(caps) - 1 else b" ", c)
                                   for i, c in enumerate(caps)) + (b"" if tls else self.ehlo_suffix))
            elif verb == b"STAR" and self._context is not None and not tls:
                wire.send(b"220 2.0.0 Ready to start TLS\r\n" + self.starttls_suffix)
                wire.start_tls(self._context)
                tls = True
            elif verb == b"MAIL":
                mail, rcpts = line.decode("utf-8", "replace"), []
                wire.send(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                rcpts.append(line.decode("utf-8", "replace"))
                wire.send(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                wire.send(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                raw = wire.until(b"\r\n.\r\n")
                if raw is None:
                    return
                with self._lock:
                    self.messages.append(RawMessage(mail, rcpts, raw, tls))
                wire.send(b"250 2.0.0 Ok: real-%d\r\n" % len(self.messages))
            elif verb == b"QUIT":
                wire.send(b"221 2.0.0 Bye\r\n")
                return
            else:  # RSET, NOOP and the rest
                wire.send(b"250 2.0.0 Ok\r\n")


class _Wire:
    """Line and delimiter reads over a socket that may switch to TLS mid-stream."""

    def __init__(self, sock: socket.socket, stop: threading.Event) -> None:
        self.sock = sock
        self.buf = b""
        self.stop = stop

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def start_tls(self, context: ssl.SSLContext) -> None:
        self.buf = b""  # a server must not act on plaintext pipelined behind STARTTLS either
        self.sock.settimeout(10)
        self.sock = context.wrap_socket(self.sock, server_side=True)
        self.sock.settimeout(0.2)

    def until(self, delimiter: bytes) -> bytes | None:
        deadline = time.monotonic() + 30
        while delimiter not in self.buf:
            if self.stop.is_set() or time.monotonic() > deadline:
                return None
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                return None
            self.buf += chunk
        head, _, self.buf = self.buf.partition(delimiter)
        return head + delimiter

    def line(self) -> bytes | None:
        got = self.until(b"\r\n")
        return None if got is None else got[:-2]


BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def has_bare_line_ending(data: bytes) -> bool:
    return BARE.search(data) is not None
