"""A byte stream over TCP with TLS that can start at any moment, for both SMTP roles.

It is an asyncio `Protocol` driving an `ssl.SSLObject` over two `MemoryBIO`s instead of asyncio's own
SSL transport, for two reasons (see DESIGN.md, performance notes):
- memory: asyncio's SSL transport allocates a 256 KiB read buffer per connection; here an idle
  connection holds only what OpenSSL needs, so tens of thousands of idle TLS sessions stay small;
- exact STARTTLS semantics: `start_tls()` drops every plaintext byte received so far in the same
  synchronous step that switches to TLS, so nothing a peer pipelined before the handshake can reach
  the SMTP engine (CVE-2011-0411 class, RFC 3207 §4.2).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import ssl
from typing import Any, cast

READ_CHUNK = 64 * 1024
HIGH_WATER = 256 * 1024  # stop reading from the socket while this much plaintext waits unread


class StreamClosed(ConnectionError):
    pass


class SmtpStream(asyncio.Protocol):
    """One TCP connection. Use `read()`, `write()`, `drain()`, `start_tls()`, `close()`."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[str, int] = ("", 0)
        self.local: tuple[str, int] = ("", 0)
        self.ssl_object: ssl.SSLObject | None = None
        self._in_bio: ssl.MemoryBIO | None = None
        self._out_bio: ssl.MemoryBIO | None = None
        self._handshake: asyncio.Future[None] | None = None
        self._plain: collections.deque[bytes] = collections.deque()
        self._plain_size = 0
        self._eof = False
        self._error: BaseException | None = None
        self._reader: asyncio.Future[None] | None = None
        self._paused = False
        self._write_paused: asyncio.Future[None] | None = None
        self._write_blocked = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # --- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        # AF_UNIX addresses are path strings (or ""), not (host, port): those keep the defaults.
        if isinstance(peer, tuple):
            self.peer = (str(peer[0]), int(peer[1]))
        if isinstance(local, tuple):
            self.local = (str(local[0]), int(local[1]))
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # SMTP replies are small and latency-bound; don't let Nagle hold them back.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self._in_bio is None:
            self._push(data)
            return
        self._in_bio.write(data)
        if self._handshake is not None and not self._handshake.done():
            self._continue_handshake()
            if self._handshake is not None and not self._handshake.done():
                return
        self._decrypt()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        if exc is not None and self._error is None:
            self._error = exc
        if self._handshake is not None and not self._handshake.done():
            self._handshake.set_exception(StreamClosed("connection lost during TLS handshake"))
        if self._write_paused is not None and not self._write_paused.done():
            self._write_paused.set_result(None)
        self._wake()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_blocked = True

    def resume_writing(self) -> None:
        self._write_blocked = False
        if self._write_paused is not None and not self._write_paused.done():
            self._write_paused.set_result(None)

    # --- reading -------------------------------------------------------------------------------------

    def _push(self, data: bytes) -> None:
        if not data:
            return
        self._plain.append(data)
        self._plain_size += len(data)
        if self._plain_size > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def _wake(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    async def read(self) -> bytes:
        """Plaintext received so far (all of it), waiting if there is none; b"" at end of stream."""
        while not self._plain:
            if self._eof or self.transport is None or self.transport.is_closing():
                if self._error is not None and not isinstance(self._error, StreamClosed):
                    return b""
                return b""
            self._reader = asyncio.get_running_loop().create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        data = b"".join(self._plain) if len(self._plain) > 1 else self._plain[0]
        self._plain.clear()
        self._plain_size = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    # --- writing -------------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not data or self.transport is None or self.transport.is_closing():
            return
        if self.ssl_object is not None:
            try:
                self.ssl_object.write(data)
            except ssl.SSLError:
                self.abort()
                return
            self._flush_tls()
        elif self._in_bio is None:
            self.transport.write(data)
        # else: TLS has begun but no session exists yet (or the handshake failed). Plaintext here
        # would land in the middle of the handshake, e.g. a shutdown's 421, so it is dropped.

    async def drain(self) -> None:
        if self._write_blocked and self.transport is not None and not self.transport.is_closing():
            self._write_paused = asyncio.get_running_loop().create_future()
            await self._write_paused

    def _flush_tls(self) -> None:
        assert self._out_bio is not None and self.transport is not None
        if self._out_bio.pending:
            self.transport.write(self._out_bio.read())

    # --- TLS -------------------------------------------------------------------------------------------

    async def start_tls(self, context: ssl.SSLContext, *, server_side: bool,
                        server_hostname: str | None = None, implicit: bool = False) -> ssl.SSLObject:
        """Switch to TLS now. Every plaintext byte already received is discarded first.

        With `implicit` (TLS from the first byte, as on port 465) nothing received was plaintext:
        the bytes that arrived before this call are the start of the ClientHello and are kept.
        """
        if self.transport is None or self.transport.is_closing():
            raise StreamClosed("connection closed before TLS could start")
        # A fast client's ClientHello can arrive before the session task runs; dropping it as if
        # it were STARTTLS plaintext would stall the handshake until the timeout.
        early = b"".join(self._plain) if implicit else b""
        self._plain.clear()
        self._plain_size = 0
        self._in_bio = ssl.MemoryBIO()
        self._out_bio = ssl.MemoryBIO()
        if early:
            self._in_bio.write(early)
        sslobj = context.wrap_bio(self._in_bio, self._out_bio, server_side=server_side,
                                  server_hostname=server_hostname)
        self._handshake_obj = sslobj
        self._handshake = asyncio.get_running_loop().create_future()
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        self._continue_handshake()
        try:
            await self._handshake
        finally:
            self._handshake = None
        self.ssl_object = sslobj
        # Application data that arrived with the last handshake flight is real TLS data: keep it.
        self._decrypt()
        return sslobj

    _handshake_obj: ssl.SSLObject | None = None

    def _continue_handshake(self) -> None:
        sslobj = self._handshake_obj
        fut = self._handshake
        assert sslobj is not None and fut is not None
        try:
            sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush_handshake()
            return
        except (ssl.SSLError, OSError) as exc:
            self._flush_handshake()
            if not fut.done():
                fut.set_exception(exc)
            return
        self._flush_handshake()
        if not fut.done():
            fut.set_result(None)

    def _flush_handshake(self) -> None:
        if self._out_bio is not None and self._out_bio.pending and self.transport is not None:
            self.transport.write(self._out_bio.read())

    def _decrypt(self) -> None:
        sslobj = self.ssl_object
        if sslobj is None:
            return
        chunks = []
        try:
            while True:
                chunk = sslobj.read(READ_CHUNK)
                if not chunk:
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self._eof = True
        except ssl.SSLError as exc:
            self._error = exc
            self._eof = True
        self._flush_tls()
        for c in chunks:
            self._push(c)
        if self._eof:
            self._wake()

    # --- closing -------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close politely: TLS close_notify (RFC 8314 §3.4 SHOULD), then TCP FIN."""
        if self.transport is None or self.transport.is_closing():
            return
        if self.ssl_object is not None:
            with contextlib.suppress(ssl.SSLError):
                self.ssl_object.unwrap()
            self._flush_tls()
        self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def extra(self, name: str) -> Any:
        return None if self.transport is None else self.transport.get_extra_info(name)
