"""Assertions on what the queue holds: the envelope as accepted and the trace header we prepend."""

from __future__ import annotations

import email.utils
import re

from mailward.queue import StoredMessage

# RFC 8314 §4.3 / §7.4: `tls` FWS cipher-suite, the name as in the IANA TLS Cipher Suites registry.
_TLS_CLAUSE = re.compile(r"\btls\s+(\S+?)\s*(;|$)")


def received(body: bytes) -> str:
    """The first header of a stored body, which must be our Received:, unfolded."""
    head = body.split(b"\r\n\r\n", 1)[0].decode("utf-8")
    first, *rest = head.split("\r\n")
    assert first.startswith("Received: "), f"the stored message does not start with Received: {first!r}"
    lines = [first]
    for line in rest:
        if line[:1] not in (" ", "\t"):
            break
        lines.append(line)
    return " ".join(ln.strip() for ln in lines)


def check_received(body: bytes, *, protocol: str, tls: tuple[str, str] | None,
                   recipient: str | None = None) -> str:
    """Check the trace header: `with` protocol (RFC 3848), TLS version and cipher, grammar order.

    RFC 5321 §4.4 orders the clauses: from, by, via, with, id, for, then additional registered
    clauses such as `tls`, then `;` and the date.
    """
    hdr = received(body)
    assert re.search(rf"\bwith {protocol}\b", hdr), hdr
    assert re.search(r"^Received: from \S+ .*\bby mx\.example\.test\b", hdr), hdr
    bare = hdr
    while (stripped := re.sub(r"\([^()]*\)", "", bare)) != bare:  # drop (nested) comments
        bare = stripped
    assert "(" not in bare and ")" not in bare, f"unbalanced comment parentheses: {hdr}"
    assert bare.count(";") == 1, f"exactly one ';' must separate the clauses from the date: {hdr}"
    words = bare.split()
    # The from clause names a domain or an address literal, nothing a client could forge with.
    assert re.fullmatch(r"[a-z0-9.-]+|\[[0-9a-fA-F:.IPv]+\]", words[2]), hdr
    with_at = words.index("with")
    assert words.index("by") < with_at < words.index("id"), hdr
    if recipient is not None:
        assert f"for <{recipient}>" in hdr, hdr
    semicolon = hdr.rindex(";")
    date = hdr[semicolon + 1:].strip()
    assert email.utils.parsedate_to_datetime(date) is not None, hdr
    clause = _TLS_CLAUSE.search(hdr)
    if tls is None:
        assert "TLSv1" not in hdr and clause is None, hdr
        return hdr
    version, cipher = tls
    assert version in hdr and cipher in hdr, f"{version} {cipher} not named in {hdr}"
    assert clause is not None, f"no RFC 8314 tls clause in {hdr}"
    suite = clause.group(1)
    assert re.fullmatch(r"TLS_[A-Z0-9_]+", suite), f"tls clause names {suite!r}, not an IANA cipher suite"
    if "for <" in hdr:
        assert hdr.index("for <") < clause.start(), f"the tls clause must follow the for clause: {hdr}"
    assert clause.start() < semicolon, hdr
    return hdr


def check_envelope(msg: StoredMessage, *, sender: str, recipients: list[str], listener: str,
                   auth_user: str | None, tls: tuple[str, str] | None) -> None:
    env = msg.envelope
    assert env.sender == sender
    assert sorted(r.recipient.address for r in msg.recipients) == sorted(recipients)
    assert all(r.status == "queued" for r in msg.recipients)
    assert env.listener == listener
    assert env.auth_user == auth_user
    assert env.client_ip == "127.0.0.1"
    if tls is None:
        assert env.tls is None
    else:
        assert env.tls is not None
        assert (env.tls.version, env.tls.cipher) == tls
        assert env.tls.version in ("TLSv1.2", "TLSv1.3")
        assert env.tls.bits >= 128
