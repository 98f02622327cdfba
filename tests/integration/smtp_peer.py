"""A raw SMTP peer over a real socket: says exactly the bytes a test wants, reads exact replies.

Client libraries normalise what they send (pipelining, STARTTLS order, line endings), so the
dialogues that probe the server's edges are written by hand with this.
"""

from __future__ import annotations

import base64
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

CRLF = b"\r\n"
TIMEOUT = 10.0


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]  # the text after "250-" / "250 " of each line

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def first(self) -> str:
        """Enhanced code and text of the first line, e.g. "5.7.0 Must issue a STARTTLS command first"."""
        return self.lines[0] if self.lines else ""

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


def verifying_context(ca: Path) -> ssl.SSLContext:
    """What an RFC 8314 client must use: verify the chain and the name, TLS 1.2 at least."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def plain_auth(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


class Peer:
    """One client connection; every blocking call is bounded by `timeout`."""

    def __init__(self, port: int, *, ca: Path | None = None, implicit_tls: bool = False,
                 source: str | None = None, timeout: float = TIMEOUT, greeting: bool = True,
                 server_hostname: str = "localhost") -> None:
        self.ca = ca
        self.server_hostname = server_hostname
        self.timeout = timeout
        self._buf = b""
        self.sock: socket.socket = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0) if source else None)
        try:
            if implicit_tls:
                self.wrap_tls()
            if greeting:
                self.greeting = self.reply()
        except BaseException:
            self.sock.close()
            raise

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    @property
    def tls(self) -> ssl.SSLSocket | None:
        return self.sock if isinstance(self.sock, ssl.SSLSocket) else None

    def wrap_tls(self, context: ssl.SSLContext | None = None) -> ssl.SSLSocket:
        """Handshake over the same TCP connection; buffered plaintext must not exist by now."""
        assert not self._buf, f"plaintext received before the TLS handshake: {self._buf!r}"
        if context is None:
            assert self.ca is not None
            context = verifying_context(self.ca)
        self.sock = context.wrap_socket(self.sock, server_hostname=self.server_hostname)
        return self.sock

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def _line(self) -> bytes:
        while CRLF not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; unread: {self._buf!r}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(CRLF)
        return line

    def reply(self) -> Reply:
        lines: list[str] = []
        while True:
            line = self._line().decode("utf-8", "replace")
            code, sep, text = line[:3], line[3:4], line[4:]
            assert code.isdigit() and sep in ("-", " ", ""), f"not an SMTP reply line: {line!r}"
            lines.append(text)
            if sep != "-":
                return Reply(int(code), tuple(lines))

    def cmd(self, line: str) -> Reply:
        self.send(line.encode() + CRLF)
        return self.reply()

    def ehlo(self, name: str = "client.example") -> Reply:
        r = self.cmd(f"EHLO {name}")
        assert r.code == 250, r
        return r

    def starttls(self) -> ssl.SSLSocket:
        r = self.cmd("STARTTLS")
        assert r.code == 220, r
        return self.wrap_tls()

    def login(self, user: str, password: str) -> Reply:
        return self.cmd(f"AUTH PLAIN {plain_auth(user, password)}")

    def pending(self, wait: float) -> bytes | None:
        """Bytes that arrive within `wait` seconds: None if none did, b"" if the peer closed."""
        if self._buf:
            data, self._buf = self._buf, b""
            return data
        self.sock.settimeout(wait)
        try:
            return self.sock.recv(65536)
        except TimeoutError:
            return None
        finally:
            self.sock.settimeout(self.timeout)

    def wait_closed(self, timeout: float) -> tuple[bytes, float]:
        """Read until the server closes; returns what arrived and when the close came."""
        start = time.monotonic()
        data = self._buf
        self._buf = b""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (ConnectionResetError, ssl.SSLError):
            pass
        finally:
            self.sock.settimeout(self.timeout)
        return data, time.monotonic() - start

    def send_message(self, sender: str, recipients: list[str], body: bytes) -> Reply:
        """MAIL/RCPT/DATA one command at a time; returns the reply to the final dot."""
        r = self.cmd(f"MAIL FROM:<{sender}>")
        assert r.code == 250, r
        for rcpt in recipients:
            r = self.cmd(f"RCPT TO:<{rcpt}>")
            assert r.code == 250, r
        r = self.cmd("DATA")
        assert r.code == 354, r
        self.send(dot_stuff(body) + b".\r\n")
        return self.reply()


def dot_stuff(body: bytes) -> bytes:
    if not body.endswith(CRLF):
        body += CRLF
    lines = body.split(CRLF)
    return CRLF.join(b"." + ln if ln.startswith(b".") else ln for ln in lines)
