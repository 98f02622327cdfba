"""DNS for delivery against a real validating resolver: Unbound over NSD with zones signed at set-up
(dnssec.py), and a mailward that finds its next hops there and delivers to smtp-sink on loopback."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from dnssec import DEAD, LIVE, RESOLVER_IP, SILENT, TLSA_DATA, DnsLab
from test_delivery import Sink, deliveries, delivery_toml, message, submit_mx, wait_until

from conftest import MakeServer
from mailward.delivery.dns import DnsPermanentError, DnsResolver, DnsTemporaryError
from mailward.delivery.policy import TlsaRecord

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture
def resolver(dns_lab: DnsLab) -> DnsResolver:
    return DnsResolver([dns_lab.resolver], timeout=3)


@pytest.fixture
def live_sink(dns_lab: DnsLab, tmp_path: Path) -> Iterator[Sink]:
    s = Sink(tmp_path / "sink", host=LIVE, port=dns_lab.smtp_port).start()
    yield s
    s.stop()


# --- the resolver against Unbound ------------------------------------------------------------------

def test_signed_zone_is_secure_unsigned_insecure_bogus_fails(resolver: DnsResolver) -> None:
    secure = run(resolver.next_hops("fall.secure.test"))
    assert secure.status == "secure" and not secure.implicit
    assert [(h.preference, h.host.name, h.host.addresses, h.host.status) for h in secure.hosts] == [
        (10, "dead.secure.test", (DEAD,), "secure"), (20, "live.secure.test", (LIVE,), "secure")]
    facts = secure.facts()
    assert facts.mx_secure and all(h.secure for h in facts.hosts)

    insecure = run(resolver.next_hops("insecure.test"))
    assert insecure.status == "insecure" and insecure.hosts[0].host.status == "insecure"
    assert insecure.hosts[0].host.addresses == (LIVE,)

    with pytest.raises(DnsTemporaryError) as bogus:
        run(resolver.next_hops("bogus.test"))
    assert str(bogus.value) == (f"resolver {RESOLVER_IP}:{resolver.servers[0][1]} answered SERVFAIL for MX "
                                "bogus.test (the domain's DNS is broken or fails DNSSEC validation)")


def test_null_implicit_cname_and_missing(resolver: DnsResolver) -> None:
    assert run(resolver.next_hops("nullmx.secure.test")).null_mx
    implicit = run(resolver.next_hops("implicit.secure.test"))
    assert implicit.implicit and [(h.preference, h.host.addresses) for h in implicit.hosts] == [(0, (LIVE,))]
    alias = run(resolver.next_hops("alias.secure.test")).hosts[0].host
    assert (alias.name, alias.canonical, alias.addresses, alias.status) == (
        "mx-alias.secure.test", "live.secure.test", (LIVE,), "secure")
    assert alias.cname_chain == ("mx-alias.secure.test", "live.secure.test")
    # A secure alias into an unsigned zone is insecure as a whole.
    outward = run(resolver.addresses("outward.secure.test"))
    assert outward.status == "insecure" and outward.canonical == "mx.insecure.test"
    dual = run(resolver.addresses("dual.secure.test"))
    assert dual.addresses == ("::1", LIVE) and dual.status == "secure"
    with pytest.raises(DnsPermanentError) as gone:
        run(resolver.next_hops("nonexistent.secure.test"))
    assert gone.value.status == "5.1.2"
    with pytest.raises(DnsPermanentError) as nomail:
        run(resolver.next_hops("nomail.secure.test"))
    assert nomail.value.status == "5.4.4"
    # A bogus MX host is skipped; with no other host the lookup is temporary.
    mixed = run(resolver.next_hops("mixed.secure.test"))
    assert [(h.host.name, h.host.status, h.host.addresses) for h in mixed.hosts] == [
        ("mx.bogus.test", "bogus", ()), ("live.secure.test", "secure", (LIVE,))]
    with pytest.raises(DnsTemporaryError):
        run(resolver.next_hops("badhost.secure.test"))


def test_tlsa_status_and_base_domain(resolver: DnsResolver) -> None:
    record = TlsaRecord(3, 1, 1, TLSA_DATA)
    live = run(resolver.tlsa("live.secure.test"))
    assert (live.status, live.records, live.base_domain) == ("secure", (record,), "live.secure.test")
    # RFC 7672 §2.2.2: the secure CNAME's target is the TLSA base domain.
    alias = run(resolver.tlsa("mx-alias.secure.test"))
    assert (alias.status, alias.records, alias.base_domain) == ("secure", (record,), "live.secure.test")
    assert run(resolver.tlsa("dead.secure.test")).records == ()  # secure denial
    insecure = run(resolver.tlsa("mx.insecure.test"))
    # Records from an unsigned zone come back, marked insecure: policy gives them no weight.
    assert (insecure.status, insecure.records) == ("insecure", (record,))
    assert run(resolver.tlsa("mx.bogus.test")).status == "bogus"


def test_silent_resolver_is_named_in_one_sentence() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((RESOLVER_IP, 0))  # takes queries, never answers
        port = silent.getsockname()[1]
        r = DnsResolver([f"{RESOLVER_IP}:{port}"], timeout=0.5)
        started = time.monotonic()
        with pytest.raises(DnsTemporaryError) as info:
            run(r.next_hops("example.test"))
        assert time.monotonic() - started < 2
    assert str(info.value) == (f"no answer from resolver {RESOLVER_IP}:{port} within 0.5s for MX "
                               "example.test; check dns.resolvers")


# --- a mailward delivering by MX -----------------------------------------------------------------

DOMAINS = ("fall.secure.test", "alias.secure.test", "implicit.secure.test", "insecure.test",
           "slow.secure.test", "nullmx.secure.test", "nonexistent.secure.test", "nomail.secure.test",
           "bogus.test", "badhost.secure.test")


def test_mx_delivery_fall_through_bounces_and_deferrals(make_server: MakeServer, dns_lab: DnsLab,
                                                        live_sink: Sink) -> None:
    port = dns_lab.smtp_port
    server = make_server(deliver=True, extra_toml=delivery_toml(
        relay=DOMAINS, port=port, connect_timeout=1, command_timeout=1) + dns_lab.dns_toml)
    rcpts = [f"{d.split('.')[0]}@{d}" for d in DOMAINS]
    sender = "sender@implicit.secure.test"
    submit_mx(server, sender, rcpts, message("dns1", sender=sender))

    def settled() -> dict[str, dict[str, str]]:
        return {d["rcpt"]: d for d in deliveries(server)}

    wait_until(lambda: set(rcpts) <= set(settled()), timeout=15, what="a result for every recipient")
    lines = settled()
    outcome = {r: (lines[r]["status"], lines[r]["dsn"]) for r in rcpts}
    assert outcome == {
        "fall@fall.secure.test": ("sent", "2.0.0"),
        "alias@alias.secure.test": ("sent", "2.0.0"),
        "implicit@implicit.secure.test": ("sent", "2.0.0"),
        "insecure@insecure.test": ("sent", "2.0.0"),
        "slow@slow.secure.test": ("sent", "2.0.0"),
        "nullmx@nullmx.secure.test": ("bounced", "5.1.10"),
        "nonexistent@nonexistent.secure.test": ("bounced", "5.1.2"),
        "nomail@nomail.secure.test": ("bounced", "5.4.4"),
        "bogus@bogus.test": ("deferred", "4.4.3"),
        "badhost@badhost.secure.test": ("deferred", "4.4.3"),
    }, lines
    # MX fall-through: the preferred host refused, the next one took the mail.
    assert lines["fall@fall.secure.test"]["relay"] == f"live.secure.test[{LIVE}]:{port}"
    log = server.log()
    assert "mx:fall.secure.test: " in log and f"dead.secure.test[{DEAD}]:{port}" in log
    # The silent host timed out, then the next MX was used.
    assert lines["slow@slow.secure.test"]["relay"] == f"live.secure.test[{LIVE}]:{port}"
    assert f"silent.secure.test[{SILENT}]:{port}: no greeting within 1s" in log
    # The MX target that is an alias is named as the MX says; implicit MX is the domain itself.
    assert lines["alias@alias.secure.test"]["relay"] == f"mx-alias.secure.test[{LIVE}]:{port}"
    assert lines["implicit@implicit.secure.test"]["relay"] == f"implicit.secure.test[{LIVE}]:{port}"
    assert "Null MX" in lines["nullmx@nullmx.secure.test"]["reply"]
    assert "does not exist (NXDOMAIN)" in lines["nonexistent@nonexistent.secure.test"]["reply"]
    assert "SERVFAIL for MX bogus.test" in lines["bogus@bogus.test"]["reply"]

    # Every delivered recipient reached the sink, and the bounce came back to the sender's MX.
    wait_until(lambda: any(m.mail.startswith("<>") for m in live_sink.messages()), what="the bounce")
    delivered = sorted(r for m in live_sink.messages() if not m.mail.startswith("<>") for r in m.rcpts)
    assert delivered == sorted(f"<{r}>" for r, (status, _) in outcome.items() if status == "sent")
    (bounce,) = [m for m in live_sink.messages() if m.mail.startswith("<>")]
    assert bounce.rcpts == [f"<{sender}>"]
    text = bounce.body.decode()
    assert "Final-Recipient: rfc822; nullmx@nullmx.secure.test" in text and "Status: 5.1.10" in text
    assert "Final-Recipient: rfc822; nonexistent@nonexistent.secure.test" in text and "Status: 5.1.2" in text
    assert "bogus@bogus.test" not in text  # deferred, not failed
