"""RFC 5321/6531 path parsing: table-driven cases plus Hypothesis properties."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mailward.smtp.address import (
    AddressError,
    Mailbox,
    domain_to_ascii,
    format_path,
    parse_forward_path,
    parse_mailbox,
    parse_reverse_path,
    split_path,
)

PARSERS = [
    pytest.param(parse_forward_path, "5.1.3", id="forward"),
    pytest.param(parse_reverse_path, "5.1.7", id="reverse"),
]

LABEL63 = "a" * 63


def _v6(text: str) -> str:
    return f"[IPv6:{ipaddress.IPv6Address(text)}]"


# (path, smtputf8, local_part, domain, ascii_domain, is_literal)
VALID = [
    ("<user@example.com>", False, "user", "example.com", "example.com", False),
    ("<User.Name+tag@Example.COM>", False, "User.Name+tag", "Example.COM", "example.com", False),
    ("<!#$%&'*+/=?^_`{|}~-@example.com>", False, "!#$%&'*+/=?^_`{|}~-", "example.com", "example.com", False),
    ("  <user@example.com> ", False, "user", "example.com", "example.com", False),
    ("<user@localhost>", False, "user", "localhost", "localhost", False),
    ("<user@a-b.123.example>", False, "user", "a-b.123.example", "a-b.123.example", False),
    ("<user@r3---sn-x.example>", False, "user", "r3---sn-x.example", "r3---sn-x.example", False),
    (f"<user@{LABEL63}.example>", False, "user", f"{LABEL63}.example", f"{LABEL63}.example", False),
    # Open-relay probes: '%' and '!' are plain local-part text, the source route is dropped.
    (
        "<relaytest%x.example@target.example>",
        False,
        "relaytest%x.example",
        "target.example",
        "target.example",
        False,
    ),
    (
        "<x.example!relaytest@target.example>",
        False,
        "x.example!relaytest",
        "target.example",
        "target.example",
        False,
    ),
    ("<@target.example:relaytest@x.example>", False, "relaytest", "x.example", "x.example", False),
    ("<@a.example,@b.example:user@c.example>", False, "user", "c.example", "c.example", False),
    ('<"a@b"@c.example>', False, '"a@b"', "c.example", "c.example", False),
    # Quoted strings are re-serialised minimally.
    ('<"abc"@example.com>', False, "abc", "example.com", "example.com", False),
    ('<"a.b"@example.com>', False, "a.b", "example.com", "example.com", False),
    ('<"a\\b"@example.com>', False, "ab", "example.com", "example.com", False),
    ('<"a..b"@example.com>', False, '"a..b"', "example.com", "example.com", False),
    ('<".a"@example.com>', False, '".a"', "example.com", "example.com", False),
    ('<"a b"@example.com>', False, '"a b"', "example.com", "example.com", False),
    ('<"a\\ b"@example.com>', False, '"a b"', "example.com", "example.com", False),
    ('<"a\\"b"@example.com>', False, '"a\\"b"', "example.com", "example.com", False),
    ('<"a\\\\b"@example.com>', False, '"a\\\\b"', "example.com", "example.com", False),
    ('<"a>b"@example.com>', False, '"a>b"', "example.com", "example.com", False),
    ('<""@example.com>', False, '""', "example.com", "example.com", False),
    # Address literals; ascii_domain is normalised.
    ("<user@[192.0.2.1]>", False, "user", "[192.0.2.1]", "[192.0.2.1]", True),
    ("<user@[IPv6:2001:db8::1]>", False, "user", "[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]", True),
    (
        "<user@[ipv6:2001:DB8:0:0:0:0:0:1]>",
        False,
        "user",
        "[ipv6:2001:DB8:0:0:0:0:0:1]",
        "[IPv6:2001:db8::1]",
        True,
    ),
    (
        "<user@[IPv6:::ffff:192.0.2.1]>",
        False,
        "user",
        "[IPv6:::ffff:192.0.2.1]",
        _v6("::ffff:192.0.2.1"),
        True,
    ),
    # Existing A-labels are valid without SMTPUTF8 and are lower-cased.
    ("<user@xn--bcher-kva.example>", False, "user", "xn--bcher-kva.example", "xn--bcher-kva.example", False),
    ("<user@XN--BCHER-KVA.Example>", False, "user", "XN--BCHER-KVA.Example", "xn--bcher-kva.example", False),
    # SMTPUTF8: U-labels become A-labels via UTS #46; UTF-8 local parts are allowed.
    ("<user@bücher.example>", True, "user", "bücher.example", "xn--bcher-kva.example", False),
    ("<user@Bücher.EXAMPLE>", True, "user", "Bücher.EXAMPLE", "xn--bcher-kva.example", False),
    ("<user@bücher\u3002example>", True, "user", "bücher\u3002example", "xn--bcher-kva.example", False),
    ("<user@пример.испытание>", True, "user", "пример.испытание", "xn--e1afmkfd.xn--80akhbyknj4f", False),
    ("<user@例え.テスト>", True, "user", "例え.テスト", "xn--r8jz45g.xn--zckzah", False),
    # Fullwidth "BUCHER" is mapped to plain ASCII by UTS #46.
    (
        "<user@\uff22\uff35\uff23\uff28\uff25\uff32.example>",
        True,
        "user",
        "\uff22\uff35\uff23\uff28\uff25\uff32.example",
        "bucher.example",
        False,
    ),
    ("<用户@例え.テスト>", True, "用户", "例え.テスト", "xn--r8jz45g.xn--zckzah", False),
    ("<Jörg.Müller@example.com>", True, "Jörg.Müller", "example.com", "example.com", False),
    ('<"jörg müller"@example.com>', True, '"jörg müller"', "example.com", "example.com", False),
    ('<"jörg"@example.com>', True, "jörg", "example.com", "example.com", False),
    ("<user@example.com>", True, "user", "example.com", "example.com", False),
]


@pytest.mark.parametrize(("path", "smtputf8", "local", "domain", "ascii_domain", "literal"), VALID)
@pytest.mark.parametrize(("parse", "enhanced"), PARSERS)
def test_valid_paths(parse, enhanced, path, smtputf8, local, domain, ascii_domain, literal):
    mailbox = parse(path, smtputf8=smtputf8)
    assert mailbox == Mailbox(local, domain, ascii_domain, literal)
    assert str(mailbox) == f"{local}@{domain}"
    assert format_path(mailbox) == f"<{local}@{domain}>"
    assert mailbox.needs_smtputf8 == (not f"{local}@{domain}".isascii())


# (path, smtputf8, text) -> 501 with the parser's enhanced code
INVALID_SYNTAX = [
    ("<a..b@example.com>", False, "Malformed address"),
    ("<.a@example.com>", False, "Malformed address"),
    ("<a.@example.com>", False, "Malformed address"),
    ("<a b@example.com>", False, "Malformed address"),
    ("<a(comment)@example.com>", False, "Malformed address"),
    ("<Name <a@example.com>>", False, "Malformed address"),
    ('<"a"b@example.com>', False, "Malformed address"),
    ('<"unterminated@example.com>', False, "Malformed address"),
    ('<"a\\é"@example.com>', True, "Malformed address"),
    ("<a\x00@example.com>", False, "Malformed address"),
    ("<a\x01@example.com>", False, "Malformed address"),
    ("<a\x7f@example.com>", False, "Malformed address"),
    ("<a\r\n@example.com>", False, "Malformed address"),
    ('<"a\tb"@example.com>', False, "Malformed address"),
    ('<"a\x7f"@example.com>', False, "Malformed address"),
    ("<a\u0085@example.com>", True, "Malformed address"),
    ("<a\u2028@example.com>", True, "Malformed address"),
    ("<a\udc80@example.com>", True, "Malformed address"),
    ("<a@b@example.com>", False, "Malformed address"),
    ("<a@@example.com>", False, "Malformed address"),
    ("<@example.com>", False, "Malformed address"),
    ("<@a.example,@b.example>", False, "Malformed address"),
    ("<@a.example:@b.example:u@c.example>", False, "Malformed address"),
    ("<a.example:u@example.com>", False, "Malformed address"),
    # Open-relay probes that must not become a mailbox.
    ('<"relaytest@x.example">', False, "Address lacks a domain"),
    ("<relaytest>", False, "Address lacks a domain"),
    ('<"postmaster">', False, "Address lacks a domain"),
    ("<@a.example:postmaster>", False, "Address lacks a domain"),
    # Domains.
    ("<a@>", False, "Malformed domain name"),
    ("<a@example..com>", False, "Malformed domain name"),
    ("<a@.example.com>", False, "Malformed domain name"),
    ("<a@example.com.>", False, "Malformed domain name"),
    ("<a@-example.com>", False, "Malformed domain name"),
    ("<a@example-.com>", False, "Malformed domain name"),
    ("<a@exa_mple.com>", False, "Malformed domain name"),
    ("<a@exa mple.com>", False, "Malformed domain name"),
    (f"<a@{LABEL63}a.example>", False, "Malformed domain name"),
    ("<a@1.2.3.4]>", False, "Malformed domain name"),
    ("<a@127.0.0.1>", False, "Domain name must not end in a numeric label"),
    ("<a@example.123>", False, "Domain name must not end in a numeric label"),
    ("<a@2130706433>", False, "Domain name must not end in a numeric label"),
    ("<a@0x7f000001>", False, "Domain name must not end in a numeric label"),
    ("<a@127.0x1>", False, "Domain name must not end in a numeric label"),
    ("<a@xn---bbk.example>", False, "Invalid IDNA label in domain name"),
    ("<a@xn--.example>", False, "Malformed domain name"),
    ("<a@xn--ab.example>", False, "Invalid IDNA label in domain name"),
    ("<a@xn--a.example>", False, "Invalid IDNA label in domain name"),
    ("<a@xn--bcher-kva.example>".replace("kva", "kvb"), False, "Invalid IDNA label in domain name"),
    ("<a@bü_cher.example>", True, "Invalid internationalised domain name"),
    ("<a@bücher..example>", True, "Malformed domain name"),
    ("<a@bücher.example.>", True, "Malformed domain name"),
    ("<a@\u0080.example>", True, "Invalid internationalised domain name"),
    ("<a@a\u200db.example>", True, "Invalid internationalised domain name"),
    ("<a@bücher.xn---bbk>", True, "Invalid IDNA label in domain name"),
    ("<a@bücher.123>", True, "Domain name must not end in a numeric label"),
    ("<a@ü" + "ü" * 63 + ".example>", True, "Invalid internationalised domain name"),
    # Source routes are ignored but must be well formed.
    ("<@:u@example.com>", False, "Malformed domain name"),
    ("<@a..b:u@example.com>", False, "Malformed domain name"),
    ("<@a.example;@b.example:u@c.example>", False, "Malformed domain name"),
    ("<@a.example,b.example:u@c.example>", False, "Malformed address"),
    ("<@[192.0.2.1]:u@example.com>", False, "Malformed domain name"),
    # Address literals.
    ("<a@[300.1.1.1]>", False, "Malformed address literal"),
    ("<a@[1.2.3]>", False, "Malformed address literal"),
    ("<a@[010.1.1.1]>", False, "Malformed address literal"),
    ("<a@[1.2.3.4.5]>", False, "Malformed address literal"),
    ("<a@[]>", False, "Malformed address literal"),
    ("<a@[192.0.2.1>", False, "Malformed address literal"),
    ("<a@[IPv6:1::2::3]>", False, "Malformed address literal"),
    ("<a@[IPv6:fe80::1%eth0]>", False, "Malformed address literal"),
    ("<a@[IPv6:192.0.2.1]>", False, "Malformed address literal"),
    ("<a@[IPv6:]>", False, "Malformed address literal"),
    ("<a@[2001:db8::1]>", False, "Unsupported address literal"),
    ("<a@[x-tag:content]>", False, "Unsupported address literal"),
    # Limits (RFC 5321 §4.5.3.1).
    ("<" + "a" * 65 + "@example.com>", False, "Local part too long"),
    ('<"' + "a" * 63 + '"@example.com>', False, "Local part too long"),
    ("<" + "ü" * 33 + "@example.com>", True, "Local part too long"),
    ("<a@" + ".".join([LABEL63] * 4) + ">", False, "Path too long"),
]


@pytest.mark.parametrize(("path", "smtputf8", "text"), INVALID_SYNTAX)
@pytest.mark.parametrize(("parse", "enhanced"), PARSERS)
def test_invalid_paths(parse, enhanced, path, smtputf8, text):
    with pytest.raises(AddressError) as info:
        parse(path, smtputf8=smtputf8)
    assert (info.value.code, info.value.enhanced, info.value.text) == (501, enhanced, text)


@pytest.mark.parametrize(
    "path",
    [
        "<ü@example.com>",
        "<user@bücher.example>",
        '<"jörg müller"@example.com>',
        "<@bücher.example:user@example.com>",
        "<a\udc80@example.com>",
        "<a\u0085@example.com>",
    ],
)
@pytest.mark.parametrize(("parse", "enhanced"), PARSERS)
def test_non_ascii_without_smtputf8(parse, enhanced, path):
    with pytest.raises(AddressError) as info:
        parse(path, smtputf8=False)
    assert (info.value.code, info.value.enhanced) == (553, "5.6.7")
    assert info.value.text == "Non-ASCII address requires SMTPUTF8"


@pytest.mark.parametrize(
    "path", ["a@example.com", "<a@example.com", "a@example.com>", "", "  ", "<a@example.com> SIZE=1"]
)
@pytest.mark.parametrize(("parse", "enhanced"), PARSERS)
def test_path_without_brackets(parse, enhanced, path):
    with pytest.raises(AddressError) as info:
        parse(path, smtputf8=False)
    assert (info.value.code, info.value.enhanced) == (501, "5.5.4")


def test_null_reverse_path():
    assert parse_reverse_path("<>", smtputf8=False) is None
    assert parse_reverse_path(" <> ", smtputf8=True) is None
    assert format_path(None) == "<>"


def test_null_forward_path_refused():
    with pytest.raises(AddressError) as info:
        parse_forward_path("<>", smtputf8=False)
    assert (info.value.code, info.value.enhanced) == (501, "5.1.3")


@pytest.mark.parametrize("path", ["<Postmaster>", "<postmaster>", "<POSTMASTER>", "<PostMaster>"])
def test_domainless_postmaster(path):
    mailbox = parse_forward_path(path, smtputf8=False)
    assert mailbox == Mailbox("postmaster", "", "", False)
    assert str(mailbox) == "postmaster"
    assert format_path(mailbox) == "<postmaster>"
    assert mailbox.ascii_form() == "postmaster"
    assert not mailbox.needs_smtputf8
    with pytest.raises(AddressError) as info:
        parse_reverse_path(path, smtputf8=False)
    assert info.value.enhanced == "5.1.7"


def test_postmaster_with_domain_keeps_case():
    assert parse_forward_path("<PostMaster@Example.com>", smtputf8=False).local_part == "PostMaster"


def _domain_of_length(octets: int) -> str:
    parts = []
    while octets - len(".".join(parts)) > 64:
        parts.append("a" * 60)
    parts.append("b" * (octets - len(".".join([*parts, ""]))))
    domain = ".".join(parts)
    assert len(domain) == octets
    return domain


def test_length_limits_at_the_boundary():
    local64 = "a" * 64
    assert parse_forward_path(f"<{local64}@example.com>", smtputf8=False).local_part == local64
    assert parse_forward_path("<" + "ü" * 32 + "@example.com>", smtputf8=True).local_part == "ü" * 32
    # 256 octets including the brackets is the longest path.
    domain = _domain_of_length(256 - len("<a@>"))
    assert parse_forward_path(f"<a@{domain}>", smtputf8=False).ascii_domain == domain
    with pytest.raises(AddressError, match="Path too long"):
        parse_forward_path(f"<ab@{domain}>", smtputf8=False)
    # The source route counts towards the path length too.
    with pytest.raises(AddressError, match="Path too long"):
        parse_reverse_path(f"<@{LABEL63}.example:a@{domain[:200]}>", smtputf8=False)


def test_domain_length_limit():
    assert domain_to_ascii(_domain_of_length(255)) == _domain_of_length(255)
    for domain in (_domain_of_length(256), "ü" * 128 + ".example"):
        with pytest.raises(AddressError) as info:
            domain_to_ascii(domain)
        assert (info.value.code, info.value.enhanced, info.value.text) == (
            501,
            "5.5.2",
            "Domain name too long",
        )
    # Written short enough, but its A-label form is longer than 255 octets.
    long_idn = ".".join(["aü"] * 60)
    assert len(long_idn.encode()) <= 255
    with pytest.raises(AddressError, match="Domain name too long"):
        domain_to_ascii(long_idn)


def test_ascii_form_and_needs_smtputf8():
    idn = parse_forward_path("<user@bücher.example>", smtputf8=True)
    assert idn.needs_smtputf8
    assert idn.ascii_form() == "user@xn--bcher-kva.example"
    alabel = parse_forward_path("<user@xn--bcher-kva.example>", smtputf8=False)
    assert not alabel.needs_smtputf8
    assert idn.ascii_domain == alabel.ascii_domain
    utf8_local = parse_forward_path("<jörg@example.com>", smtputf8=True)
    assert utf8_local.needs_smtputf8
    assert utf8_local.ascii_form() is None
    literal = parse_forward_path("<u@[IPv6:2001:DB8::1]>", smtputf8=False)
    assert literal.ascii_form() == "u@[IPv6:2001:db8::1]"


@pytest.mark.parametrize(
    ("arg", "path", "params"),
    [
        ("<a@b.example>", "<a@b.example>", ""),
        ("  <a@b.example>", "<a@b.example>", ""),
        ("\t<a@b.example>", "<a@b.example>", ""),
        ("<a@b.example> SIZE=100", "<a@b.example>", "SIZE=100"),
        ("<a@b.example>  SIZE=100  BODY=8BITMIME ", "<a@b.example>", "SIZE=100  BODY=8BITMIME"),
        ('<"a> b"@c.example> SIZE=1', '<"a> b"@c.example>', "SIZE=1"),
        ('<"a\\"> b"@c.example>', '<"a\\"> b"@c.example>', ""),
        ('<"a\\\\"@c.example> X=1', '<"a\\\\"@c.example>', "X=1"),
        ("<>", "<>", ""),
        ("<> SIZE=1 SMTPUTF8", "<>", "SIZE=1 SMTPUTF8"),
        ("<Postmaster>", "<Postmaster>", ""),
        ("<@a.example:u@b.example> NOTIFY=NEVER", "<@a.example:u@b.example>", "NOTIFY=NEVER"),
    ],
)
def test_split_path(arg, path, params):
    assert split_path(arg) == (path, params)


@pytest.mark.parametrize(
    "arg",
    [
        "",
        "   ",
        "a@b.example",
        "a@b.example SIZE=1",
        "<a@b.example",
        "<a@b.example>SIZE=1",
        "<a b@c.example>",
        '<"a@b.example>',
        '<"a\\">',
        "x<a@b.example>",
    ],
)
def test_split_path_refuses(arg):
    with pytest.raises(AddressError) as info:
        split_path(arg)
    assert (info.value.code, info.value.enhanced) == (501, "5.5.4")


def test_split_then_parse_relay_probe():
    path, params = split_path(' <"relaytest@x.example"> ')
    assert params == ""
    with pytest.raises(AddressError, match="lacks a domain"):
        parse_forward_path(path, smtputf8=False)


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("Example.COM", "example.com"),
        ("mx1.example.com", "mx1.example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
        ("localhost", "localhost"),
    ],
)
def test_domain_to_ascii(domain, expected):
    assert domain_to_ascii(domain) == expected


@pytest.mark.parametrize(
    "domain", ["", "exa mple.com", "a..b", "a.b.", "-a.example", "[192.0.2.1]", "192.0.2.1", "xn--a.example"]
)
def test_domain_to_ascii_refuses(domain):
    with pytest.raises(AddressError) as info:
        domain_to_ascii(domain)
    assert (info.value.code, info.value.enhanced) == (501, "5.5.2")


def test_domain_to_ascii_literals():
    assert domain_to_ascii("[192.0.2.1]", allow_literal=True) == "[192.0.2.1]"
    assert domain_to_ascii("[IPv6:2001:DB8:0::1]", allow_literal=True) == "[IPv6:2001:db8::1]"
    assert domain_to_ascii("Example.COM", allow_literal=True) == "example.com"
    with pytest.raises(AddressError, match="Unsupported address literal"):
        domain_to_ascii("[x:y]", allow_literal=True)


def test_parse_mailbox():
    assert parse_mailbox("u@bücher.example") == Mailbox("u", "bücher.example", "xn--bcher-kva.example", False)
    with pytest.raises(AddressError):
        parse_mailbox("u@bücher.example", smtputf8=False)


@pytest.mark.parametrize(
    "mailbox",
    [
        Mailbox("a\r\nRSET", "x.example", "x.example", False),
        Mailbox("a", "x.example>\r\nDATA", "x.example", False),
        Mailbox("a\x00", "x.example", "x.example", False),
        Mailbox("a\u2028", "x.example", "x.example", False),
    ],
)
def test_format_path_refuses_command_injection(mailbox):
    with pytest.raises(AddressError):
        format_path(mailbox)


def test_address_error_carries_reply():
    error = AddressError(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
    assert isinstance(error, ValueError)
    assert (error.code, error.enhanced, error.text) == (553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
    assert str(error) == "553 5.6.7 Non-ASCII address requires SMTPUTF8"


# --- properties -------------------------------------------------------------------------------

ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
QTEXT_SPECIALS = ' "\\@<>()[]:;,.'
UTF8 = st.characters(codec="utf-8", min_codepoint=0xA0, exclude_characters="\u2028\u2029")

ascii_atoms = st.text(st.sampled_from(ATEXT), min_size=1, max_size=6)
utf8_atoms = st.text(st.one_of(st.sampled_from(ATEXT), UTF8), min_size=1, max_size=4)
dot_strings = st.lists(st.one_of(ascii_atoms, utf8_atoms), min_size=1, max_size=3).map(".".join)


def _quote(value: str, escape_all: bool) -> str:
    escaped = "".join("\\" + c if c in '"\\' or (escape_all and c.isascii()) else c for c in value)
    return f'"{escaped}"'


quoted_strings = st.builds(
    _quote,
    st.text(st.one_of(st.sampled_from(ATEXT + QTEXT_SPECIALS), UTF8), max_size=12),
    st.booleans(),
)
local_parts = st.one_of(dot_strings, quoted_strings)

ldh_labels = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,8}[A-Za-z0-9])?", fullmatch=True)
u_labels = st.sampled_from(["bücher", "münchen", "пример", "例え", "δοκιμή", "ñandú", "xn--bcher-kva"])
tlds = st.sampled_from(["example", "EXAMPLE", "test", "xn--zckzah", "テスト", "испытание"])
domains = st.builds(
    lambda labels, tld: ".".join([*labels, tld]),
    st.lists(st.one_of(ldh_labels, u_labels), max_size=3),
    tlds,
)
literals = st.one_of(
    st.ip_addresses(v=4).map(lambda ip: f"[{ip}]"),
    st.ip_addresses(v=6).map(lambda ip: f"[IPv6:{ip.exploded if ip.packed[0] % 2 else ip}]"),
)
routes = st.lists(domains, min_size=1, max_size=2).map(lambda hops: ",".join("@" + h for h in hops) + ":")
paths = st.builds(
    lambda route, local, domain: f"<{route}{local}@{domain}>",
    st.one_of(st.just(""), routes),
    local_parts,
    st.one_of(domains, literals),
)


@given(paths)
@example('<"a\\ b"@x.example>')
@example("<@a.example:u@[IPv6:::1]>")
def test_format_path_round_trips(path):
    mailbox = parse_forward_path(path, smtputf8=True)
    assert mailbox == parse_reverse_path(path, smtputf8=True)
    formatted = format_path(mailbox)
    assert parse_forward_path(formatted, smtputf8=True) == mailbox
    assert parse_reverse_path(formatted, smtputf8=True) == mailbox
    assert formatted == f"<{mailbox}>"
    assert split_path(f"  {formatted} SIZE=1 ") == (formatted, "SIZE=1")
    assert mailbox.ascii_domain == mailbox.ascii_domain.lower() or mailbox.is_literal
    ascii_only = path.isascii()
    assert mailbox.needs_smtputf8 == (not formatted.isascii())
    if ascii_only:
        assert parse_forward_path(path, smtputf8=False) == mailbox
    if mailbox.ascii_form() is not None and not mailbox.is_literal:
        # The A-label form is itself a valid ASCII path naming the same mailbox.
        again = parse_forward_path(f"<{mailbox.ascii_form()}>", smtputf8=False)
        assert (again.local_part, again.ascii_domain) == (mailbox.local_part, mailbox.ascii_domain)


@given(quoted_strings)
def test_canonical_local_part_is_idempotent(quoted):
    first = parse_forward_path(f"<{quoted}@example.com>", smtputf8=True).local_part
    assert parse_forward_path(f"<{first}@example.com>", smtputf8=True).local_part == first
    assert len(first.encode()) <= len(quoted.encode())


def _only_address_errors(call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except AddressError as error:
        assert error.code in (501, 553)
        assert error.enhanced.startswith("5.")
        assert error.text.isascii() and error.text.isprintable()
        return None


def _check_any_input(text):
    for smtputf8 in (False, True):
        for parse in (parse_forward_path, parse_reverse_path):
            mailbox = _only_address_errors(parse, text, smtputf8=smtputf8)
            if mailbox is not None:
                # Whatever is accepted is safe to put on the wire and reads back the same.
                assert parse(format_path(mailbox), smtputf8=smtputf8) == mailbox
                if not smtputf8:
                    assert not mailbox.needs_smtputf8
    _only_address_errors(split_path, text)
    _only_address_errors(domain_to_ascii, text)
    _only_address_errors(domain_to_ascii, text, allow_literal=True)


@settings(max_examples=300)
@given(st.text())
def test_any_text_raises_only_address_error(text):
    _check_any_input(text)
    _check_any_input(f"<{text}>")


TOKENS = [
    *'<>"\\@.:,[] \t-%!aZ0',
    *["xn--", "IPv6:", "::", "1.2.3.4", "example", "postmaster"],
    *["ü", "例", "\u3002", "\x00", "\r\n", "\x7f", "\udc80"],
]


@settings(max_examples=500)
@given(st.lists(st.sampled_from(TOKENS), max_size=30).map("".join))
def test_structured_garbage_raises_only_address_error(text):
    _check_any_input(text)
    _check_any_input(f"<{text}>")
    _check_any_input(f"<a@{text}>")
    _check_any_input(f'<"{text}"@example.com>')


@settings(max_examples=200)
@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300))
def test_printable_ascii_raises_only_address_error(text):
    _check_any_input(text)
    _check_any_input(f"<{text}@example.com>")
