"""Fuzz the server role of the SMTP engine with arbitrary client bytes.

Input layout: the session bytes, then a 6-byte trailer read by FuzzedDataProvider from the end
(flags, limit selector, 4-byte seed). The trailer picks the ServerOptions; the seed drives how the
bytes are split into reads and how every decision is answered, so a seed file is a readable
transcript followed by six control bytes.

Invariants checked on every input:
* the engine never raises on peer input;
* the output is whole CRLF-terminated reply lines with 3-digit codes, multi-line replies keep one
  code and every reply is complete when handed to the transport;
* the input buffer stays bounded (2 x the longest line limit + the last read);
* once the session is closed (QUIT, 421, close()) nothing more is sent or reported;
* message content: BodyEnded.size is the number of content octets reported, the size limit
  holds, no DATA line is longer than the text line limit, and content that was not BINARYMIME
  never carries a bare CR or LF.

Run: python fuzz/fuzz_server.py [libFuzzer flags] [corpus dirs]
"""

from __future__ import annotations

import random
import re
import sys

import atheris

with atheris.instrument_imports(include=["mailward"]):
    from mailward.smtp import codes
    from mailward.smtp.codes import Reply
    from mailward.smtp.events import (
        DECISION_EVENTS,
        AuthRequested,
        AuthResponse,
        BodyChunk,
        BodyEnded,
        BodyRejected,
        ConnectionClosing,
        DataStarted,
        MailReceived,
        QuitRequested,
        StartTlsRequested,
    )
    from mailward.smtp.server import AUTH_LINE_LIMIT, ServerConnection, ServerOptions

TRAILER = 6
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -][^\r\n]*)?\Z")
_REFUSALS = (
    codes.LOCAL_ERROR,
    codes.RELAY_DENIED,
    codes.AUTH_FAILED,
    codes.TOO_MANY_RCPTS,
    Reply(550, "5.1.1", ("No such user", "second line")),
    codes.SHUTTING_DOWN,  # 421: the engine must close
)
_POSITIVE = (None, None, None, Reply(250, "2.0.0", ("first", "second", "")), codes.r(250, None, "ok"))
_CHUNK_SIZES = (1, 2, 3, 7, 64, 509, 4096, 1 << 20)


class Violation(AssertionError):
    pass


def check(cond: bool, what: str) -> None:
    if not cond:
        raise Violation(what)


def options_from(flags: int, sel: int) -> ServerOptions:
    small = bool(flags & 0x10)
    extensions = not flags & 0x80
    return ServerOptions(
        hostname="mx.fuzz",
        starttls=bool(flags & 0x01),
        auth_mechanisms=("PLAIN", "LOGIN") if flags & 0x04 else (),
        bare_line_endings="normalize" if flags & 0x08 else "reject",
        require_tls=bool(flags & 0x20),
        require_auth=bool(flags & 0x40),
        max_command_line=(32, 64, 512)[sel % 3] if small else 512,
        max_text_line=(16, 80, 1000)[sel // 3 % 3] if small else 1000,
        max_message_size=(64, 1024, None)[sel // 9 % 3] if small else 50 * 1024 * 1024,
        max_recipients=(1, 2, 1000)[sel // 27 % 3] if small else 1000,
        hard_error_limit=(2, 5, 20)[sel // 81 % 3] if small else 20,
        chunking=extensions,
        pipelining=extensions,
        dsn=extensions,
        smtputf8=extensions,
        eightbitmime=extensions,
    )


def has_bare_line_ending(data: bytes) -> bool:
    rest = data.replace(b"\r\n", b"")
    return b"\r" in rest or b"\n" in rest


class Harness:
    def __init__(self, opts: ServerOptions, tls_active: bool, rng: random.Random) -> None:
        self.opts = opts
        self.rng = rng
        self.srv = ServerConnection(opts, tls_active=tls_active)
        self.open_code: bytes | None = None  # code of an unfinished multi-line reply
        self.finished = False  # closed and its last output collected
        self.body: list[bytes] | None = None
        self.binary = False
        self.via_data = False
        self.tls_pending = False
        self.limit = 2 * max(opts.max_command_line, opts.max_text_line, AUTH_LINE_LIMIT)

    def collect(self) -> None:
        out = self.srv.data_to_send()
        if self.finished:
            check(out == b"", f"output after the session closed: {out[:80]!r}")
            return
        if out:
            check(out.endswith(b"\r\n"), f"output does not end in CRLF: {out[-80:]!r}")
            for line in out[:-2].split(b"\r\n"):
                m = _REPLY_LINE.match(line)
                check(m is not None, f"not a reply line: {line[:80]!r}")
                assert m is not None
                code, more = m[1], (m[2] or b" ").startswith(b"-")
                check(self.open_code in (None, code), f"code changed inside a reply: {line[:80]!r}")
                self.open_code = code if more else None
            check(self.open_code is None, "multi-line reply cut off at the end of the output")
        if self.srv.closed:
            self.finished = True

    def decide(self, ev: object) -> None:
        srv, rng = self.srv, self.rng
        if isinstance(ev, AuthRequested | AuthResponse):
            pick = rng.randrange(4)
            if pick == 0:
                srv.auth_challenge(rng.choice((b"", b"Username:", b"\x00\xff challenge")))
            elif pick == 1:
                srv.auth_succeeded("fuzz")
            else:
                srv.respond(rng.choice(_REFUSALS))
            return
        if isinstance(ev, MailReceived):
            self.binary = ev.params.body == "BINARYMIME"
        if rng.random() < 0.8:
            reply = rng.choice(_POSITIVE) if not isinstance(ev, DataStarted | StartTlsRequested) else None
            srv.accept(reply)
            if isinstance(ev, DataStarted):
                self.body = []
                self.via_data = not ev.chunking
            elif isinstance(ev, StartTlsRequested):
                check(srv.awaiting_tls, "STARTTLS accepted but the engine is not waiting for TLS")
                if rng.random() < 0.9:
                    srv.tls_established()
                else:
                    self.tls_pending = True  # plaintext keeps arriving before the handshake
        else:
            srv.respond(rng.choice(_REFUSALS))
        if isinstance(ev, BodyEnded):
            self.body = None

    def end_body(self, ev: BodyEnded) -> None:
        check(self.body is not None, "BodyEnded outside a message")
        assert self.body is not None
        body = b"".join(self.body)
        check(ev.size == len(body), f"BodyEnded.size {ev.size} != {len(body)} octets reported")
        limit = self.opts.max_message_size
        check(limit is None or ev.size <= limit, "message larger than max_message_size accepted")
        if not self.binary:
            check(not has_bare_line_ending(body), f"bare CR/LF in accepted content: {body[:200]!r}")
        if self.via_data:
            longest = max((len(x) for x in body.split(b"\r\n")), default=0)
            check(longest <= self.opts.max_text_line - 2, f"DATA line of {longest} octets accepted")

    def drain(self) -> None:
        srv = self.srv
        while (ev := srv.next_event()) is not None:
            check(not self.finished, f"event after the session closed: {ev!r}")
            if isinstance(ev, BodyChunk):
                check(self.body is not None, "BodyChunk outside a message")
                assert self.body is not None
                self.body.append(ev.data)
            elif isinstance(ev, BodyEnded):
                self.end_body(ev)
            elif isinstance(ev, BodyRejected):
                check(self.body is not None, "BodyRejected outside a message")
                self.body = None
            elif isinstance(ev, QuitRequested | ConnectionClosing):
                check(srv.closed, f"{type(ev).__name__} but the engine is not closed")
            if isinstance(ev, DECISION_EVENTS):
                check(srv.awaiting_decision, f"decision event {ev!r} without a pending decision")
                self.decide(ev)
        if srv._events:
            raise Violation(f"next_event() returned None with {srv._events[0]!r} still queued")

    def feed(self, chunk: bytes) -> None:
        srv = self.srv
        srv.receive_data(chunk)
        self.drain()
        if self.tls_pending and self.rng.random() < 0.5:
            self.tls_pending = False
            srv.tls_established()
            self.drain()
        check(len(srv._in) <= self.limit + len(chunk), f"input buffer grew to {len(srv._in)} octets")
        if not srv.closed and self.rng.random() < 0.002:
            srv.close(self.rng.choice((None, codes.TIMEOUT)))
            self.body = None
        self.collect()


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    flags = fdp.ConsumeIntInRange(0, 255)
    sel = fdp.ConsumeIntInRange(0, 255)
    rng = random.Random(fdp.ConsumeIntInRange(0, 2**32 - 1))
    payload = fdp.ConsumeBytes(fdp.remaining_bytes())

    h = Harness(options_from(flags, sel), bool(flags & 0x02), rng)
    h.srv.greet()
    h.collect()
    pos = 0
    while pos < len(payload):
        size = rng.choice(_CHUNK_SIZES)
        h.feed(payload[pos : pos + size])
        pos += size
    h.srv.close()
    h.collect()
    h.srv.receive_data(b"NOOP\r\nQUIT\r\n")
    h.drain()
    h.collect()


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
