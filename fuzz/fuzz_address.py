"""Fuzz the RFC 5321/6531 path parsers (smtp/address.py) with arbitrary text.

Input layout: the first byte picks the parser and SMTPUTF8 (bits 0-2: split_path, reverse path,
forward path, bare mailbox, domain; bit 3: smtputf8); the rest is UTF-8 (invalid octets become
lone surrogates, as surrogateescape decoding would leave them). Paths come from any client on
port 25, so every input must become a value or an AddressError, nothing else.

Invariants: only AddressError is raised, with a 4xx/5xx code and a text that is one printable
line; a parsed mailbox can be put on the wire (format_path never refuses it), parses back to
itself, needs SMTPUTF8 only if that was allowed, and has a routing domain that is lower-case ASCII
and normalises to itself; domain_to_ascii is idempotent; split_path returns a bracketed path.

Run: python fuzz/fuzz_address.py [libFuzzer flags] [corpus dirs]
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["mailward"]):
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


def check_mailbox(mailbox: Mailbox, smtputf8: bool) -> None:
    assert smtputf8 or not mailbox.needs_smtputf8, mailbox
    wire = format_path(mailbox)
    assert parse_forward_path(wire, smtputf8=True) == mailbox, (wire, mailbox)
    domain = mailbox.ascii_domain
    assert (domain.isascii() and domain == domain.lower()) or mailbox.is_literal, mailbox
    if domain:
        assert domain_to_ascii(domain, allow_literal=True) == domain, mailbox
    else:
        assert mailbox.local_part.lower() == "postmaster", mailbox


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    mode, smtputf8 = data[0] % 5, bool(data[0] & 8)
    text = data[1:].decode("utf-8", "surrogateescape")
    try:
        if mode == 0:
            path, rest = split_path(text)
            assert path.startswith("<") and path.endswith(">"), path
            assert rest == rest.strip(" \t"), rest
        elif mode == 1:
            sender = parse_reverse_path(text, smtputf8=smtputf8)
            if sender is not None:
                check_mailbox(sender, smtputf8)
        elif mode == 2:
            check_mailbox(parse_forward_path(text, smtputf8=smtputf8), smtputf8)
        elif mode == 3:
            check_mailbox(parse_mailbox(text, smtputf8=smtputf8), smtputf8)
        else:
            ascii_domain = domain_to_ascii(text, allow_literal=smtputf8)
            assert ascii_domain.isascii()
            assert domain_to_ascii(ascii_domain, allow_literal=True) == ascii_domain
    except AddressError as err:
        assert 400 <= err.code < 600 and err.text and err.text.isprintable(), err


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
