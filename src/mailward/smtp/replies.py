"""Reading what an SMTP server sends: reply lines (RFC 5321 §4.2) and EHLO capabilities.

Shared by the client role, `mailward check` and tests. Bounded against hostile servers: an
over-long line, an endless multi-line reply or a malformed code is reported, never raised.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from mailward.smtp.codes import Reply

MAX_REPLY_LINE = 2048  # RFC 5321 allows 512; real servers exceed it, hostile ones exceed anything
MAX_REPLY_LINES = 200


@dataclass(frozen=True, slots=True)
class MalformedReply:
    """Input that is not a valid reply; the parser has dropped it and resynchronised."""

    detail: str


# RFC 5321 §4.2: Reply-code = %x32-35 %x30-35 %x30-39, then "-" (more lines), SP text, or nothing.
_REPLY_LINE = re.compile(rb"([2-5][0-5][0-9])(?:([ -])|\Z)")
_ENHANCED = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?= |\Z)")
# Reply text ends up in logs and in bounce messages: no controls, no Unicode line separators.
_TEXT_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def _reply_from_lines(code: int, raw_lines: list[bytes]) -> Reply:
    texts = [_TEXT_UNSAFE.sub("\ufffd", raw.decode("utf-8", "replace")) for raw in raw_lines]
    enhanced = None
    cls = code // 100
    if cls != 3 and (m := _ENHANCED.match(texts[0])) is not None and int(m[1]) == cls:
        enhanced = m[0]
        n = len(enhanced)
        texts = [t[n:].lstrip(" ") if t.startswith(enhanced) and t[n : n + 1] in ("", " ") else t
                 for t in texts]
    return Reply(code, enhanced, tuple(texts))


class ReplyParser:
    """Incremental reply parser: ``feed()`` bytes, then ``next_reply()`` until it returns None.

    Lines end in CRLF; a bare LF is tolerated because real servers send it. Memory stays bounded by
    ``max_line`` x ``max_lines`` whatever the peer sends: an over-long line, a reply with too many
    lines, codes that change within a reply or a line without a valid code yields a
    ``MalformedReply`` and the offending input is skipped.
    """

    def __init__(self, *, max_line: int = MAX_REPLY_LINE, max_lines: int = MAX_REPLY_LINES) -> None:
        self._max_line = max_line
        self._max_lines = max_lines
        self._buf = bytearray()
        self._code = 0
        self._lines: list[bytes] = []
        self._skip_line = False  # an over-long line was reported; drop it up to its LF
        self._skip_reply = False  # a reply had too many lines; drop it up to its last line

    def feed(self, data: bytes) -> None:
        self._buf += data

    def clear(self) -> None:
        """Forget everything buffered (STARTTLS: nothing read in clear may be acted on)."""
        self._buf.clear()
        self._lines = []
        self._skip_line = self._skip_reply = False

    def next_reply(self) -> Reply | MalformedReply | None:
        buf = self._buf
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                if self._skip_line:
                    buf.clear()
                elif len(buf) > self._max_line + 1:  # +1: a CR may still be followed by its LF
                    buf.clear()
                    self._skip_line = True
                    return self._error(f"reply line longer than {self._max_line} octets")
                return None
            raw = bytes(buf[:nl])
            del buf[: nl + 1]
            if self._skip_line:
                self._skip_line = False
                continue
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            if len(raw) > self._max_line:
                return self._error(f"reply line longer than {self._max_line} octets")
            m = _REPLY_LINE.match(raw)
            if m is None:
                return self._error(f"malformed reply line {raw[:40]!r}")
            code = int(m[1])
            last = m[2] != b"-"
            if self._skip_reply:
                self._skip_reply = not last
                continue
            if self._lines and code != self._code:
                return self._error(f"reply code changed from {self._code} to {code} within a reply")
            if len(self._lines) >= self._max_lines:
                self._skip_reply = not last
                return self._error(f"reply longer than {self._max_lines} lines")
            self._code = code
            self._lines.append(raw[4:])
            if last:
                lines, self._lines = self._lines, []
                return _reply_from_lines(code, lines)

    def _error(self, detail: str) -> MalformedReply:
        self._lines = []
        return MalformedReply(detail)


# --- capabilities --------------------------------------------------------------------------------

_EHLO_KEYWORD = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:([ =])(.*))?", re.DOTALL)
_SASL_MECH = re.compile(r"[A-Z0-9_-]{1,20}")
_SIZE_VALUE = re.compile(r"[0-9]{1,20}")


def _frozen_map(items: Mapping[str, str] | None = None) -> Mapping[str, str]:
    return MappingProxyType(dict(items or {}))


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What the server announced in its EHLO reply (all False / None after a HELO fallback).

    ``size`` is None without the SIZE extension and 0 when SIZE carries no (usable) number, which
    RFC 1870 defines as "no fixed limit". ``keywords`` keeps every line as keyword (upper case) ->
    parameters, the legacy ``AUTH=`` form under the key ``"AUTH="``.
    """

    hostname: str
    esmtp: bool = True
    pipelining: bool = False
    size: int | None = None
    eightbitmime: bool = False
    smtputf8: bool = False
    chunking: bool = False
    binarymime: bool = False
    starttls: bool = False
    dsn: bool = False
    requiretls: bool = False
    enhancedstatuscodes: bool = False
    auth: frozenset[str] = frozenset()
    keywords: Mapping[str, str] = field(default_factory=_frozen_map, hash=False)

    @classmethod
    def from_ehlo(cls, reply: Reply) -> Capabilities:
        first = reply.lines[0].split(None, 1)
        keywords: dict[str, str] = {}
        mechanisms: set[str] = set()
        for line in reply.lines[1:]:
            m = _EHLO_KEYWORD.fullmatch(line.strip())
            if m is None:
                continue
            keyword, sep, params = m[1].upper(), m[2], (m[3] or "").strip()
            if sep == "=":
                # Pre-RFC 2554 servers (and Microsoft's, alongside the standard line) say AUTH=.
                keyword += "="
            if keyword in ("AUTH", "AUTH="):
                mechanisms.update(x for x in params.upper().split() if _SASL_MECH.fullmatch(x))
            keywords.setdefault(keyword, params)
        size: int | None = None
        if "SIZE" in keywords:
            value = keywords["SIZE"]
            size = int(value) if _SIZE_VALUE.fullmatch(value) else 0
        return cls(
            hostname=first[0] if first else "",
            esmtp=True,
            pipelining="PIPELINING" in keywords,
            size=size,
            eightbitmime="8BITMIME" in keywords,
            smtputf8="SMTPUTF8" in keywords,
            chunking="CHUNKING" in keywords,
            binarymime="BINARYMIME" in keywords,
            starttls="STARTTLS" in keywords,
            dsn="DSN" in keywords,
            requiretls="REQUIRETLS" in keywords,
            enhancedstatuscodes="ENHANCEDSTATUSCODES" in keywords,
            auth=frozenset(mechanisms),
            keywords=_frozen_map(keywords),
        )

    @classmethod
    def from_helo(cls, reply: Reply) -> Capabilities:
        first = reply.lines[0].split(None, 1)
        return cls(hostname=first[0] if first else "", esmtp=False)
