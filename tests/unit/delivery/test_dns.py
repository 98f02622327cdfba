"""DnsResolver's reading of DNS answers, fed real dnspython messages instead of a network."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

import dns.message
import dns.name
import dns.rdatatype
import pytest

from mailward.delivery.dns import DnsPermanentError, DnsResolver, DnsTemporaryError, NextHops
from mailward.delivery.policy import Destination, TlsaRecord, plan

T = TypeVar("T")
LOOPBACK = ("127.0.0.1:5353",)
SOA = "example. 300 IN SOA ns.example. hostmaster.example. 1 3600 600 86400 {neg}"


def message(name: str, rdtype: str, *answer: str, rcode: str = "NOERROR", ad: bool = False,
            negative_ttl: int | None = None) -> dns.message.Message:
    """A resolver's response as dnspython parses it off the wire."""
    authority = SOA.format(neg=negative_ttl) if negative_ttl is not None else ""
    text = "\n".join([
        "id 1", "opcode QUERY", f"rcode {rcode}", "flags QR RD RA" + (" AD" if ad else ""),
        ";QUESTION", f"{name}. IN {rdtype}", ";ANSWER", *answer, ";AUTHORITY", authority,
    ])
    return dns.message.from_text(text)


class FakeDns:
    """Answers by (name, type) and counts the questions; unknown questions get SERVFAIL."""

    def __init__(self, ad: bool = False) -> None:
        self.ad = ad
        self.answers: dict[tuple[str, str], list[dns.message.Message]] = {}
        self.asked: list[tuple[str, str]] = []

    def add(self, name: str, rdtype: str, *records: str, rcode: str = "NOERROR", ad: bool | None = None,
            negative_ttl: int | None = 300) -> FakeDns:
        """Records as zone lines without the owner name's trailing dot, e.g. "mx.example. 300 IN A ..."."""
        lines = [r if " IN " in r else f"{name}. 300 IN {rdtype} {r}" for r in records]
        neg = None if lines else negative_ttl
        self.answers.setdefault((name, rdtype), []).append(
            message(name, rdtype, *lines, rcode=rcode, ad=self.ad if ad is None else ad, negative_ttl=neg))
        return self

    def host(self, name: str, *addresses: str, ad: bool | None = None) -> FakeDns:
        self.add(name, "A", *[a for a in addresses if ":" not in a], ad=ad)
        return self.add(name, "AAAA", *[a for a in addresses if ":" in a], ad=ad)

    async def __call__(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> dns.message.Message:
        key = (name.to_text(omit_final_dot=True), dns.rdatatype.to_text(rdtype))
        self.asked.append(key)
        await asyncio.sleep(0)
        queue = self.answers.get(key)
        if not queue:
            return message(key[0], key[1], rcode="SERVFAIL")
        # Each answer once, the last one for good: lets a test change what DNS says.
        return queue.pop(0) if len(queue) > 1 else queue[0]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def resolver(fake: FakeDns, resolvers: Iterable[str] = LOOPBACK, **kw: Any) -> DnsResolver:
    return DnsResolver(tuple(resolvers), exchange=fake, **kw)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def hops(r: DnsResolver, domain: str) -> NextHops:
    return run(r.next_hops(domain))


# --- next hops ------------------------------------------------------------------------------------

def test_mx_hosts_by_preference_with_their_addresses() -> None:
    fake = (FakeDns().add("example", "MX", "20 b.example.", "5 a.example.", "30 c.example.")
            .host("a.example", "192.0.2.1", "2001:db8::1", "192.0.2.2")
            .host("b.example", "192.0.2.3").host("c.example", "2001:db8::3"))
    result = hops(resolver(fake, rng=random.Random(1)), "Example.")
    assert result.domain == "example" and not result.null_mx and not result.implicit
    assert [(h.preference, h.host.name) for h in result.hosts] == [(5, "a.example"), (20, "b.example"),
                                                                    (30, "c.example")]
    a = result.hosts[0].host
    assert a.addresses[0] == "2001:db8::1" and set(a.addresses[1:]) == {"192.0.2.1", "192.0.2.2"}
    facts = result.facts()
    assert [(h.name, h.preference) for h in facts.hosts] == [("a.example", 5), ("b.example", 20),
                                                              ("c.example", 30)]
    assert facts.hosts[2].addresses == ("2001:db8::3",)


def test_equal_preferences_come_in_random_order() -> None:
    orders = set()
    for seed in range(40):
        fake = (FakeDns().add("example", "MX", "10 a.example.", "10 b.example.", "10 c.example.",
                              "20 z.example.", "5 first.example.")
                .host("a.example", "192.0.2.1").host("b.example", "192.0.2.2").host("c.example", "192.0.2.3")
                .host("z.example", "192.0.2.9").host("first.example", "192.0.2.5"))
        names = [h.host.name for h in hops(resolver(fake, rng=random.Random(seed)), "example").hosts]
        assert names[0] == "first.example" and names[-1] == "z.example"
        orders.add(tuple(names[1:4]))
    assert len(orders) == 6  # every order of the three equal hosts turns up


def test_duplicate_exchange_keeps_its_best_preference() -> None:
    fake = FakeDns().add("example", "MX", "30 a.example.", "10 a.example.", "20 b.example.")
    fake.host("a.example", "192.0.2.1").host("b.example", "192.0.2.2")
    assert [(h.preference, h.host.name) for h in hops(resolver(fake), "example").hosts] == [
        (10, "a.example"), (20, "b.example")]


def test_null_mx_is_reported_and_plans_an_immediate_bounce() -> None:
    result = hops(resolver(FakeDns().add("example", "MX", "0 .")), "example")
    assert result.null_mx and result.hosts == ()
    decision = plan(Destination(key="mx:example", kind="mx", domain="example"), result.facts())
    assert decision.refusal is not None and decision.refusal.permanent
    assert decision.refusal.status == "5.1.10"


def test_a_root_exchange_beside_real_hosts_is_no_null_mx() -> None:
    fake = FakeDns().add("example", "MX", "0 .", "10 mx.example.").host("mx.example", "192.0.2.1")
    result = hops(resolver(fake), "example")
    assert not result.null_mx and [h.host.name for h in result.hosts] == ["mx.example"]


def test_implicit_mx_uses_the_domains_own_addresses() -> None:
    fake = FakeDns().add("example", "MX").host("example", "192.0.2.7", "2001:db8::7")
    result = hops(resolver(fake), "example")
    assert result.implicit and [(h.preference, h.host.name) for h in result.hosts] == [(0, "example")]
    assert result.hosts[0].host.addresses == ("2001:db8::7", "192.0.2.7")
    assert result.facts().implicit_mx


def test_implicit_mx_follows_the_domains_cname() -> None:
    fake = FakeDns().add("alias.example", "MX", "alias.example. 60 IN CNAME real.example.")
    for rdtype, tail in (("A", ["real.example. 300 IN A 192.0.2.8"]), ("AAAA", [])):
        fake.answers[("alias.example", rdtype)] = [message(
            "alias.example", rdtype, "alias.example. 60 IN CNAME real.example.", *tail,
            negative_ttl=None if tail else 300)]
    fake.add("alias.example", "CNAME", "alias.example. 60 IN CNAME real.example.")
    result = hops(resolver(fake), "alias.example")
    assert result.cname_chain == ("alias.example", "real.example") and result.implicit
    # The domain stays the host, its alias recorded: DANE asks whether that chain is secure.
    (host,) = [h.host for h in result.hosts]
    assert (host.name, host.canonical, host.addresses) == ("alias.example", "real.example", ("192.0.2.8",))


def test_no_mx_and_no_address_is_permanent() -> None:
    fake = FakeDns().add("example", "MX").host("example")
    with pytest.raises(DnsPermanentError) as info:
        run(resolver(fake).next_hops("example"))
    assert info.value.status == "5.4.4" and "no MX and no address records" in str(info.value)


def test_nxdomain_is_permanent_and_servfail_temporary() -> None:
    fake = FakeDns().add("gone.example", "MX", rcode="NXDOMAIN").add("broken.example", "MX", rcode="SERVFAIL")
    fake.add("refused.example", "MX", rcode="REFUSED")
    r = resolver(fake)
    with pytest.raises(DnsPermanentError) as gone:
        run(r.next_hops("gone.example"))
    assert gone.value.status == "5.1.2" and str(gone.value) == "domain gone.example does not exist (NXDOMAIN)"
    with pytest.raises(DnsTemporaryError) as broken:
        run(r.next_hops("broken.example"))
    assert broken.value.status == "4.4.3" and "answered SERVFAIL for MX broken.example" in str(broken.value)
    assert "127.0.0.1:5353" in str(broken.value)
    with pytest.raises(DnsTemporaryError, match="answered REFUSED"):
        run(r.next_hops("refused.example"))


def test_an_answer_to_another_question_is_temporary() -> None:
    async def wrong(name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> dns.message.Message:
        return message("other.example", "MX", "other.example. 300 IN MX 10 mx.other.example.")

    with pytest.raises(DnsTemporaryError, match="malformed answer"):
        run(DnsResolver(LOOPBACK, exchange=wrong).next_hops("example"))


def test_one_failed_mx_host_is_skipped_all_failed_defers() -> None:
    fake = FakeDns().add("example", "MX", "10 broken.example.", "20 good.example.")
    fake.add("broken.example", "A", rcode="SERVFAIL").add("broken.example", "AAAA", "2001:db8::1")
    fake.host("good.example", "192.0.2.2")
    result = hops(resolver(fake), "example")
    broken, good = (h.host for h in result.hosts)
    assert broken.addresses == () and broken.status == "bogus" and "SERVFAIL for A broken.example" in (
        broken.error or "")
    assert good.addresses == ("192.0.2.2",)
    # policy skips the host without addresses and keeps the other
    decision = plan(Destination(key="mx:example", kind="mx", domain="example"), result.facts())
    assert [c.host for c in decision.candidates] == ["good.example"]

    only_broken = FakeDns().add("example", "MX", "10 broken.example.")
    only_broken.add("broken.example", "A", rcode="SERVFAIL").add("broken.example", "AAAA")
    with pytest.raises(DnsTemporaryError, match="no MX host of example could be looked up"):
        run(resolver(only_broken).next_hops("example"))


def test_mx_hosts_that_do_not_exist_bounce() -> None:
    fake = FakeDns().add("example", "MX", "10 gone.example.", "20 empty.example.")
    fake.add("gone.example", "A", rcode="NXDOMAIN").add("gone.example", "AAAA", rcode="NXDOMAIN")
    fake.host("empty.example")
    with pytest.raises(DnsPermanentError) as info:
        run(resolver(fake).next_hops("example"))
    assert info.value.status == "5.4.4"
    assert "gone.example: host gone.example does not exist" in str(info.value)
    assert "empty.example: no address records" in str(info.value)


def test_mx_target_cname_is_followed_and_recorded() -> None:
    fake = FakeDns().add("example", "MX", "10 mx.example.")
    for rdtype, record in (("A", "mx.example. 300 IN A 192.0.2.4"), ("AAAA", None)):
        lines = ["mx.example. 300 IN CNAME host.example.", "host.example. 300 IN CNAME real.example."]
        if record:
            lines.append(record.replace("mx.example.", "real.example."))
        fake.answers[("mx.example", rdtype)] = [message("mx.example", rdtype, *lines)]
    host = hops(resolver(fake), "example").hosts[0].host
    assert host.name == "mx.example" and host.addresses == ("192.0.2.4",)
    assert host.canonical == "real.example"
    assert host.cname_chain == ("mx.example", "host.example", "real.example")


# --- DNSSEC status --------------------------------------------------------------------------------

def secure_domain(ad_a: bool = True) -> FakeDns:
    fake = FakeDns(ad=True).add("example", "MX", "10 mx.example.")
    fake.add("mx.example", "A", "192.0.2.1", ad=ad_a).add("mx.example", "AAAA")
    return fake


@pytest.mark.parametrize(("resolvers", "secure"), [
    (("127.0.0.1",), True), (("127.0.0.53:5353",), True), (("::1",), True), (("[::1]:5353",), True),
    (("127.0.0.1", "192.0.2.53"), False), (("192.0.2.53",), False), (("2001:db8::53",), False),
])
def test_ad_bit_is_trusted_only_from_loopback_resolvers(resolvers: tuple[str, ...], secure: bool) -> None:
    result = hops(resolver(secure_domain(), resolvers), "example")
    expected = "secure" if secure else "insecure"
    assert (result.status, result.hosts[0].host.status) == (expected, expected)
    assert result.facts().mx_secure is secure and result.facts().hosts[0].secure is secure


def test_a_remote_resolver_is_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "mailward.delivery")
    r = resolver(secure_domain(), ("192.0.2.53",))
    hops(r, "example")
    hops(r, "example")
    (record,) = [rec for rec in caplog.records if "DANE" in rec.getMessage()]
    assert "192.0.2.53:53 is not on loopback" in record.getMessage()
    assert not [rec for rec in caplog.records if "DANE" in rec.getMessage() and rec is not record]


def test_no_ad_bit_is_insecure_and_host_needs_both_families_secure() -> None:
    assert hops(resolver(secure_domain(ad_a=False)), "example").hosts[0].host.status == "insecure"
    insecure = FakeDns(ad=False).add("example", "MX", "10 mx.example.").host("mx.example", "192.0.2.1")
    result = hops(resolver(insecure), "example")
    assert (result.status, result.hosts[0].host.status) == ("insecure", "insecure")


def test_a_half_failed_address_lookup_is_temporary() -> None:
    # Half an answer could hide the addresses (or the insecurity) DANE depends on.
    fake = FakeDns(ad=True).add("mx.example", "A", "192.0.2.1").add("mx.example", "AAAA", rcode="SERVFAIL")
    with pytest.raises(DnsTemporaryError):
        run(resolver(fake).addresses("mx.example"))


# --- cache ----------------------------------------------------------------------------------------

def test_answers_are_cached_for_their_smallest_ttl() -> None:
    fake = FakeDns()
    fake.answers[("mx.example", "A")] = [message("mx.example", "A", "mx.example. 60 IN CNAME real.example.",
                                                 "real.example. 300 IN A 192.0.2.1")]
    fake.add("mx.example", "AAAA", negative_ttl=120)
    # An insecure alias: whether the alias itself is secure is asked once too (DANE, RFC 7672 §2.2.2).
    fake.add("mx.example", "CNAME", "mx.example. 300 IN CNAME real.example.")
    clock = Clock()
    r = resolver(fake, clock=clock)
    run(r.addresses("mx.example"))
    assert len(fake.asked) == 3
    clock.now += 59
    run(r.addresses("mx.example"))
    assert len(fake.asked) == 3  # all from the cache
    clock.now += 2  # the A answer (TTL 60 through its CNAME) expired, the denial (120) did not
    run(r.addresses("mx.example"))
    assert fake.asked[3:] == [("mx.example", "A")]


def test_failures_are_never_cached() -> None:
    fake = FakeDns().add("example", "MX", rcode="SERVFAIL").add("example", "MX", "10 mx.example.")
    fake.host("mx.example", "192.0.2.1")
    r = resolver(fake)
    with pytest.raises(DnsTemporaryError):
        run(r.next_hops("example"))
    assert hops(r, "example").hosts[0].host.addresses == ("192.0.2.1",)
    assert fake.asked.count(("example", "MX")) == 2
    hops(r, "example")
    assert fake.asked.count(("example", "MX")) == 2  # the good answer is cached


def test_nxdomain_is_cached_as_an_answer() -> None:
    fake = FakeDns().add("gone.example", "MX", rcode="NXDOMAIN", negative_ttl=600)
    r = resolver(fake)
    for _ in range(2):
        with pytest.raises(DnsPermanentError):
            run(r.next_hops("gone.example"))
    assert fake.asked == [("gone.example", "MX")]


def test_cache_is_bounded() -> None:
    fake = FakeDns()
    for name in ("a", "b", "c"):
        fake.add(f"{name}.example", "A", "192.0.2.1")
    r = resolver(fake, cache_entries=2)

    async def ask(*names: str) -> None:
        for name in names:
            await r._lookup(dns.name.from_text(f"{name}.example."), dns.rdatatype.A)

    run(ask("a", "b", "a", "c"))  # c pushes out b, the least recently used
    run(ask("a", "c", "b"))
    assert [n for n, _ in fake.asked] == ["a.example", "b.example", "c.example", "b.example"]


def test_concurrent_questions_are_asked_once() -> None:
    fake = FakeDns().add("example", "MX", "10 mx.example.").host("mx.example", "192.0.2.1")
    r = resolver(fake)

    async def both() -> list[NextHops]:
        return list(await asyncio.gather(r.next_hops("example"), r.next_hops("example")))

    first, second = run(both())
    assert first == second
    assert sorted(fake.asked) == [("example", "MX"), ("mx.example", "A"), ("mx.example", "AAAA")]


# --- TLSA -----------------------------------------------------------------------------------------

DIGEST = "00" * 32


def test_tlsa_records_with_status() -> None:
    fake = FakeDns(ad=True).add("_25._tcp.mx.example", "TLSA", f"3 1 1 {DIGEST}", f"2 0 1 {'ab' * 32}")
    fake.host("mx.example", "192.0.2.1")
    facts = run(resolver(fake).tlsa("mx.example"))
    assert facts.status == "secure" and facts.base_domain == "mx.example"
    assert facts.records == (TlsaRecord(3, 1, 1, bytes(32)),
                             TlsaRecord(2, 0, 1, b"\xab" * 32))
    remote = run(resolver(fake, ("192.0.2.53",)).tlsa("mx.example"))
    assert remote.status == "insecure"


def test_tlsa_on_another_port_and_lookup_failures() -> None:
    fake = FakeDns(ad=True).add("_465._tcp.mx.example", "TLSA", f"3 1 1 {DIGEST}")
    fake.host("mx.example", "192.0.2.1")
    assert run(resolver(fake).tlsa("mx.example", 465)).records
    fake.add("_25._tcp.mx.example", "TLSA", rcode="SERVFAIL")
    failed = run(resolver(fake).tlsa("mx.example"))
    assert failed.status == "bogus" and failed.records == ()
    fake.add("_25._tcp.none.example", "TLSA", rcode="NXDOMAIN").host("none.example", "192.0.2.2")
    absent = run(resolver(fake).tlsa("none.example"))
    assert (absent.status, absent.records) == ("secure", ())


def alias_zone(ad: bool, expanded_tlsa: bool) -> FakeDns:
    fake = FakeDns(ad=ad)
    for rdtype, tail in (("A", ["real.example. 300 IN A 192.0.2.1"]), ("AAAA", [])):
        fake.answers[("mx.example", rdtype)] = [message(
            "mx.example", rdtype, "mx.example. 300 IN CNAME real.example.", *tail, ad=ad,
            negative_ttl=None if tail else 300)]
    fake.add("_25._tcp.real.example", "TLSA", *([f"3 1 1 {DIGEST}"] if expanded_tlsa else []))
    fake.add("_25._tcp.mx.example", "TLSA", f"3 0 1 {'cd' * 32}")
    return fake


def test_tlsa_base_domain_is_the_expanded_name_of_a_secure_alias() -> None:
    # RFC 7672 §2.2.2: first the CNAME-expanded name ...
    facts = run(resolver(alias_zone(True, True)).tlsa("mx.example"))
    assert facts.base_domain == "real.example" and facts.records[0].selector == 1
    # ... and the original name when the expanded one securely has none.
    fake = alias_zone(True, False)
    facts = run(resolver(fake).tlsa("mx.example"))
    assert facts.base_domain == "mx.example" and facts.records[0].selector == 0
    assert ("_25._tcp.real.example", "TLSA") in fake.asked


def test_an_insecure_alias_is_not_expanded_for_tlsa() -> None:
    fake = alias_zone(False, True)
    facts = run(resolver(fake).tlsa("mx.example"))
    assert facts.status == "insecure" and facts.base_domain == "mx.example"
    assert ("_25._tcp.real.example", "TLSA") not in fake.asked


@pytest.mark.parametrize(("cname", "expected"), [("secure", True), ("insecure", False), ("SERVFAIL", True)])
def test_a_secure_alias_of_an_insecure_target_is_marked(cname: str, expected: bool) -> None:
    # RFC 7672 §2.2.2 as Postfix reads it: the chain as a whole is insecure (its target is in an
    # unsigned zone), but the alias itself validated, so TLSA records at its own name count.
    fake = alias_zone(False, False)
    if cname != "SERVFAIL":
        fake.add("mx.example", "CNAME", "mx.example. 300 IN CNAME real.example.", ad=cname == "secure")
    host = run(resolver(fake).addresses("mx.example"))
    assert host.status == "insecure"
    # A failed CNAME lookup is not "insecure": the TLSA lookup, with its own status, decides.
    assert host.alias_secure is expected and host.facts().alias_secure is expected
    # A secure chain is a secure alias; a plain name is none; neither needs the extra question.
    secure = alias_zone(True, False)
    assert run(resolver(secure).addresses("mx.example")).alias_secure
    plain = FakeDns(ad=False).host("mx.example", "192.0.2.1")
    assert not run(resolver(plain).addresses("mx.example")).alias_secure
    assert ("mx.example", "CNAME") not in secure.asked + plain.asked
    # Without a trusted AD bit nothing is secure, so the question is not worth asking.
    remote = alias_zone(False, False)
    assert not run(resolver(remote, ("192.0.2.53",)).addresses("mx.example")).alias_secure
    assert ("mx.example", "CNAME") not in remote.asked


# --- TXT (MTA-STS discovery) -----------------------------------------------------------------------


def test_txt_records_join_their_strings_and_are_cached() -> None:
    fake = FakeDns().add("_mta-sts.example", "TXT", '"v=STSv1; " "id=abc"', '"v=spf1 -all"')
    r = resolver(fake)
    assert run(r.txt("_mta-sts.Example.")) == (b"v=STSv1; id=abc", b"v=spf1 -all")
    assert run(r.txt("_mta-sts.example")) == (b"v=STSv1; id=abc", b"v=spf1 -all")
    assert fake.asked == [("_mta-sts.example", "TXT")]


@pytest.mark.parametrize("rcode", ["NOERROR", "NXDOMAIN"])
def test_txt_absent_is_empty(rcode: str) -> None:
    fake = FakeDns().add("_mta-sts.example", "TXT", rcode=rcode)
    assert run(resolver(fake).txt("_mta-sts.example")) == ()


def test_txt_failure_is_never_no_record() -> None:
    with pytest.raises(DnsTemporaryError, match="SERVFAIL"):
        run(resolver(FakeDns()).txt("_mta-sts.example"))
