"""DANE (RFC 7672) end to end: a mailward delivers by MX through a validating Unbound over NSD
(dnssec.py, zones signed at set-up) to real peers on loopback (dane_lab.py): mailward instances
with DANE-EE and DANE-TA certificates, Postfix's smtp-sink where no TLS is offered, and a proxy
that strips STARTTLS. Where Postfix's posttls-finger is installed, its verdict for each destination
must agree with mailward's.

One message to every destination is sent once per module; each test reads its part of the result.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from background import BackgroundServer
from dane_lab import CLEAR, EE_EXPIRED, EE_SELF, SNI, STRIP, TA
from dnssec import DnsLab
from mailward_server import MailwardServer
from test_delivery import Sink, deliveries, delivery_toml, message, queue_count, submit_mx, wait_until

SENDER = "sender@example.test"
TLS_VERSION = r"TLSv1\.[23]/\S+"


@dataclass(frozen=True)
class Case:
    """One destination: what mailward must do, and what posttls-finger must say about it."""

    domain: str
    status: str  # sent | deferred
    tls: str  # the log line's tls= field, a regular expression
    finger: str  # posttls-finger's verdict: Verified, Trusted, Untrusted, or "none" (no TLS session)
    relay: str | None = None  # the host that took the mail, as the log names it
    peer: str | None = None  # which peer holds the mail afterwards
    dsn: str = "2.0.0"
    reply: str = ""  # part of the deferral reason

    @property
    def rcpt(self) -> str:
        return f"rcpt@{self.domain}"


def verified(usage: str) -> str:
    return rf"Verified {TLS_VERSION} \(dane {usage}\)"


UNTRUSTED = rf"Untrusted {TLS_VERSION}"

CASES = [
    # DANE-EE ignores expiry and names (RFC 7672 §3.1.1)
    Case("expired.dane.test", "sent", verified("3 1 1"), "Verified", "ee-expired.dane.test", "expired"),
    Case("selfsigned.dane.test", "sent", verified("3 1 1"), "Verified", "ee-self.dane.test", "selfsigned"),
    # DANE-TA: a private CA the server sends; the leaf names the host or the next-hop domain
    Case("ta-cert.dane.test", "sent", verified("2 0 1"), "Verified", "ta201.dane.test", "ta"),
    Case("ta-spki.dane.test", "sent", verified("2 1 1"), "Verified", "ta211.dane.test", "ta"),
    Case("ta-mismatch.dane.test", "deferred", UNTRUSTED, "Untrusted", dsn="4.7.5",
         reply="DANE-TA matched, but the certificate names"),
    # a TLSA record that matches nothing: deferred; with a second MX that matches: delivered there
    Case("nomatch-only.dane.test", "deferred", UNTRUSTED, "Untrusted", dsn="4.7.5",
         reply="no TLSA record matches the certificate chain"),
    Case("fallback.dane.test", "sent", verified("3 1 1"), "Untrusted", "ee-self.dane.test", "selfsigned"),
    # a TLSA RRset whose signature is broken: bogus, so no connection at all (RFC 7672 §2.1.1)
    Case("bogus.dane.test", "deferred", "plaintext", "none", dsn="4.7.5",
         reply="TLSA lookup failed or is bogus"),
    # only PKIX-TA/EE records: TLS required, not authenticated (§2.2.3)
    Case("pkix-only.dane.test", "sent", UNTRUSTED, "Untrusted", "pkix.dane.test", "selfsigned"),
    Case("pkix-nostarttls.dane.test", "deferred", "plaintext", "none", dsn="4.7.4",
         reply="does not offer STARTTLS"),
    # STARTTLS stripped in front of a DANE host
    Case("strip.dane.test", "deferred", "plaintext", "none", dsn="4.7.4", reply="does not offer STARTTLS"),
    # secure zone, securely no TLSA: opportunistic
    Case("notlsa.dane.test", "sent", UNTRUSTED, "Untrusted", "notlsa-mx.dane.test", "selfsigned"),
    # CNAME'd MX hosts: a secure chain (TLSA and SNI at the target), a secure alias of an unsigned target
    Case("cname.dane.test", "sent", verified("3 1 1"), "Verified", "alias-mx.dane.test", "sni"),
    Case("cname-insecure.dane.test", "sent", verified("3 1 1"), "Verified", "alias-out.dane.test",
         "selfsigned"),
    # an insecure alias of a signed host: no TLSA, so no SNI for the target, and the decoy it gets
    Case("cname-unsigned.dane.test", "sent", UNTRUSTED, "Untrusted", "alias-in.unsigned.test", "sni"),
    # no MX: the domain's own TLSA (§2.2.1), unless it is reached through an insecure alias
    Case("implicit.dane.test", "sent", verified("3 1 1"), "Verified", "implicit.dane.test", "selfsigned"),
    Case("implicit-alias.unsigned.test", "sent", UNTRUSTED, "Untrusted", "implicit-alias.unsigned.test",
         "selfsigned"),
    # unsigned zone: opportunistic TLS, its (insecure) TLSA ignored; plaintext only without STARTTLS
    Case("tls.unsigned.test", "sent", UNTRUSTED, "Untrusted", "mx-tls.unsigned.test", "selfsigned"),
    Case("clear.unsigned.test", "sent", "plaintext", "none", "mx-clear.unsigned.test", "sink"),
    # an insecure MX RRset: its hosts' TLSA records are not used (Postfix: insecure_mx_policy = may)
    Case("insecure-mx.unsigned.test", "sent", UNTRUSTED, "Untrusted", "ee-self.dane.test", "selfsigned"),
]
BY_DOMAIN = {c.domain: c for c in CASES}
ADDRESS = {"ee-expired": EE_EXPIRED, "ee-self": EE_SELF, "ta201": TA, "ta211": TA, "pkix": EE_SELF,
           "notlsa-mx": EE_SELF, "alias-mx": SNI, "alias-out": EE_SELF, "implicit": EE_SELF,
           "implicit-alias": EE_SELF, "mx-tls": EE_SELF, "mx-clear": CLEAR, "alias-in": SNI}


# --- a STARTTLS-stripping proxy ----------------------------------------------------------------------

@dataclass
class StripProxy(BackgroundServer):
    """Relays SMTP to `upstream`, deleting STARTTLS from every reply, and keeps both directions."""

    listen: tuple[str, int]
    upstream: tuple[str, int]
    to_server: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)
    stripped: int = 0

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._session, *self.listen)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)

        async def client_to_server() -> None:
            while data := await reader.read(65536):
                self.to_server.extend(data)
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        async def server_to_client() -> None:
            buffer, reply = b"", []
            while data := await up_reader.read(65536):
                buffer += data
                while b"\r\n" in buffer:
                    line, buffer = buffer.split(b"\r\n", 1)
                    reply.append(line)
                    if line[3:4] == b"-":
                        continue  # a multi-line reply goes out whole, renumbered
                    kept = [ln for ln in reply if b"STARTTLS" not in ln.upper()]
                    self.stripped += len(reply) - len(kept)
                    out = b"".join(ln[:3] + (b"-" if i < len(kept) - 1 else b" ") + ln[4:] + b"\r\n"
                                   for i, ln in enumerate(kept))
                    reply = []
                    self.to_client.extend(out)
                    writer.write(out)
                    await writer.drain()
            writer.close()

        await asyncio.gather(client_to_server(), server_to_client(), return_exceptions=True)


# --- the world: peers, the sender, one message to every destination -----------------------------------

@dataclass
class World:
    root: Path
    lab: DnsLab
    sender: MailwardServer
    peers: dict[str, MailwardServer]
    sink: Sink
    proxy: StripProxy
    lines: dict[str, dict[str, str]]

    def received(self, peer: str) -> list[tuple[list[str], bytes]]:
        """(recipients, body) of every message a peer holds."""
        if peer == "sink":
            return [(m.rcpts, m.body) for m in self.sink.messages()]
        return [([f"<{r.recipient.address}>" for r in m.recipients], body)
                for m, body in self.peers[peer].messages()]


def relay_domains() -> str:
    return "relay_domains = [" + ", ".join(f'"{c.domain}"' for c in CASES) + "]\n"


@pytest.fixture(scope="module")
def world(dns_lab: DnsLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    lab, certs, port = dns_lab, dns_lab.dane, dns_lab.smtp_port
    assert certs is not None
    root = tmp_path_factory.mktemp("dane")
    servers: list[MailwardServer] = []
    sink = Sink(root / "sink", host=CLEAR, port=port)
    proxy = StripProxy((STRIP, port), (EE_SELF, port))
    try:
        peers = {}
        for name, address, pems in (("expired", EE_EXPIRED, [certs.expired]),
                                    ("selfsigned", EE_SELF, [certs.selfsigned]),
                                    ("ta", TA, [certs.ta]),
                                    ("sni", SNI, [certs.decoy, certs.target])):  # the decoy is the default
            peer = MailwardServer(root / name, mx=port, address=address, extra_toml=relay_domains(),
                                  certificates=tuple((p.cert, p.key) for p in pems))
            servers.append(peer)
            peer.write_config()
            peer.start()
            peers[name] = peer
        sink.start()
        proxy.start()
        sender = MailwardServer(root / "sender", deliver=True, extra_toml=delivery_toml(
            relay=tuple(c.domain for c in CASES), port=port, connect_timeout=3, command_timeout=5,
            retry_initial=3600) + lab.dns_toml)
        servers.append(sender)
        sender.write_config()
        sender.start()
        submit_mx(sender, SENDER, [c.rcpt for c in CASES], message("dane1", sender=SENDER))
        rcpts = {c.rcpt for c in CASES}

        def logged() -> dict[str, dict[str, str]]:
            return {d["rcpt"]: d for d in deliveries(sender)}

        wait_until(lambda: rcpts <= set(logged()), timeout=30, what="a result for every destination")
        yield World(root, lab, sender, peers, sink, proxy, logged())
    finally:
        for server in servers:
            server.stop()
        sink.stop()
        proxy.stop()
    for server in servers:
        assert "Traceback" not in server.log(), server.log()


# --- mailward's verdicts ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=[c.domain for c in CASES])
def test_outcome_and_tls_verdict(world: World, case: Case) -> None:
    line = world.lines[case.rcpt]
    assert (line["status"], line["dsn"]) == (case.status, case.dsn), line
    assert re.fullmatch(case.tls, line["tls"]), line
    assert case.reply in line["reply"], line
    port = world.lab.smtp_port
    if case.status == "sent":
        assert case.relay is not None and case.peer is not None
        assert line["relay"] == f"{case.relay}[{ADDRESS[case.relay.split('.')[0]]}]:{port}", line
        (body,) = [b for rcpts, b in world.received(case.peer) if f"<{case.rcpt}>" in rcpts]
        assert b"Subject: dane1" in body
        # the peer's Received: header says whether TLS carried it
        assert (b"with ESMTPS" in body) is (case.tls != "plaintext"), body[:600]
    else:
        assert line["relay"] == "none"
        assert not any(f"<{case.rcpt}>" in rcpts for p in ("sink", *world.peers)
                       for rcpts, _ in world.received(p))


def test_the_queue_keeps_the_dane_match(world: World) -> None:
    (original,) = [m for m, _ in world.sender.messages() if m.envelope.sender == SENDER]
    tls = {r.recipient.address: r.tls for r in original.recipients}
    ta = tls["rcpt@ta-spki.dane.test"]
    assert ta is not None and (ta.trust, ta.dane, ta.policy) == ("Verified", "2 1 1", "dane")
    pkix = tls["rcpt@pkix-only.dane.test"]
    assert pkix is not None and (pkix.trust, pkix.dane, pkix.policy) == ("Untrusted", None, "encrypt")
    shown = world.sender.cli("queue", "show", original.id).stdout
    assert re.search(rf"Verified {TLS_VERSION} \(dane 2 1 1\) at level dane", shown), shown


def test_dane_failures_are_temporary_and_never_plaintext(world: World) -> None:
    failing = [c for c in CASES if c.status == "deferred"]
    assert {c.dsn for c in failing} == {"4.7.5", "4.7.4"}
    (original,) = [m for m, _ in world.sender.messages() if m.envelope.sender == SENDER]
    states = {r.recipient.address: r for r in original.recipients}
    for case in failing:
        assert states[case.rcpt].status == "deferred" and states[case.rcpt].next_attempt_at is not None
    assert queue_count(world.sender) == 1  # no bounce was queued
    # Plaintext went only where no TLSA record demanded TLS: the unsigned destination.
    assert [rcpts for rcpts, _ in world.received("sink")] == [["<rcpt@clear.unsigned.test>"]]


def test_a_failing_mx_is_passed_over_for_the_next(world: World) -> None:
    log = world.sender.log()
    port = world.lab.smtp_port
    assert (f"mx:fallback.dane.test: 4.7.5 DANE authentication of nomatch.dane.test[{EE_SELF}]:{port} "
            "failed: no TLSA record matches the certificate chain") in log
    # The bogus host is left out of the plan, with the reason in the log.
    assert "mx:bogus.dane.test: not using bogus-tlsa.dane.test: TLSA lookup failed or is bogus" in log


def test_stripped_starttls_sends_no_envelope_and_no_content(world: World) -> None:
    proxy = world.proxy
    assert proxy.stripped >= 1 and b"EHLO" in proxy.to_server  # the proxy was on the path
    sent = bytes(proxy.to_server).upper()
    assert b"MAIL FROM" not in sent and b"RCPT TO" not in sent and b"DATA" not in sent
    assert b"DANE1" not in sent and b"BODY OF" not in sent
    assert b"STARTTLS" not in bytes(proxy.to_client).upper()


def test_sni_is_the_tlsa_base_domain(world: World) -> None:
    # The SNI peer's default certificate is a decoy; only "target.dane.test" selects the one its TLSA
    # record names, so the Verified delivery through the alias proves which name was sent.
    line = world.lines[BY_DOMAIN["cname.dane.test"].rcpt]
    assert line["status"] == "sent" and line["tls"].startswith("Verified")
    assert world.peers["sni"].log().count("TLS TLSv1") >= 1


# --- posttls-finger agrees ----------------------------------------------------------------------------

FINGER_VERDICT = re.compile(r"^posttls-finger: (Verified|Trusted|Untrusted|Anonymous) TLS connection "
                            r"established to (\S+):", re.MULTILINE)


def posttls_finger(world: World, destination: str) -> str:
    """posttls-finger's verdict for `destination`: the word, or "none" when no TLS session was made."""
    binary = shutil.which("posttls-finger")
    if binary is None:
        pytest.skip("posttls-finger is not installed (Debian package postfix)")
    if world.lab.resolv_conf is None:
        pytest.skip("posttls-finger only asks the system resolver (port 53, from /etc/resolv.conf), and "
                    "Unbound could not be given port 53 on a loopback address (this needs root)")
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is needed to give posttls-finger its own /etc/resolv.conf")
    config = world.root / "postfix"
    main_cf = config / "main.cf"
    if not main_cf.exists():
        config.mkdir(exist_ok=True)
        # DNSSEC on, the root probe off (the lab has no root zone).
        main_cf.write_text("smtp_dns_support_level = dnssec\nsmtp_host_lookup = dns\ndnssec_probe =\n")
        # Postfix waits (up to two seconds) for a main.cf changed within the last seconds to settle.
        old = time.time() - 3600
        os.utime(main_cf, (old, old))
    # A private mount namespace: /etc/resolv.conf names the lab's Unbound for this process only.
    script = f'mount --bind {world.lab.resolv_conf} /etc/resolv.conf && exec "$@"'
    # -M may: hosts of an insecure MX RRset get no DANE, the policy mailward implements (Postfix's
    # default, "dane", would authenticate them and log "Trusted").
    result = subprocess.run(
        [unshare, "--mount", "sh", "-c", script, "sh", "env", f"MAIL_CONFIG={config}", binary, "-c",
         "-l", "dane", "-M", "may", "-t", "5", "-T", "5", destination],
        capture_output=True, text=True, timeout=30)
    if result.returncode != 0 and "mount" in result.stderr:
        pytest.skip(f"cannot give posttls-finger its own resolv.conf: {result.stderr.strip()}")
    found = FINGER_VERDICT.findall(result.stdout)
    assert len(found) <= 1, result.stdout
    return found[0][0] if found else "none"


def mailward_word(line: dict[str, str]) -> str:
    # "plaintext" with relay=none means no connection or no TLS session: posttls-finger's "none".
    word = line["tls"].split()[0]
    return "none" if word == "plaintext" else word


@pytest.mark.parametrize("case", CASES, ids=[c.domain for c in CASES])
def test_posttls_finger_agrees(world: World, case: Case) -> None:
    finger = posttls_finger(world, f"{case.domain}:{world.lab.smtp_port}")
    assert finger == case.finger
    if case.domain == "fallback.dane.test":
        # posttls-finger stops at the first MX, whose TLSA record matches nothing; mailward's
        # attempt there failed DANE the same way before the second MX took the mail.
        assert "DANE authentication of nomatch.dane.test" in world.sender.log()
        assert posttls_finger(world, f"[ee-self.dane.test]:{world.lab.smtp_port}") == \
            mailward_word(world.lines[case.rcpt])
        return
    assert finger == mailward_word(world.lines[case.rcpt])
