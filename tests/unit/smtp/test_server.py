"""The server role: feed bytes, assert events and reply bytes. No sockets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from smtp_helpers import codes_of, pump, reject_with, session

from mailward.smtp import codes
from mailward.smtp.events import (
    AuthCancelled,
    AuthRequested,
    AuthResponse,
    BodyChunk,
    BodyEnded,
    BodyRejected,
    ConnectionClosing,
    DataStarted,
    EhloReceived,
    MailReceived,
    ProtocolError,
    QuitRequested,
    RcptReceived,
    StartTlsRequested,
    TransactionReset,
)
from mailward.smtp.server import (
    ServerConnection,
    ServerOptions,
    _bare_and_stuffed,
    _has_bare_line_ending,
    _has_line_longer_than,
)

EHLO = b"EHLO client.test\r\n"
TXN = b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@mx.test>\r\nDATA\r\n"


def body_of(events: list[object]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, BodyChunk))


def test_greeting_and_simple_transaction() -> None:
    events, out = session(EHLO + TXN + b"Subject: hi\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    assert out.startswith(b"220 mx.test ESMTP mailward\r\n")
    assert codes_of(out) == ["220", "250", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0", "221 2.0.0"]
    kinds = [type(e) for e in events]
    assert kinds == [EhloReceived, MailReceived, RcptReceived, DataStarted, BodyChunk, BodyEnded,
                     QuitRequested]
    assert body_of(events) == b"Subject: hi\r\n\r\nhello\r\n"
    mail = events[1]
    assert isinstance(mail, MailReceived) and mail.sender is not None
    assert str(mail.sender) == "a@client.test"


def test_ehlo_capabilities_follow_tls_state() -> None:
    opts = ServerOptions(hostname="mx.test", starttls=True, require_tls=True,
                         auth_mechanisms=("PLAIN", "LOGIN"))
    _, plain = session(EHLO, opts)
    assert b"STARTTLS" in plain and b"AUTH" not in plain and b"REQUIRETLS" not in plain
    _, tls = session(EHLO, opts, tls=True)
    assert b"STARTTLS" not in tls and b"250-AUTH PLAIN LOGIN" in tls and b"REQUIRETLS" in tls
    assert b"ENHANCEDSTATUSCODES" in tls and b"PIPELINING" in tls and b"CHUNKING" in tls


def test_submission_refuses_mail_and_auth_before_starttls() -> None:
    opts = ServerOptions(hostname="mx.test", starttls=True, require_tls=True, auth_mechanisms=("PLAIN",))
    events, out = session(EHLO + b"AUTH PLAIN AGEAYg==\r\nMAIL FROM:<a@b.test>\r\n", opts)
    assert codes_of(out)[-2:] == ["530 5.7.0", "530 5.7.0"]
    assert b"Must issue a STARTTLS command first" in out
    assert not any(isinstance(e, MailReceived | AuthRequested) for e in events)


def test_require_auth_before_mail() -> None:
    opts = ServerOptions(hostname="mx.test", auth_mechanisms=("PLAIN",), require_auth=True)
    _, out = session(EHLO + b"MAIL FROM:<a@b.test>\r\n", opts, tls=True)
    assert codes_of(out)[-1] == "530 5.7.0"


def test_mail_before_ehlo_is_bad_sequence() -> None:
    _, out = session(b"MAIL FROM:<a@b.test>\r\n")
    assert codes_of(out)[-1] == "503 5.5.1"


def test_dot_unstuffing() -> None:
    events, _ = session(EHLO + TXN + b"..leading\r\n\r\n...two\r\nx.\r\n.\r\n")
    assert body_of(events) == b".leading\r\n\r\n..two\r\nx.\r\n"


def test_data_at_once_line() -> None:
    events, out = session(EHLO + TXN + b".\r\n")
    assert body_of(events) == b"" and codes_of(out)[-1] == "250 2.0.0"


SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r.\n", b"\n.\r", b"\r.\r\n", b"\r\n\x00.\r\n",
             b"\r\n.\r", b"\r\n.\n"]


@pytest.mark.parametrize("eod", SMUGGLING)
def test_smuggled_end_of_data_is_rejected(eod: bytes) -> None:
    smuggled = b"MAIL FROM:<admin@victim.test>\r\nRCPT TO:<c@mx.test>\r\nDATA\r\nspoofed\r\n"
    data = EHLO + TXN + b"real" + eod + smuggled + b".\r\nQUIT\r\n"
    events, out = session(data)
    # Only one message transaction happened and it was refused as a whole.
    assert sum(isinstance(e, MailReceived) for e in events) == 1
    if b"\r" not in eod.replace(b"\r\n", b"") and b"\n" not in eod.replace(b"\r\n", b""):
        # No bare line ending (the NUL variant): one ordinary message that contains the attempt.
        assert b"MAIL FROM:<admin@victim.test>" in body_of(events)
        assert codes_of(out)[-2:] == ["250 2.0.0", "221 2.0.0"]
        return
    rejected = [e for e in events if isinstance(e, BodyRejected)]
    assert len(rejected) == 1 and rejected[0].reply.code == 550
    assert not any(isinstance(e, BodyEnded) for e in events)
    assert codes_of(out)[-2:] == ["550 5.5.2", "221 2.0.0"]


@pytest.mark.parametrize("eod", SMUGGLING)
def test_smuggled_end_of_data_stays_in_body_when_normalizing(eod: bytes) -> None:
    opts = ServerOptions(hostname="mx.test", bare_line_endings="normalize")
    smuggled = b"MAIL FROM:<admin@victim.test>\r\n"
    events, _ = session(EHLO + TXN + b"real" + eod + smuggled + b".\r\n", opts)
    assert sum(isinstance(e, MailReceived) for e in events) == 1
    assert sum(isinstance(e, BodyEnded) for e in events) == 1
    body = body_of(events)
    assert b"MAIL FROM:<admin@victim.test>" in body
    assert b"\r" not in body.replace(b"\r\n", b"") and b"\n" not in body.replace(b"\r\n", b"")


def test_bare_lf_in_command_is_rejected() -> None:
    events, out = session(EHLO + b"NOOP\nNOOP\r\n")
    assert codes_of(out)[-2:] == ["500 5.5.2", "250 2.0.0"]
    assert any(isinstance(e, ProtocolError) for e in events)


def test_starttls_discards_pipelined_commands() -> None:
    opts = ServerOptions(hostname="mx.test", starttls=True)
    srv = ServerConnection(opts)
    srv.greet()
    srv.receive_data(EHLO + b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\nRSET\r\n")
    events = []
    while (ev := srv.next_event()) is not None:
        events.append(ev)
        srv.accept()
    assert [type(e) for e in events] == [EhloReceived, StartTlsRequested]
    assert srv.awaiting_tls
    srv.receive_data(b"RSET\r\n")  # plaintext arriving before the handshake finished: dropped
    assert srv.next_event() is None
    srv.tls_established()
    assert srv.next_event() is None
    out = srv.data_to_send()
    assert codes_of(out) == ["220", "250", "220 2.0.0"]
    # The session starts over: MAIL needs a new EHLO.
    srv.receive_data(b"MAIL FROM:<a@b.test>\r\n")
    assert isinstance(srv.next_event(), ProtocolError)
    assert codes_of(srv.data_to_send()) == ["503 5.5.1"]


def test_starttls_twice_and_when_not_offered() -> None:
    _, out = session(EHLO + b"STARTTLS\r\n")
    assert codes_of(out)[-1] == "502 5.5.1"
    opts = ServerOptions(hostname="mx.test", starttls=True)
    _, out = session(EHLO + b"STARTTLS\r\n", opts, tls=True)
    assert codes_of(out)[-1] == "503 5.5.1"
    _, out = session(EHLO + b"STARTTLS now\r\n", opts)
    assert codes_of(out)[-1] == "501 5.5.4"


def test_command_line_too_long_keeps_session_usable() -> None:
    _, out = session(EHLO + b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n")
    assert codes_of(out)[-2:] == ["500 5.5.2", "250 2.0.0"]
    _events, out = session([EHLO, b"NOOP " + b"x" * 5000, b"y" * 5000, b"\r\nNOOP\r\n"])
    assert codes_of(out)[-2:] == ["500 5.5.2", "250 2.0.0"]


def test_auth_response_too_long_ends_the_exchange_with_its_own_code() -> None:
    """RFC 4954 §4: 500 5.5.6 for an AUTH line over 12,288 octets, whether it arrives whole or in
    pieces without a newline; afterwards the session reads commands again, not AUTH data."""
    opts = ServerOptions(hostname="mx.test", auth_mechanisms=("PLAIN",))
    for chunks in ([b"A" * 13000 + b"\r\n"], [b"A" * 8000, b"A" * 8000, b"A" * 8000, b"\r\n"]):
        srv = ServerConnection(opts, tls_active=True)
        srv.greet()
        pump(srv, [EHLO])
        srv.receive_data(b"AUTH PLAIN\r\n")
        assert isinstance(srv.next_event(), AuthRequested)
        srv.auth_challenge(b"")
        events = pump(srv, [*chunks, b"NOOP\r\n"])
        assert codes_of(srv.data_to_send())[-3:] == ["334", "500 5.5.6", "250 2.0.0"]
        assert not any(isinstance(e, AuthResponse) for e in events)


def test_invalid_utf8_argument_is_a_syntax_error_not_an_unknown_command() -> None:
    _, out = session(EHLO + b"MAIL FROM:<a\xff@b.test> SMTPUTF8\r\nMAIL FROM:<a\xc3\x28@b.test>\r\n"
                     b"NO\xffOP\r\nNOOP\r\n")
    assert codes_of(out)[-4:] == ["501 5.5.4", "501 5.5.4", "500 5.5.2", "250 2.0.0"]


def test_data_line_too_long() -> None:
    _, out = session(EHLO + TXN + b"a" * 999 + b"\r\n.\r\nNOOP\r\n")
    assert codes_of(out)[-2:] == ["500 5.5.2", "250 2.0.0"]
    _events, out = session(EHLO + TXN + b"a" * 998 + b"\r\n.\r\n")
    assert codes_of(out)[-1] == "250 2.0.0"
    # A line that never ends is dropped piecewise: memory stays bounded.
    srv = ServerConnection(ServerOptions(hostname="mx.test"))
    pump(srv, [EHLO + TXN] + [b"z" * 4096] * 100)
    assert len(srv._in) <= 1001


def test_too_many_recipients() -> None:
    opts = ServerOptions(hostname="mx.test", max_recipients=2)
    rcpts = b"".join(b"RCPT TO:<r%d@mx.test>\r\n" % i for i in range(3))
    _events, out = session(EHLO + b"MAIL FROM:<a@b.test>\r\n" + rcpts + b"DATA\r\nx\r\n.\r\n", opts)
    assert codes_of(out)[2:] == ["250 2.1.0", "250 2.1.5", "250 2.1.5", "452 4.5.3", "354", "250 2.0.0"]


def test_size_limits() -> None:
    opts = ServerOptions(hostname="mx.test", max_message_size=100)
    _, out = session(EHLO + b"MAIL FROM:<a@b.test> SIZE=101\r\n", opts)
    assert codes_of(out)[-1] == "552 5.3.4"
    assert b"SIZE 100" in out
    events, out = session(EHLO + TXN + (b"x" * 50 + b"\r\n") * 3 + b".\r\nNOOP\r\n", opts)
    assert codes_of(out)[-2:] == ["552 5.3.4", "250 2.0.0"]
    assert any(isinstance(e, BodyRejected) for e in events)


def test_rcpt_without_mail_and_data_without_rcpt() -> None:
    _, out = session(EHLO + b"RCPT TO:<b@mx.test>\r\nMAIL FROM:<>\r\nDATA\r\n")
    assert codes_of(out)[2:] == ["503 5.5.1", "250 2.1.0", "554 5.5.1"]


def test_refused_recipients_are_not_counted() -> None:
    def decide(srv: ServerConnection, ev: object) -> None:
        if isinstance(ev, RcptReceived):
            srv.respond(codes.RELAY_DENIED)
        else:
            srv.accept()

    _, out = session(EHLO + TXN, decide=decide)
    assert codes_of(out)[-2:] == ["554 5.7.1", "554 5.5.1"]


def test_nested_mail_and_rset() -> None:
    events, out = session(EHLO + b"MAIL FROM:<a@b.test>\r\nMAIL FROM:<a@b.test>\r\nRSET\r\n"
                                b"MAIL FROM:<a@b.test>\r\n")
    assert codes_of(out)[2:] == ["250 2.1.0", "503 5.5.1", "250 2.0.0", "250 2.1.0"]
    assert any(isinstance(e, TransactionReset) for e in events)


def test_vrfy_help_noop_and_unknown() -> None:
    _, out = session(EHLO + b"VRFY root\r\nHELP\r\nNOOP\r\nEXPN staff\r\nFOO\r\n")
    assert codes_of(out)[2:] == ["252 2.5.0", "214 2.0.0", "250 2.0.0", "502 5.5.1", "500 5.5.2"]


def test_hard_error_limit_closes() -> None:
    opts = ServerOptions(hostname="mx.test", hard_error_limit=3)
    events, out = session(b"FOO\r\n" * 5, opts)
    assert codes_of(out)[-1] == "421 4.7.0"
    assert isinstance(events[-1], ConnectionClosing)


def test_bdat_chunks_and_last() -> None:
    data = EHLO + b"MAIL FROM:<a@b.test>\r\nRCPT TO:<b@mx.test>\r\nBDAT 6\r\nHello\nBDAT 3 LAST\r\nx\r\n"
    events, out = session(data)
    # bare LF in a non-binary BDAT body is rejected like in DATA
    assert codes_of(out)[-2:] == ["550 5.5.2", "503 5.5.1"]
    data = EHLO + b"MAIL FROM:<a@b.test>\r\nRCPT TO:<b@mx.test>\r\nBDAT 7\r\nHello\r\nBDAT 3 LAST\r\n.\r\n"
    events, out = session(data)
    assert codes_of(out)[-2:] == ["250 2.0.0", "250 2.0.0"]
    assert body_of(events) == b"Hello\r\n.\r\n"  # no dot-unstuffing and no terminator in BDAT


def test_bdat_binarymime_is_verbatim() -> None:
    payload = bytes(range(256))
    data = (EHLO + b"MAIL FROM:<a@b.test> BODY=BINARYMIME\r\nRCPT TO:<b@mx.test>\r\n"
            + b"BDAT %d LAST\r\n" % len(payload) + payload)
    events, out = session(data)
    assert body_of(events) == payload and codes_of(out)[-1] == "250 2.0.0"
    _, out = session(EHLO + b"MAIL FROM:<a@b.test> BODY=BINARYMIME\r\nRCPT TO:<b@mx.test>\r\nDATA\r\n")
    assert codes_of(out)[-1] == "503 5.5.1"


def test_bdat_without_transaction_swallows_octets() -> None:
    events, out = session(EHLO + b"BDAT 12\r\nQUIT\r\nQUIT\r\nNOOP\r\n")
    assert codes_of(out)[2:] == ["503 5.5.1", "250 2.0.0"]
    assert not any(isinstance(e, QuitRequested) for e in events)


def test_bdat_refused_at_start_swallows_octets() -> None:
    def decide(srv: ServerConnection, ev: object) -> None:
        if isinstance(ev, DataStarted):
            srv.respond(codes.LOCAL_ERROR)
        else:
            srv.accept()

    data = EHLO + b"MAIL FROM:<a@b.test>\r\nRCPT TO:<b@mx.test>\r\nBDAT 6 LAST\r\nQUIT\r\nNOOP\r\n"
    _events, out = session(data, decide=decide)
    assert codes_of(out)[-2:] == ["451 4.3.0", "250 2.0.0"]


def test_auth_exchange_plain_login_cancel_and_bad_base64() -> None:
    opts = ServerOptions(hostname="mx.test", auth_mechanisms=("PLAIN", "LOGIN"))
    srv = ServerConnection(opts, tls_active=True)
    srv.greet()
    events = pump(srv, [EHLO])
    srv.receive_data(b"AUTH LOGIN\r\n")
    ev = srv.next_event()
    assert isinstance(ev, AuthRequested) and ev.initial_response is None
    srv.auth_challenge(b"Username:")
    srv.receive_data(b"dXNlcg==\r\n")
    ev = srv.next_event()
    assert isinstance(ev, AuthResponse) and ev.data == b"user"
    srv.auth_challenge(b"Password:")
    srv.receive_data(b"*\r\n")
    assert isinstance(srv.next_event(), AuthCancelled)
    srv.receive_data(b"AUTH PLAIN\r\n")
    assert isinstance(srv.next_event(), AuthRequested)
    srv.auth_challenge(b"")
    srv.receive_data(b"!!!\r\n")
    assert isinstance(srv.next_event(), AuthCancelled)
    srv.receive_data(b"AUTH PLAIN AHVzZXIAcGFzcw==\r\n")
    ev = srv.next_event()
    assert isinstance(ev, AuthRequested) and ev.initial_response == b"\x00user\x00pass"
    srv.auth_succeeded("user")
    srv.receive_data(b"AUTH PLAIN =\r\n")
    assert isinstance(srv.next_event(), ProtocolError)
    out = srv.data_to_send()
    assert codes_of(out)[2:] == ["334", "334", "501 5.7.0", "334", "501 5.5.2", "235 2.7.0", "503 5.5.1"]
    assert events


def test_auth_refusal_reply() -> None:
    opts = ServerOptions(hostname="mx.test", auth_mechanisms=("PLAIN",))
    _, out = session(EHLO + b"AUTH PLAIN AHUAcA==\r\nAUTH CRAM-MD5\r\n", opts, tls=True,
                     decide=lambda s, e: s.respond(codes.AUTH_FAILED) if isinstance(e, AuthRequested)
                     else s.accept())
    assert codes_of(out)[-2:] == ["535 5.7.8", "504 5.5.4"]


def test_smtputf8_rules() -> None:
    rcpt = "RCPT TO:<üser@mx.test>\r\n".encode()
    _, out = session(EHLO + b"MAIL FROM:<a@b.test>\r\n" + rcpt)
    assert codes_of(out)[-1] == "553 5.6.7"
    _, out = session(EHLO + b"MAIL FROM:<a@b.test> SMTPUTF8\r\n" + rcpt)
    assert codes_of(out)[-1] == "250 2.1.5"


def test_esmtp_parameter_validation() -> None:
    _, out = session(EHLO + b"MAIL FROM:<a@b.test> FOO=1\r\nMAIL FROM:<a@b.test> SIZE=x\r\n"
                            b"MAIL FROM:<a@b.test> REQUIRETLS\r\n"
                            b"MAIL FROM:<a@b.test> RET=HDRS ENVID=abc+2Bdef BODY=8BITMIME\r\n"
                            b"RCPT TO:<b@mx.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;b+40mx.test\r\n")
    assert codes_of(out)[2:] == ["555 5.5.4", "501 5.5.4", "530 5.7.10", "250 2.1.0", "250 2.1.5"]
    events, _ = session(EHLO + b"MAIL FROM:<a@b.test> RET=HDRS ENVID=abc+2Bdef\r\n"
                               b"RCPT TO:<b@mx.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;b+40mx.test\r\n")
    mail, rcpt = events[1], events[2]
    assert isinstance(mail, MailReceived) and mail.params.envid == "abc+def" and mail.params.ret == "HDRS"
    assert isinstance(rcpt, RcptReceived) and rcpt.params.notify == frozenset({"SUCCESS", "DELAY"})
    assert rcpt.params.orcpt == "rfc822;b@mx.test"


def test_pipelined_group_is_decided_in_order() -> None:
    seen: list[str] = []

    def decide(srv: ServerConnection, ev: object) -> None:
        seen.append(type(ev).__name__)
        if isinstance(ev, RcptReceived) and ev.recipient.local_part == "bad":
            srv.respond(codes.r(550, "5.1.1", "No such user"))
        else:
            srv.accept()

    data = EHLO + b"MAIL FROM:<a@b.test>\r\nRCPT TO:<bad@mx.test>\r\nRCPT TO:<ok@mx.test>\r\nDATA\r\n"
    _, out = session(data + b"x\r\n.\r\n", decide=decide)
    assert seen == ["EhloReceived", "MailReceived", "RcptReceived", "RcptReceived", "DataStarted",
                    "BodyEnded"]
    assert codes_of(out)[2:] == ["250 2.1.0", "550 5.1.1", "250 2.1.5", "354", "250 2.0.0"]


def test_quit_closes_and_ignores_the_rest() -> None:
    events, out = session(EHLO + b"QUIT\r\nNOOP\r\n")
    assert codes_of(out)[-1] == "221 2.0.0"
    assert isinstance(events[-1], QuitRequested)


def test_greet_refusal_closes() -> None:
    srv = ServerConnection(ServerOptions(hostname="mx.test"))
    srv.greet(codes.TOO_MANY_CONNECTIONS)
    srv.receive_data(EHLO)
    assert srv.next_event() is None and srv.closed


def test_decision_api_misuse_raises() -> None:
    srv = ServerConnection(ServerOptions(hostname="mx.test"))
    with pytest.raises(RuntimeError):
        srv.accept()


def test_body_rejection_reply_from_session() -> None:
    _events, out = session(EHLO + TXN + b"x\r\n.\r\n",
                          decide=lambda s, e: s.respond(codes.LOCAL_ERROR) if isinstance(e, BodyEnded)
                          else s.accept())
    assert codes_of(out)[-1] == "451 4.3.0"
    _, out = session(EHLO + TXN + b"x\r\n.\r\nRCPT TO:<b@mx.test>\r\n",
                     decide=reject_with(codes.LOCAL_ERROR))
    assert "250" not in codes_of(out)[1:]


# --- properties -----------------------------------------------------------------------------------

SESSION = (EHLO + TXN + b"line one\r\n..dot\r\n" + b"y" * 300 + b"\r\n.\r\n"
           + b"MAIL FROM:<c@d.test>\r\nRCPT TO:<e@mx.test>\r\nBDAT 5\r\nabc\r\nBDAT 0 LAST\r\n"
           + b"NOOP\r\nVRFY x\r\nRSET\r\nQUIT\r\n")


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0), max_size=40))
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    whole_events, whole_out = session(SESSION)
    events, out = session(_split(SESSION, cuts))
    # Body chunks may be cut differently; compare them joined.
    def norm(evs: list[object]) -> list[object]:
        res: list[object] = []
        for e in evs:
            if isinstance(e, BodyChunk) and res and isinstance(res[-1], BodyChunk):
                res[-1] = BodyChunk(res[-1].data + e.data)
            elif not (isinstance(e, BodyChunk) and not e.data):
                res.append(e)
        return res
    assert norm(events) == norm(whole_events)
    assert out == whole_out


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(min_value=0), max_size=10))
def test_never_raises_on_any_input(data: bytes, cuts: list[int]) -> None:
    opts = ServerOptions(hostname="mx.test", starttls=True, auth_mechanisms=("PLAIN",))
    session([EHLO + TXN, *_split(data, cuts)], opts)
    session(_split(b"EHLO x\r\n" + data, cuts), opts)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([
    b"EHLO a\r\n", b"HELO b\r\n", b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<c@mx.test>\r\n", b"DATA\r\n",
    b"x\r\n", b".\r\n", b"\r\n", b"BDAT 3\r\n", b"BDAT 2 LAST\r\n", b"RSET\r\n", b"STARTTLS\r\n",
    b"AUTH PLAIN\r\n", b"AUTH PLAIN AHUAcA==\r\n", b"*\r\n", b"NOOP\r\n", b"\n", b"\r", b".\n",
    b"MAIL FROM:<> BODY=BINARYMIME\r\n", b"QUIT\r\n",
]), max_size=30))
def test_command_soup_never_raises(parts: list[bytes]) -> None:
    opts = ServerOptions(hostname="mx.test", starttls=True, auth_mechanisms=("PLAIN",))
    session(parts, opts)
    session(parts, opts, tls=True)


NORMALIZE = ServerOptions(hostname="mx.test", bare_line_endings="normalize")


def test_normalize_accepts_many_short_bare_lf_lines_in_one_read() -> None:
    events, out = session([EHLO + TXN, b"line\n" * 300, b"\r\n.\r\n"], NORMALIZE)
    assert codes_of(out)[-1] == "250 2.0.0"
    assert body_of(events) == b"line\r\n" * 300 + b"\r\n"


def test_normalize_bdat_cr_at_chunk_boundary_and_at_the_end() -> None:
    pre = EHLO + b"MAIL FROM:<a@b.test>\r\nRCPT TO:<b@mx.test>\r\n"
    events, _ = session(pre + b"BDAT 2\r\na\rBDAT 3 LAST\r\nb\r\n", NORMALIZE)
    assert body_of(events) == b"a\r\nb\r\n"
    events, _ = session(pre + b"BDAT 2\r\na\rBDAT 3 LAST\r\n\nb\r", NORMALIZE)
    assert body_of(events) == b"a\r\nb\r\n"
    _, out = session(pre + b"BDAT 2 LAST\r\na\r")
    assert codes_of(out)[-1] == "550 5.5.2"


def test_reject_mode_drops_bare_lf_flood_without_buffering_it() -> None:
    srv = ServerConnection(ServerOptions(hostname="mx.test"))
    pump(srv, [EHLO + TXN] + [b"x\n" * 2048] * 50)
    assert len(srv._in) <= 1
    srv.receive_data(b"\r\n.\r\n")
    while srv.next_event() is not None:
        pass
    assert codes_of(srv.data_to_send())[-1] == "550 5.5.2"


def test_serialising_refuses_parameter_smuggling() -> None:
    from mailward.smtp.address import parse_forward_path
    from mailward.smtp.commands import InjectionError, Mail, MailParams, Rcpt, RcptParams, parse_command

    rcpt = parse_forward_path("<b@mx.test>", smtputf8=True)
    with pytest.raises(InjectionError):
        Mail(None, MailParams(ret="FULL REQUIRETLS")).to_bytes()
    with pytest.raises(InjectionError):
        Mail(None, MailParams(body="7BIT X=1")).to_bytes()
    cmd = Rcpt(rcpt, RcptParams(orcpt="utf-8;x NOTIFY=NEVER"))
    wire = cmd.to_bytes()
    assert b" NOTIFY" not in wire
    assert parse_command(wire[:-2]) == cmd


def test_overlong_line_without_newline_is_reported_at_once() -> None:
    srv = ServerConnection(ServerOptions(hostname="mx.test"))
    srv.greet()
    srv.receive_data(b"NOOP " + b"x" * 600)
    ev = srv.next_event()
    assert isinstance(ev, ProtocolError) and ev.reply.code == 500


def test_auth_failures_reaching_the_error_limit_close_after_the_reply() -> None:
    opts = ServerOptions(hostname="mx.test", auth_mechanisms=("PLAIN",), hard_error_limit=2)
    srv = ServerConnection(opts, tls_active=True)
    srv.greet()
    events = pump(srv, [EHLO + b"AUTH PLAIN AHUAcA==\r\nAUTH PLAIN AHUAcA==\r\nNOOP\r\n"],
                  decide=reject_with(codes.AUTH_FAILED))
    assert codes_of(srv.data_to_send())[-3:] == ["535 5.7.8", "535 5.7.8", "421 4.7.0"]
    assert srv.closed and isinstance(events[-1], ConnectionClosing)


def test_parameters_split_on_space_only() -> None:
    from mailward.smtp.commands import CommandError, Mail, MailParams, parse_command

    with pytest.raises(CommandError):
        parse_command("MAIL FROM:<a@b.test> ENVID=x\x85REQUIRETLS".encode())
    cmd = parse_command(b"MAIL FROM:<a@b.test> ENVID=x+85REQUIRETLS")
    assert isinstance(cmd, Mail) and cmd.params.envid == "x\x85REQUIRETLS" and not cmd.params.requiretls
    relayed = Mail(cmd.sender, MailParams(envid=cmd.params.envid)).to_bytes()
    assert relayed == b"MAIL FROM:<a@b.test> ENVID=x+85REQUIRETLS\r\n"
    assert parse_command(relayed[:-2]) == Mail(cmd.sender, MailParams(envid="x\x85REQUIRETLS"))


@given(st.binary(max_size=80).map(lambda b: bytes(b"ab\r\n"[x % 4] for x in b)), st.integers(0, 12))
@settings(max_examples=2000)
def test_line_length_check_agrees_with_splitting_every_line(data: bytes, limit: int) -> None:
    assert _has_line_longer_than(data, limit) == (max(map(len, data.split(b"\n"))) > limit)


@given(st.binary(max_size=80).map(lambda b: bytes(b"a.\r\n"[x % 4] for x in b)))
@settings(max_examples=3000)
def test_content_scan_agrees_with_counting_and_searching_apart(data: bytes) -> None:
    assert _bare_and_stuffed(data) == (_has_bare_line_ending(data), b"\r\n." in data)
