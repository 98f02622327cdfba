"""Round trips between what one role writes and what the other reads (Hypothesis).

Commands: the client serialises with ``to_bytes()``, the server parses with ``parse_command``; any
difference means the two roles disagree about a command. Replies: the server serialises with
``Reply.to_bytes()``, the client parses with ``ReplyParser``. xtext: RFC 3461 encoding.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mailward.smtp.address import AddressError, Mailbox, parse_mailbox
from mailward.smtp.codes import Reply
from mailward.smtp.commands import (
    BODY_TYPES,
    Auth,
    Bdat,
    Command,
    Data,
    Ehlo,
    Helo,
    Help,
    InjectionError,
    Mail,
    MailParams,
    Noop,
    Quit,
    Rcpt,
    RcptParams,
    Rset,
    StartTls,
    Vrfy,
    parse_command,
    xtext_decode,
    xtext_encode,
)
from mailward.smtp.replies import ReplyParser

# --- mailboxes -----------------------------------------------------------------------------------

_ATEXT = "abcXYZ019!#$%&'*+-/=?^_`{|}~"
_UTF8_LETTERS = "üéßøяж例ДΩ"
_atom = st.text(alphabet=_ATEXT + _UTF8_LETTERS, min_size=1, max_size=8)
_dot_string = st.lists(_atom, min_size=1, max_size=3).map(".".join)
# Quoted strings with blanks, '@', '>' and the two characters that need a backslash.
_quoted = st.text(alphabet='ab @>.,:"\\' + "ü", min_size=0, max_size=10).map(
    lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
)
_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_tld = st.from_regex(r"[a-z][a-z0-9-]{0,6}[a-z0-9]", fullmatch=True).filter(lambda t: not t.startswith("xn"))
_idn_label = st.sampled_from(["bücher", "münchen", "例え", "пример", "δοκιμή", "xn--bcher-kva"])
_domain = st.one_of(
    st.builds(lambda ls, t: ".".join([*ls, t]), st.lists(st.one_of(_label, _idn_label), max_size=3), _tld),
    st.ip_addresses(v=4).map(lambda ip: f"[{ip}]"),
    st.ip_addresses(v=6).map(lambda ip: f"[IPv6:{ip}]"),
)


@st.composite
def mailboxes(draw: st.DrawFn, ascii_only: bool = False) -> Mailbox:
    local = draw(st.one_of(_dot_string, _quoted))
    domain = draw(_domain)
    text = f"{local}@{domain}"
    if ascii_only:
        assume(text.isascii())
    try:
        return parse_mailbox(text, smtputf8=True)
    except AddressError:
        assume(False)
        raise


_xtext_value = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=30)


@st.composite
def mail_params(draw: st.DrawFn) -> MailParams:
    return MailParams(
        size=draw(st.none() | st.integers(min_value=0, max_value=10**20 - 1)),
        body=draw(st.none() | st.sampled_from(BODY_TYPES)),
        smtputf8=draw(st.booleans()),
        ret=draw(st.none() | st.sampled_from(["FULL", "HDRS"])),
        # esmtp-value is 1*char (RFC 5321 §4.1.2): an empty ENVID cannot be written.
        envid=draw(st.none() | _xtext_value.filter(bool)),
        requiretls=draw(st.booleans()),
        auth=draw(st.none() | st.just("<>") | mailboxes(ascii_only=True).map(str)),
    )


@st.composite
def rcpt_params(draw: st.DrawFn) -> RcptParams:
    notify = draw(
        st.none()
        | st.just(frozenset({"NEVER"}))
        | st.sets(st.sampled_from(["SUCCESS", "FAILURE", "DELAY"]), min_size=1).map(frozenset)
    )
    orcpt = draw(
        st.none()
        | mailboxes(ascii_only=True).map(lambda mb: f"rfc822;{mb}")
        | _xtext_value.filter(bool).map(lambda v: f"x-local;{v}")
        | mailboxes().map(lambda mb: f"utf-8;{mb}")  # RFC 6533 utf-8-addr-xtext
    )
    return RcptParams(notify, orcpt)


@st.composite
def mail_commands(draw: st.DrawFn) -> Mail:
    sender = draw(st.none() | mailboxes())
    params = draw(mail_params())
    if sender is not None and sender.needs_smtputf8:
        params = dataclasses.replace(params, smtputf8=True)  # as the client engine does
    return Mail(sender, params)


_no_controls = st.characters(blacklist_categories=("Cc", "Cs"))
_word = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp")),
                min_size=1, max_size=40)
_argument = st.text(alphabet=_no_controls, max_size=40)

commands: st.SearchStrategy[Command] = st.one_of(
    st.builds(Ehlo, _word),
    st.builds(Helo, _word),
    mail_commands(),
    st.builds(Rcpt, mailboxes(), rcpt_params()),
    st.just(Data()),
    st.builds(Bdat, st.integers(min_value=0, max_value=10**15 - 1), st.booleans()),
    st.just(Rset()),
    st.builds(Noop, _argument),
    st.just(Quit()),
    st.builds(Vrfy, _argument.filter(lambda s: s.strip() != "")),
    st.builds(Help, _argument),
    st.just(StartTls()),
    st.builds(Auth, st.from_regex(r"[A-Z0-9_-]{1,20}", fullmatch=True), st.none() | st.binary(max_size=64)),
)


@settings(max_examples=400, deadline=None)
@given(commands)
def test_command_round_trip(cmd: Command) -> None:
    wire = cmd.to_bytes()
    assert wire.endswith(b"\r\n")
    assert b"\r" not in wire[:-2] and b"\n" not in wire[:-2]
    assert parse_command(wire[:-2]) == cmd


# --- replies -------------------------------------------------------------------------------------

# RFC 5321 §4.2: the second digit is 0-5.
_codes = st.builds(lambda a, b, c: a * 100 + b * 10 + c,
                   st.integers(2, 5), st.integers(0, 5), st.integers(0, 9))
_reply_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=60
).map(lambda s: s.strip())


@st.composite
def replies(draw: st.DrawFn) -> Reply:
    code = draw(_codes)
    enhanced = None
    if code // 100 != 3 and draw(st.booleans()):
        enhanced = f"{code // 100}.{draw(st.integers(0, 999))}.{draw(st.integers(0, 999))}"
    lines = tuple(draw(st.lists(_reply_text, min_size=1, max_size=5)))
    if enhanced is None:
        # Text that itself starts like an enhanced code is read as one: not a round trip.
        first = lines[0].split(" ", 1)[0]
        parts = first.split(".")
        assume(not (len(parts) == 3 and all(p.isascii() and p.isdigit() for p in parts)))
    return Reply(code, enhanced, lines)


@settings(max_examples=400, deadline=None)
@given(replies(), st.integers(min_value=1, max_value=50))
def test_reply_round_trip_through_the_client_parser(reply: Reply, piece: int) -> None:
    wire = reply.to_bytes()
    parser = ReplyParser()
    parsed = []
    for i in range(0, len(wire), piece):
        parser.feed(wire[i : i + piece])
        while (item := parser.next_reply()) is not None:
            parsed.append(item)
    assert parsed == [reply]


def test_reply_round_trip_examples() -> None:
    for reply in (
        Reply(250, None, ("mx.test", "PIPELINING", "SIZE 1000", "")),
        Reply(550, "5.1.1", ("No such user", "", "try again")),
        Reply(354, None, ("End data with <CR><LF>.<CR><LF>",)),
        Reply(221, "2.0.0", ("",)),
    ):
        parser = ReplyParser()
        parser.feed(reply.to_bytes())
        assert parser.next_reply() == reply


# --- xtext ---------------------------------------------------------------------------------------


@given(st.text(alphabet=st.characters(max_codepoint=255)))
def test_xtext_round_trip(value: str) -> None:
    # xtext carries octets: each character of a decoded value is one octet.
    assert xtext_decode(xtext_encode(value)) == value


@given(st.text(alphabet=st.characters(min_codepoint=256), min_size=1))
def test_xtext_refuses_what_it_cannot_carry(value: str) -> None:
    with pytest.raises(InjectionError):
        xtext_encode(value)


@given(_xtext_value)
def test_xtext_of_ascii_is_printable_without_plus_or_equals(value: str) -> None:
    # RFC 3461 §4: xchar is "!".."~" except "+" and "="; hexchar is "+" and two upper-case hex digits.
    assert re.fullmatch(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*", xtext_encode(value))
