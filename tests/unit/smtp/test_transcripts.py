"""Recorded sessions of real SMTP software (transcripts/README.md) replayed through the engine.

Each ``.client`` file is fed to a ServerConnection: the messages, envelopes and bodies must come
out as the tool sent them, and the replies must match what was recorded. Each ``.server`` file is
fed, one reply at a time, to a ClientConnection asked to send the same envelopes and bodies: it
must write the same commands and bodies as the tool did and see every message delivered.

The body oracle is deliberately naive (split lines, drop one leading dot), which is all these
well-formed sessions need, so it shares no code with the engine.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from smtp_helpers import codes_of, pump

from mailward.smtp.client import (
    AuthChallenge,
    AuthCompleted,
    ClientConnection,
    ClientEvent,
    EhloCompleted,
    GreetingReceived,
    ReadyForBody,
    ReplyReceived,
    TransactionResult,
)
from mailward.smtp.codes import Reply
from mailward.smtp.commands import Auth, Command, Data, Ehlo, Helo, Mail, Quit, Rcpt, parse_command
from mailward.smtp.events import (
    AuthRequested,
    AuthResponse,
    BodyChunk,
    BodyEnded,
    DataStarted,
    MailReceived,
    RcptReceived,
    ServerEvent,
)
from mailward.smtp.replies import Capabilities, ReplyParser
from mailward.smtp.server import ServerConnection, ServerOptions

HERE = Path(__file__).parent / "transcripts"
NAMES = sorted(p.stem for p in HERE.glob("*.client"))


@dataclass(frozen=True)
class Expect:
    """What a person checked in the recording: message count, recipients, a piece of each body."""

    messages: int
    recipients: int
    body: str
    checks: dict[str, object] = field(default_factory=dict)


SWAKS_BODY = "This is a test mailing\r\n"
DOTS = ".leading dot\r\n..two dots\r\n.\r\na line after a lone dot\r\n"
EIGHT_BIT = "Café crème brûlée €5\r\n"
EXPECTED: dict[str, Expect] = {
    "mailward-postfix-8bitmime": Expect(1, 2, EIGHT_BIT, {"body_type": "8BITMIME", "size": 411}),
    "mailward-postfix-dsn-dots": Expect(1, 1, DOTS, {"size": 327, "envid": "env+id=1",
                                                       "notify": {"SUCCESS", "FAILURE", "DELAY"}}),
    "mailward-postfix-smtputf8": Expect(1, 1, "Grüße\r\n", {"size": 288, "smtputf8": True,
                                                            "sender": "jörg@client.test",
                                                            "orcpt": "utf-8;üser@mx.test"}),
    "mailward-swaks-8bit": Expect(1, 1, EIGHT_BIT),
    "mailward-swaks-auth-login": Expect(1, 1, SWAKS_BODY, {"auth": [b"alice", b"secret pw"]}),
    "mailward-swaks-auth-pipelining": Expect(1, 1, SWAKS_BODY, {"auth": [b"\x00alice\x00secret pw"]}),
    "mailward-swaks-auth-plain": Expect(1, 1, SWAKS_BODY, {"auth": [b"\x00alice\x00secret pw"]}),
    "mailward-swaks-dots": Expect(1, 1, DOTS),
    "mailward-swaks-pipelining": Expect(1, 2, SWAKS_BODY),
    "mailward-swaks-plain": Expect(1, 1, SWAKS_BODY),
    "sink-smtp-source-file": Expect(1, 1, DOTS),
    "sink-smtp-source-multi": Expect(3, 2, "Subject: smtp-source test\r\n\r\n1XXXXXXXXX"),
    "sink-swaks-8bit": Expect(1, 1, EIGHT_BIT),
    "sink-swaks-dots": Expect(1, 1, DOTS),
    "sink-swaks-pipelining": Expect(1, 2, SWAKS_BODY),
    "sink-swaks-plain": Expect(1, 1, SWAKS_BODY),
}

_FINAL_LINE = re.compile(rb"(?m)^[0-9]{3}(?:[ \r][^\n]*)?\n")


@dataclass
class Recorded:
    commands: list[Command] = field(default_factory=list)
    auth_lines: list[bytes] = field(default_factory=list)  # decoded answers to 334 challenges
    bodies: list[bytes] = field(default_factory=list)  # DATA content, dot-unstuffed


def split_client(data: bytes, auth_answers: int) -> Recorded:
    """Commands, AUTH answers and bodies of a client's byte stream."""
    assert data.endswith(b"\r\n")
    rec = Recorded()
    body: list[bytes] | None = None
    answers_left = 0
    for line in data[:-2].split(b"\r\n"):
        if body is not None:
            if line == b".":
                rec.bodies.append(b"".join(body))
                body = None
            else:
                body.append((line[1:] if line.startswith(b".") else line) + b"\r\n")
        elif answers_left:
            answers_left -= 1
            rec.auth_lines.append(base64.b64decode(line, validate=True))
        else:
            cmd = parse_command(line)
            rec.commands.append(cmd)
            if isinstance(cmd, Auth):
                answers_left = auth_answers
            elif isinstance(cmd, Data):
                body = []
    assert body is None and not answers_left
    return rec


def server_replies(data: bytes) -> tuple[list[bytes], list[Reply]]:
    """The recorded server stream cut into one piece per reply, and those replies parsed."""
    pieces, start = [], 0
    for m in _FINAL_LINE.finditer(data):
        pieces.append(data[start : m.end()])
        start = m.end()
    assert start == len(data)
    parser = ReplyParser()
    parser.feed(data)
    replies = []
    while (item := parser.next_reply()) is not None:
        assert isinstance(item, Reply), item
        replies.append(item)
    assert len(replies) == len(pieces)
    return pieces, replies


def load(name: str) -> tuple[bytes, bytes, Recorded]:
    client = (HERE / f"{name}.client").read_bytes()
    server = (HERE / f"{name}.server").read_bytes()
    challenges = sum(r.code == 334 for r in server_replies(server)[1])
    return client, server, split_client(client, challenges)


# --- the client side through the server engine ----------------------------------------------------


class Authenticator:
    """Answers AUTH as the recording server did: PLAIN at once; LOGIN with Username:/Password:."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.login_step = 0

    def __call__(self, srv: ServerConnection, ev: ServerEvent) -> None:
        if isinstance(ev, AuthRequested):
            if ev.initial_response is not None:
                self.received.append(ev.initial_response)
            if ev.mechanism == "LOGIN" and ev.initial_response is None:
                srv.auth_challenge(b"Username:")
            elif ev.mechanism == "LOGIN":
                srv.auth_challenge(b"Password:")
            else:
                srv.auth_succeeded("alice")
        elif isinstance(ev, AuthResponse):
            self.received.append(ev.data)
            if len(self.received) == 1:
                srv.auth_challenge(b"Password:")
            else:
                srv.auth_succeeded("alice")
        else:
            srv.accept()


def serve(name: str, chunks: list[bytes]) -> tuple[list[ServerEvent], bytes, Authenticator]:
    options = ServerOptions(hostname="mx.test", auth_mechanisms=("PLAIN", "LOGIN"))
    srv = ServerConnection(options, tls_active="auth" in name)
    srv.greet()
    auth = Authenticator()
    events = pump(srv, chunks, auth)
    return events, srv.data_to_send(), auth


def messages(events: list[ServerEvent]) -> list[bytes]:
    out: list[bytes] = []
    body: list[bytes] = []
    for ev in events:
        if isinstance(ev, DataStarted):
            body = []
        elif isinstance(ev, BodyChunk):
            body.append(ev.data)
        elif isinstance(ev, BodyEnded):
            out.append(b"".join(body))
            assert ev.size == len(out[-1])
    return out


def test_every_transcript_is_described() -> None:
    assert NAMES and sorted(EXPECTED) == NAMES
    assert all((HERE / f"{name}.server").exists() for name in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_client_bytes_through_the_server(name: str) -> None:
    client, _, rec = load(name)
    expect = EXPECTED[name]
    events, _, auth = serve(name, [client])

    bodies = messages(events)
    assert len(bodies) == expect.messages == len(rec.bodies)
    assert bodies == rec.bodies
    assert all(expect.body.encode() in body for body in bodies)
    mails = [e for e in events if isinstance(e, MailReceived)]
    rcpts = [e for e in events if isinstance(e, RcptReceived)]
    assert len(mails) == expect.messages and len(rcpts) == expect.messages * expect.recipients
    sent_mail = [c for c in rec.commands if isinstance(c, Mail)]
    assert [(e.sender, e.params) for e in mails] == [(c.sender, c.params) for c in sent_mail]
    assert [e.recipient for e in rcpts] == [c.recipient for c in rec.commands if isinstance(c, Rcpt)]

    checks = expect.checks
    params = mails[0].params
    assert params.body == checks.get("body_type")
    assert params.size == checks.get("size")
    assert params.envid == checks.get("envid")
    assert params.smtputf8 == checks.get("smtputf8", False)
    assert str(mails[0].sender) == checks.get("sender", "a@client.test")
    assert rcpts[0].params.notify == (frozenset(n) if (n := checks.get("notify")) else None)
    if "orcpt" in checks:
        assert rcpts[0].params.orcpt == checks["orcpt"]
    assert auth.received == checks.get("auth", [])


@pytest.mark.parametrize("name", NAMES)
def test_any_read_size_gives_the_same_session(name: str) -> None:
    client, _, _ = load(name)
    whole_events, whole_out, _ = serve(name, [client])
    for size in (1, 2, 7, 64):
        chunks = [client[i : i + size] for i in range(0, len(client), size)]
        events, out, _ = serve(name, chunks)
        assert messages(events) == messages(whole_events)
        assert [e for e in events if not isinstance(e, BodyChunk)] == [
            e for e in whole_events if not isinstance(e, BodyChunk)
        ]
        assert out == whole_out


@pytest.mark.parametrize("name", NAMES)
def test_engine_replies_match_the_recording(name: str) -> None:
    client, server, _ = load(name)
    _, out, _ = serve(name, [client])
    ours = server_replies(out)[1]  # every reply parses with the client's reply parser
    recorded = server_replies(server)[1]
    if name.startswith("mailward-"):
        # Recorded from this engine: a change in what it answers must be deliberate.
        assert codes_of(out) == codes_of(server)
    # smtp-sink answered the same commands with the same codes (its EHLO reply just says less).
    assert [r.code for r in ours] == [r.code for r in recorded]


# --- the server side through the client engine ---------------------------------------------------


def drive_client(name: str, server: bytes, rec: Recorded) -> tuple[list[ClientEvent], bytes]:
    """Asks a ClientConnection for the recorded session and plays the recorded replies to it."""
    hello = rec.commands[0]
    assert isinstance(hello, Ehlo | Helo)
    client = ClientConnection(hello.hostname, tls_active="auth" in name)
    auth = next((c for c in rec.commands if isinstance(c, Auth)), None)
    answers = list(rec.auth_lines)
    transactions = []
    mail: Mail | None = None
    for cmd in rec.commands:
        if isinstance(cmd, Mail):
            mail = cmd
            transactions.append((cmd, []))
        elif isinstance(cmd, Rcpt):
            assert mail is not None
            transactions[-1][1].append((cmd.recipient, cmd.params))
    bodies = list(rec.bodies)
    assert isinstance(rec.commands[-1], Quit)

    def next_step() -> None:
        if transactions:
            m, rcpts = transactions.pop(0)
            assert client.start_transaction(m.sender, rcpts, m.params, size=m.params.size) is None
        else:
            client.quit()

    events: list[ClientEvent] = []
    out = []
    for piece in server_replies(server)[0]:
        client.receive_data(piece)
        while (ev := client.next_event()) is not None:
            events.append(ev)
            if isinstance(ev, GreetingReceived):
                client.ehlo()
            elif isinstance(ev, EhloCompleted) and auth is not None and not client.authenticated:
                client.auth(auth.mechanism, auth.initial_response)
            elif isinstance(ev, AuthChallenge):
                client.auth_respond(answers.pop(0))
            elif isinstance(ev, ReadyForBody):
                client.send_body(bodies.pop(0))
                client.end_body()
            elif isinstance(ev, AuthCompleted):
                assert ev.succeeded
                next_step()
            elif isinstance(ev, EhloCompleted | TransactionResult):
                next_step()
            else:
                assert isinstance(ev, ReplyReceived), ev
        out.append(client.data_to_send())
    client.receive_eof()
    return events, b"".join(out)


@pytest.mark.parametrize("name", NAMES)
def test_server_replies_through_the_client(name: str) -> None:
    client_bytes, server, rec = load(name)
    events, written = drive_client(name, server, rec)

    results = [e for e in events if isinstance(e, TransactionResult)]
    assert len(results) == EXPECTED[name].messages
    assert all(len(r.delivered) == EXPECTED[name].recipients for r in results)
    assert isinstance(events[-1], ReplyReceived) and events[-1].command == "QUIT"
    assert events[-1].reply.code == 221

    # The client wrote what the tool wrote: the same commands (EHLO where smtp-source said HELO,
    # parameters in our order), AUTH answers and byte-identical bodies after dot-stuffing.
    ours = split_client(written, len(rec.auth_lines))
    assert ours.commands == [Ehlo(c.hostname) if isinstance(c, Helo) else c for c in rec.commands]
    assert ours.auth_lines == rec.auth_lines
    assert ours.bodies == rec.bodies
    if name.startswith(("sink-swaks", "mailward-swaks")):
        assert written == client_bytes  # swaks writes parameters in the same order as we do


def test_smtp_sink_ehlo_reply_with_empty_last_line() -> None:
    _, replies = server_replies((HERE / "sink-swaks-plain.server").read_bytes())
    ehlo = replies[1]
    assert ehlo.code == 250 and ehlo.lines[-1] == ""
    caps = Capabilities.from_ehlo(ehlo)
    assert caps.pipelining and caps.eightbitmime and caps.dsn and caps.auth == {"PLAIN", "LOGIN"}
    assert caps.enhancedstatuscodes and not caps.size and not caps.chunking
