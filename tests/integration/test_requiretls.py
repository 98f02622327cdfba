"""REQUIRETLS (RFC 8689) end to end: a message submitted with REQUIRETLS to one mailward goes on
only over authenticated TLS to a securely found host that offers REQUIRETLS, and otherwise comes
back to its sender with 5.7.30 in a bounce that carries none of its content. And a message whose
sender wrote "TLS-Required: No" is delivered with opportunistic TLS where the destination's DANE
policy would have held it.

Peers, on the DNS lab's loopback addresses (dnssec.py, dane_lab.py, sts_lab.py):
* a second mailward at EE_SELF (DANE-EE for selfsigned.dane.test; offers REQUIRETLS under TLS);
* a second mailward at PKIX, named by the enforced MTA-STS policy of enforce-ok.sts.test, whose MX
  records are not signed: MTA-STS is what makes that MX trustworthy;
* a real Postfix (3.7, which has no REQUIRETLS) at TA with the DANE-TA chain of ta-cert.dane.test:
  authenticated TLS, but no REQUIRETLS, so it must never see the envelope; as the loopback next
  hop of a route (requiretls defaults to opportunistic there) it takes the message.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
import ssl
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dane_lab import EE_SELF, TA
from dnssec import DnsLab
from mailward_server import USER, MailwardServer
from sts_lab import PKIX, StsPki
from test_delivery import deliveries, delivery_toml, route, wait_until
from test_mtasts_delivery import PolicyServer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from postfix_instance import PostfixError, PostfixInstance

SENDER = USER  # a local user of the sender: its bounces land in its own Maildir
SECURE_DANE = "rcpt@selfsigned.dane.test"  # DANE-EE, peer offers REQUIRETLS: delivered
SECURE_STS = "rcpt@enforce-ok.sts.test"  # MTA-STS enforce, PKIX, peer offers REQUIRETLS: delivered
NO_REQUIRETLS = "rcpt@ta-cert.dane.test"  # DANE-TA verified Postfix without REQUIRETLS: bounced
FALLBACK = "rcpt@rtls-fallback.dane.test"  # Postfix first, then the DANE peer: delivered there
INSECURE_MX = "rcpt@tls.unsigned.test"  # unsigned MX, no MTA-STS: bounced without a connection
FILTERED = "rcpt@filter.test"  # a loopback route to Postfix: REQUIRETLS relaxed, delivered
DANE_FAILS = "rcpt@nomatch-only.dane.test"  # the TLSA record matches nothing


def body(subject: str, *headers: str) -> bytes:
    lines = [f"From: {SENDER}", "To: undisclosed-recipients:;", f"Subject: {subject}",
             f"Message-ID: <{subject}@example.test>", *headers]
    return ("\r\n".join(lines) + f"\r\n\r\nsecret text of {subject}\r\n").encode()


def submit(server: MailwardServer, rcpts: list[str], data: bytes, *, requiretls: bool) -> None:
    context = ssl.create_default_context(cafile=str(server.ca))
    context.check_hostname = False
    with smtplib.SMTP("127.0.0.1", server.mx, timeout=10) as smtp:
        smtp.ehlo("client.test")
        assert not smtp.has_extn("requiretls")  # advertised only once TLS is up (RFC 8689 §4)
        smtp.starttls(context=context)
        smtp.ehlo("client.test")
        assert smtp.has_extn("requiretls")
        smtp.mail(SENDER, ["REQUIRETLS"] if requiretls else [])
        for rcpt in rcpts:
            code, text = smtp.rcpt(rcpt)
            assert code == 250, (rcpt, code, text)
        code, text = smtp.data(data)
        assert code == 250, text


@dataclass
class World:
    sender: MailwardServer
    dane_peer: MailwardServer
    sts_peer: MailwardServer | None
    postfix: PostfixInstance
    lines: dict[str, list[dict[str, str]]]


@pytest.fixture(scope="module")
def world(dns_lab: DnsLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    lab, port, certs = dns_lab, dns_lab.smtp_port, dns_lab.dane
    assert certs is not None
    root = tmp_path_factory.mktemp("requiretls")
    pki = StsPki(root, "mailward REQUIRETLS lab")
    ca_file, mx_cert, mx_key = pki.ca_file, pki.mx_cert, pki.mx_key

    servers: list[MailwardServer] = []
    policies: PolicyServer | None = None
    postfix = PostfixInstance(certs.ta.cert, certs.ta.key, address=TA,
                              relay_domains=("ta-cert.dane.test", "filter.test"),
                              ports={"mx": port, "submissions": port + 1, "submission": port + 2,
                                     "plain": port + 3})
    try:
        try:
            postfix.start()
        except PostfixError as exc:
            pytest.skip(f"no Postfix peer: {exc}")
        sts_ok = True
        policies = PolicyServer(pki.server_context())
        try:
            policies.start()
        except PermissionError:
            sts_ok = False  # port 443 needs root; the MTA-STS case is skipped
        relay = ("relay_domains = [\"selfsigned.dane.test\", \"enforce-ok.sts.test\", "
                 "\"nomatch-only.dane.test\", \"rtls-fallback.dane.test\"]\n")
        dane_peer = MailwardServer(root / "dane", mx=port, address=EE_SELF, extra_toml=relay,
                                   certificates=((certs.selfsigned.cert, certs.selfsigned.key),))
        sts_peer = MailwardServer(root / "sts", mx=port, address=PKIX, extra_toml=relay,
                                  certificates=((mx_cert, mx_key),))
        for peer in (dane_peer, sts_peer):
            servers.append(peer)
            peer.write_config()
            peer.start()
        rcpts = [SECURE_DANE, SECURE_STS, NO_REQUIRETLS, FALLBACK, INSECURE_MX, FILTERED, DANE_FAILS]
        sender = MailwardServer(root / "sender", deliver=True, extra_toml=delivery_toml(
            route("filter.test", f"[{TA}]:{port}", security="encrypt"),
            relay=tuple(r.split("@")[1] for r in rcpts), port=port, connect_timeout=3, command_timeout=5,
            retry_initial=3600) + lab.dns_toml + f'[mta_sts]\nca_file = "{ca_file}"\nfetch_timeout = 3\n')
        servers.append(sender)
        sender.write_config()
        sender.start()
        secured = [SECURE_DANE, *([SECURE_STS] if sts_ok else []), NO_REQUIRETLS, FALLBACK, INSECURE_MX,
                   FILTERED]
        # REQUIRETLS outranks a TLS-Required: No header in the same message (RFC 8689 §5).
        submit(sender, secured, body("rtls1", "TLS-Required: No"), requiretls=True)
        submit(sender, [DANE_FAILS], body("optional1", "TLS-Required: No"), requiretls=False)
        submit(sender, [DANE_FAILS], body("strict1"), requiretls=False)
        expected = len(secured) + 2 + 1  # and the bounce, delivered to the sender's mailbox

        def logged() -> dict[str, list[dict[str, str]]]:
            out: dict[str, list[dict[str, str]]] = {}
            for d in deliveries(sender):
                out.setdefault(d["rcpt"], []).append(d)
            return out

        wait_until(lambda: sum(len(v) for v in logged().values()) >= expected, timeout=40,
                   what="a result for every recipient")
        # The bounce for the two refused recipients goes to the sender's own mailbox.
        wait_until(lambda: any((sender.state_dir / "mail" / "alice" / "new").glob("*")), timeout=20,
                   what="the bounce in the sender's mailbox")
        yield World(sender, dane_peer, sts_peer if sts_ok else None, postfix, logged())
    finally:
        for server in servers:
            server.stop()
        if policies is not None:
            policies.stop()
        postfix.cleanup()  # stops it and removes its directory
    for server in servers:
        assert "Traceback" not in server.log(), server.log()


def held_by(peer: MailwardServer, subject: str, rcpt: str) -> list[tuple[bool, bytes]]:
    """(REQUIRETLS flag, content) of each copy for `rcpt` that a peer holds."""
    return [(m.envelope.requiretls, data) for m, data in peer.messages()
            if f"Subject: {subject}".encode() in data and rcpt in {r.recipient.address for r in m.recipients}]


def test_dane_path_that_offers_requiretls_gets_the_message_with_the_flag(world: World) -> None:
    (line,) = world.lines[SECURE_DANE]
    assert (line["status"], line["dsn"]) == ("sent", "2.0.0"), line
    assert line["tls"].startswith("Verified") and "(dane 3 1 1)" in line["tls"], line
    # The next hop keeps enforcing it: the stored envelope there says REQUIRETLS.
    ((flag, data),) = held_by(world.dane_peer, "rtls1", SECURE_DANE)
    assert flag is True and b"secret text of rtls1" in data


def test_mta_sts_makes_an_unsigned_mx_good_enough(world: World) -> None:
    if world.sts_peer is None:
        pytest.skip("port 443 on a loopback address needs root (RFC 8461 §3.3 allows no other port)")
    (line,) = world.lines[SECURE_STS]
    assert (line["status"], line["dsn"]) == ("sent", "2.0.0"), line
    assert line["tls"].startswith("Verified"), line
    ((flag, _),) = held_by(world.sts_peer, "rtls1", SECURE_STS)
    assert flag is True


def test_a_verified_host_without_requiretls_never_sees_the_envelope(world: World) -> None:
    (line,) = world.lines[NO_REQUIRETLS]
    assert (line["status"], line["dsn"]) == ("bounced", "5.7.30"), line
    assert "does not offer REQUIRETLS" in line["reply"], line
    log = world.sender.log()
    assert f"REQUIRETLS support required: ta201.dane.test[{TA}]" in log
    # Postfix saw a TLS session (EHLO, STARTTLS, EHLO, QUIT) and no MAIL command from it.
    postfix_log = world.postfix.log_path.read_text()
    sessions = [ln for ln in postfix_log.splitlines() if "disconnect from" in ln and "starttls=1" in ln]
    assert sessions, postfix_log[-3000:]
    assert any("mail=" not in ln for ln in sessions), sessions


def test_a_better_mx_without_requiretls_is_passed_over_for_the_next(world: World) -> None:
    (line,) = world.lines[FALLBACK]
    assert (line["status"], line["dsn"]) == ("sent", "2.0.0"), line
    assert line["relay"] == f"ee-self.dane.test[{EE_SELF}]:{world.postfix.port('mx')}", line
    assert f"mx:rtls-fallback.dane.test: 5.7.30 REQUIRETLS support required: ta201.dane.test[{TA}]" in (
        world.sender.log())
    ((flag, _),) = held_by(world.dane_peer, "rtls1", FALLBACK)
    assert flag is True


def test_an_insecure_mx_is_refused_at_once_with_5_7_30(world: World) -> None:
    (line,) = world.lines[INSECURE_MX]
    assert (line["status"], line["dsn"], line["relay"]) == ("bounced", "5.7.30", "none"), line
    assert "REQUIRETLS needs authenticated TLS, level is may" in line["reply"], line


def test_a_loopback_route_relaxes_requiretls_and_delivers(world: World) -> None:
    (line,) = world.lines[FILTERED]
    assert line["status"] == "sent", line
    assert line["relay"] == f"{TA}[{TA}]:{world.postfix.port('mx')}", line
    # Postfix took it (without REQUIRETLS on the wire: it offers none) and discarded it.
    assert world.postfix.delivered(1) >= 1


def test_the_bounce_is_redacted_and_says_5_7_30(world: World) -> None:
    (path,) = (world.sender.state_dir / "mail" / "alice" / "new").glob("*")
    raw = path.read_bytes()
    assert b"secret text of rtls1" not in raw and b"Subject: rtls1" not in raw
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    text = raw.decode("utf-8", "replace")
    assert "Status: 5.7.30" in text
    assert NO_REQUIRETLS in text and INSECURE_MX in text
    assert SECURE_DANE not in text  # delivered recipients are not reported as failed


def test_tls_required_no_delivers_where_dane_would_hold_the_mail(world: World) -> None:
    lines = world.lines[DANE_FAILS]
    assert len(lines) == 2, lines
    by_status = {d["status"]: d for d in lines}
    sent, deferred = by_status["sent"], by_status["deferred"]
    # The message with the header went over opportunistic TLS to the host whose TLSA matches nothing.
    assert sent["tls"].startswith("Untrusted"), sent
    assert sent["relay"].startswith("nomatch.dane.test["), sent
    ((flag, data),) = held_by(world.dane_peer, "optional1", DANE_FAILS)
    assert flag is False and b"TLS-Required: No" in data
    # The one without it waits, as DANE demands.
    assert deferred["dsn"] == "4.7.5", deferred
    assert "TLS-Required: No in" in world.sender.log()


def test_requiretls_without_tls_is_refused(world: World) -> None:
    with smtplib.SMTP("127.0.0.1", world.sender.mx, timeout=10) as smtp:
        smtp.ehlo("client.test")
        code, text = smtp.mail(SENDER, ["REQUIRETLS"])
    assert (code, text[:6]) == (530, b"5.7.10"), text
