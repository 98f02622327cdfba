"""MTA-STS (RFC 8461) end to end: a mailward delivers by MX through the DNS lab (dnssec.py, with the
sts.test zone of sts_lab.py) to real peers on loopback, fetching policies from an HTTPS server on
port 443 of its own loopback address with a certificate from a private CA (the sender's
`mta_sts.ca_file`).

One message to every destination is sent once per module; each test reads its part of the result.
Two destinations start with a policy already in the sender's queue database, cached under an id
the TXT record no longer carries: one gets a new policy, one's refresh fails.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from background import BackgroundServer
from dane_lab import EE_SELF
from dnssec import DnsLab
from mailward_server import MailwardServer
from sts_lab import CACHED, CACHED_ID, MAX_AGE, PKIX, POLICIES, POLICY_SERVER, STRIP, StsPki
from test_dane_delivery import StripProxy
from test_delivery import deliveries, delivery_toml, message, submit_mx, wait_until

from mailward.queue import StsPolicyRecord
from mailward.queue.sqlite import SqliteQueue

SENDER = "sender@example.test"
TLS_VERSION = r"TLSv1\.[23]/\S+"


@dataclass(frozen=True)
class Case:
    domain: str
    status: str  # sent | deferred
    tls: str  # the log line's tls= field, a regular expression
    reply: str = ""  # part of the reply or deferral reason
    dsn: str = "2.0.0"

    @property
    def rcpt(self) -> str:
        return f"rcpt@{self.domain}"


VERIFIED = rf"Verified {TLS_VERSION} \(pkix\)"
OPPORTUNISTIC = rf"(Trusted|Untrusted) {TLS_VERSION}"

CASES = [
    # enforce: the MX is listed and its certificate is PKIX-valid for its name
    Case("enforce-ok.sts.test", "sent", VERIFIED),
    Case("wildcard.sts.test", "deferred", "plaintext|Untrusted.*|Trusted.*", dsn="4.7.5"),
    # enforce: the MX is not listed, so no connection at all
    Case("enforce-bad.sts.test", "deferred", "plaintext", "not listed in the MTA-STS policy", "4.7.5"),
    # testing: delivered anyway, opportunistically
    Case("testing.sts.test", "sent", OPPORTUNISTIC),
    # no redirects, no policies over 64 KiB: as if there were no policy
    Case("redirect.sts.test", "sent", OPPORTUNISTIC),
    Case("oversized.sts.test", "sent", OPPORTUNISTIC),
    # a stripped STARTTLS under enforce: no envelope, no content, a deferral
    Case("strip.sts.test", "deferred", "plaintext", "does not offer STARTTLS", "4.7.4"),
    # a new TXT id: the cached enforce policy is replaced by the new testing one
    Case("changed.sts.test", "sent", OPPORTUNISTIC),
    # a new TXT id whose fetch fails: the unexpired cached policy (enforce, another MX) still holds
    Case("cached.sts.test", "deferred", "plaintext", "not listed in the MTA-STS policy", "4.7.5"),
    # DANE and MTA-STS both published, DANE failing: MTA-STS never relaxes it
    Case("nomatch-only.dane.test", "deferred", rf"Untrusted {TLS_VERSION}",
         "no TLSA record matches the certificate chain", "4.7.5"),
]


# --- the HTTPS policy server -------------------------------------------------------------------------

@dataclass
class PolicyServer(BackgroundServer):
    """HTTP/1.1 over TLS on POLICY_SERVER:443, one canned answer per Host header."""

    context: ssl.SSLContext
    requests: list[str] = field(default_factory=list)  # Host headers, in order

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._session, POLICY_SERVER, 443, ssl=self.context)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            host = next((ln.split(":", 1)[1].strip() for ln in lines if ln.lower().startswith("host:")), "")
            self.requests.append(host)
            served = POLICIES.get(host.removeprefix("mta-sts."))
            path_ok = lines[0].startswith("GET /.well-known/mta-sts.txt ")
            if served is None or not path_ok:
                status, body, headers = 404, b"not found\n", (("Content-Type", "text/plain"),)
            else:
                status, body, headers = served.status, served.body, served.headers
            out = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", "Connection: close",
                   *(f"{k}: {v}" for k, v in headers)]
            writer.write(("\r\n".join(out) + "\r\n\r\n").encode() + body)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()


# --- the world ----------------------------------------------------------------------------------------

@dataclass
class World:
    lab: DnsLab
    sender: MailwardServer
    pkix: MailwardServer
    policies: PolicyServer
    proxy: StripProxy
    lines: dict[str, dict[str, str]]


def relay_domains() -> str:
    return "relay_domains = [" + ", ".join(f'"{c.domain}"' for c in CASES) + "]\n"


def seed_cache(queue_path: Path) -> None:
    """Policies cached an hour ago under an id the TXT records no longer carry."""
    async def seed() -> None:
        queue_path.parent.mkdir(parents=True, exist_ok=True)
        q = await SqliteQueue.open(queue_path)
        try:
            import time
            fetched = time.time() - 3600
            for domain, body in CACHED.items():
                await q.save_sts_policy(StsPolicyRecord(domain, CACHED_ID, body.decode(), fetched,
                                                        fetched + MAX_AGE))
        finally:
            await q.close()
    asyncio.run(seed())


@pytest.fixture(scope="module")
def world(dns_lab: DnsLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    lab, port, certs = dns_lab, dns_lab.smtp_port, dns_lab.dane
    assert certs is not None
    root = tmp_path_factory.mktemp("mtasts")
    pki = StsPki(root, "mailward MTA-STS lab")
    ca_file, mx_cert, mx_key = pki.ca_file, pki.mx_cert, pki.mx_key
    servers: list[MailwardServer] = []
    policies = PolicyServer(pki.server_context())
    proxy = StripProxy((STRIP, port), (PKIX, port))
    try:
        try:
            policies.start()
        except PermissionError:
            pytest.skip("port 443 on a loopback address needs root (RFC 8461 §3.3 allows no other port)")
        proxy.start()
        peers = (("pkix", PKIX, [(mx_cert, mx_key)]),
                 ("selfsigned", EE_SELF, [(certs.selfsigned.cert, certs.selfsigned.key)]))
        started: dict[str, MailwardServer] = {}
        for name, address, pems in peers:
            peer = MailwardServer(root / name, mx=port, address=address, extra_toml=relay_domains(),
                                  certificates=tuple(pems))
            servers.append(peer)
            peer.write_config()
            peer.start()
            started[name] = peer
        sender = MailwardServer(root / "sender", deliver=True, extra_toml=delivery_toml(
            relay=tuple(c.domain for c in CASES), port=port, connect_timeout=3, command_timeout=5,
            retry_initial=3600) + lab.dns_toml + f'[mta_sts]\nca_file = "{ca_file}"\nfetch_timeout = 3\n')
        servers.append(sender)
        sender.write_config()
        seed_cache(sender.queue_path)
        sender.start()
        submit_mx(sender, SENDER, [c.rcpt for c in CASES], message("sts1", sender=SENDER))
        rcpts = {c.rcpt for c in CASES}

        def logged() -> dict[str, dict[str, str]]:
            return {d["rcpt"]: d for d in deliveries(sender)}

        wait_until(lambda: rcpts <= set(logged()), timeout=40, what="a result for every destination")
        yield World(lab, sender, started["pkix"], policies, proxy, logged())
    finally:
        for server in servers:
            server.stop()
        proxy.stop()
        policies.stop()
    for server in servers:
        assert "Traceback" not in server.log(), server.log()


@pytest.mark.parametrize("case", CASES, ids=[c.domain for c in CASES])
def test_outcome(world: World, case: Case) -> None:
    line = world.lines[case.rcpt]
    assert (line["status"], line["dsn"]) == (case.status, case.dsn), line
    assert re.fullmatch(case.tls, line["tls"]), line
    assert case.reply in line["reply"], line
    held = [m for m, _ in world.pkix.messages() if case.rcpt in {r.recipient.address for r in m.recipients}]
    assert bool(held) is (case.status == "sent" and case.domain.endswith(".sts.test")), line


def test_enforced_delivery_is_verified_against_the_mx_name(world: World) -> None:
    line = world.lines["rcpt@enforce-ok.sts.test"]
    assert line["relay"] == f"mx-good.sts.test[{PKIX}]:{world.lab.smtp_port}"
    # wildcard.sts.test's MX is listed, but its certificate names another host: PKIX fails.
    reply = world.lines["rcpt@wildcard.sts.test"]["reply"]
    assert "mx-other.sts.test" in reply, reply


def test_policy_failures_are_logged_and_fetched_once(world: World) -> None:
    log = world.sender.log()
    assert "redirecting to https://mta-sts.enforce-bad.sts.test/.well-known/mta-sts.txt (not followed)" in log
    assert "larger than 65536 bytes" in log
    assert "cached.sts.test: refresh failed" in log
    # The redirect's target was never asked for on its behalf: one request per domain.
    hosts = world.policies.requests
    assert hosts.count("mta-sts.enforce-bad.sts.test") == 1, hosts
    assert hosts.count("mta-sts.redirect.sts.test") == 1, hosts
    # Beside failing DANE the policy was fetched, and still relaxed nothing.
    assert hosts.count("mta-sts.nomatch-only.dane.test") == 1, hosts


def test_new_policies_are_cached_in_the_queue(world: World) -> None:
    async def read() -> dict[str, StsPolicyRecord | None]:
        q = await SqliteQueue.open(world.sender.queue_path)
        try:
            return {d: await q.load_sts_policy(d) for d in ("changed.sts.test", "cached.sts.test",
                                                              "enforce-ok.sts.test", "redirect.sts.test")}
        finally:
            await q.close()

    rows = asyncio.run(read())
    changed, cached, ok, redirect = (rows[d] for d in ("changed.sts.test", "cached.sts.test",
                                                       "enforce-ok.sts.test", "redirect.sts.test"))
    assert changed is not None and changed.id == "new1" and "mode: testing" in changed.text
    assert cached is not None and cached.id == CACHED_ID  # the failed refresh replaced nothing
    assert ok is not None and ok.id == "new1"
    assert redirect is None


def test_stripped_starttls_sends_no_envelope(world: World) -> None:
    proxy = world.proxy
    assert proxy.stripped >= 1 and b"EHLO" in proxy.to_server
    sent = bytes(proxy.to_server).upper()
    assert b"MAIL FROM" not in sent and b"RCPT TO" not in sent and b"STS1" not in sent
