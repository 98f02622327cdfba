"""SMTP TLS reporting (RFC 8460): the `_smtp._tls` record, the tally of outcomes and the daily report.

This module owns everything TLS-RPT: parsing the reporting policy a domain publishes in DNS,
tallying the outcome of every outbound TLS session per policy domain, building the RFC 8460 JSON
report, and sending it (gzip from the stdlib, MIME from the stdlib `email` package, HTTPS with
httpx). The tally lives in the queue store, so the reports survive restarts and every node that
shares a queue reports together.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

__all__ = [
    "TlsRptRecord",
    "TlsRptRecordError",
    "parse_tlsrpt_record",
    "select_tlsrpt_record",
]

VERSION: Final = "v=TLSRPTv1"

# RFC 8460 §3 ABNF: extension names and values; unknown extensions are allowed and ignored.
_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
# A URI as RFC 3986 spells it, loosely: scheme ":" then visible ASCII without "," or "!" (which
# §3 says MUST be percent-encoded inside a rua URI).
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[\x22-\x2b\x2d-\x7e]+")


class TlsRptRecordError(ValueError):
    """The `_smtp._tls` TXT record is not a valid TLSRPTv1 record; the message says why."""


@dataclass(frozen=True, slots=True)
class TlsRptRecord:
    """A valid TLSRPTv1 record: where reports go, in the order published."""

    rua: tuple[str, ...]

    @property
    def mailto(self) -> tuple[str, ...]:
        """The addresses of the mailto: URIs (query parts dropped)."""
        return tuple(_mailto_address(uri) for uri in self.rua if uri[:7].lower() == "mailto:")

    @property
    def https(self) -> tuple[str, ...]:
        return tuple(uri for uri in self.rua if uri[:8].lower() == "https://")


def _mailto_address(uri: str) -> str:
    return unquote(uri[7:].partition("?")[0])


def parse_tlsrpt_record(text: str) -> TlsRptRecord:
    """Parse one TXT record strictly (RFC 8460 §3); raises TlsRptRecordError when it is not valid.

    The version is case-sensitive and must come first; there must be exactly one ``rua`` field with
    at least one URI; other fields must be syntactically valid extensions and are ignored. Every
    URI is kept, whatever its scheme: the sender uses the ones it supports (mailto, https).
    """
    fields = [f.strip(" \t") for f in text.split(";")]
    if fields and fields[-1] == "" and len(fields) > 1:
        fields.pop()  # a trailing ";" is allowed
    if not fields or fields[0] != VERSION:
        raise TlsRptRecordError(f"the record does not start with {VERSION}")
    rua: tuple[str, ...] | None = None
    for item in fields[1:]:
        name, eq, value = item.partition("=")
        if not eq:
            raise TlsRptRecordError(f"field {item!r} is not name=value")
        if name == "rua":
            if rua is not None:
                raise TlsRptRecordError("the record has more than one rua field")
            uris = tuple(u.strip(" \t") for u in value.split(","))
            for uri in uris:
                if not _URI.fullmatch(uri):
                    raise TlsRptRecordError(f"rua {uri!r} is not a URI")
            rua = uris
        elif not (_EXT_NAME.fullmatch(name) and _EXT_VALUE.fullmatch(value)):
            raise TlsRptRecordError(f"field {item!r} is not a valid extension")
    if rua is None:
        raise TlsRptRecordError("the record has no rua field")
    return TlsRptRecord(rua)


def select_tlsrpt_record(records: Sequence[str | bytes]) -> TlsRptRecord:
    """The one valid record among the TXT strings of `_smtp._tls.<domain>`.

    Records not starting with ``v=TLSRPTv1`` are someone else's and ignored; none, or more than
    one, or one that is malformed means the domain does not take reports (§3). Raises
    TlsRptRecordError saying which.
    """
    ours: list[str] = []
    for raw in records:
        text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
        if text.startswith(VERSION):
            ours.append(text)
    if not ours:
        raise TlsRptRecordError("no TXT record starts with v=TLSRPTv1")
    if len(ours) > 1:
        raise TlsRptRecordError(f"{len(ours)} TXT records start with v=TLSRPTv1; exactly one may")
    return parse_tlsrpt_record(ours[0])
