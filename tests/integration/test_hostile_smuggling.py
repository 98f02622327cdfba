"""SMTP smuggling (CVE-2023-51764/51765/51766 class) against a running mailward, in and out.

Each message carries a second, complete transaction behind a non-standard end-of-data sequence.
A vulnerable server ends the first message at that sequence and runs the rest as commands, so a
second message from a forged sender appears. Sent on 25, 587 (STARTTLS + AUTH) and 465 (AUTH),
with DATA and BDAT, one command at a time and pipelined in one write, against both settings of
`bare_line_endings`. What counts is what the queue holds, not only the replies. Outbound, the
accepted messages are relayed to a recording peer, which must never see a bare CR or LF.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from hostile import (
    RawSink,
    RecordProperty,
    Tally,
    good_client_delivers,
    has_bare_line_ending,
    open_session,
)
from mailward_server import KINDS, USER
from smtp_peer import Peer

from conftest import MakeServer
from mailward.queue import Envelope, Recipient
from mailward.queue.sqlite import SqliteQueue

# The inbound end-of-data set of the SEC Consult research and the scanners built on it
# (The-Login/SMTP-Smuggling-Tools, hannob/smtpsmug), the outbound additions, and a few more
# near-misses: each is followed by a whole second transaction.
VARIANTS: dict[str, bytes] = {
    r"\n.\n": b"\n.\n",
    r"\n.\r\n": b"\n.\r\n",
    r"\n.\r": b"\n.\r",
    r"\r.\n": b"\r.\n",
    r"\r.\r": b"\r.\r",
    r"\r.\r\n": b"\r.\r\n",
    r"\r\n.\n": b"\r\n.\n",
    r"\r\n.\r": b"\r\n.\r",
    r"\r\n\x00.\r\n": b"\r\n\x00.\r\n",
    r"\r\n.\x00\r\n": b"\r\n.\x00\r\n",
    r"\r\n.\r\r\n": b"\r\n.\r\r\n",
    r"\r\r\n.\r\r\n": b"\r\r\n.\r\r\n",
    r"\r\n .\r\n": b"\r\n .\r\n",
    r"\n\n.\n\n": b"\n\n.\n\n",
}
FORGED = "admin@example.test"
SMUGGLED = (f"MAIL FROM:<{FORGED}>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n"
            f"From: {FORGED}\r\nSubject: smuggled\r\n\r\nsmuggled body").encode()
METHODS = ("DATA", "DATA pipelined", "BDAT", "BDAT pipelined")


def content(n: int, eod: bytes) -> bytes:
    """Message text with the variant and the smuggled transaction, without the final terminator."""
    return b"From: <x@example.test>\r\nSubject: smuggling %d\r\n\r\nfirst part" % n + eod + SMUGGLED


def sender(kind: str) -> str:
    return "someone@foreign.test" if kind == "mx" else USER


def attempt(peer: Peer, kind: str, method: str, n: int, eod: bytes, rcpt: str) -> tuple[int, str]:
    """One smuggling attempt; returns the reply to the content and a complaint, "" if none."""
    envelope = f"MAIL FROM:<{sender(kind)}>\r\nRCPT TO:<{rcpt}>\r\n".encode()
    text = content(n, eod)
    if method.startswith("DATA"):
        tail = b"DATA\r\n"
        body = text + b"\r\n.\r\n"
    else:
        tail = b"BDAT %d LAST\r\n" % (len(text) + 2)
        body = text + b"\r\n"
    if method.endswith("pipelined"):
        # Everything in one write, with a NOOP behind it: the unauthorised pipelining the
        # short-term smuggling fixes refused. Strict one-command-at-a-time parsing must cope.
        peer.send(envelope + tail + (body if method == "BDAT pipelined" else b""))
        replies = [peer.reply(), peer.reply()]
        if method.startswith("DATA"):
            replies.append(peer.reply())
            peer.send(body)
    else:
        replies = [peer.cmd(line) for line in envelope.decode().splitlines()]
        if method.startswith("DATA"):
            replies.append(peer.cmd("DATA"))
        peer.send(body if method.startswith("DATA") else tail + body)
    expected = [250, 250, 354] if method.startswith("DATA") else [250, 250]
    if [r.code for r in replies] != expected:
        return 0, f"envelope replies {[str(r) for r in replies]}"
    final = peer.reply()
    noop = peer.cmd("NOOP")
    if (noop.code, noop.first) != (250, "2.0.0 Ok"):
        return final.code, f"after the content: {final}, then {noop} where NOOP's reply belonged"
    if peer.pending(0.05) is not None:
        return final.code, "stray replies after NOOP"
    if final.code not in (250, 550, 554):
        return final.code, f"content answered {final}"
    return final.code, ""


@pytest.mark.parametrize("mode", ["reject", "normalize"])
def test_no_end_of_data_variant_ends_a_message_early(make_server: MakeServer, mode: str,
                                                     record_property: RecordProperty) -> None:
    server = make_server(extra_toml='[local]\ncatch_all = "alice"\n',
                         listener_toml=dict.fromkeys(KINDS, f'bare_line_endings = "{mode}"'))
    tally = Tally(f"SMTP smuggling inbound ({mode})")
    results: dict[int, tuple[str, int, str]] = {}
    n = 0
    for kind in KINDS:
        for method in METHODS:
            with open_session(server, kind) as peer:
                for name, eod in VARIANTS.items():
                    n += 1
                    code, complaint = attempt(peer, kind, method, n, eod, "victim@example.test")
                    bare = has_bare_line_ending(eod.replace(b"\r\n", b""))
                    if mode == "reject" and bare and code == 250:
                        complaint = complaint or "bare CR/LF accepted in reject mode"
                    results[n] = (f"{kind} {method} {name}", code, complaint)
    assert good_client_delivers(server)
    assert server.stop() == 0
    # The queue is the referee: one message per 250 (plus the good client's), none forged,
    # every one still carrying the smuggled text inside its body and no bare line ending.
    stored: dict[int, bytes] = {}
    forged = 0
    for msg, body in server.messages():
        if b"Subject: good client" in body:
            continue
        if msg.envelope.sender == FORGED or b"Subject: smuggling " not in body:
            forged += 1  # a message nobody sent on purpose: the second transaction got out
            continue
        head = body.split(b"Subject: smuggling ", 1)[1]
        stored[int(head.split(b"\r\n", 1)[0])] = body
    for i, (what, code, complaint) in results.items():
        body = stored.get(i)
        if not complaint and code == 250:
            if body is None:
                complaint = "acknowledged but not queued"
            elif not (b"first part" in body and b"smuggled body" in body) or has_bare_line_ending(body):
                complaint = f"stored as {body!r}"
        elif not complaint and body is not None:
            complaint = f"refused with {code} but queued"
        tally.check(not complaint, f"{what}: {complaint}")
    assert forged == 0, f"{forged} smuggled messages were queued"
    assert set(stored) <= set(results)
    tally.record(record_property)


def test_relayed_messages_carry_no_bare_line_endings(make_server: MakeServer, tmp_path: Path,
                                                     record_property: RecordProperty) -> None:
    """Normalised on the way in, then relayed to a recording peer: the wire shows CRLF only,
    one end-of-data per message, and only the transactions mailward itself started."""
    with RawSink(tmp_path) as sink:
        normalize = dict.fromkeys(KINDS, 'bare_line_endings = "normalize"')
        server = make_server(deliver=True, listener_toml=normalize,
                             extra_toml=f'[delivery]\n[[delivery.route]]\ndomain = "relay.test"\n'
                                        f'next_hop = "[127.0.0.1]:{sink.port}"\nsecurity = "may"\n')
        tally = Tally("SMTP smuggling outbound")
        sent = 0
        for method in ("DATA", "BDAT"):
            with open_session(server, "submissions") as peer:
                for eod in VARIANTS.values():
                    sent += 1
                    code, complaint = attempt(peer, "submissions", method, sent, eod, f"r{sent}@relay.test")
                    assert code == 250 and not complaint, complaint
        deadline = time.monotonic() + 30
        while len(sink.messages) < sent and time.monotonic() < deadline:
            time.sleep(0.1)
        relayed = {rcpt: m for m in sink.messages for rcpt in m.rcpts}
        for i in range(1, sent + 1):
            m = relayed.get(f"RCPT TO:<r{i}@relay.test>")
            ok = m is not None and (not has_bare_line_ending(m.raw) and m.raw.count(b"\r\n.\r\n") == 1
                                    and b"smuggled body" in m.raw)
            tally.check(ok, f"message {i}: {m}")
        mails = [c for c in sink.commands if c.upper().startswith("MAIL")]
        assert len(mails) == sent and not any(FORGED in c for c in mails), mails
        server.stop()
    tally.record(record_property)


def test_stored_bare_line_endings_leave_as_crlf(make_server: MakeServer, tmp_path: Path,
                                                record_property: RecordProperty) -> None:
    """Messages already in the queue with bare CR and LF (the listeners never store them, but the
    queue does not forbid them) still leave with CRLF only and dot-stuffed: the delivery client's
    own defence, checked on the wire."""
    texts = [b"Subject: q%d\r\n\r\nbefore" % i + eod + SMUGGLED + b"\r\n"
             for i, eod in enumerate(VARIANTS.values())]
    with RawSink(tmp_path / "sink") as sink:
        server = make_server(start=False, deliver=True, extra_toml=(
            f'relay_domains = ["relay.test"]\n[delivery]\n[[delivery.route]]\ndomain = "relay.test"\n'
            f'next_hop = "[127.0.0.1]:{sink.port}"\nsecurity = "may"\n'))

        async def store() -> None:
            q = await SqliteQueue.open(server.queue_path)
            try:
                for i, text in enumerate(texts):
                    txn = await q.begin(Envelope(sender="a@example.test", client_ip="127.0.0.1",
                                                 client_helo="x", listener="mx", received_at=time.time()))
                    await txn.add_rcpt(Recipient(address=f"q{i}@relay.test"))
                    await txn.write_body(text)
                    await txn.commit()
            finally:
                await q.close()

        server.queue_path.parent.mkdir(parents=True, exist_ok=True)
        asyncio.run(store())
        server.start()
        deadline = time.monotonic() + 30
        while len(sink.messages) < len(texts) and time.monotonic() < deadline:
            time.sleep(0.1)
        tally = Tally("SMTP smuggling outbound (stored bare CR/LF)")
        relayed = {rcpt: m for m in sink.messages for rcpt in m.rcpts}
        for i in range(len(texts)):
            m = relayed.get(f"RCPT TO:<q{i}@relay.test>")
            ok = (m is not None and not has_bare_line_ending(m.raw) and m.raw.count(b"\r\n.\r\n") == 1
                  and b"smuggled body" in m.raw)
            tally.check(ok, f"stored message {i}: {m}")
        mails = [c for c in sink.commands if c.upper().startswith("MAIL")]
        assert len(mails) == len(texts) and not any(FORGED in c for c in mails), mails
        server.stop()
    tally.record(record_property)
