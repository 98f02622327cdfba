"""Load for the crash tests: message bodies that carry their id, and many concurrent submitters.

`body_for` makes a message's content from its id alone, so a test can recompute what must have
been stored or delivered. `Submitters` runs many SMTP clients on one asyncio loop in a thread of
the test process: some on 465 (implicit TLS, AUTH PLAIN), some on 25 (STARTTLS, no AUTH). Each
message has a fresh id; an id is recorded as acknowledged only once the 250 to its final dot
arrived. A client whose connection breaks (the server was killed) reconnects until told to stop,
and never resends a message: one cut off without a reply stays unacknowledged, whatever became
of it on the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field

from mailward_server import PASSWORD, USER, MailwardServer
from smtp_peer import dot_stuff, plain_auth, verifying_context

BIG_EVERY = 15  # test_crash: every 15th message is larger than the queue's in-memory spool threshold


def body_for(msg_id: str, big_every: int | None = BIG_EVERY) -> bytes:
    """Deterministic content from the id; with `big_every`, one in that many is 5,000 lines long
    (past the queue's 256 KiB in-memory spool threshold when the id has 20 characters or more)."""
    n = int(hashlib.sha256(msg_id.encode()).hexdigest()[:4], 16)
    lines = 5000 if big_every and n % big_every == 0 else 10 + n % 50
    head = f"From: {USER}\r\nTo: bob@example.org\r\nSubject: {msg_id}\r\n\r\n"
    text = "".join(f"{msg_id} line {i:05d} .......................\r\n" for i in range(lines))
    return (head + text).encode()


@dataclass
class SubmitterStats:
    acked: list[str] = field(default_factory=list)  # ids whose final 250 arrived, in order
    begun: set[str] = field(default_factory=set)  # ids whose envelope was sent (acknowledged or not)
    refused: int = 0  # an answer other than 250 to MAIL, RCPT, DATA or the final dot
    connections: int = 0
    broken: int = 0  # connections that ended with an error (mostly: the server was killed)
    latencies: list[float] = field(default_factory=list)  # seconds from MAIL to the final 250


class Submitters:
    """`tls_clients` on 465 with AUTH and `mx_clients` on 25 with STARTTLS, to `domain` recipients.

    The recipient of each message is `<id>@<domain>`, so a delivery log line or a sink's dump
    names the message it belongs to.
    """

    def __init__(self, server: MailwardServer, *, tls_clients: int, mx_clients: int, domain: str,
                 per_connection: int = 20, prefix: str = "m", big_every: int | None = None) -> None:
        self.server = server
        self.tls_clients = tls_clients
        self.mx_clients = mx_clients
        self.domain = domain
        self.per_connection = per_connection
        self.prefix = prefix
        self.big_every = big_every
        self.stats = SubmitterStats()
        self.lock = threading.Lock()
        self._numbers = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ctx = verifying_context(server.ca)

    @property
    def acked(self) -> int:
        with self.lock:
            return len(self.stats.acked)

    def __enter__(self) -> Submitters:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._thread.is_alive():
            def wake() -> None:
                assert self._stop is not None
                self._stop.set()
            while self._stop is None and self._thread.is_alive():
                time.sleep(0.01)
            if self._stop is None:
                return  # the loop thread ended before it started any client
            self._loop.call_soon_threadsafe(wake)
            self._thread.join(60)
            assert not self._thread.is_alive(), "a submitter hung"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        clients = [self._client(True) for _ in range(self.tls_clients)]
        clients += [self._client(False) for _ in range(self.mx_clients)]
        await asyncio.gather(*clients)

    async def _client(self, implicit_tls: bool) -> None:
        assert self._stop is not None
        while not self._stop.is_set():
            try:
                await self._connection(implicit_tls)
            except (OSError, EOFError, ssl.SSLError, TimeoutError, ProtocolFailure):
                with self.lock:
                    self.stats.broken += 1
                # The server is gone or refusing: try again soon, as a queueing client would.
                try:
                    async with asyncio.timeout(0.05):
                        await self._stop.wait()
                except TimeoutError:
                    pass

    async def _connection(self, implicit_tls: bool) -> None:
        assert self._stop is not None
        port = self.server.submissions if implicit_tls else self.server.mx
        async with asyncio.timeout(15):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=self._ctx if implicit_tls else None,
                server_hostname="localhost" if implicit_tls else None)
        with self.lock:
            self.stats.connections += 1
        try:
            wire = _Wire(reader, writer)
            await wire.expect(220)
            await wire.command(b"EHLO load.test", 250)
            if implicit_tls:
                await wire.command(f"AUTH PLAIN {plain_auth(USER, PASSWORD)}".encode(), 235)
                sender = USER
            else:
                await wire.command(b"STARTTLS", 220)
                async with asyncio.timeout(15):
                    await writer.start_tls(self._ctx, server_hostname="localhost")
                await wire.command(b"EHLO load.test", 250)
                sender = "load@client.test"
            for _ in range(self.per_connection):
                if self._stop.is_set():
                    break
                await self._message(wire, sender)
            await wire.command(b"QUIT", 221)
        finally:
            writer.transport.abort()  # no lingering: the connection may be dead already
            # Bounded: on some Pythons wait_closed() of an aborted TLS transport never returns.
            with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                async with asyncio.timeout(1):
                    await writer.wait_closed()

    async def _message(self, wire: _Wire, sender: str) -> None:
        msg_id = f"{self.prefix}{next(self._numbers):05d}-{uuid.uuid4().hex[:6]}"
        started = time.monotonic()
        with self.lock:
            self.stats.begun.add(msg_id)
        # PIPELINING (RFC 2920): the envelope in one write, then its three replies.
        wire.write(f"MAIL FROM:<{sender}>\r\nRCPT TO:<{msg_id}@{self.domain}>\r\nDATA\r\n".encode())
        codes = [await wire.reply() for _ in range(3)]
        if codes != [250, 250, 354]:
            with self.lock:
                self.stats.refused += 1
            if codes[2] == 354:  # DATA went ahead without a recipient: end it empty
                wire.write(b".\r\n")
                await wire.reply()
            await wire.command(b"RSET", 250)
            return
        wire.write(dot_stuff(body_for(msg_id, self.big_every)) + b".\r\n")
        code = await wire.reply()
        if code != 250:
            with self.lock:
                self.stats.refused += 1
            return
        with self.lock:
            self.stats.acked.append(msg_id)
            self.stats.latencies.append(time.monotonic() - started)


class ProtocolFailure(Exception):
    """An unexpected reply to a command the session depends on."""


class _Wire:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        async with asyncio.timeout(30):
            await self.writer.drain()

    async def reply(self) -> int:
        """The code of the next (possibly multi-line) reply."""
        async with asyncio.timeout(30):
            while True:
                line = await self.reader.readline()
                if not line.endswith(b"\n"):
                    raise EOFError("connection closed")
                if line[3:4] != b"-":
                    return int(line[:3])

    async def expect(self, code: int) -> None:
        got = await self.reply()
        if got != code:
            raise ProtocolFailure(f"expected {code}, got {got}")

    async def command(self, line: bytes, code: int) -> None:
        self.write(line + b"\r\n")
        await self.expect(code)

