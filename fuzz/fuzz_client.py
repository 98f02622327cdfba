"""Fuzz the client role of the SMTP engine with arbitrary server bytes.

Input layout: the server's bytes, then a 5-byte trailer read by FuzzedDataProvider from the end
(mode byte, 4-byte seed). Bit 7 of the mode byte cuts the bytes into reads at random instead of
one reply per read; the other bits pick the mode, which puts the client in a state before the
fuzzed bytes arrive, using canned replies: fresh (the bytes start with the greeting), waiting for
the EHLO reply, in the middle of a pipelined transaction (DATA or BDAT), just after STARTTLS (the
bytes start with the 220 and whatever an attacker injects after it), or in an AUTH exchange. From
then on a driver reacts to every event the way delivery could (EHLO, STARTTLS, AUTH, transactions,
RSET, NOOP, QUIT), choices drawn from the seed.

Invariants: the client never raises on server input (receive_data / receive_eof), and never on a
call the driver makes in answer to an event; every start_transaction() ends in exactly one
TransactionResult with one reply per recipient; the reply buffer stays bounded; after
ServerClosed or ClientProtocolError nothing more is written or reported.

Run: python fuzz/fuzz_client.py [libFuzzer flags] [corpus dirs]
"""

from __future__ import annotations

import random
import re
import sys

import atheris

with atheris.instrument_imports(include=["mailward"]):
    from mailward.smtp.address import parse_mailbox
    from mailward.smtp.client import (
        AuthChallenge,
        AuthCompleted,
        ClientConnection,
        ClientProtocolError,
        EhloCompleted,
        EhloRefused,
        GreetingReceived,
        ReadyForBody,
        ReplyReceived,
        ServerClosed,
        StartTlsReady,
        StartTlsRefused,
        TransactionResult,
    )
    from mailward.smtp.commands import MailParams, RcptParams
    from mailward.smtp.replies import MAX_REPLY_LINE, MAX_REPLY_LINES

TRAILER = 5
MODES = ("fresh", "ehlo", "transaction", "starttls", "auth")
GREETING = b"220 mx.fuzz ESMTP\r\n"
EHLO_REPLY = (
    b"250-mx.fuzz\r\n250-PIPELINING\r\n250-SIZE 100000\r\n250-8BITMIME\r\n250-CHUNKING\r\n"
    b"250-BINARYMIME\r\n250-STARTTLS\r\n250-AUTH PLAIN LOGIN\r\n250-DSN\r\n250-SMTPUTF8\r\n"
    b"250-REQUIRETLS\r\n250 ENHANCEDSTATUSCODES\r\n"
)
SENDER = parse_mailbox("alice@client.fuzz")
UTF8_SENDER = parse_mailbox("jörg@client.fuzz")
RECIPIENTS = [parse_mailbox(f"r{i}@mx.fuzz") for i in range(4)] + [parse_mailbox("postmaster")]
BODIES = (
    b"Subject: x\r\n\r\nhello\r\n",
    b".\r\n..\r\n.x\n\rbare\rcr\nlf",
    b"",
    bytes(range(256)),
    b"x" * 3000 + b"\r",
)
_CHUNK_SIZES = (1, 2, 3, 5, 16, 100, 1000, 1 << 20)
_FINAL_LINE = re.compile(rb"(?m)^[0-9]{3}(?:[ \r][^\n]*)?\n")


class Violation(AssertionError):
    pass


def check(cond: bool, what: str) -> None:
    if not cond:
        raise Violation(what)


class Driver:
    def __init__(self, rng: random.Random, tls_active: bool) -> None:
        self.rng = rng
        self.client = ClientConnection("client.fuzz", tls_active=tls_active,
                                       allow_plaintext_auth=rng.random() < 0.5)
        self.started: list[int] = []  # recipients per start_transaction()
        self.results: list[TransactionResult] = []
        self.terminal = False
        self.finished = False  # terminal event seen and the output after it collected
        self.transactions = 0
        self.quit_sent = False

    # --- actions ---------------------------------------------------------------------------------

    def start_transaction(self) -> None:
        c, rng = self.client, self.rng
        caps = c.capabilities
        if caps is None or self.transactions >= 4:
            self.quit()
            return
        self.transactions += 1
        rcpts = [(mb, RcptParams(notify=frozenset({"SUCCESS", "FAILURE"}), orcpt="rfc822;" + str(mb))
                  if rng.random() < 0.3 else RcptParams())
                 for mb in rng.sample(RECIPIENTS, rng.randint(1, 3))]
        body = rng.choice((None, "8BITMIME", "BINARYMIME"))
        use_bdat = caps.chunking and caps.pipelining and (body == "BINARYMIME" or rng.random() < 0.5)
        if body == "BINARYMIME" and not use_bdat:
            body = None
        params = MailParams(body=body, smtputf8=rng.random() < 0.2, requiretls=rng.random() < 0.1,
                            ret="HDRS" if rng.random() < 0.2 else None, envid="env+id=1")
        sender = rng.choice((SENDER, SENDER, None, UTF8_SENDER))
        size = rng.choice((None, 10, 10**9))
        c.start_transaction(sender, rcpts, params, size=size, use_bdat=use_bdat)
        self.started.append(len(rcpts))

    def after_command_phase(self) -> None:
        """What to do when the client is free: another transaction, RSET, NOOP or QUIT."""
        pick = self.rng.randrange(6)
        if pick < 3:
            self.start_transaction()
        elif pick == 3:
            self.client.rset()
        elif pick == 4:
            self.client.noop()
        else:
            self.quit()

    def react(self, ev: object) -> None:
        c, rng = self.client, self.rng
        if isinstance(ev, ServerClosed | ClientProtocolError):
            check(c.closed, f"{type(ev).__name__} but the client is not closed")
            self.terminal = True
            return
        check(not self.terminal, f"event after the session ended: {ev!r}")
        if isinstance(ev, TransactionResult):
            self.results.append(ev)
        if c.closed or self.quit_sent:
            return  # later events are already queued; a driver acts on the newest state only
        if isinstance(ev, GreetingReceived):
            if ev.reply.code == 220 and rng.random() < 0.95:
                c.ehlo()
            else:
                self.quit()
        elif isinstance(ev, EhloCompleted):
            caps = ev.capabilities
            if caps.starttls and not c.tls_active and rng.random() < 0.3:
                c.starttls()
            elif caps.auth and (c.tls_active or c.allow_plaintext_auth) and not c.authenticated \
                    and rng.random() < 0.4:
                mech = rng.choice(sorted(caps.auth))
                c.auth(mech, rng.choice((None, b"", b"\x00user\x00pass")))
            else:
                self.after_command_phase()
        elif isinstance(ev, StartTlsReady):
            c.tls_established()
            c.ehlo()
        elif isinstance(ev, AuthChallenge):
            if rng.random() < 0.8:
                c.auth_respond(rng.choice((b"user", b"", b"\xff" * 50)))
            else:
                c.auth_cancel()
        elif isinstance(ev, ReadyForBody):
            body = rng.choice(BODIES)
            pos = 0
            while pos < len(body):
                n = rng.choice((1, 7, 100, 5000))
                c.send_body(body[pos : pos + n])
                pos += n
            c.end_body()
        elif isinstance(ev, StartTlsRefused | AuthCompleted | TransactionResult | ReplyReceived):
            self.after_command_phase()
        elif isinstance(ev, EhloRefused):
            self.quit()

    def quit(self) -> None:
        self.quit_sent = True
        self.client.quit()

    # --- plumbing --------------------------------------------------------------------------------

    def drain(self) -> None:
        while (ev := self.client.next_event()) is not None:
            self.react(ev)
        out = self.client.data_to_send()
        if self.finished:
            check(out == b"", f"output after the session ended: {out[:80]!r}")
        self.finished = self.terminal
        parser = self.client._parser
        check(len(parser._buf) <= MAX_REPLY_LINE + 1, f"reply buffer grew to {len(parser._buf)} octets")
        check(len(parser._lines) <= MAX_REPLY_LINES, "reply parser holds too many lines")


def setup(mode: str, rng: random.Random) -> Driver:
    d = Driver(rng, tls_active=mode == "auth")
    c = d.client
    if mode == "fresh":
        return d
    c.receive_data(GREETING)
    check(isinstance(c.next_event(), GreetingReceived), "canned greeting not reported")
    c.ehlo()
    if mode == "ehlo":
        return d
    c.receive_data(EHLO_REPLY)
    check(isinstance(c.next_event(), EhloCompleted), "canned EHLO reply not reported")
    if mode == "transaction":
        d.start_transaction()
    elif mode == "starttls":
        c.starttls()
    else:
        c.auth(rng.choice(("PLAIN", "LOGIN")), rng.choice((None, b"\x00user\x00pass")))
    return d


def pieces(payload: bytes, paced: bool, rng: random.Random) -> list[bytes]:
    """Paced: one reply per read, as a server sends them, so the driver answers in between and a
    recorded conversation plays out. Otherwise arbitrary cuts."""
    if paced:
        out, start = [], 0
        for m in _FINAL_LINE.finditer(payload):
            out.append(payload[start : m.end()])
            start = m.end()
        out.append(payload[start:])
        return [p for p in out if p]
    out, pos = [], 0
    while pos < len(payload):
        size = rng.choice(_CHUNK_SIZES)
        out.append(payload[pos : pos + size])
        pos += size
    return out


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode_byte = fdp.ConsumeIntInRange(0, 255)
    mode = MODES[(mode_byte & 0x7F) % len(MODES)]
    rng = random.Random(fdp.ConsumeIntInRange(0, 2**32 - 1))
    payload = fdp.ConsumeBytes(fdp.remaining_bytes())

    d = setup(mode, rng)
    d.drain()
    for piece in pieces(payload, not mode_byte & 0x80, rng):
        d.client.receive_data(piece)
        d.drain()
    d.client.receive_eof()
    d.drain()
    check(d.terminal, "EOF did not end the session")
    check(len(d.results) == len(d.started),
          f"{len(d.started)} transactions started, {len(d.results)} results")
    for n, res in zip(d.started, d.results, strict=True):
        check(len(res.rcpt_replies) == n, "TransactionResult without one reply per recipient")


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
