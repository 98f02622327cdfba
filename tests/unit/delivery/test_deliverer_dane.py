"""Which hosts the Deliverer asks TLSA for, and what a TLSA answer does to the plan: pure logic
against a fake resolver (the real lookups run against Unbound in tests/integration)."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from mailward.config import config_from_dict
from mailward.delivery import Deliverer, Resolver, lookup_tlsa
from mailward.delivery.dns import DnssecStatus, HostAddresses, MailHost, NextHops
from mailward.delivery.policy import (
    Destination,
    RouteFacts,
    SecurityLevel,
    TlsaFacts,
    TlsaRecord,
    destination_for,
    plan,
)
from mailward.queue import Envelope, Recipient
from mailward.queue.sqlite import SqliteQueue

EE = TlsaRecord(3, 1, 1, bytes(32))
PORT = 2525


def host(name: str, status: DnssecStatus = "secure", *, address: str = "127.0.0.1",
         alias_secure: bool = False) -> HostAddresses:
    return HostAddresses(name, (address,), status, alias_secure=alias_secure)


def hops(domain: str, *hosts: HostAddresses, status: DnssecStatus = "secure",
         implicit: bool = False) -> NextHops:
    return NextHops(domain, tuple(MailHost(10 * (i + 1), h) for i, h in enumerate(hosts)), status,
                    implicit=implicit)


class FakeResolver:
    """The `Resolver` protocol from tables; records the TLSA questions, and can make them fail."""

    def __init__(self, next_hops: NextHops | None = None, tlsa: dict[str, TlsaFacts] | None = None,
                 fail: frozenset[str] = frozenset()) -> None:
        self._hops = next_hops
        self._tlsa = tlsa or {}
        self._fail = fail
        self.asked: list[tuple[str, int]] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def next_hops(self, domain: str) -> NextHops:
        assert self._hops is not None and self._hops.domain == domain
        return self._hops

    async def addresses(self, host: str) -> HostAddresses:
        raise AssertionError("MX destinations only")

    async def tlsa(self, host: str, port: int = 25) -> TlsaFacts:
        self.asked.append((host, port))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.01)  # every lookup is under way before any ends, if they run together
            if host in self._fail:
                raise RuntimeError("resolver library blew up")
            return self._tlsa.get(host, TlsaFacts("secure", (), base_domain=host))
        finally:
            self.in_flight -= 1


def mx(domain: str, level: SecurityLevel = SecurityLevel.DANE) -> Destination:
    return Destination(key=f"mx:{domain}", kind="mx", domain=domain, port=PORT, level=level)


def asked(resolver: FakeResolver, destination: Destination, nh: NextHops) -> list[str]:
    asyncio.run(lookup_tlsa(resolver, destination, nh.facts()))
    assert all(port == destination.port for _, port in resolver.asked)  # _PORT._tcp, as delivered
    return sorted(h for h, _ in resolver.asked)


# --- which hosts are asked ------------------------------------------------------------------------------

@pytest.mark.parametrize(("nh", "expected"), [
    # RFC 7672 §2.2.1: a secure MX RRset; §2.2.2: only hosts whose address records are secure
    (hops("d.example", host("a.d.example"), host("b.d.example")), ["a.d.example", "b.d.example"]),
    (hops("d.example", host("a.d.example"), host("b.other.example", "insecure")), ["a.d.example"]),
    # an insecure MX RRset chose its hosts: their TLSA records prove nothing about the destination
    (hops("d.example", host("a.d.example"), status="insecure"), []),
    # no MX: the domain itself is the host, and its own address records decide
    (hops("d.example", host("d.example"), status="insecure", implicit=True), ["d.example"]),
    (hops("d.example", host("d.example", "insecure"), implicit=True), []),
    # a secure alias whose target is unsigned: TLSA at the alias's own name (Postfix does the same)
    (hops("d.example", host("alias.d.example", "insecure", alias_secure=True)), ["alias.d.example"]),
])
def test_tlsa_is_asked_only_where_rfc7672_lets_dane_apply(nh: NextHops, expected: list[str]) -> None:
    assert asked(FakeResolver(), mx("d.example"), nh) == expected


@pytest.mark.parametrize("level", [SecurityLevel.NONE, SecurityLevel.MAY, SecurityLevel.ENCRYPT,
                                   SecurityLevel.VERIFY, SecurityLevel.SECURE])
def test_levels_without_dane_ask_nothing(level: SecurityLevel) -> None:
    nh = hops("d.example", host("a.d.example"))
    resolver = FakeResolver()
    assert asyncio.run(lookup_tlsa(resolver, mx("d.example", level), nh.facts())) is None
    assert resolver.asked == []


def test_dane_only_asks_too_and_the_lookups_run_together() -> None:
    nh = hops("d.example", *(host(f"mx{i}.d.example") for i in range(4)))
    resolver = FakeResolver()
    found = asyncio.run(lookup_tlsa(resolver, mx("d.example", SecurityLevel.DANE_ONLY), nh.facts()))
    assert found is not None and sorted(found) == [f"mx{i}.d.example" for i in range(4)]
    assert resolver.most_in_flight == 4


def test_mx_delivery_defaults_to_dane(tmp_path: Path) -> None:
    config = config_from_dict({"listener": [], "hostname": "out.example.net", "state_dir": str(tmp_path)},
                              "test", base_dir=tmp_path)
    destination = destination_for("d.example", config)
    assert destination.level is SecurityLevel.DANE
    assert asked(FakeResolver(), destination, hops("d.example", host("a.d.example"))) == ["a.d.example"]


# --- what the answers do to the plan ------------------------------------------------------------------

def plan_with(resolver: FakeResolver, nh: NextHops, level: SecurityLevel = SecurityLevel.DANE) -> Any:
    destination = mx(nh.domain, level)
    facts: RouteFacts = nh.facts()
    return plan(destination, facts, tlsa=asyncio.run(lookup_tlsa(resolver, destination, facts)))


def test_a_failed_lookup_makes_the_host_unusable_never_tlsa_less() -> None:
    nh = hops("d.example", host("a.d.example", address="127.0.0.2"), host("b.d.example", address="127.0.0.3"))
    # RFC 7672 §2.1.1: a lookup error (here one the resolver raised) is not "no records"
    decision = plan_with(FakeResolver(fail=frozenset({"a.d.example"})), nh)
    assert [c.host for c in decision.candidates] == ["b.d.example"]
    assert decision.candidates[0].tls.level is SecurityLevel.MAY  # b securely has no TLSA records
    assert any(s.startswith("a.d.example: TLSA lookup failed") for s in decision.skipped)
    bogus = {"a.d.example": TlsaFacts("bogus", base_domain="a.d.example"),
             "b.d.example": TlsaFacts("bogus", base_domain="b.d.example")}
    decision = plan_with(FakeResolver(tlsa=bogus), nh)
    # none left: defer (temporary), never plaintext and never a bounce
    assert decision.candidates == () and decision.refusal is not None
    assert (decision.refusal.permanent, decision.refusal.status) == (False, "4.7.5")


def test_secure_records_demand_dane_with_the_base_domain_as_sni() -> None:
    nh = hops("d.example", host("alias.d.example"))
    found = {"alias.d.example": TlsaFacts("secure", (EE,), base_domain="real.d.example")}
    (candidate,) = plan_with(FakeResolver(tlsa=found), nh).candidates
    tls = candidate.tls
    assert (tls.verify, tls.required, tls.tlsa) == ("dane", True, (EE,))
    assert tls.verify_name == "real.d.example"  # RFC 7672 §8.1: SNI is the TLSA base domain
    assert tls.dane_names[0] == "real.d.example" and "d.example" in tls.dane_names


def test_insecure_records_and_unusable_records() -> None:
    nh = hops("d.example", host("a.d.example"))
    insecure = {"a.d.example": TlsaFacts("insecure", (EE,), base_domain="a.d.example")}
    (c,) = plan_with(FakeResolver(tlsa=insecure), nh).candidates
    assert (c.tls.level, c.tls.required) == (SecurityLevel.MAY, False)
    pkix_ee = TlsaRecord(1, 1, 1, bytes(32))
    pkix_only = {"a.d.example": TlsaFacts("secure", (pkix_ee,), base_domain="a.d.example")}
    (c,) = plan_with(FakeResolver(tlsa=pkix_only), nh).candidates
    # §2.2.3: secure but unusable records still forbid plaintext
    assert (c.tls.level, c.tls.required, c.tls.verify) == (SecurityLevel.ENCRYPT, True, "none")


# --- the Deliverer, with a real queue -----------------------------------------------------------------

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_deliverer_defers_when_every_tlsa_lookup_failed(tmp_path: Path) -> None:
    port = closed_port()  # a connection attempt would end in 4.4.1 here, not 4.7.5
    nh = NextHops("d.example", (MailHost(10, host("mx.d.example")),), "secure")
    resolver = FakeResolver(nh, fail=frozenset({"mx.d.example"}))
    config = config_from_dict({"listener": [], "hostname": "out.example.net", "state_dir": str(tmp_path),
                               "delivery": {"port": port}}, "test", base_dir=tmp_path)

    async def run() -> None:
        queue = await SqliteQueue.open(tmp_path / "q.db")
        typed: Resolver = resolver
        deliverer = Deliverer(config, queue, typed, None, rng=random.Random(1), owner="test:1")
        task = asyncio.create_task(deliverer.run())
        try:
            env = Envelope(sender="a@out.example.net", client_ip="127.0.0.1", client_helo="c",
                           listener="submission", received_at=time.time())
            async with await queue.begin(env) as txn:
                await txn.add_rcpt(Recipient("bob@d.example"))
                await txn.write_body(b"Subject: hi\r\n\r\nhello\r\n")
                mid = await txn.commit()
            for _ in range(300):
                m = await queue.get(mid)
                if m is not None and m.recipients[0].attempts:
                    break
                await asyncio.sleep(0.01)
            assert m is not None
            r = m.recipients[0]
            assert r.status == "deferred" and r.last_reply is not None
            assert r.last_reply.startswith("4.7.5 ") and "TLSA lookup failed" in r.last_reply
            assert r.tls is None  # no connection was made
            assert resolver.asked == [("mx.d.example", port)]
        finally:
            await deliverer.stop(grace=1)
            await asyncio.wait_for(task, 2)
            await queue.close()

    asyncio.run(run())
