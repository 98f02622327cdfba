"""Client and server engines wired back to back in memory, running real SMTP conversations."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailward.smtp.address import Mailbox, parse_mailbox
from mailward.smtp.client import (
    AuthChallenge,
    AuthCompleted,
    ClientConnection,
    ClientEvent,
    EhloCompleted,
    GreetingReceived,
    ReadyForBody,
    ReplyReceived,
    ServerClosed,
    StartTlsReady,
    TransactionResult,
)
from mailward.smtp.codes import Reply
from mailward.smtp.commands import MailParams, RcptParams
from mailward.smtp.events import (
    DECISION_EVENTS,
    AuthRequested,
    AuthResponse,
    BodyChunk,
    BodyEnded,
    BodyRejected,
    DataStarted,
    MailReceived,
    RcptReceived,
    ServerEvent,
    StartTlsRequested,
)
from mailward.smtp.server import ServerConnection, ServerOptions

Decider = Callable[[ServerConnection, ServerEvent], None]
SENDER = parse_mailbox("alice@client.test")
BOB = parse_mailbox("bob@mx.test")
CAROL = parse_mailbox("carol@mx.test")
DAVE = parse_mailbox("dave@mx.test")
NO_SUCH_USER = Reply(550, "5.1.1", ("No such user",))


def accept_all(srv: ServerConnection, ev: ServerEvent) -> None:
    if isinstance(ev, AuthRequested | AuthResponse):
        srv.auth_succeeded("user")
    else:
        srv.accept()


@dataclass
class Wire:
    """Moves bytes both ways until both engines are quiet, answering the server's decisions."""

    server: ServerConnection
    client: ClientConnection
    decide: Decider = accept_all
    piece: int = 0  # deliver bytes in pieces of this size (0: whole writes)
    server_events: list[ServerEvent] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    _body: list[bytes] = field(default_factory=list)

    def _pieces(self, data: bytes) -> list[bytes]:
        if not self.piece:
            return [data]
        return [data[i : i + self.piece] for i in range(0, len(data), self.piece)]

    def pump(self) -> list[ClientEvent]:
        events: list[ClientEvent] = []
        moved = True
        while moved:
            moved = False
            if data := self.server.data_to_send():
                moved = True
                for part in self._pieces(data):
                    self.client.receive_data(part)
            while (cev := self.client.next_event()) is not None:
                events.append(cev)
            if data := self.client.data_to_send():
                moved = True
                for part in self._pieces(data):
                    self.server.receive_data(part)
                    self._drain_server()
            moved = self._drain_server() or moved
        return events

    def _drain_server(self) -> bool:
        seen = False
        while (ev := self.server.next_event()) is not None:
            seen = True
            self.server_events.append(ev)
            if isinstance(ev, DataStarted):
                self._body = []
            elif isinstance(ev, BodyChunk):
                self._body.append(ev.data)
            elif isinstance(ev, BodyEnded):
                self.bodies.append(b"".join(self._body))
            if isinstance(ev, DECISION_EVENTS):
                self.decide(self.server, ev)
        return seen

    def handshake(self) -> None:
        """Stands in for the TLS handshake both drivers would do after STARTTLS."""
        self.server.tls_established()
        self.client.tls_established()


def wire(options: ServerOptions | None = None, *, tls: bool = False, decide: Decider = accept_all,
         piece: int = 0, allow_plaintext_auth: bool = False) -> Wire:
    server = ServerConnection(options or ServerOptions(hostname="mx.test"), tls_active=tls)
    client = ClientConnection("client.test", tls_active=tls, allow_plaintext_auth=allow_plaintext_auth)
    server.greet()
    w = Wire(server, client, decide, piece)
    [greeting] = w.pump()
    assert isinstance(greeting, GreetingReceived) and greeting.reply.code == 220
    return w


def ehlo(w: Wire) -> EhloCompleted:
    w.client.ehlo()
    [ev] = w.pump()
    assert isinstance(ev, EhloCompleted)
    return ev


def send(w: Wire, recipients: Sequence[Mailbox], chunks: Sequence[bytes], *,
         params: MailParams | None = None, use_bdat: bool = False, size: int | None = None,
         sender: Mailbox | None = SENDER) -> TransactionResult:
    w.client.start_transaction(sender, [(r, RcptParams()) for r in recipients], params, size=size,
                               use_bdat=use_bdat)
    events = w.pump()
    if events and isinstance(events[-1], ReadyForBody):
        assert events[-1].chunking is use_bdat
        for chunk in chunks:
            w.client.send_body(chunk)
        w.client.end_body()
        events += w.pump()
    results = [e for e in events if isinstance(e, TransactionResult)]
    assert len(results) == 1, events
    return results[0]


def refuse(recipients: set[Mailbox], reply: Reply = NO_SUCH_USER) -> Decider:
    def decide(srv: ServerConnection, ev: ServerEvent) -> None:
        if isinstance(ev, RcptReceived) and ev.recipient in recipients:
            srv.respond(reply)
        else:
            accept_all(srv, ev)
    return decide


LINE_BREAK = re.compile(rb"\r\n|\r|\n")


def normalised(body: bytes) -> bytes:
    out = LINE_BREAK.sub(b"\r\n", body)
    return out if not out or out.endswith(b"\r\n") else out + b"\r\n"


# --- conversations -------------------------------------------------------------------------------


def test_several_messages_on_one_connection_with_rset_between() -> None:
    w = wire()
    ehlo(w)
    for i in range(3):
        result = send(w, [BOB], [b"Subject: %d\r\n\r\n.body %d\r\n" % (i, i)])
        assert result.delivered == (BOB,)
        w.client.rset()
        assert w.pump() == [ReplyReceived("RSET", Reply(250, "2.0.0", ("Reset state",)))]
    assert w.bodies == [b"Subject: %d\r\n\r\n.body %d\r\n" % (i, i) for i in range(3)]
    w.client.quit()
    assert w.pump() == [ReplyReceived("QUIT", Reply(221, "2.0.0", ("Bye",)))]
    assert w.server.closed
    w.client.receive_eof()
    assert w.pump() == [ServerClosed(None)]


def test_rset_and_next_transaction_are_pipelined_together() -> None:
    w = wire()
    ehlo(w)
    send(w, [BOB], [b"one\r\n"])
    w.client.rset()
    w.client.start_transaction(SENDER, [(CAROL, RcptParams())])
    out = w.client.data_to_send()
    assert out.startswith(b"RSET\r\nMAIL FROM:") and out.endswith(b"DATA\r\n")
    w.server.receive_data(out)
    events = w.pump()
    assert [type(e) for e in events] == [ReplyReceived, ReadyForBody]


@pytest.mark.parametrize(("pipelining", "use_bdat"), [(True, False), (True, True), (False, False)])
def test_mixed_recipients_give_per_recipient_results(pipelining: bool, use_bdat: bool) -> None:
    options = ServerOptions(hostname="mx.test", pipelining=pipelining)
    w = wire(options, decide=refuse({CAROL}))
    caps = ehlo(w).capabilities
    assert caps.pipelining is pipelining
    result = send(w, [BOB, CAROL, DAVE], [b"Hello\n", b".world\r", b"\n"], use_bdat=use_bdat)
    assert result.mail_reply.code == 250
    assert [(mb, r.code) for mb, r in result.rcpt_replies] == [(BOB, 250), (CAROL, 550), (DAVE, 250)]
    assert result.rcpt_replies[1][1] == NO_SUCH_USER
    assert result.delivered == (BOB, DAVE)
    assert w.bodies == [b"Hello\r\n.world\r\n"]
    assert [e.chunking for e in w.server_events if isinstance(e, DataStarted)] == [use_bdat]


def test_without_pipelining_the_client_waits_for_every_reply() -> None:
    w = wire(ServerOptions(hostname="mx.test", pipelining=False))
    ehlo(w)
    w.client.start_transaction(SENDER, [(BOB, RcptParams()), (CAROL, RcptParams())])
    writes = []
    while data := w.client.data_to_send():
        writes.append(data)
        w.server.receive_data(data)
        w._drain_server()
        w.client.receive_data(w.server.data_to_send())
    assert writes == [b"MAIL FROM:<alice@client.test>\r\n", b"RCPT TO:<bob@mx.test>\r\n",
                      b"RCPT TO:<carol@mx.test>\r\n", b"DATA\r\n"]
    assert isinstance(w.client.next_event(), ReadyForBody)


def test_all_recipients_refused_sends_no_body() -> None:
    w = wire(decide=refuse({BOB, CAROL}))
    ehlo(w)
    result = send(w, [BOB, CAROL], [b"never sent\r\n"])
    assert result.data_reply is None and result.delivered == ()
    assert w.bodies == [] and not any(isinstance(e, BodyChunk) for e in w.server_events)
    # The server is in a clean state: the next transaction works.
    w.decide = accept_all
    assert send(w, [BOB], [b"x\r\n"]).delivered == (BOB,)


def test_mail_refused_is_every_recipients_result() -> None:
    def decide(srv: ServerConnection, ev: ServerEvent) -> None:
        if isinstance(ev, MailReceived):
            srv.respond(Reply(550, "5.7.1", ("Sender blocked",)))
        else:
            accept_all(srv, ev)

    for options in (ServerOptions(hostname="mx.test"), ServerOptions(hostname="mx.test", pipelining=False)):
        w = wire(options, decide=decide)
        ehlo(w)
        result = send(w, [BOB, CAROL], [b"x\r\n"])
        assert [r for _, r in result.outcomes] == [Reply(550, "5.7.1", ("Sender blocked",))] * 2
        assert not any(isinstance(e, RcptReceived) for e in w.server_events)


def test_server_421_during_recipients() -> None:
    def decide(srv: ServerConnection, ev: ServerEvent) -> None:
        if isinstance(ev, RcptReceived) and ev.recipient == CAROL:
            srv.respond(Reply(421, "4.3.2", ("Shutting down",)))
        else:
            accept_all(srv, ev)

    w = wire(decide=decide)
    ehlo(w)
    w.client.start_transaction(SENDER, [(BOB, RcptParams()), (CAROL, RcptParams())])
    events = w.pump()
    bye = Reply(421, "4.3.2", ("Shutting down",))
    assert isinstance(events[0], TransactionResult)
    assert events[0].outcomes == ((BOB, bye), (CAROL, bye))
    assert events[1:] == [ServerClosed(bye)]
    assert w.server.closed and w.client.closed


def test_size_limit_refused_locally_and_by_the_server() -> None:
    w = wire(ServerOptions(hostname="mx.test", max_message_size=1000))
    assert ehlo(w).capabilities.size == 1000
    reply = w.client.start_transaction(SENDER, [(BOB, RcptParams())], size=5000)
    assert reply is not None and (reply.code, reply.enhanced) == (552, "5.3.4")
    assert w.client.data_to_send() == b""
    [local] = w.pump()
    assert isinstance(local, TransactionResult) and local.mail_reply == reply
    # Undeclared size: the server measures and refuses at the end.
    result = send(w, [BOB], [b"x" * 600 + b"\r\n", b"y" * 600 + b"\r\n"])
    assert result.data_reply is not None and result.data_reply.code == 552
    assert result.delivered == ()
    assert any(isinstance(e, BodyRejected) for e in w.server_events)
    # BDAT: the refused chunk decides, and the session goes on.
    result = send(w, [BOB], [b"x" * 600 + b"\r\n", b"y" * 600 + b"\r\n", b"z\r\n"], use_bdat=True)
    assert result.data_reply is not None and result.data_reply.code == 552
    assert send(w, [BOB], [b"small\r\n"], size=7).delivered == (BOB,)


def test_starttls_then_auth_plain() -> None:
    options = ServerOptions(hostname="mx.test", starttls=True, require_tls=True,
                            auth_mechanisms=("PLAIN", "LOGIN"))
    seen: list[ServerEvent] = []

    def decide(srv: ServerConnection, ev: ServerEvent) -> None:
        seen.append(ev)
        if isinstance(ev, AuthRequested):
            assert ev.initial_response is None
            srv.auth_challenge(b"")
        elif isinstance(ev, AuthResponse):
            if ev.data == b"\0alice\0s3cret":
                srv.auth_succeeded("alice")
            else:
                srv.respond(Reply(535, "5.7.8", ("Authentication credentials invalid",)))
        else:
            srv.accept()

    w = wire(options, decide=decide)
    caps = ehlo(w).capabilities
    assert caps.starttls and caps.auth == frozenset()
    w.client.starttls()
    events = w.pump()
    assert events == [StartTlsReady(Reply(220, "2.0.0", ("Ready to start TLS",)))]
    assert isinstance(seen[-1], StartTlsRequested) and w.server.awaiting_tls
    w.handshake()
    caps = ehlo(w).capabilities
    assert not caps.starttls and caps.auth == {"PLAIN", "LOGIN"} and caps.requiretls
    w.client.auth("PLAIN")
    assert w.pump() == [AuthChallenge(b"")]
    w.client.auth_respond(b"\0alice\0s3cret")
    [done] = w.pump()
    assert isinstance(done, AuthCompleted) and done.succeeded
    assert w.server.authenticated_as == "alice"
    result = send(w, [BOB], [b"over TLS\r\n"], params=MailParams(requiretls=True))
    assert result.delivered == (BOB,)
    mail = next(e for e in w.server_events if isinstance(e, MailReceived))
    assert mail.params.requiretls


def test_auth_plain_with_initial_response_and_failure() -> None:
    options = ServerOptions(hostname="mx.test", auth_mechanisms=("PLAIN",))

    def decide(srv: ServerConnection, ev: ServerEvent) -> None:
        if isinstance(ev, AuthRequested):
            if ev.initial_response == b"\0bob\0right":
                srv.auth_succeeded("bob")
            else:
                srv.respond(Reply(535, "5.7.8", ("Authentication credentials invalid",)))
        else:
            srv.accept()

    w = wire(options, tls=True, decide=decide)
    ehlo(w)
    w.client.auth("PLAIN", b"\0bob\0wrong")
    [failed] = w.pump()
    assert isinstance(failed, AuthCompleted) and failed.reply.code == 535 and not w.client.authenticated
    w.client.auth("PLAIN", b"\0bob\0right")
    [ok] = w.pump()
    assert isinstance(ok, AuthCompleted) and ok.succeeded and w.server.authenticated_as == "bob"


def test_smtputf8_and_binarymime() -> None:
    w = wire()
    ehlo(w)
    jorg = parse_mailbox("jörg@bücher.test")
    result = send(w, [BOB], [b"Subject: caf\xc3\xa9\r\n"], sender=jorg, params=MailParams(body="8BITMIME"))
    assert result.delivered == (BOB,)
    mail = [e for e in w.server_events if isinstance(e, MailReceived)][-1]
    assert mail.sender == jorg and mail.params.smtputf8
    binary = bytes(range(256)) * 4 + b"\r\n.\r\n\r"
    result = send(w, [BOB], [binary[:100], binary[100:]], params=MailParams(body="BINARYMIME"),
                  use_bdat=True)
    assert result.delivered == (BOB,)
    assert w.bodies[-1] == binary


def test_one_megabyte_body_with_dot_lines_arrives_exactly() -> None:
    w = wire(ServerOptions(hostname="mx.test", max_message_size=None))
    ehlo(w)
    lines = [b"." * (i % 7) + b"line %d " % i + b"x" * (i % 90) for i in range(20_000)]
    body = b"\r\n".join(lines)
    assert len(body) > 1_000_000 and body.count(b"\r\n.") > 10_000
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    for use_bdat in (False, True):
        result = send(w, [BOB], chunks, use_bdat=use_bdat)
        assert result.delivered == (BOB,)
        assert w.bodies[-1] == body + b"\r\n"


@settings(max_examples=150, deadline=None)
@given(
    body=st.binary(max_size=400).map(lambda b: b.translate(bytes.maketrans(b"abcdef", b"\r\n...\r"))),
    cuts=st.lists(st.integers(0, 400), max_size=10),
    piece=st.integers(0, 40),
    pipelining=st.booleans(),
    use_bdat=st.booleans(),
)
def test_server_receives_exactly_the_normalised_body(body: bytes, cuts: list[int], piece: int,
                                                     pipelining: bool, use_bdat: bool) -> None:
    w = wire(ServerOptions(hostname="mx.test", max_text_line=100_000, pipelining=pipelining),
             piece=piece)
    ehlo(w)
    use_bdat = use_bdat and pipelining  # BDAT is used only with PIPELINING
    bounds = sorted({0, len(body), *(c for c in cuts if c <= len(body))})
    chunks = [body[a:b] for a, b in itertools.pairwise(bounds)]
    result = send(w, [BOB], chunks, use_bdat=use_bdat)
    assert not any(isinstance(e, BodyRejected) for e in w.server_events)
    assert result.delivered == (BOB,)
    assert w.bodies == [normalised(body)]
