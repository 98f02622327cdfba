"""The client role: feed server replies, assert events and the bytes the client writes. No sockets."""

from __future__ import annotations

import base64
import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from smtp_helpers import session

from mailward.smtp.address import Mailbox, parse_mailbox
from mailward.smtp.client import (
    CONNECTION_LOST,
    AuthChallenge,
    AuthCompleted,
    BodyEncoder,
    Capabilities,
    ClientConnection,
    ClientEvent,
    ClientProtocolError,
    ClientUsageError,
    EhloCompleted,
    EhloRefused,
    GreetingReceived,
    MalformedReply,
    ReadyForBody,
    ReplyParser,
    ReplyReceived,
    ServerClosed,
    StartTlsReady,
    StartTlsRefused,
    TransactionResult,
)
from mailward.smtp.codes import Reply
from mailward.smtp.commands import InjectionError, MailParams, RcptParams
from mailward.smtp.events import BodyChunk, BodyEnded, BodyRejected
from mailward.smtp.server import ServerOptions

GREETING = b"220 mx.test ESMTP\r\n"
EHLO_FULL = (
    b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250-CHUNKING\r\n"
    b"250-BINARYMIME\r\n250-STARTTLS\r\n250-ENHANCEDSTATUSCODES\r\n250-DSN\r\n250 SMTPUTF8\r\n"
)
EHLO_BARE = b"250-mx.test\r\n250 ENHANCEDSTATUSCODES\r\n"
SENDER = parse_mailbox("alice@client.test")
BOB = parse_mailbox("bob@mx.test")
CAROL = parse_mailbox("carol@mx.test")


def drain(client: ClientConnection) -> list[ClientEvent]:
    out = []
    while (ev := client.next_event()) is not None:
        out.append(ev)
    return out


def feed(client: ClientConnection, data: bytes) -> list[ClientEvent]:
    client.receive_data(data)
    return drain(client)


def connected(ehlo: bytes = EHLO_FULL, *, tls: bool = False, **kw: bool) -> ClientConnection:
    client = ClientConnection("client.test", tls_active=tls, **kw)
    assert feed(client, GREETING) == [GreetingReceived(Reply(220, None, ("mx.test ESMTP",)))]
    client.ehlo()
    assert client.data_to_send() == b"EHLO client.test\r\n"
    evs = feed(client, ehlo)
    assert len(evs) == 1 and isinstance(evs[0], EhloCompleted)
    return client


def rcpts(*boxes: Mailbox) -> list[tuple[Mailbox, RcptParams]]:
    return [(b, RcptParams()) for b in boxes]


def only_result(events: list[ClientEvent]) -> TransactionResult:
    results = [e for e in events if isinstance(e, TransactionResult)]
    assert len(results) == 1
    return results[0]


def parse_all(data: bytes) -> list[Reply | MalformedReply]:
    parser = ReplyParser()
    parser.feed(data)
    out = []
    while (item := parser.next_reply()) is not None:
        out.append(item)
    return out


# --- reply parsing -------------------------------------------------------------------------------


def test_single_and_multiline_replies() -> None:
    assert parse_all(b"250 Ok\r\n") == [Reply(250, None, ("Ok",))]
    assert parse_all(b"250-first\r\n250-second\r\n250 third\r\n") == [
        Reply(250, None, ("first", "second", "third"))
    ]
    assert parse_all(b"250\r\n250-\r\n250 \r\n") == [Reply(250, None, ("",)), Reply(250, None, ("", ""))]


def test_enhanced_status_code_is_extracted_and_stripped_from_every_line() -> None:
    assert parse_all(b"550-5.1.1 No such user\r\n550 5.1.1 here\r\n") == [
        Reply(550, "5.1.1", ("No such user", "here"))
    ]
    assert parse_all(b"250 2.0.0\r\n") == [Reply(250, "2.0.0", ("",))]
    # The class must match the reply, and 3xx replies carry none.
    assert parse_all(b"250 5.1.1 odd\r\n") == [Reply(250, None, ("5.1.1 odd",))]
    assert parse_all(b"354 2.0.0 go\r\n") == [Reply(354, None, ("2.0.0 go",))]
    assert parse_all(b"250 2.0.0x not a code\r\n") == [Reply(250, None, ("2.0.0x not a code",))]


def test_reply_round_trips_through_to_bytes() -> None:
    for reply in (Reply(250, "2.1.5", ("Recipient ok",)), Reply(421, "4.3.2", ("a", "b", "")),
                  Reply(354, None, ("End data with <CR><LF>.<CR><LF>",))):
        assert parse_all(reply.to_bytes()) == [reply]


def test_bare_lf_is_tolerated_and_text_is_sanitised() -> None:
    assert parse_all(b"250-one\n250 two\n") == [Reply(250, None, ("one", "two"))]
    [reply] = parse_all(b"550 bad\rtext\x1b[31m \xff \xe2\x80\xa8 caf\xc3\xa9\r\n")
    assert isinstance(reply, Reply)
    assert reply.lines == ("bad\ufffdtext\ufffd[31m \ufffd \ufffd café",)


@pytest.mark.parametrize("line", [b"abc hello", b"25 short", b"2500 long", b"600 bad class",
                                  b"199 bad class", b"260 bad second digit", b"250_x", b"",
                                  b" 250 indented"])
def test_garbage_codes_are_malformed(line: bytes) -> None:
    out = parse_all(line + b"\r\n250 next\r\n")
    assert isinstance(out[0], MalformedReply)
    assert out[1:] == [Reply(250, None, ("next",))]


def test_mismatched_codes_within_a_reply() -> None:
    out = parse_all(b"250-one\r\n251 two\r\n250 ok\r\n")
    assert isinstance(out[0], MalformedReply) and "250 to 251" in out[0].detail
    assert out[1:] == [Reply(250, None, ("ok",))]


def test_huge_line_is_reported_once_and_skipped_with_bounded_memory() -> None:
    parser = ReplyParser()
    parser.feed(b"250 " + b"x" * 100)
    errors = 0
    for _ in range(1000):  # 1 MB without a line end, in pieces
        parser.feed(b"x" * 1000)
        while (item := parser.next_reply()) is not None:
            assert isinstance(item, MalformedReply)
            errors += 1
        assert len(parser._buf) <= 4096
    parser.feed(b"xxx\r\n250 fine\r\n")
    assert parser.next_reply() == Reply(250, None, ("fine",))
    assert errors == 1


def test_line_limit_is_exact() -> None:
    ok = b"250 " + b"x" * 2044  # 2048 octets before CRLF
    assert parse_all(ok + b"\r\n") == [Reply(250, None, ("x" * 2044,))]
    [err] = parse_all(ok + b"y\r\n")
    assert isinstance(err, MalformedReply)


def test_endless_continuation_lines_are_bounded() -> None:
    parser = ReplyParser()
    errors = 0
    for _ in range(100):
        parser.feed(b"250-more\r\n" * 100)
        while (item := parser.next_reply()) is not None:
            assert isinstance(item, MalformedReply)
            errors += 1
        assert len(parser._lines) <= 200
    assert errors == 1
    parser.feed(b"250 end of the endless reply\r\n220 next\r\n")
    assert parser.next_reply() == Reply(220, None, ("next",))


def test_line_count_limit_is_exact() -> None:
    assert parse_all(b"250-x\r\n" * 199 + b"250 x\r\n") == [Reply(250, None, ("x",) * 200)]
    out = parse_all(b"250-x\r\n" * 200 + b"250 x\r\n")
    assert len(out) == 1 and isinstance(out[0], MalformedReply)


REPLY_STREAM = (
    b"220-mx.test ESMTP\r\n220 second line\r\n250-2.0.0 a\n250 2.0.0 b\r\n"
    b"garbage\r\n" + b"250 " + b"y" * 3000 + b"\r\n"
    + b"250-x\r\n251 y\r\n"
    + b"250-z\r\n" * 205 + b"250 z\r\n"
    + b"550 5.1.1 caf\xc3\xa9\r\n354 go ahead\r\n"
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, len(REPLY_STREAM)), max_size=30))
def test_reply_parsing_is_independent_of_chunking(cuts: list[int]) -> None:
    whole = parse_all(REPLY_STREAM)
    bounds = sorted({0, len(REPLY_STREAM), *cuts})
    parser = ReplyParser()
    pieces: list[Reply | MalformedReply] = []
    for a, b in itertools.pairwise(bounds):
        parser.feed(REPLY_STREAM[a:b])
        while (item := parser.next_reply()) is not None:
            pieces.append(item)
    assert pieces == whole
    assert [type(x).__name__ for x in whole] == [
        "Reply", "Reply", "MalformedReply", "MalformedReply", "MalformedReply", "MalformedReply",
        "Reply", "Reply"]


def test_every_single_byte_split_gives_the_same_replies() -> None:
    data = b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 10\r\n550 5.7.1 no\r\n"
    whole = parse_all(data)
    for i in range(len(data) + 1):
        parser = ReplyParser()
        out = []
        for part in (data[:i], data[i:]):
            parser.feed(part)
            while (item := parser.next_reply()) is not None:
                out.append(item)
        assert out == whole


# --- capabilities --------------------------------------------------------------------------------


def caps_of(ehlo: bytes) -> Capabilities:
    [reply] = parse_all(ehlo)
    assert isinstance(reply, Reply)
    return Capabilities.from_ehlo(reply)


def test_postfix_capabilities() -> None:
    caps = caps_of(
        b"250-mail.example.org\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-VRFY\r\n250-ETRN\r\n"
        b"250-STARTTLS\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250-SMTPUTF8\r\n"
        b"250 CHUNKING\r\n"
    )
    assert caps == Capabilities(
        hostname="mail.example.org", pipelining=True, size=10240000, eightbitmime=True, smtputf8=True,
        chunking=True, starttls=True, dsn=True, enhancedstatuscodes=True, keywords=caps.keywords)
    assert caps.keywords["SIZE"] == "10240000" and caps.keywords["VRFY"] == ""
    assert not caps.binarymime and not caps.requiretls and caps.auth == frozenset()


def test_exim_capabilities() -> None:
    caps = caps_of(
        b"250-mx.example.net Hello client.example [192.0.2.1]\r\n250-SIZE 52428800\r\n"
        b"250-LIMITS MAILMAX=1000 RCPTMAX=50000\r\n250-8BITMIME\r\n250-PIPELINING\r\n"
        b"250-PIPE_CONNECT\r\n250-CHUNKING\r\n250-PRDR\r\n250-AUTH PLAIN LOGIN CRAM-MD5\r\n"
        b"250 HELP\r\n"
    )
    assert caps.hostname == "mx.example.net" and caps.size == 52428800
    assert caps.pipelining and caps.chunking and caps.eightbitmime and not caps.starttls
    assert caps.auth == {"PLAIN", "LOGIN", "CRAM-MD5"}
    assert caps.keywords["LIMITS"] == "MAILMAX=1000 RCPTMAX=50000"
    assert "PIPE_CONNECT" not in caps.keywords  # not a valid ehlo-keyword


def test_gmail_like_capabilities() -> None:
    caps = caps_of(
        b"250-smtp.gmail.com at your service, [192.0.2.1]\r\n250-SIZE 35882577\r\n250-8BITMIME\r\n"
        b"250-AUTH LOGIN PLAIN XOAUTH2 PLAIN-CLIENTTOKEN OAUTHBEARER XOAUTH\r\n"
        b"250-ENHANCEDSTATUSCODES\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 SMTPUTF8\r\n"
    )
    assert caps.hostname == "smtp.gmail.com" and caps.size == 35882577
    assert caps.auth == {"LOGIN", "PLAIN", "XOAUTH2", "PLAIN-CLIENTTOKEN", "OAUTHBEARER", "XOAUTH"}
    assert caps.smtputf8 and caps.chunking and not caps.dsn


def test_microsoft_like_capabilities_with_legacy_auth() -> None:
    caps = caps_of(
        b"250-BN8PR.outlook.office365.com Hello [192.0.2.1]\r\n250-SIZE 157286400\r\n"
        b"250-PIPELINING\r\n250-DSN\r\n250-ENHANCEDSTATUSCODES\r\n250-AUTH NTLM\r\n"
        b"250-AUTH=LOGIN PLAIN\r\n250-8BITMIME\r\n250-BINARYMIME\r\n250-CHUNKING\r\n250 SMTPUTF8\r\n"
    )
    assert caps.auth == {"NTLM", "LOGIN", "PLAIN"}
    assert caps.keywords["AUTH"] == "NTLM" and caps.keywords["AUTH="] == "LOGIN PLAIN"
    assert caps.binarymime and caps.chunking and caps.dsn and caps.size == 157286400
    only_legacy = caps_of(b"250-mx\r\n250 AUTH=LOGIN PLAIN\r\n")
    assert only_legacy.auth == {"LOGIN", "PLAIN"}


def test_size_without_number_means_no_fixed_limit() -> None:
    assert caps_of(b"250-mx\r\n250 SIZE\r\n").size == 0
    assert caps_of(b"250-mx\r\n250 SIZE lots\r\n").size == 0
    assert caps_of(b"250-mx\r\n250 8BITMIME\r\n").size is None
    assert caps_of(b"250-mx\r\n250 requiretls\r\n").requiretls  # keywords are case-insensitive


def test_capabilities_are_immutable_and_hashable() -> None:
    caps = caps_of(EHLO_FULL)
    with pytest.raises(TypeError):
        caps.keywords["X"] = "y"  # type: ignore[index]
    assert hash(caps) == hash(caps_of(EHLO_FULL))


# --- greeting, EHLO, API misuse ------------------------------------------------------------------


def test_commands_before_greeting_or_ehlo_are_refused() -> None:
    client = ClientConnection("client.test")
    with pytest.raises(ClientUsageError, match="greeting"):
        client.ehlo()
    feed(client, GREETING)
    with pytest.raises(ClientUsageError, match="EHLO"):
        client.start_transaction(SENDER, rcpts(BOB))
    with pytest.raises(ClientUsageError, match="body phase"):
        client.send_body(b"x")
    assert client.data_to_send() == b""


def test_refused_greeting_allows_only_quit() -> None:
    client = ClientConnection("client.test")
    [ev] = feed(client, b"554 5.7.1 no service for you\r\n")
    assert ev == GreetingReceived(Reply(554, "5.7.1", ("no service for you",)))
    with pytest.raises(ClientUsageError, match="refused service"):
        client.ehlo()
    client.quit()
    assert client.data_to_send() == b"QUIT\r\n"
    assert feed(client, b"221 bye\r\n") == [ReplyReceived("QUIT", Reply(221, None, ("bye",)))]
    client.receive_eof()
    assert drain(client) == [ServerClosed(None)]


def test_421_greeting_closes() -> None:
    client = ClientConnection("client.test")
    assert feed(client, b"421 4.7.0 busy\r\n") == [ServerClosed(Reply(421, "4.7.0", ("busy",)))]
    assert client.closed
    client.quit()  # harmless once closed
    assert client.data_to_send() == b""


def test_ehlo_falls_back_to_helo_on_500_and_502() -> None:
    for code in (b"500", b"502"):
        client = ClientConnection("client.test")
        feed(client, GREETING)
        client.ehlo()
        client.data_to_send()
        assert feed(client, code + b" 5.5.1 what\r\n") == []
        assert client.data_to_send() == b"HELO client.test\r\n"
        [ev] = feed(client, b"250 mx.test\r\n")
        assert isinstance(ev, EhloCompleted) and ev.capabilities == Capabilities("mx.test", esmtp=False)
        # No ESMTP: no SIZE= parameter, no pipelining.
        client.start_transaction(SENDER, rcpts(BOB), MailParams(size=10))
        assert client.data_to_send() == b"MAIL FROM:<alice@client.test>\r\n"


def test_ehlo_refused() -> None:
    client = ClientConnection("client.test")
    feed(client, GREETING)
    client.ehlo()
    assert feed(client, b"550 5.7.1 go away\r\n") == [EhloRefused(Reply(550, "5.7.1", ("go away",)))]
    assert client.capabilities is None
    client.ehlo()
    assert feed(client, b"502 no\r\n") == []
    assert feed(client, b"501 still no\r\n") == [EhloRefused(Reply(501, None, ("still no",)))]


# --- command injection ---------------------------------------------------------------------------


def test_injection_in_local_hostname_is_refused_at_construction() -> None:
    with pytest.raises(InjectionError):
        ClientConnection("client.test\r\nRCPT TO:<victim@example.com>")


@pytest.mark.parametrize(
    ("sender", "params", "rparams"),
    [
        (Mailbox("a>\r\nRCPT TO:<c", "d.test", "d.test", False), MailParams(), RcptParams()),
        (SENDER, MailParams(ret="FULL\r\nRSET"), RcptParams()),
        (SENDER, MailParams(body="7BIT\nDATA"), RcptParams()),
        (SENDER, MailParams(), RcptParams(orcpt="rfc822\x00;x@y")),
    ],
)
def test_injection_through_the_api_is_refused_before_anything_is_written(
    sender: Mailbox, params: MailParams, rparams: RcptParams
) -> None:
    client = connected()
    with pytest.raises(ValueError, match=r"control|invalid"):
        client.start_transaction(sender, [(BOB, rparams)], params)
    assert client.data_to_send() == b""
    assert not client.in_transaction
    client.noop()  # still usable
    assert client.data_to_send() == b"NOOP\r\n"


def test_xtext_parameters_cannot_inject() -> None:
    client = connected()
    client.start_transaction(SENDER, rcpts(BOB), MailParams(envid="x\r\nRSET", auth="<>"))
    out = client.data_to_send()
    assert out.count(b"\r\n") == 3 and b"ENVID=x+0D+0ARSET" in out
    assert b"AUTH=" not in out  # the server offers no AUTH: RFC 4954 §5


def test_utf8_orcpt_is_encoded_not_injected() -> None:
    client = connected()
    client.start_transaction(SENDER, [(BOB, RcptParams(orcpt="utf-8;x@y\r\nRSET"))])
    out = client.data_to_send()
    assert b"RSET" not in out.split(b"\r\n")


# --- message content -----------------------------------------------------------------------------

LINE_BREAK = re.compile(rb"\r\n|\r|\n")


def normalised(body: bytes) -> bytes:
    out = LINE_BREAK.sub(b"\r\n", body)
    return out if not out or out.endswith(b"\r\n") else out + b"\r\n"


def encode(chunks: list[bytes], **kw: bool) -> bytes:
    enc = BodyEncoder(**kw)
    return b"".join(enc.encode(c) for c in chunks) + enc.finish()


def test_dot_stuffing_and_line_ending_repair() -> None:
    assert encode([b".a\r\n.b\r\nc.\r\n..d"]) == b"..a\r\n..b\r\nc.\r\n...d\r\n"
    assert encode([b"a\nb\rc\r\r\nd\n\re"]) == b"a\r\nb\r\nc\r\n\r\nd\r\n\r\ne\r\n"
    assert encode([b"x\r", b"\n.y"]) == b"x\r\n..y\r\n"  # CR | LF is one CRLF
    assert encode([b"x\r", b"\r", b"\n", b"."]) == b"x\r\n\r\n..\r\n"
    assert encode([b"x\r\n", b".", b"."]) == b"x\r\n...\r\n"
    assert encode([b"x\r"]) == b"x\r\n"
    assert encode([]) == b"" and encode([b"", b""]) == b""
    assert encode([b".\r\n"]) == b"..\r\n"
    assert encode([b"a\r\n.\r\n.b"], dot_stuff=False) == b"a\r\n.\r\n.b\r\n"
    assert encode([b"\x00\r\n.\n\r"], normalize=False, dot_stuff=False) == b"\x00\r\n.\n\r"


def test_smuggling_sequences_never_leave() -> None:
    for evil in (b"\n.\n", b"\n.\r", b"\r.\n", b"\r.\r", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r\r\n",
                 b"\r\r\n.\r\r\n", b"\r\n\x00.\r\n", b"\r\n.\r\n"):
        out = encode([b"a", evil, b"MAIL FROM:<spoof@x>\r\n"])
        assert LINE_BREAK.sub(b"|", out).count(b"|") == out.count(b"\r\n")  # no bare CR or LF
        assert b"\r\n.\r\n" not in out


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=300).map(lambda b: b.translate(bytes.maketrans(b"abcd", b"\r\n.."))),
    st.lists(st.integers(0, 300), max_size=12),
)
def test_server_unstuffs_exactly_the_normalised_body(body: bytes, cuts: list[int]) -> None:
    bounds = sorted({0, len(body), *(c for c in cuts if c <= len(body))})
    wire = encode([body[a:b] for a, b in itertools.pairwise(bounds)])
    assert b"\r\n" in wire or not wire
    events, _ = session(
        b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@mx.test>\r\nDATA\r\n" + wire + b".\r\n",
        ServerOptions(hostname="mx.test", max_text_line=100_000),
    )
    assert not any(isinstance(e, BodyRejected) for e in events)
    assert any(isinstance(e, BodyEnded) for e in events)
    assert b"".join(e.data for e in events if isinstance(e, BodyChunk)) == normalised(body)


# --- transactions --------------------------------------------------------------------------------


def test_pipelined_transaction_is_one_write() -> None:
    client = connected()
    assert client.start_transaction(SENDER, rcpts(BOB, CAROL), MailParams(body="8BITMIME"), size=500) is None
    assert client.data_to_send() == (
        b"MAIL FROM:<alice@client.test> SIZE=500 BODY=8BITMIME\r\nRCPT TO:<bob@mx.test>\r\n"
        b"RCPT TO:<carol@mx.test>\r\nDATA\r\n"
    )
    assert feed(client, b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 unknown\r\n") == []
    assert feed(client, b"354 go\r\n") == [ReadyForBody(chunking=False)]
    with pytest.raises(ClientUsageError):
        client.rset()
    client.send_body(b"Subject: x\n\n.hi")
    client.end_body()
    assert client.data_to_send() == b"Subject: x\r\n\r\n..hi\r\n.\r\n"
    result = only_result(feed(client, b"250 2.0.0 queued as 1\r\n"))
    assert result.mail_reply == Reply(250, "2.1.0", ("ok",))
    assert result.rcpt_replies == ((BOB, Reply(250, "2.1.5", ("ok",))),
                                   (CAROL, Reply(550, "5.1.1", ("unknown",))))
    assert result.data_reply == Reply(250, "2.0.0", ("queued as 1",))
    assert result.outcomes == ((BOB, result.data_reply), (CAROL, Reply(550, "5.1.1", ("unknown",))))
    assert result.delivered == (BOB,)


def test_without_pipelining_one_command_at_a_time() -> None:
    client = connected(EHLO_BARE)
    client.start_transaction(SENDER, rcpts(BOB, CAROL))
    assert client.data_to_send() == b"MAIL FROM:<alice@client.test>\r\n"
    assert feed(client, b"250 ok\r\n") == []
    assert client.data_to_send() == b"RCPT TO:<bob@mx.test>\r\n"
    assert feed(client, b"450 4.2.0 later\r\n") == []
    assert client.data_to_send() == b"RCPT TO:<carol@mx.test>\r\n"
    assert feed(client, b"250 ok\r\n") == []
    assert client.data_to_send() == b"DATA\r\n"
    assert feed(client, b"354 go\r\n") == [ReadyForBody(chunking=False)]
    client.end_body()
    assert client.data_to_send() == b".\r\n"
    result = only_result(feed(client, b"250 ok\r\n"))
    assert [r.code for _, r in result.outcomes] == [450, 250]


def test_mail_refused_without_pipelining_sends_no_rcpt() -> None:
    client = connected(EHLO_BARE)
    client.start_transaction(SENDER, rcpts(BOB, CAROL))
    client.data_to_send()
    result = only_result(feed(client, b"553 5.7.1 sender refused\r\n"))
    refusal = Reply(553, "5.7.1", ("sender refused",))
    assert result == TransactionResult(refusal, ((BOB, refusal), (CAROL, refusal)), None)
    assert client.data_to_send() == b""
    assert not client.in_transaction


def test_mail_refused_with_pipelining_gives_every_recipient_that_failure() -> None:
    client = connected()
    client.start_transaction(SENDER, rcpts(BOB))
    client.data_to_send()
    result = only_result(feed(client, b"452 4.3.1 full\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n"))
    assert result.rcpt_replies == ((BOB, Reply(452, "4.3.1", ("full",))),)
    assert result.data_reply is None and result.delivered == ()


def test_no_recipient_accepted_without_pipelining_sends_no_data() -> None:
    client = connected(EHLO_BARE)
    client.start_transaction(SENDER, rcpts(BOB))
    client.data_to_send()
    feed(client, b"250 ok\r\n")
    client.data_to_send()
    result = only_result(feed(client, b"550 no\r\n"))
    assert result.data_reply is None and client.data_to_send() == b""


def test_unfinished_transaction_is_reset_before_the_next_one() -> None:
    client = connected()
    client.start_transaction(SENDER, rcpts(BOB))
    client.data_to_send()
    only_result(feed(client, b"250 ok\r\n550 no\r\n554 no valid recipients\r\n"))
    client.start_transaction(SENDER, rcpts(CAROL))
    assert client.data_to_send().startswith(b"RSET\r\nMAIL FROM:")
    assert feed(client, b"250 reset\r\n250 ok\r\n250 ok\r\n354 go\r\n") == [ReadyForBody(False)]
    client.end_body()
    client.data_to_send()
    only_result(feed(client, b"250 queued\r\n"))
    client.start_transaction(SENDER, rcpts(CAROL))  # the content ended: no RSET needed
    assert client.data_to_send().startswith(b"MAIL FROM:")


def test_pipelined_data_answered_354_without_recipients_gets_a_lone_dot() -> None:
    client = connected()
    client.start_transaction(SENDER, rcpts(BOB))
    client.data_to_send()
    assert feed(client, b"250 ok\r\n550 no\r\n354 go ahead anyway\r\n") == []
    assert client.data_to_send() == b".\r\n"
    result = only_result(feed(client, b"554 5.5.1 no valid recipients\r\n"))
    assert result.data_reply is None and result.outcomes[0][1].code == 550


def test_positive_reply_to_data_is_a_protocol_error() -> None:
    client = connected()
    client.start_transaction(SENDER, rcpts(BOB))
    client.data_to_send()
    events = feed(client, b"250 ok\r\n250 ok\r\n250 sure, no need for content\r\n")
    result = only_result(events)
    assert result.data_reply is not None and result.data_reply.code == 451
    assert result.delivered == ()
    assert isinstance(events[-1], ClientProtocolError) and client.closed


def test_data_refused() -> None:
    client = connected()
    client.start_transaction(SENDER, rcpts(BOB))
    client.data_to_send()
    result = only_result(feed(client, b"250 ok\r\n250 ok\r\n451 4.3.0 try later\r\n"))
    assert result.outcomes == ((BOB, Reply(451, "4.3.0", ("try later",))),)


def test_rset_noop_quit_replies() -> None:
    client = connected()
    client.rset()
    client.noop()
    client.quit()
    # NOOP is a synchronisation point (RFC 2920 §3.1): QUIT waits for its reply.
    assert client.data_to_send() == b"RSET\r\nNOOP\r\n"
    assert feed(client, b"250 2.0.0 reset\r\n250 2.0.0 ok\r\n") == [
        ReplyReceived("RSET", Reply(250, "2.0.0", ("reset",))),
        ReplyReceived("NOOP", Reply(250, "2.0.0", ("ok",))),
    ]
    assert client.data_to_send() == b"QUIT\r\n"
    assert feed(client, b"221 2.0.0 bye\r\n") == [ReplyReceived("QUIT", Reply(221, "2.0.0", ("bye",)))]
    with pytest.raises(ClientUsageError, match="after QUIT"):
        client.noop()


def test_421_mid_transaction_finishes_the_transaction_then_closes() -> None:
    client = connected()
    client.start_transaction(SENDER, rcpts(BOB, CAROL))
    client.data_to_send()
    bye = Reply(421, "4.3.2", ("shutting down",))
    events = feed(client, b"250 ok\r\n250 ok\r\n421 4.3.2 shutting down\r\n")
    assert events == [
        TransactionResult(Reply(250, None, ("ok",)), ((BOB, Reply(250, None, ("ok",))), (CAROL, bye)), bye),
        ServerClosed(bye),
    ]
    assert client.closed
    assert feed(client, b"250 late\r\n") == []
    client.receive_eof()
    assert drain(client) == []


def test_421_during_the_body() -> None:
    client = connected()
    client.start_transaction(SENDER, rcpts(BOB))
    client.data_to_send()
    feed(client, b"250 ok\r\n250 ok\r\n354 go\r\n")
    client.send_body(b"partial")
    events = feed(client, b"421 4.4.2 timeout\r\n")
    assert only_result(events).outcomes[0][1].code == 421
    with pytest.raises(ClientUsageError):
        client.send_body(b"more")


def test_eof_mid_transaction() -> None:
    client = connected()
    client.start_transaction(SENDER, rcpts(BOB))
    client.data_to_send()
    feed(client, b"250 ok\r\n")
    client.receive_eof()
    events = drain(client)
    assert only_result(events).outcomes == ((BOB, CONNECTION_LOST),)
    assert events[-1] == ServerClosed(None)


def test_unsolicited_replies() -> None:
    client = connected()
    [ev] = feed(client, b"250 surprise\r\n")
    assert isinstance(ev, ClientProtocolError) and "no command outstanding" in ev.detail
    client = connected()
    assert feed(client, b"421 4.4.2 idle timeout\r\n") == [
        ServerClosed(Reply(421, "4.4.2", ("idle timeout",)))]


def test_malformed_reply_is_a_protocol_error_not_an_exception() -> None:
    client = connected()
    client.start_transaction(SENDER, rcpts(BOB))
    client.data_to_send()
    events = feed(client, b"250 ok\r\n2x0 what\r\n")
    assert only_result(events).outcomes[0][1].code == 451
    assert isinstance(events[-1], ClientProtocolError)
    assert client.data_to_send() == b""


def test_intermediate_reply_to_mail_is_a_protocol_error() -> None:
    client = connected()
    client.start_transaction(SENDER, rcpts(BOB))
    client.data_to_send()
    events = feed(client, b"354 what\r\n")
    assert isinstance(events[-1], ClientProtocolError)


def test_one_transaction_at_a_time_and_a_recipient_needed() -> None:
    client = connected()
    with pytest.raises(ClientUsageError, match="recipient"):
        client.start_transaction(SENDER, [])
    client.start_transaction(SENDER, rcpts(BOB))
    with pytest.raises(ClientUsageError, match="transaction"):
        client.start_transaction(SENDER, rcpts(BOB))


# The server's answers, round by round: a server cannot answer a command before it has it, so a
# round is delivered only after the client wrote the commands it answers.
ROUNDS = [
    GREETING,
    EHLO_FULL,
    b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no\r\n354 go\r\n",
    b"250 2.0.0 queued\r\n",
    b"250 2.0.0 reset\r\n",
    b"221 bye\r\n",
]


def run_script(cuts: set[int]) -> tuple[list[ClientEvent], bytes]:
    client = ClientConnection("client.test")
    events: list[ClientEvent] = []
    out = b""
    offset = 0
    for server_bytes in ROUNDS:
        inner = {c - offset for c in cuts if 0 < c - offset < len(server_bytes)}
        bounds = sorted({0, len(server_bytes), *inner})
        offset += len(server_bytes)
        for a, b in itertools.pairwise(bounds):
            client.receive_data(server_bytes[a:b])
            while (ev := client.next_event()) is not None:
                events.append(ev)
                if isinstance(ev, GreetingReceived):
                    client.ehlo()
                elif isinstance(ev, EhloCompleted):
                    client.start_transaction(SENDER, rcpts(BOB, CAROL))
                elif isinstance(ev, ReadyForBody):
                    client.send_body(b"hi\n")
                    client.end_body()
                elif isinstance(ev, TransactionResult):
                    client.rset()
                elif isinstance(ev, ReplyReceived) and ev.command == "RSET":
                    client.quit()
            out += client.data_to_send()
    return events, out


@settings(max_examples=100, deadline=None)
@given(st.sets(st.integers(0, sum(map(len, ROUNDS))), max_size=25))
def test_client_events_are_independent_of_chunking(cuts: set[int]) -> None:
    whole = run_script(set())
    assert run_script(cuts) == whole
    assert [type(e).__name__ for e in whole[0]] == [
        "GreetingReceived", "EhloCompleted", "ReadyForBody", "TransactionResult", "ReplyReceived",
        "ReplyReceived"]
    assert whole[1].endswith(b"DATA\r\nhi\r\n.\r\nRSET\r\nQUIT\r\n")


def test_replies_ahead_of_their_commands_are_a_protocol_error() -> None:
    client = ClientConnection("client.test")
    events = feed(client, GREETING + EHLO_FULL)
    assert isinstance(events[0], GreetingReceived) and isinstance(events[1], ClientProtocolError)


# --- local failures ------------------------------------------------------------------------------


def local_failure(client: ClientConnection, *args: object, **kw: object) -> Reply:
    reply = client.start_transaction(*args, **kw)  # type: ignore[arg-type]
    assert reply is not None
    assert client.data_to_send() == b""
    result = only_result(drain(client))
    assert result.mail_reply == reply and result.data_reply is None
    assert all(r == reply for _, r in result.rcpt_replies)
    assert not client.in_transaction
    return reply


def test_size_over_the_announced_limit_is_refused_locally() -> None:
    reply = local_failure(connected(), SENDER, rcpts(BOB), size=1001)
    assert (reply.code, reply.enhanced) == (552, "5.3.4") and "1001" in reply.text
    reply = local_failure(connected(), SENDER, rcpts(BOB), MailParams(size=5000))
    assert reply.code == 552
    client = connected()
    assert client.start_transaction(SENDER, rcpts(BOB), size=1000) is None
    assert b"SIZE=1000" in client.data_to_send()


def test_size_zero_means_no_limit() -> None:
    client = connected(b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE\r\n")
    assert client.start_transaction(SENDER, rcpts(BOB), size=10**12) is None
    assert b"SIZE=1000000000000" in client.data_to_send()


def test_smtputf8_needed_but_not_offered() -> None:
    reply = local_failure(connected(EHLO_BARE), parse_mailbox("jörg@client.test"), rcpts(BOB))
    assert (reply.code, reply.enhanced) == (554, "5.6.7")
    reply = local_failure(connected(EHLO_BARE), SENDER, rcpts(BOB), MailParams(smtputf8=True))
    assert reply.enhanced == "5.6.7"


def test_non_ascii_domain_goes_as_a_labels_without_smtputf8() -> None:
    client = connected(b"250-mx.test\r\n250 PIPELINING\r\n")
    client.start_transaction(parse_mailbox("a@bücher.test"), rcpts(parse_mailbox("b@müller.test")))
    assert client.data_to_send() == (
        b"MAIL FROM:<a@xn--bcher-kva.test>\r\nRCPT TO:<b@xn--mller-kva.test>\r\nDATA\r\n")


def test_utf8_addresses_add_smtputf8_when_offered() -> None:
    client = connected()
    client.start_transaction(parse_mailbox("jörg@client.test"), rcpts(BOB))
    assert client.data_to_send().startswith("MAIL FROM:<jörg@client.test> SMTPUTF8\r\n".encode())


def test_8bitmime_and_binarymime_not_offered() -> None:
    reply = local_failure(connected(EHLO_BARE), SENDER, rcpts(BOB), MailParams(body="8BITMIME"))
    assert (reply.code, reply.enhanced) == (554, "5.6.3")
    reply = local_failure(connected(EHLO_BARE), SENDER, rcpts(BOB), MailParams(body="BINARYMIME"),
                          use_bdat=True)
    assert reply.enhanced == "5.6.3"
    client = connected(EHLO_BARE)
    client.start_transaction(SENDER, rcpts(BOB), MailParams(body="7BIT"))
    assert client.data_to_send() == b"MAIL FROM:<alice@client.test>\r\n"  # BODY= needs 8BITMIME


def test_requiretls_needs_the_extension_and_tls() -> None:
    reply = local_failure(connected(), SENDER, rcpts(BOB), MailParams(requiretls=True))
    assert (reply.code, reply.enhanced) == (550, "5.7.30")
    # Announced but not under TLS (a MITM could add it to a cleartext EHLO): still refused.
    with_rtls = EHLO_FULL.replace(b"250 SMTPUTF8", b"250-SMTPUTF8\r\n250 REQUIRETLS")
    local_failure(connected(with_rtls), SENDER, rcpts(BOB), MailParams(requiretls=True))
    client = connected(with_rtls, tls=True)
    assert client.start_transaction(SENDER, rcpts(BOB), MailParams(requiretls=True)) is None
    assert b" REQUIRETLS\r\n" in client.data_to_send()


def test_dsn_parameters_are_left_out_for_a_server_without_dsn() -> None:
    params = RcptParams(notify=frozenset({"SUCCESS", "FAILURE"}), orcpt="rfc822;bob@mx.test")
    client = connected(b"250-mx.test\r\n250 PIPELINING\r\n")
    client.start_transaction(SENDER, [(BOB, params)], MailParams(ret="HDRS", envid="id1"))
    assert client.data_to_send() == b"MAIL FROM:<alice@client.test>\r\nRCPT TO:<bob@mx.test>\r\nDATA\r\n"
    client = connected()
    client.start_transaction(SENDER, [(BOB, params)], MailParams(ret="HDRS", envid="id1"))
    assert client.data_to_send() == (
        b"MAIL FROM:<alice@client.test> RET=HDRS ENVID=id1\r\n"
        b"RCPT TO:<bob@mx.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@mx.test\r\nDATA\r\n")


# --- BDAT ----------------------------------------------------------------------------------------


def test_bdat_holds_the_newest_chunk_so_the_last_carries_last() -> None:
    client = connected()
    client.start_transaction(SENDER, rcpts(BOB), use_bdat=True)
    assert client.data_to_send().endswith(b"RCPT TO:<bob@mx.test>\r\n")  # no DATA
    assert feed(client, b"250 ok\r\n250 ok\r\n") == [ReadyForBody(chunking=True)]
    client.send_body(b"one\n.two\r")
    assert client.data_to_send() == b""
    client.send_body(b"\nthree")
    assert client.data_to_send() == b"BDAT 9\r\none\r\n.two"
    client.end_body()
    assert client.data_to_send() == b"BDAT 9 LAST\r\n\r\nthree\r\n"
    assert feed(client, b"250 2.0.0 8 octets\r\n") == []
    result = only_result(feed(client, b"250 2.0.0 queued\r\n"))
    assert result.data_reply == Reply(250, "2.0.0", ("queued",))


def test_bdat_empty_body_and_binary_verbatim() -> None:
    client = connected()
    client.start_transaction(SENDER, rcpts(BOB), use_bdat=True)
    client.data_to_send()
    feed(client, b"250 ok\r\n250 ok\r\n")
    client.end_body()
    assert client.data_to_send() == b"BDAT 0 LAST\r\n"
    only_result(feed(client, b"250 ok\r\n"))
    client.start_transaction(SENDER, rcpts(BOB), MailParams(body="BINARYMIME"), use_bdat=True)
    assert b"BODY=BINARYMIME" in client.data_to_send()
    feed(client, b"250 ok\r\n250 ok\r\n")
    client.send_body(b"\r\n.\r\n\n\r\x00")
    client.end_body()
    assert client.data_to_send() == b"BDAT 8 LAST\r\n\r\n.\r\n\n\r\x00"


def test_bdat_refused_chunk_stops_the_stream() -> None:
    client = connected()
    client.start_transaction(SENDER, rcpts(BOB), use_bdat=True)
    client.data_to_send()
    feed(client, b"250 ok\r\n250 ok\r\n")
    client.send_body(b"a" * 10)
    client.send_body(b"b" * 10)
    assert client.data_to_send().startswith(b"BDAT 10\r\n")
    assert feed(client, b"552 5.3.4 too big\r\n") == []
    client.send_body(b"c" * 10)
    client.end_body()
    assert client.data_to_send() == b""
    result = only_result(drain(client))
    assert result.outcomes == ((BOB, Reply(552, "5.3.4", ("too big",))),)


def test_bdat_needs_chunking_and_pipelining() -> None:
    with pytest.raises(ClientUsageError, match="CHUNKING and PIPELINING"):
        connected(b"250-mx.test\r\n250 CHUNKING\r\n").start_transaction(SENDER, rcpts(BOB), use_bdat=True)
    with pytest.raises(ClientUsageError, match="use_bdat=True"):
        connected().start_transaction(SENDER, rcpts(BOB), MailParams(body="BINARYMIME"))


def test_bdat_all_recipients_refused_requests_no_body() -> None:
    client = connected()
    client.start_transaction(SENDER, rcpts(BOB), use_bdat=True)
    client.data_to_send()
    result = only_result(feed(client, b"250 ok\r\n550 no\r\n"))
    assert result.data_reply is None and client.data_to_send() == b""


# --- STARTTLS ------------------------------------------------------------------------------------


def test_starttls_response_injection_is_discarded() -> None:
    client = connected()
    client.starttls()
    assert client.data_to_send() == b"STARTTLS\r\n"
    injected = b"220 2.0.0 Ready to start TLS\r\n250-evil.test\r\n250 AUTH PLAIN\r\n421 bye\r\n"
    assert feed(client, injected) == [StartTlsReady(Reply(220, "2.0.0", ("Ready to start TLS",)))]
    assert client.awaiting_tls and client.capabilities is None and not client.closed
    assert feed(client, b"250 more plaintext before the handshake\r\n") == []
    with pytest.raises(ClientUsageError, match="STARTTLS"):
        client.ehlo()
    client.tls_established()
    assert client.tls_active
    with pytest.raises(ClientUsageError, match="EHLO"):
        client.start_transaction(SENDER, rcpts(BOB))
    with pytest.raises(ClientUsageError, match="EHLO"):
        client.auth("PLAIN", b"\0u\0p")
    client.ehlo()
    assert client.data_to_send() == b"EHLO client.test\r\n"
    [ev] = feed(client, b"250-mx.test\r\n250 AUTH LOGIN\r\n")
    assert isinstance(ev, EhloCompleted) and ev.capabilities.auth == {"LOGIN"}
    with pytest.raises(ClientUsageError):
        client.starttls()  # already under TLS


def test_starttls_split_reads_discard_the_rest_of_the_read() -> None:
    client = connected()
    client.starttls()
    assert feed(client, b"220 go") == []
    assert feed(client, b"\r\n250 injected\r\n") == [StartTlsReady(Reply(220, None, ("go",)))]


def test_starttls_refused_keeps_the_session() -> None:
    client = connected()
    client.starttls()
    assert feed(client, b"454 4.7.0 TLS not available\r\n") == [
        StartTlsRefused(Reply(454, "4.7.0", ("TLS not available",)))]
    assert client.capabilities is not None and not client.tls_active
    client.start_transaction(SENDER, rcpts(BOB))  # policy allowed cleartext


def test_starttls_only_when_offered() -> None:
    with pytest.raises(ClientUsageError, match="not offered"):
        connected(EHLO_BARE).starttls()
    with pytest.raises(ClientUsageError, match="tls_established"):
        connected().tls_established()


# --- AUTH ----------------------------------------------------------------------------------------

EHLO_AUTH = b"250-mx.test\r\n250-PIPELINING\r\n250 AUTH PLAIN LOGIN\r\n"


def test_auth_refused_without_tls() -> None:
    client = connected(EHLO_AUTH)
    with pytest.raises(ClientUsageError, match="without TLS"):
        client.auth("PLAIN", b"\0user\0secret")
    assert client.data_to_send() == b""
    client = connected(EHLO_AUTH, allow_plaintext_auth=True)
    client.auth("plain", b"\0user\0secret")
    assert client.data_to_send() == b"AUTH PLAIN " + base64.b64encode(b"\0user\0secret") + b"\r\n"


def test_auth_login_exchange() -> None:
    client = connected(EHLO_AUTH, tls=True)
    with pytest.raises(ClientUsageError, match="not offered"):
        client.auth("CRAM-MD5")
    client.auth("LOGIN")
    assert client.data_to_send() == b"AUTH LOGIN\r\n"
    with pytest.raises(ClientUsageError):
        client.start_transaction(SENDER, rcpts(BOB))
    assert feed(client, b"334 VXNlcm5hbWU6\r\n") == [AuthChallenge(b"Username:")]
    client.auth_respond(b"user")
    assert client.data_to_send() == b"dXNlcg==\r\n"
    assert feed(client, b"334 UGFzc3dvcmQ6\r\n") == [AuthChallenge(b"Password:")]
    client.auth_respond(b"")
    assert client.data_to_send() == b"\r\n"
    [ev] = feed(client, b"235 2.7.0 Authentication successful\r\n")
    assert isinstance(ev, AuthCompleted) and ev.succeeded and client.authenticated
    with pytest.raises(ClientUsageError, match="already"):
        client.auth("PLAIN", b"")


def test_auth_failure_and_garbled_challenge() -> None:
    client = connected(EHLO_AUTH, tls=True)
    client.auth("PLAIN", b"\0u\0wrong")
    client.data_to_send()
    [ev] = feed(client, b"535 5.7.8 Authentication credentials invalid\r\n")
    assert isinstance(ev, AuthCompleted) and not ev.succeeded and not client.authenticated
    client.auth("LOGIN")
    client.data_to_send()
    assert feed(client, b"334 not*base64!\r\n") == []
    assert client.data_to_send() == b"*\r\n"  # RFC 4954: cancel what cannot be decoded
    [ev] = feed(client, b"501 5.7.0 cancelled\r\n")
    assert isinstance(ev, AuthCompleted) and ev.reply.code == 501
    with pytest.raises(ClientUsageError):
        client.auth_respond(b"late")


def test_auth_cancel() -> None:
    client = connected(EHLO_AUTH, tls=True)
    client.auth("LOGIN")
    feed(client, b"334 VXNlcm5hbWU6\r\n")
    client.data_to_send()
    client.auth_cancel()
    assert client.data_to_send() == b"*\r\n"
    [ev] = feed(client, b"501 5.7.0 Authentication cancelled\r\n")
    assert isinstance(ev, AuthCompleted)
    events = feed(client, b"334 again?\r\n")
    assert isinstance(events[-1], ClientProtocolError)  # nothing was outstanding
