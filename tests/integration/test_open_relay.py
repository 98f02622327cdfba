"""Open-relay matrix (nmap smtp-open-relay style) on 25 without AUTH and on 587/465 without AUTH.

Only example.test is local. Nothing addressed to another domain may be accepted, whatever the
spelling; routing characters in a local part (%, !) stay local-part text for the local domain.
"""

from __future__ import annotations

import pytest
from hostile import RecordProperty, Tally
from mailward_server import PASSWORD, USER, MailwardServer
from smtp_peer import Peer, plain_auth

from conftest import MakeServer

# Full-width letters, which UTS #46 maps to "FOREIGN" and "example".
FW_FOREIGN = "\uff26\uff2f\uff32\uff25\uff29\uff27\uff2e"
FW_EXAMPLE = "\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45"
# (RCPT path, None if it must be refused, else the address it must be queued as)
MATRIX: list[tuple[str, str | None]] = [
    ("<relaytest@foreign.test>", None),
    ("<RelayTest@FOREIGN.TEST>", None),
    ('<"relaytest@foreign.test">', None),  # no domain at all: not postmaster, so malformed
    ("<relaytest@foreign.test.>", None),
    ("<@example.test:relaytest@foreign.test>", None),  # source route ignored: foreign
    ("<@example.test,@mx.example.test:relaytest@foreign.test>", None),
    ("<relaytest@[127.0.0.1]>", None),
    ("<relaytest@[IPv6:::1]>", None),
    ("<relaytest@127.0.0.1>", None),
    ("<relaytest@example.test.foreign.test>", None),
    ("<relaytest@sub.example.test>", None),
    ("<relaytest@example.test@foreign.test>", None),
    ("<relaytest@foreign.test@example.test>", None),
    ("<relaytest@xn--frign-jua.test>", None),
    ("<relaytest@föreign.test>", None),  # IDN, with SMTPUTF8
    (f"<relaytest@{FW_FOREIGN}.test>", None),  # full-width, maps to foreign.test
    ("<relaytest@foreign。test>", None),  # ideographic full stop
    ("<relaytest%foreign.test@example.test>", "relaytest%foreign.test@example.test"),
    ("<foreign.test!relaytest@example.test>", "foreign.test!relaytest@example.test"),
    ('<"relaytest@foreign.test"@example.test>', '"relaytest@foreign.test"@example.test'),
    ("<relaytest@EXAMPLE.TEST>", "relaytest@example.test"),
    (f"<relaytest2@{FW_EXAMPLE}.test>", "relaytest2@example.test"),  # full-width maps to ours
    ("<postmaster>", "postmaster"),
]
EXPECTED_LOCAL = {queued for _, queued in MATRIX if queued is not None}


@pytest.fixture
def server(make_server: MakeServer) -> MailwardServer:
    # A catch-all makes every local part of example.test a valid recipient, so the matrix tests
    # routing, not the RCPT-time check for unknown users.
    return make_server(extra_toml='[local]\ncatch_all = "alice"\n')


def local_domain_only(server: MailwardServer) -> None:
    for msg, _ in server.messages():
        for r in msg.recipients:
            address = r.recipient.address
            assert address == "postmaster" or address.endswith("@example.test"), address
            assert "foreign" not in address.rpartition("@")[2]


def test_mx_relays_for_nobody(server: MailwardServer) -> None:
    with Peer(server.mx, ca=server.ca) as peer:
        peer.ehlo()
        assert peer.cmd("MAIL FROM:<someone@foreign.test> SMTPUTF8").code == 250
        for path, queued in MATRIX:
            r = peer.cmd(f"RCPT TO:{path}")
            if queued is None:
                assert r.code >= 500, f"{path} accepted: {r}"
                if r.code == 554:
                    assert r.first == "5.7.1 Relay access denied"
            else:
                assert r.code == 250, f"local {path} refused: {r}"
        assert peer.cmd("DATA").code == 354
        peer.send(b"Subject: relay test\r\n\r\nrelay test\r\n.\r\n")
        assert peer.reply().code == 250
        # The same matrix under TLS: STARTTLS grants nothing, and 25 never takes AUTH.
        peer.starttls()
        assert not any(ln.startswith("AUTH") for ln in peer.ehlo().lines)
        r = peer.cmd(f"AUTH PLAIN {plain_auth(USER, PASSWORD)}")
        assert r.code == 502, r
        assert peer.cmd("MAIL FROM:<someone@foreign.test> SMTPUTF8").code == 250
        for path, queued in MATRIX:
            r = peer.cmd(f"RCPT TO:{path}")
            assert (r.code == 250) == (queued is not None), f"{path}: {r}"
        assert peer.cmd("RSET").code == 250

    assert server.stop() == 0
    [(msg, _)] = server.messages()
    assert {r.recipient.address for r in msg.recipients} == EXPECTED_LOCAL
    local_domain_only(server)


@pytest.mark.parametrize("kind", ["submission", "submissions"])
def test_submission_without_auth_accepts_nothing(server: MailwardServer, kind: str) -> None:
    implicit = kind == "submissions"
    # A few paths per connection: each refusal counts toward the hard error limit (421 at 20).
    for start in range(0, len(MATRIX), 8):
        with Peer(server.port(kind), ca=server.ca, implicit_tls=implicit) as peer:
            peer.ehlo()
            if not implicit:
                peer.starttls()
                peer.ehlo()
            r = peer.cmd("MAIL FROM:<someone@foreign.test> SMTPUTF8")
            assert (r.code, r.first) == (530, "5.7.0 Authentication required"), r
            for path, _ in MATRIX[start:start + 8]:
                r = peer.cmd(f"RCPT TO:{path}")
                assert r.code >= 500, f"{path} accepted without AUTH: {r}"
            assert peer.cmd("DATA").code >= 500
    assert server.stop() == 0
    assert server.messages() == []


def test_mx_without_smtputf8_refuses_non_ascii(server: MailwardServer) -> None:
    with Peer(server.mx) as peer:
        peer.ehlo()
        assert peer.cmd("MAIL FROM:<someone@foreign.test>").code == 250
        for path in ("<relaytest@föreign.test>", f"<relaytest@{FW_EXAMPLE}.test>"):
            r = peer.cmd(f"RCPT TO:{path}")
            assert (r.code, r.first) == (553, "5.6.7 Non-ASCII address requires SMTPUTF8"), r
    assert server.stop() == 0
    assert server.messages() == []


# --- the nmap smtp-open-relay matrix, with figures -----------------------------------------------------

EXT, IP, ME, HOST = "foreign.test", "127.0.0.1", "example.test", "mx.example.test"
# Sender spellings nmap combines with every recipient: null, foreign, ours, our literal, our host.
NMAP_SENDERS = ["<>", f"<antispam@{EXT}>", f"<antispam@{ME}>", f"<antispam@[{IP}]>",
                f"<antispam@{HOST}>", f"<antispam@{ME.upper()}>"]
NMAP_RCPTS = [
    f"<relaytest@{EXT}>", f'<"relaytest@{EXT}">', f'<"relaytest%{EXT}">',
    f"<relaytest%{EXT}@[{IP}]>", f'<"relaytest%{EXT}"@[{IP}]>', f"<relaytest%{EXT}@{ME}>",
    f"<relaytest%{EXT}@{HOST}>", f"<@[{IP}]:relaytest@{EXT}>", f"<@{ME}:relaytest@{EXT}>",
    f"<@{HOST}:relaytest@{EXT}>", f"<{EXT}!relaytest>", f"<{EXT}!relaytest@[{IP}]>",
    f"<{EXT}!relaytest@{ME}>", f"<{EXT}!relaytest@{HOST}>", f"<relaytest@[{IP}]>",
    f"<relaytest@{EXT.upper()}>", f"<relaytest@{ME.upper()}.{EXT}>", f"<RELAYTEST@{EXT.title()}>",
    f"<relaytest@{ME}.>", f"<relaytest@{ME}@{EXT}>", f'<"relaytest@{EXT}"@{ME}>',
    f"<relaytest@{EXT}%{ME}>", f"<relaytest%{EXT}%{ME}@{ME}>", "<relaytest@[IPv6:::1]>",
    f"<relaytest@{HOST}>", f"<relaytest@sub.{ME}>",
]


def is_ours(path: str) -> bool:
    """Whether a path names a mailbox in example.test: the domain after the last @, once a
    source route is dropped (RFC 5321 §C), whatever %, ! or quoted @ the local part holds."""
    mailbox = path[1:-1]
    if mailbox.startswith("@"):
        mailbox = mailbox.partition(":")[2]
    return "@" in mailbox and mailbox.rpartition("@")[2].lower() == ME


def queued_locally(server: MailwardServer) -> list[str]:
    """Every queued recipient; each must be ours (the domain exactly example.test, or postmaster)."""
    found = [r.recipient.address for msg, _ in server.messages() for r in msg.recipients]
    for address in found:
        assert address == "postmaster" or address.rpartition("@")[2] == ME, f"relayed to {address}"
    return found


def test_nmap_matrix_on_mx(server: MailwardServer, record_property: RecordProperty) -> None:
    """Every sender x recipient spelling on 25, in clear and under STARTTLS: a recipient is
    accepted only if the address it is queued as is in example.test (a local part may hold % or !)."""
    tally = Tally("open relay: nmap matrix on 25")
    for tls in (False, True):
        for sender in NMAP_SENDERS:
            with Peer(server.mx, ca=server.ca) as peer:
                peer.ehlo()
                if tls:
                    peer.starttls()
                    peer.ehlo()
                assert peer.cmd(f"MAIL FROM:{sender}").code == 250
                accepted = 0
                for path in NMAP_RCPTS:
                    r = peer.cmd(f"RCPT TO:{path}")
                    ok = r.code == 250 if is_ours(path) else r.code >= 500
                    accepted += r.code == 250
                    tally.check(ok, f"{sender} -> {path}: {r}")
                if accepted:
                    assert peer.cmd("DATA").code == 354
                    peer.send(b"Subject: relay test\r\n\r\nrelay test\r\n.\r\n")
                    assert peer.reply().code == 250
    assert server.stop() == 0
    queued_locally(server)
    tally.record(record_property)


@pytest.mark.parametrize("kind", ["submission", "submissions"])
def test_nmap_matrix_without_auth(server: MailwardServer, kind: str,
                                  record_property: RecordProperty) -> None:
    tally = Tally(f"open relay: nmap matrix, no AUTH ({kind})")
    implicit = kind == "submissions"
    for sender in NMAP_SENDERS:
        for start in range(0, len(NMAP_RCPTS), 8):
            with Peer(server.port(kind), ca=server.ca, implicit_tls=implicit) as peer:
                peer.ehlo()
                if not implicit:
                    peer.starttls()
                    peer.ehlo()
                r = peer.cmd(f"MAIL FROM:{sender}")
                tally.check(r.code == 530, f"MAIL FROM:{sender} without AUTH: {r}")
                for path in NMAP_RCPTS[start:start + 8]:
                    r = peer.cmd(f"RCPT TO:{path}")
                    tally.check(r.code >= 500, f"{sender} -> {path} accepted without AUTH: {r}")
                tally.check(peer.cmd("DATA").code >= 500, "DATA accepted without AUTH")
    assert server.stop() == 0
    assert server.messages() == []
    tally.record(record_property)
