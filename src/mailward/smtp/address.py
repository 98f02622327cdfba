"""SMTP paths: the ``<...>`` in ``MAIL FROM`` and ``RCPT TO``, their mailboxes and domains.

This module owns the syntax of reverse and forward paths (RFC 5321 §4.1.2 with the RFC 6531
SMTPUTF8 extensions), their length limits (RFC 5321 §4.5.3.1), domain names in IDNA 2008 form
(RFC 5890, UTS #46 mapping) and address literals. It does no I/O.

It is written by hand because it is the heart of the engine's input validation: every address a
peer gives us passes through here before any routing or relay decision is made. The stdlib's
``email.utils`` parses RFC 5322 header addresses (comments, display names, obsolete forms), which is
far too lenient for SMTP paths. Routing characters such as ``%`` and ``!`` are ordinary local-part
text here and a source route is parsed and dropped, so a path can never name a destination other
than its final domain.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final

import idna

__all__ = [
    "AddressError",
    "Mailbox",
    "domain_to_ascii",
    "format_path",
    "parse_forward_path",
    "parse_mailbox",
    "parse_reverse_path",
    "split_path",
]

MAX_LOCAL_PART_OCTETS: Final = 64
MAX_DOMAIN_OCTETS: Final = 255
MAX_PATH_OCTETS: Final = 256

# Enhanced status codes (RFC 3463 / RFC 6531).
_FORWARD: Final = "5.1.3"  # bad destination mailbox address syntax
_REVERSE: Final = "5.1.7"  # bad sender's mailbox address syntax
_NEEDS_UTF8: Final = "5.6.7"  # non-ASCII address without SMTPUTF8
_BAD_ARGUMENT: Final = "5.5.4"  # invalid command arguments
_BAD_DOMAIN: Final = "5.5.2"  # syntax error (EHLO names and other bare domains)


class AddressError(ValueError):
    """Why a path was refused; carries the SMTP reply the server should send.

    ``text`` never echoes the peer's input, so it is always safe to put on the wire.
    """

    code: int
    enhanced: str
    text: str

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text


# UTF8-non-ascii of RFC 6531 §3.3, minus what no address needs and downstream code may
# mishandle: C1 controls, lone surrogates (left by surrogateescape decoding of invalid UTF-8),
# and U+2028/U+2029, which str.splitlines() treats as line breaks.
_UTF8: Final = "\u00a0-\u2027\u202a-\ud7ff\ue000-\U0010ffff"
_ATEXT: Final = "A-Za-z0-9!#$%&'*+/=?^_`{|}~\\-" + _UTF8
_QTEXT: Final = "\\x20\\x21\\x23-\\x5b\\x5d-\\x7e" + _UTF8
_DOT_STRING: Final = f"[{_ATEXT}]+(?:\\.[{_ATEXT}]+)*"
_QUOTED_STRING: Final = f'"(?:[{_QTEXT}]|\\\\[\\x20-\\x7e])*"'

_DOT_STRING_RE: Final = re.compile(_DOT_STRING)
_QUOTED_PAIR_RE: Final = re.compile(r"\\(.)", re.DOTALL)
_QUOTE_NEEDED_RE: Final = re.compile(r'(["\\])')

# The route ends at the first ':' because At-domain allows only a Domain, never a literal. The
# route and domain are captured loosely here and validated by the domain parser.
_PATH_RE: Final = re.compile(
    f"<(?:(?P<route>@[^,:]*(?:,@[^,:]*)*):)?"
    f"(?P<local>{_DOT_STRING}|{_QUOTED_STRING})"
    f"(?:@(?P<domain>[^@<>]*))?>"
)

# Outside quotes a path ends at '>' and cannot contain blanks; inside, anything goes up to the
# closing quote (a backslash escapes the next character).
_SPLIT_RE: Final = re.compile(r'[ \t]*(<(?:[^"> \t]|"(?:[^"\\]|\\.)*")*>)', re.DOTALL)

_LABEL: Final = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_LABEL_RE: Final = re.compile(_LABEL)
_ASCII_DOMAIN_RE: Final = re.compile(f"{_LABEL}(?:\\.{_LABEL})*")
# A last label like these makes inet_aton()/getaddrinfo() read the whole name as an IPv4 address
# ("127.1", "0x7f000001"), which would let a "domain" route to an arbitrary address.
_NUMERIC_TLD_RE: Final = re.compile(r"[0-9]+|0x[0-9a-f]*")

_IPV4_LITERAL_RE: Final = re.compile(r"\[([0-9]{1,3}(?:\.[0-9]{1,3}){3})\]")
_IPV6_LITERAL_RE: Final = re.compile(r"\[IPv6:([0-9a-f:.]+)\]", re.ASCII | re.IGNORECASE)
_GENERAL_LITERAL_RE: Final = re.compile(r"\[[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+\]")

# Characters that must never reach a command line we send (CR/LF injection and friends).
_UNSAFE_ON_WIRE_RE: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class Mailbox:
    """One mailbox from a path.

    ``local_part`` is the canonical wire form: a dot-string as given, or a quoted string
    re-serialised minimally (quotes only when the content is not a dot-string, and only ``"`` and
    ``\\`` escaped), so equal local parts compare equal. Its case is kept: local parts are
    case-sensitive. ``domain`` is the domain as the peer wrote it; ``ascii_domain`` is the form to
    route and compare on: lower-case A-labels, or the normalised address literal such as
    ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``. The domain-less ``<Postmaster>`` recipient has
    ``domain == ascii_domain == ""``.
    """

    local_part: str
    domain: str
    ascii_domain: str
    is_literal: bool

    def __str__(self) -> str:
        if not self.domain:
            return self.local_part
        return f"{self.local_part}@{self.domain}"

    @property
    def needs_smtputf8(self) -> bool:
        """Whether sending this mailbox as written requires the SMTPUTF8 extension."""
        return not (self.local_part.isascii() and self.domain.isascii())

    def ascii_form(self) -> str | None:
        """The mailbox with its domain in A-label form, or None if the local part is not ASCII."""
        if not self.local_part.isascii():
            return None
        if not self.ascii_domain:
            return self.local_part
        return f"{self.local_part}@{self.ascii_domain}"


def _octets(text: str) -> int:
    if text.isascii():
        return len(text)
    # surrogatepass: a lone surrogate must count, not raise.
    return len(text.encode("utf-8", "surrogatepass"))


def _canonical_quoted(quoted: str) -> str:
    value = _QUOTED_PAIR_RE.sub(r"\1", quoted[1:-1])
    if _DOT_STRING_RE.fullmatch(value):
        return value
    return '"' + _QUOTE_NEEDED_RE.sub(r"\\\1", value) + '"'


def _check_tld(ascii_domain: str, enhanced: str) -> None:
    if _NUMERIC_TLD_RE.fullmatch(ascii_domain.rpartition(".")[2]):
        raise AddressError(501, enhanced, "Domain name must not end in a numeric label")


def _check_alabel(label: str, enhanced: str) -> None:
    # Only "xn--" labels go through idna: plain LDH labels are already fully checked by the
    # regular expression, and legacy names with "--" in positions 3-4 still exist in DNS.
    if label.startswith("xn--"):
        try:
            idna.ulabel(label)
        except ValueError:
            raise AddressError(501, enhanced, "Invalid IDNA label in domain name") from None


def _domain_to_ascii(domain: str, enhanced: str) -> str:
    """Validate a Domain (not a literal) and return its lower-case A-label form."""
    if _octets(domain) > MAX_DOMAIN_OCTETS:
        raise AddressError(501, enhanced, "Domain name too long")
    if domain.isascii():
        if not _ASCII_DOMAIN_RE.fullmatch(domain):
            raise AddressError(501, enhanced, "Malformed domain name")
        ascii_domain = domain.lower()
        if "xn--" in ascii_domain:
            for label in ascii_domain.split("."):
                _check_alabel(label, enhanced)
    else:
        ascii_domain = _unicode_domain_to_ascii(domain, enhanced)
        if _octets(ascii_domain) > MAX_DOMAIN_OCTETS:
            raise AddressError(501, enhanced, "Domain name too long")
    _check_tld(ascii_domain, enhanced)
    return ascii_domain


def _unicode_domain_to_ascii(domain: str, enhanced: str) -> str:
    try:
        # UTS #46 maps case, width variants and ideographic full stops and rejects controls,
        # surrogates and non-LDH ASCII (std3_rules).
        mapped = idna.uts46_remap(domain, std3_rules=True)
    except ValueError:
        raise AddressError(501, enhanced, "Invalid internationalised domain name") from None
    labels: list[str] = []
    for label in mapped.split("."):
        if label.isascii():
            # Same rule as for all-ASCII domains, so mixing in a U-label changes nothing else.
            if not _LABEL_RE.fullmatch(label):
                raise AddressError(501, enhanced, "Malformed domain name")
            _check_alabel(label, enhanced)
            labels.append(label)
            continue
        try:
            labels.append(idna.alabel(label).decode("ascii"))
        except ValueError:
            raise AddressError(501, enhanced, "Invalid internationalised domain name") from None
    return ".".join(labels)


def _literal_to_ascii(literal: str, enhanced: str) -> str:
    """Validate an address literal and return it normalised, brackets included."""
    if match := _IPV4_LITERAL_RE.fullmatch(literal):
        try:
            # ipaddress refuses leading zeros, which other software reads as octal.
            return f"[{ipaddress.IPv4Address(match[1])}]"
        except ValueError:
            raise AddressError(501, enhanced, "Malformed address literal") from None
    if match := _IPV6_LITERAL_RE.fullmatch(literal):
        try:
            return f"[IPv6:{ipaddress.IPv6Address(match[1])}]"
        except ValueError:
            raise AddressError(501, enhanced, "Malformed address literal") from None
    if literal[1:6].lower() != "ipv6:" and _GENERAL_LITERAL_RE.fullmatch(literal):
        raise AddressError(501, enhanced, "Unsupported address literal")
    raise AddressError(501, enhanced, "Malformed address literal")


def _parse_path(text: str, *, smtputf8: bool, forward: bool) -> Mailbox | None:
    enhanced = _FORWARD if forward else _REVERSE
    path = text.strip(" \t")
    if not (path.startswith("<") and path.endswith(">")):
        raise AddressError(501, _BAD_ARGUMENT, "Path must be enclosed in angle brackets")
    if not smtputf8 and not path.isascii():
        raise AddressError(553, _NEEDS_UTF8, "Non-ASCII address requires SMTPUTF8")
    if path == "<>":
        if forward:
            raise AddressError(501, enhanced, "Empty recipient address")
        return None
    # Checked before matching, so the regular expressions only ever see short input.
    if _octets(path) > MAX_PATH_OCTETS:
        raise AddressError(501, enhanced, "Path too long")
    match = _PATH_RE.fullmatch(path)
    if match is None:
        raise AddressError(501, enhanced, "Malformed address")
    route, local, domain = match.group("route", "local", "domain")

    if domain is None:
        # RFC 5321 §4.1.1.3: "<Postmaster>" is the only domain-less path, and only as a recipient.
        if forward and route is None and local.lower() == "postmaster":
            return Mailbox("postmaster", "", "", False)
        raise AddressError(501, enhanced, "Address lacks a domain")
    if _octets(local) > MAX_LOCAL_PART_OCTETS:
        raise AddressError(501, enhanced, "Local part too long")
    local_part = _canonical_quoted(local) if local.startswith('"') else local

    if domain.startswith("["):
        ascii_domain = _literal_to_ascii(domain, enhanced)
        is_literal = True
    else:
        ascii_domain = _domain_to_ascii(domain, enhanced)
        is_literal = False

    if route is not None:
        # The route is obsolete and ignored (RFC 5321 §4.1.2, appendix C), but a malformed one
        # still makes the path malformed.
        for hop in route.split(","):
            _domain_to_ascii(hop[1:], enhanced)
    return Mailbox(local_part, domain, ascii_domain, is_literal)


def parse_reverse_path(text: str, *, smtputf8: bool) -> Mailbox | None:
    """Parse the path of ``MAIL FROM``; None is the null reverse path ``<>``.

    ``text`` is the path alone (see ``split_path``); surrounding blanks are tolerated.
    ``smtputf8`` is whether the client asked for SMTPUTF8 on this transaction.
    """
    return _parse_path(text, smtputf8=smtputf8, forward=False)


def parse_forward_path(text: str, *, smtputf8: bool) -> Mailbox:
    """Parse the path of ``RCPT TO``, including the domain-less ``<Postmaster>``."""
    mailbox = _parse_path(text, smtputf8=smtputf8, forward=True)
    assert mailbox is not None  # "<>" is refused for forward paths
    return mailbox


def parse_mailbox(text: str, *, smtputf8: bool = True) -> Mailbox:
    """Parse a bare ``local@domain`` (configuration, tests) with the forward-path rules."""
    return parse_forward_path(f"<{text}>", smtputf8=smtputf8)


def split_path(arg: str) -> tuple[str, str]:
    """Split the argument after ``MAIL FROM:``/``RCPT TO:`` into (path, parameters).

    Blanks before the path are tolerated, as Postfix does. A quoted local part may contain '>'
    and blanks. The parameters string has surrounding blanks removed and is "" when absent.
    """
    match = _SPLIT_RE.match(arg)
    if match is None:
        raise AddressError(501, _BAD_ARGUMENT, "Path must be enclosed in angle brackets")
    rest = arg[match.end() :]
    if rest and rest[0] not in " \t":
        raise AddressError(501, _BAD_ARGUMENT, "Parameters must be separated from the path by a space")
    return match[1], rest.strip(" \t")


def domain_to_ascii(domain: str, *, allow_literal: bool = False) -> str:
    """Validate a domain name (U-labels allowed) and return its lower-case A-label form.

    For EHLO names and configuration. With ``allow_literal``, an address literal such as
    ``[192.0.2.1]`` is accepted and returned normalised. Errors are ``501 5.5.2``.
    """
    if allow_literal and domain.startswith("["):
        return _literal_to_ascii(domain, _BAD_DOMAIN)
    return _domain_to_ascii(domain, _BAD_DOMAIN)


def format_path(mailbox: Mailbox | None) -> str:
    """Serialise a mailbox for a command: ``<local@domain>``, or ``<>`` for None.

    A Mailbox built by hand rather than parsed is checked for characters that could split the
    command line.
    """
    if mailbox is None:
        return "<>"
    text = str(mailbox)
    if _UNSAFE_ON_WIRE_RE.search(text):
        raise AddressError(501, _FORWARD, "Address contains control characters")
    return f"<{text}>"
