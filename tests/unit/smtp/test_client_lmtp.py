"""The client role in LMTP mode (RFC 2033): LHLO, and one reply per accepted recipient after the dot."""

from __future__ import annotations

import pytest

from mailward.smtp.address import parse_mailbox
from mailward.smtp.client import (
    CONNECTION_LOST,
    ClientConnection,
    ClientEvent,
    ClientUsageError,
    EhloCompleted,
    EhloRefused,
    GreetingReceived,
    ReadyForBody,
    ServerClosed,
    TransactionResult,
)
from mailward.smtp.codes import Reply
from mailward.smtp.commands import MailParams, RcptParams

SENDER = parse_mailbox("alice@client.test")
BOB = parse_mailbox("bob@mbox.test")
CAROL = parse_mailbox("carol@mbox.test")
DAVE = parse_mailbox("dave@mbox.test")
LHLO_REPLY = b"250-mbox.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-CHUNKING\r\n250 ENHANCEDSTATUSCODES\r\n"


def drain(client: ClientConnection) -> list[ClientEvent]:
    out = []
    while (ev := client.next_event()) is not None:
        out.append(ev)
    return out


def feed(client: ClientConnection, data: bytes) -> list[ClientEvent]:
    client.receive_data(data)
    return drain(client)


def lmtp_client() -> ClientConnection:
    client = ClientConnection("mx.client.test", lmtp=True)
    assert isinstance(feed(client, b"220 mbox.test LMTP ready\r\n")[0], GreetingReceived)
    client.ehlo()
    assert client.data_to_send() == b"LHLO mx.client.test\r\n"
    [ev] = feed(client, LHLO_REPLY)
    assert isinstance(ev, EhloCompleted) and ev.capabilities.chunking
    return client


def to_body(client: ClientConnection) -> None:
    client.start_transaction(SENDER, [(b, RcptParams()) for b in (BOB, CAROL, DAVE)], MailParams())
    # CHUNKING is offered, yet LMTP sends DATA: RFC 2033 defines per-recipient replies only there.
    assert client.data_to_send() == (b"MAIL FROM:<alice@client.test>\r\nRCPT TO:<bob@mbox.test>\r\n"
                                     b"RCPT TO:<carol@mbox.test>\r\nRCPT TO:<dave@mbox.test>\r\nDATA\r\n")
    evs = feed(client, b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no such user\r\n250 2.1.5 ok\r\n"
                       b"354 go ahead\r\n")
    assert evs == [ReadyForBody(chunking=False)]
    client.send_body(b"Subject: hi\r\n\r\nhello\r\n")
    client.end_body()
    assert client.data_to_send() == b"Subject: hi\r\n\r\nhello\r\n.\r\n"


def test_one_reply_per_accepted_recipient_in_rcpt_order() -> None:
    client = lmtp_client()
    to_body(client)
    assert feed(client, b"250 2.0.0 <bob@mbox.test> saved\r\n") == []  # dave's reply is still due
    [result] = feed(client, b"452 4.2.2 <dave@mbox.test> mailbox full\r\n")
    assert isinstance(result, TransactionResult)
    assert result.final_replies == (Reply(250, "2.0.0", ("<bob@mbox.test> saved",)), None,
                                    Reply(452, "4.2.2", ("<dave@mbox.test> mailbox full",)))
    assert [(str(mb), r.code) for mb, r in result.outcomes] == [
        ("bob@mbox.test", 250), ("carol@mbox.test", 550), ("dave@mbox.test", 452)]
    assert result.delivered == (BOB,)
    client.start_transaction(SENDER, [(BOB, RcptParams())])  # no RSET needed: the content ended
    assert client.data_to_send().startswith(b"MAIL FROM:")


def test_a_session_ending_half_way_leaves_the_rest_undecided() -> None:
    client = lmtp_client()
    to_body(client)
    assert feed(client, b"250 2.0.0 <bob@mbox.test> saved\r\n") == []
    client.receive_eof()
    result, closed = drain(client)
    assert isinstance(result, TransactionResult) and closed == ServerClosed(None)
    # Bob's success must not leak onto Dave, whose mailbox never answered.
    assert [r for _, r in result.outcomes] == [Reply(250, "2.0.0", ("<bob@mbox.test> saved",)),
                                               Reply(550, "5.1.1", ("no such user",)), CONNECTION_LOST]


def test_no_helo_fallback_and_no_bdat() -> None:
    client = ClientConnection("mx.client.test", lmtp=True)
    feed(client, b"220 mbox.test LMTP\r\n")
    client.ehlo()
    client.data_to_send()
    [ev] = feed(client, b"500 5.5.1 unknown command\r\n")
    assert isinstance(ev, EhloRefused) and client.data_to_send() == b""
    client = lmtp_client()
    with pytest.raises(ClientUsageError):
        client.start_transaction(SENDER, [(BOB, RcptParams())], use_bdat=True)


def test_smtp_mode_is_unchanged() -> None:
    client = ClientConnection("mx.client.test")
    feed(client, b"220 mx ESMTP\r\n")
    client.ehlo()
    assert client.data_to_send() == b"EHLO mx.client.test\r\n"
    feed(client, b"250-mx\r\n250 PIPELINING\r\n")
    client.start_transaction(SENDER, [(BOB, RcptParams()), (CAROL, RcptParams())])
    client.data_to_send()
    feed(client, b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    client.send_body(b"x\r\n")
    client.end_body()
    [result] = feed(client, b"250 2.0.0 queued\r\n")
    assert isinstance(result, TransactionResult) and result.final_replies == ()
    assert result.delivered == (BOB, CAROL)
