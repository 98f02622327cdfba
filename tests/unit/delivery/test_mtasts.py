"""MTA-STS: the TXT record and policy parsers row by row, and the cache rules of `MtaSts`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mailward.config import config_from_dict
from mailward.delivery.dns import DnsTemporaryError, HostAddresses
from mailward.delivery.mtasts import (
    MAX_POLICY_BYTES,
    RESULT_FETCH_ERROR,
    RESULT_INVALID,
    CachedPolicy,
    MtaSts,
    PolicyError,
    StsRecord,
    for_delivery,
    parse_policy,
    parse_txt,
    sts_facts,
)
from mailward.delivery.policy import (
    Destination,
    HostFacts,
    RouteFacts,
    SecurityLevel,
    StsFacts,
    destination_for,
    plan,
)

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.mark.parametrize(("records", "expected"), [
    (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
    (["v=STSv1; id=abc"], "abc"),
    (["v=STSv1;id=abc"], "abc"),
    ([b"v=STSv1; id=abc"], "abc"),
    (["v=STSv1; id=abc; ext=value"], "abc"),
    (["v=spf1 -all", "v=STSv1; id=abc"], "abc"),  # others' records are ignored
    ([], None),
    (["v=spf1 -all"], None),
    (["v=STSv1; id=a", "v=STSv1; id=b"], None),  # two records: none (§3.1)
    (["v=STSv1; id=a", "v=STSv1; id=a"], None),
    (["v=STSv1"], None),  # no id
    (["v=STSv1; id="], None),
    (["v=STSv1; id=" + "a" * 33], None),  # at most 32
    (["v=STSv1; id=ab-c"], None),  # alphanumeric only
    (["v=STSv1; id=a; id=b"], None),
    (["v=STSv10; id=a"], None),
    (["v=stsv1; id=a"], None),  # case-sensitive; and not ours
    (["V=STSv1; id=a"], None),
    (["v=STSv1; id=a; garbage"], None),
    (["id=a; v=STSv1"], None),  # the version comes first
])
def test_parse_txt(records: list[str | bytes], expected: str | None) -> None:
    found = parse_txt(records)
    assert found == (None if expected is None else StsRecord(expected))


GOOD = b"version: STSv1\nmode: enforce\nmx: mail.example.com\nmx: *.example.net\nmax_age: 604800\n"


@pytest.mark.parametrize(("body", "mode", "mx", "max_age"), [
    (GOOD, "enforce", ("mail.example.com", "*.example.net"), 604800),
    (GOOD.replace(b"\n", b"\r\n"), "enforce", ("mail.example.com", "*.example.net"), 604800),
    (GOOD.rstrip(b"\n"), "enforce", ("mail.example.com", "*.example.net"), 604800),
    (b"version: STSv1\nmode: testing\nmx: MX.Example.COM.\nmax_age: 86400\n", "testing",
     ("mx.example.com",), 86400),
    (b"version: STSv1\nmode: none\nmax_age: 0\n", "none", (), 0),
    (b"version:STSv1\nmode:\tenforce\nmx:mx.example.com\nmax_age: 31557600\nfoo: bar\n", "enforce",
     ("mx.example.com",), 31557600),  # unknown fields ignored, any WSP after the colon
    (b"max_age: 5\nmx: a.example\nmode: enforce\nversion: STSv1\n", "enforce", ("a.example",), 5),
])
def test_parse_policy_valid(body: bytes, mode: str, mx: tuple[str, ...], max_age: int) -> None:
    policy = parse_policy(body)
    assert (policy.mode, policy.mx, policy.max_age) == (mode, mx, max_age)
    assert policy.facts().mode == mode


@pytest.mark.parametrize("body", [
    b"",
    b"mode: enforce\nmx: a.example\nmax_age: 5\n",  # no version
    b"version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 5\n",
    b"Version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 5\n",  # keys are case-sensitive
    b"version: STSv1\nmode: Enforce\nmx: a.example\nmax_age: 5\n",
    b"version: STSv1\nmode: reject\nmx: a.example\nmax_age: 5\n",
    b"version: STSv1\nmx: a.example\nmax_age: 5\n",  # no mode
    b"version: STSv1\nmode: enforce\nmax_age: 5\n",  # enforce without mx
    b"version: STSv1\nmode: testing\nmax_age: 5\n",
    b"version: STSv1\nmode: enforce\nmx: a.example\n",  # no max_age
    b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 31557601\n",
    b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n",
    b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 12345678901\n",
    b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1e5\n",
    b"version: STSv1\nmode: enforce\nmode: none\nmx: a.example\nmax_age: 5\n",  # repeated
    b"version: STSv1\nmode: enforce\nmx: *.*.example\nmax_age: 5\n",  # one wildcard label only
    b"version: STSv1\nmode: enforce\nmx: mx*.example\nmax_age: 5\n",
    b"version: STSv1\nmode: enforce\nmx: example\nmax_age: 5\n",  # not a host name with a domain
    b"version: STSv1\nmode: enforce\nmx: -a.example\nmax_age: 5\n",
    b"version: STSv1\nmode: enforce\nmx: a..example\nmax_age: 5\n",
    b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 5\n\n",  # an empty line
    b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 5\njunk\n",
    b"version: STSv1\nmode: enforce\nmx: \xff.example\nmax_age: 5\n",  # not UTF-8
    b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 5\n" + b"x: y\n" * (MAX_POLICY_BYTES // 5),
])
def test_parse_policy_invalid(body: bytes) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(body)
    assert caught.value.result_type == RESULT_INVALID


# --- the cache rules, with DNS and HTTPS replaced ---------------------------------------------------


class FakeStore:
    def __init__(self) -> None:
        self.rows: dict[str, CachedPolicy] = {}

    async def load_sts_policy(self, domain: str) -> CachedPolicy | None:
        return self.rows.get(domain)

    async def save_sts_policy(self, policy: CachedPolicy) -> None:
        self.rows[policy.domain] = policy


class FakeDns:
    def __init__(self) -> None:
        self.records: list[bytes] | None = [b"v=STSv1; id=one"]

    async def txt(self, name: str) -> tuple[bytes, ...]:
        assert name == "_mta-sts.example.org"
        if self.records is None:
            raise DnsTemporaryError("SERVFAIL")
        return tuple(self.records)

    async def addresses(self, host: str) -> HostAddresses:
        return HostAddresses(host, ("127.0.0.1",), "insecure")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def sts(store: FakeStore, dns: FakeDns, clock: Clock, served: list[bytes | PolicyError]) -> MtaSts:
    m = MtaSts(dns, store, clock=clock)
    fetched: list[str] = []

    async def get(host: str, address: str) -> bytes:
        fetched.append(host)
        item = served.pop(0)
        if isinstance(item, PolicyError):
            raise item
        return item

    m._get = get  # type: ignore[method-assign]
    return m


POLICY = b"version: STSv1\nmode: enforce\nmx: mx.example.org\nmax_age: 86400\n"
TESTING = POLICY.replace(b"enforce", b"testing")


def test_fetch_once_then_cached_and_persisted() -> None:
    store, dns, clock = FakeStore(), FakeDns(), Clock()
    served: list[bytes | PolicyError] = [POLICY]

    async def go() -> None:
        m = sts(store, dns, clock, served)
        first = await m.lookup("example.org")
        assert first.policy is not None and first.policy.mode == "enforce" and not first.from_cache
        clock.now += 60
        second = await m.lookup("Example.ORG.")
        assert second.from_cache and second.policy == first.policy
        # A restart: a new MtaSts reads the store and does not fetch.
        third = await sts(store, dns, clock, []).lookup("example.org")
        assert third.policy is not None and third.from_cache

    run(go())
    assert served == [] and store.rows["example.org"].id == "one"


def test_id_change_refetches() -> None:
    store, dns, clock = FakeStore(), FakeDns(), Clock()
    served: list[bytes | PolicyError] = [POLICY, TESTING]

    async def go() -> None:
        m = sts(store, dns, clock, served)
        assert (await m.lookup("example.org")).policy.mode == "enforce"  # type: ignore[union-attr]
        dns.records = [b"v=STSv1; id=two"]
        found = await m.lookup("example.org")
        assert found.policy is not None and found.policy.mode == "testing" and not found.from_cache

    run(go())
    assert store.rows["example.org"].id == "two"


def test_failed_refresh_keeps_unexpired_cache() -> None:
    store, dns, clock = FakeStore(), FakeDns(), Clock()
    served: list[bytes | PolicyError] = [POLICY, PolicyError("HTTP 500", RESULT_FETCH_ERROR)]

    async def go() -> None:
        m = sts(store, dns, clock, served)
        await m.lookup("example.org")
        dns.records = [b"v=STSv1; id=two"]
        found = await m.lookup("example.org")
        assert found.policy is not None and found.policy.mode == "enforce" and found.from_cache
        assert found.failure == RESULT_FETCH_ERROR
        # Not retried at once for every delivery.
        again = await m.lookup("example.org")
        assert again.policy is not None and again.failure is None
        # Expired: no policy, and a failed fetch is reported.
        clock.now += 86400 + 1
        served.append(PolicyError("HTTP 500", RESULT_FETCH_ERROR))
        gone = await m.lookup("example.org")
        assert gone.policy is None and gone.failure == RESULT_FETCH_ERROR

    run(go())


def test_missing_txt_does_not_evict_and_failed_txt_keeps_cache() -> None:
    store, dns, clock = FakeStore(), FakeDns(), Clock()

    async def go() -> None:
        m = sts(store, dns, clock, [POLICY])
        await m.lookup("example.org")
        dns.records = []
        assert (await m.lookup("example.org")).policy is not None
        dns.records = None
        assert (await m.lookup("example.org")).policy is not None
        fresh = sts(FakeStore(), dns, clock, [])
        assert (await fresh.lookup("example.org")).policy is None

    run(go())


def test_proactive_refresh_before_expiry() -> None:
    store, dns, clock = FakeStore(), FakeDns(), Clock()
    served: list[bytes | PolicyError] = [POLICY, TESTING]

    async def go() -> None:
        m = sts(store, dns, clock, served)
        await m.lookup("example.org")
        clock.now += 43200 + 1  # half of max_age: refreshed though the id is the same
        found = await m.lookup("example.org")
        assert found.policy is not None and found.policy.mode == "testing"

    run(go())
    assert served == []


def test_refetch_forces_a_fetch() -> None:
    store, dns, clock = FakeStore(), FakeDns(), Clock()
    served: list[bytes | PolicyError] = [POLICY, TESTING]

    async def go() -> None:
        m = sts(store, dns, clock, served)
        await m.lookup("example.org")
        assert (await m.lookup("example.org", refetch=True)).policy.mode == "testing"  # type: ignore[union-attr]

    run(go())


def test_invalid_policy_is_reported_not_raised() -> None:
    async def go() -> None:
        m = sts(FakeStore(), FakeDns(), Clock(), [b"version: STSv1\nmode: bogus\n"])
        found = await m.lookup("example.org")
        assert found.policy is None and found.failure == RESULT_INVALID

    run(go())


# --- what the Deliverer asks: sts_facts -------------------------------------------------------------


def cfg(**mta_sts: Any) -> Any:
    policy = [{"destination": "verified.example", "level": "verify"}]
    return config_from_dict({"listener": [], "hostname": "out.example.net", "mta_sts": mta_sts,
                             "delivery": {"policy": policy}}, "test", base_dir=Path("/etc"))


FACTS = RouteFacts(hosts=(HostFacts("mx.example.org", ("192.0.2.1",)),
                          HostFacts("other.example", ("192.0.2.2",))))


class CountingDns(FakeDns):
    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    async def txt(self, name: str) -> tuple[bytes, ...]:
        self.asked += 1
        return await super().txt(name)


@pytest.mark.parametrize(("domain", "config_kw", "expected"), [
    ("example.org", {}, StsFacts("enforce", ("mx.example.org",), Path("/etc/sts-ca.pem"))),
    ("example.org", {"enabled": False}, None),  # switched off
    ("verified.example", {}, None),  # an explicit level: plan would not consult it
])
def test_sts_facts_applies_to_mx_delivery_at_level_dane(domain: str, config_kw: dict[str, Any],
                                                        expected: StsFacts | None) -> None:
    config = cfg(ca_file="sts-ca.pem", **config_kw)
    dns = CountingDns()

    async def go() -> StsFacts | None:
        m = sts(FakeStore(), dns, Clock(), [POLICY]) if config.mta_sts.enabled else None
        dns_domain = destination_for(domain, config)
        assert dns_domain.kind == "mx"
        return await sts_facts(m, config, replace(dns_domain, domain="example.org"), FACTS)

    assert run(go()) == expected
    assert dns.asked == (1 if expected else 0)


def test_sts_facts_skips_routes_and_resolvers_without_txt() -> None:
    config = cfg()
    route = Destination(key="route:x", kind="route", domain="example.org", level=SecurityLevel.DANE)
    dns = CountingDns()
    assert run(sts_facts(for_delivery(config, dns, None), config, route, FACTS)) is None
    assert dns.asked == 0
    mx = destination_for("example.org", config)
    assert for_delivery(config, object(), None) is None
    assert run(sts_facts(None, config, mx, FACTS)) is None


def test_testing_mode_logs_unlisted_hosts(caplog: pytest.LogCaptureFixture) -> None:
    config = cfg()

    async def go() -> StsFacts | None:
        m = sts(FakeStore(), FakeDns(), Clock(), [TESTING])
        return await sts_facts(m, config, destination_for("example.org", config), FACTS)

    with caplog.at_level(logging.INFO, logger="mailward.delivery"):
        found = run(go())
    assert found is not None and found.mode == "testing"
    assert "does not list MX host other.example; delivering anyway" in caplog.text
    assert "mx.example.org; delivering" not in caplog.text


def test_a_final_attempt_fetches_an_enforced_policy_again() -> None:
    config = cfg()
    served: list[bytes | PolicyError] = [POLICY, TESTING]

    async def go() -> StsFacts | None:
        m = sts(FakeStore(), FakeDns(), Clock(), served)
        mx = destination_for("example.org", config)
        await sts_facts(m, config, mx, FACTS)
        return await sts_facts(m, config, mx, FACTS, final=True)

    found = run(go())
    assert found is not None and found.mode == "testing" and served == []


def test_an_enforced_policy_asks_pkix_with_its_ca_for_listed_hosts_only() -> None:
    config = cfg()
    decision = plan(destination_for("example.org", config), FACTS,
                    sts=StsFacts("enforce", ("mx.example.org",), Path("/etc/sts-ca.pem")))
    (candidate,) = decision.candidates
    assert candidate.host == "mx.example.org"
    assert (candidate.tls.verify, candidate.tls.verify_name, candidate.tls.ca_file) == (
        "pkix", "mx.example.org", Path("/etc/sts-ca.pem"))
    assert decision.skipped == ("other.example: not listed in the MTA-STS policy",)


@pytest.mark.parametrize(("records", "served", "expected"), [
    ([b"v=STSv1; id=one"], [PolicyError(RESULT_FETCH_ERROR, "refused")], StsFacts("none", unavailable=True)),
    ([b"v=STSv1; id=one"], [b"version: STSv1\nmode: bogus\n"], StsFacts("none", unavailable=True)),
    (None, [], StsFacts("none", unavailable=True)),  # the TXT lookup failed: published or not, unknown
    ([], [], None),  # no TXT record: no policy, certainly
])
def test_a_policy_that_cannot_be_had_is_marked_unavailable(records: list[bytes] | None,
                                                           served: list[bytes | PolicyError],
                                                           expected: StsFacts | None) -> None:
    """Without a cached policy, a failed fetch or lookup means delivery as without MTA-STS
    (RFC 8461 §3.3); the facts say so, so that a REQUIRETLS message waits instead of bouncing."""
    config = cfg()
    dns = FakeDns()
    dns.records = records

    async def go() -> StsFacts | None:
        m = sts(FakeStore(), dns, Clock(), served)
        return await sts_facts(m, config, destination_for("example.org", config), FACTS)

    assert run(go()) == expected
