"""The pure delivery policy: routing rows and plan rows (hosts, TLS requirement, refusals)."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pytest

from mailward.config import NextHop, SecurityLevelName, config_from_dict
from mailward.delivery.dns import HostAddresses, MailHost, NextHops
from mailward.delivery.policy import (
    Destination,
    HostFacts,
    RouteFacts,
    SecurityLevel,
    StsFacts,
    TlsaFacts,
    TlsaRecord,
    destination_for,
    literal_facts,
    plan,
    sts_matches,
    tlsa_hosts,
)

L = SecurityLevel


def config(**delivery: Any) -> Any:
    return config_from_dict({"listener": [], "hostname": "out.example.net",
                             "local_domains": ["example.net", "localhost"], "delivery": delivery},
                            "test", base_dir=Path("/etc"))


ROUTES = [
    {"domain": "partner.example", "next_hop": "[192.0.2.25]:2526", "security": "encrypt"},
    {"domain": ".partner.example", "next_hop": "relay.partner.example:587", "security": "verify",
     "ca_file": "/etc/partner-ca.pem"},
    {"domain": ".deep.partner.example", "next_hop": "[2001:db8::25]"},
    {"domain": "mx-route.example", "next_hop": "mail.elsewhere.example"},
    {"domain": "plain.example", "next_hop": "[192.0.2.26]", "security": "none"},
]


# --- routing -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("domain", "key", "kind", "lookup", "port", "level", "explicit"), [
    # local domains and the domain-less <postmaster>
    ("example.net", "local", "local", "", 25, L.NONE, False),
    ("", "local", "local", "", 25, L.NONE, False),
    # an exact route wins over a suffix route
    ("partner.example", "route:[192.0.2.25]:2526", "route", "192.0.2.25", 2526, L.ENCRYPT, True),
    ("a.partner.example", "route:relay.partner.example:587", "route", "relay.partner.example", 587, L.VERIFY,
     True),
    # the longest suffix wins; an IPv6 literal keeps delivery.port
    ("x.deep.partner.example", "route:[2001:db8::25]", "route", "2001:db8::25", 25, L.MAY, True),
    # a bare host name in next_hop means "the MX of that host"
    ("mx-route.example", "route:mail.elsewhere.example", "route", "mail.elsewhere.example", 25, L.MAY, False),
    ("plain.example", "route:[192.0.2.26]", "route", "192.0.2.26", 25, L.NONE, True),
    # everything else: MX delivery at the design default, dane
    ("example.org", "mx:example.org", "mx", "example.org", 25, L.DANE, False),
    ("notpartner.example", "mx:notpartner.example", "mx", "notpartner.example", 25, L.DANE, False),
    # an address literal: that address, at the global level (dane: no TLSA, so opportunistic)
    ("[192.0.2.7]", "mx:[192.0.2.7]", "mx", "192.0.2.7", 25, L.DANE, True),
    ("[ipv6:2001:db8::7]", "mx:[ipv6:2001:db8::7]", "mx", "2001:db8::7", 25, L.DANE, True),
])
def test_routing(domain: str, key: str, kind: str, lookup: str, port: int, level: SecurityLevel,
                 explicit: bool) -> None:
    dest = destination_for(domain, config(route=ROUTES))
    assert (dest.key, dest.kind, dest.port, dest.level) == (key, kind, port, level)
    if kind != "local":
        assert dest.lookup_name == lookup
        assert dest.uses_mx is not explicit


POLICIES = [
    {"destination": "example.org", "level": "verify", "ca_file": "/etc/org-ca.pem"},
    {"destination": ".example.org", "level": "secure"},
    {"destination": ".deep.example.org", "level": "dane-only"},
    {"destination": "plain.example", "level": "none"},
    {"destination": ".partner.example", "level": "secure"},  # routes decide before the table
]


@pytest.mark.parametrize(("domain", "level", "source"), [
    # an exact row beats a suffix row, the longest suffix wins, a suffix row does not cover the domain
    ("example.org", L.VERIFY, "delivery.policy[0] for example.org"),
    ("mx.example.org", L.SECURE, "delivery.policy[1] for .example.org"),
    ("a.deep.example.org", L.DANE_ONLY, "delivery.policy[2] for .deep.example.org"),
    ("deep.example.org", L.SECURE, "delivery.policy[1] for .example.org"),
    ("plain.example", L.NONE, "delivery.policy[3] for plain.example"),
    ("sub.plain.example", L.ENCRYPT, "delivery.security, the default"),
    ("other.example", L.ENCRYPT, "delivery.security, the default"),
    ("[192.0.2.7]", L.ENCRYPT, "delivery.security, the default for address literals"),
    # a route's own security, whatever the table says about the domain
    ("a.partner.example", L.VERIFY, "delivery.route[1] for .partner.example"),
    ("example.net", L.NONE, "local_domains: delivered here without SMTP"),
])
def test_policy_table_levels(domain: str, level: SecurityLevel, source: str) -> None:
    cfg = config(route=ROUTES[:2], policy=POLICIES[:4], security="encrypt")
    dest = destination_for(domain, cfg)
    assert (dest.level, dest.level_source) == (level, source)


def test_policy_row_ca_file_and_plaintext_opt_in_are_carried() -> None:
    dest = destination_for("example.org", config(policy=POLICIES[:1]))
    assert dest.ca_file == Path("/etc/org-ca.pem") and not dest.may_retry_plaintext
    assert destination_for("other.example", config(may_retry_plaintext=True)).may_retry_plaintext
    routed = destination_for("a.partner.example", config(route=ROUTES, may_retry_plaintext=True))
    assert routed.may_retry_plaintext


def test_policy_row_for_the_smarthost() -> None:
    sh = {"host": "[192.0.2.9]", "tls": "starttls", "ca_file": "/etc/relay-ca.pem"}
    dest = destination_for("example.org", config(smarthost=sh, policy=[
        {"destination": "[192.0.2.9]", "level": "encrypt"},
        {"destination": "[192.0.2.9]:587", "level": "dane"}]))
    assert (dest.level, dest.level_source) == (L.DANE, "delivery.policy[1] for [192.0.2.9]:587")
    assert dest.ca_file == Path("/etc/relay-ca.pem")  # the smarthost's own, the row names none
    portless = destination_for("example.org", config(smarthost=sh, policy=[
        {"destination": "[192.0.2.9]", "level": "encrypt"}]))
    assert (portless.level, portless.level_source) == (L.ENCRYPT, "delivery.policy[0] for [192.0.2.9]")
    default = destination_for("example.org", config(smarthost=sh))
    assert (default.level, default.level_source) == (L.VERIFY, "delivery.smarthost, always verified")


def test_config_levels_are_the_policy_levels() -> None:
    assert set(typing.get_args(SecurityLevelName)) == {level.value for level in SecurityLevel}


def test_routes_to_one_next_hop_share_connections() -> None:
    cfg = config(route=[{"domain": "a.example", "next_hop": "[192.0.2.1]"},
                        {"domain": "b.example", "next_hop": "[192.0.2.1]"},
                        {"domain": "c.example", "next_hop": "[192.0.2.1]", "security": "encrypt"}])
    a, b, c = (destination_for(d, cfg) for d in ("a.example", "b.example", "c.example"))
    assert a == b and hash(a) == hash(b) and a.level_source != b.level_source
    assert c != a  # another level: other connections


def test_route_ca_file_is_carried() -> None:
    dest = destination_for("a.partner.example", config(route=ROUTES))
    assert dest.ca_file == Path("/etc/partner-ca.pem")


def test_smarthost_takes_everything_not_local_or_routed() -> None:
    cfg = config(route=ROUTES[:1], smarthost={"host": "smtp.example.org", "username": "u",
                                              "password_file": "/etc/pw"})
    dest = destination_for("example.org", cfg)
    assert (dest.key, dest.kind, dest.port, dest.level) == (
        "smarthost:smtp.example.org:465", "smarthost", 465, L.VERIFY)
    assert dest.implicit_tls and dest.authenticate and not dest.uses_mx
    assert destination_for("partner.example", cfg).kind == "route"
    assert destination_for("localhost", cfg).kind == "local"
    starttls = destination_for("example.org", config(smarthost={"host": "[192.0.2.9]", "tls": "starttls"}))
    assert (starttls.port, starttls.implicit_tls, starttls.authenticate) == (587, False, False)
    assert starttls.next_hop == NextHop("192.0.2.9", 587, literal=True, mx=False)


# --- plans -------------------------------------------------------------------------------------------

MX = Destination(key="mx:example.org", kind="mx", domain="example.org", port=25)
MX1 = HostFacts("mx1.example.org", ("2001:db8::1", "192.0.2.1"), 10)
MX2 = HostFacts("mx2.example.org", ("192.0.2.2",), 20)
SECURE_MX1 = HostFacts("mx1.example.org", ("192.0.2.1",), 10, secure=True)
SECURE_MX2 = HostFacts("mx2.example.org", ("192.0.2.2",), 20, secure=True)
TWO = RouteFacts((MX1, MX2))
EE = TlsaRecord(3, 1, 1, b"\x01" * 32)
PKIX_EE = TlsaRecord(1, 1, 1, b"\x01" * 32)


def at(level: SecurityLevel, **kw: Any) -> Destination:
    return Destination(key="d", kind=kw.pop("kind", "mx"), domain="example.org", level=level, **kw)


def summary(p: Any) -> Any:
    if p.refusal is not None:
        r = p.refusal
        return ("refused", "permanent" if r.permanent else "temporary", r.status)
    return [(c.host, c.address, c.tls.level.value, c.tls.required, c.tls.verify, c.tls.verify_name,
             c.tls.plaintext_after_failed_handshake) for c in p.candidates]


MAY_ROW = ("may", False, "none", None, False)
MAY_CLEAR_ROW = ("may", False, "none", None, True)


@pytest.mark.parametrize(("name", "dest", "facts", "kw", "expected"), [
    ("may: every address of every host, in order; a failed handshake is not retried in clear",
     at(L.MAY), TWO, {},
     [("mx1.example.org", "2001:db8::1", *MAY_ROW), ("mx1.example.org", "192.0.2.1", *MAY_ROW),
      ("mx2.example.org", "192.0.2.2", *MAY_ROW)]),
    ("may with delivery.may_retry_plaintext: the operator opted in to the retry in clear",
     at(L.MAY, may_retry_plaintext=True), RouteFacts((MX2,)), {},
     [("mx2.example.org", "192.0.2.2", *MAY_CLEAR_ROW)]),
    ("dane without TLSA falls back to may, with the opt-in too", at(L.DANE, may_retry_plaintext=True),
     RouteFacts((MX2,)), {}, [("mx2.example.org", "192.0.2.2", *MAY_CLEAR_ROW)]),
    ("the opt-in never loosens a level that demands TLS", at(L.ENCRYPT, may_retry_plaintext=True),
     RouteFacts((MX2,)), {}, [("mx2.example.org", "192.0.2.2", "encrypt", True, "none", None, False)]),
    ("implicit TLS has no plaintext to retry in", at(L.MAY, may_retry_plaintext=True, implicit_tls=True,
                                                     kind="smarthost"),
     RouteFacts((MX2,)), {}, [("mx2.example.org", "192.0.2.2", *MAY_ROW)]),
    ("none: never STARTTLS", at(L.NONE), RouteFacts((MX2,)), {},
     [("mx2.example.org", "192.0.2.2", "none", False, "none", None, False)]),
    ("encrypt: TLS required, no verification, no fallback", at(L.ENCRYPT), RouteFacts((MX2,)), {},
     [("mx2.example.org", "192.0.2.2", "encrypt", True, "none", None, False)]),
    ("verify: PKIX against each MX host name", at(L.VERIFY), TWO, {},
     [("mx1.example.org", "2001:db8::1", "verify", True, "pkix", "mx1.example.org", False),
      ("mx1.example.org", "192.0.2.1", "verify", True, "pkix", "mx1.example.org", False),
      ("mx2.example.org", "192.0.2.2", "verify", True, "pkix", "mx2.example.org", False)]),
    ("secure: an insecure MX set gives no host", at(L.SECURE), TWO, {},
     ("refused", "temporary", "4.7.5")),
    ("secure: a DNSSEC-secure MX set is verified", at(L.SECURE),
     RouteFacts((SECURE_MX2,), mx_secure=True), {},
     [("mx2.example.org", "192.0.2.2", "secure", True, "pkix", "mx2.example.org", False)]),
    ("secure to an explicit host needs no MX",
     at(L.SECURE, next_hop=NextHop("relay.example", 25, False, False)),
     RouteFacts((HostFacts("relay.example", ("192.0.2.9",)),)), {},
     [("relay.example", "192.0.2.9", "secure", True, "pkix", "relay.example", False)]),
    ("dane without TLSA lookups is opportunistic (RFC 7672: no secure TLSA)", at(L.DANE),
     RouteFacts((MX2,)), {},
     [("mx2.example.org", "192.0.2.2", *MAY_ROW)]),
    ("dane-only without TLSA lookups refuses, temporarily", at(L.DANE_ONLY), TWO, {},
     ("refused", "temporary", "4.7.5")),
    ("Null MX fails at once", at(L.MAY), RouteFacts((), null_mx=True), {},
     ("refused", "permanent", "5.1.10")),
    ("Null MX beats any level", at(L.VERIFY), RouteFacts((), null_mx=True), {"requiretls": True},
     ("refused", "permanent", "5.1.10")),
    ("no hosts at all is temporary", at(L.MAY), RouteFacts(()), {}, ("refused", "temporary", "4.4.4")),
    ("hosts without addresses are temporary", at(L.MAY), RouteFacts((HostFacts("mx.example.org", ()),)), {},
     ("refused", "temporary", "4.4.4")),
    ("a host without addresses is skipped, the next is used", at(L.MAY),
     RouteFacts((HostFacts("gone.example.org", (), 5), MX2)), {},
     [("mx2.example.org", "192.0.2.2", *MAY_ROW)]),
    # REQUIRETLS (RFC 8689 §4.2.1): only authenticated TLS to a securely obtained host; when no
    # host qualifies for that reason alone, the message goes back with 5.7.30.
    ("REQUIRETLS refuses may", at(L.MAY), TWO, {"requiretls": True}, ("refused", "permanent", "5.7.30")),
    ("REQUIRETLS refuses encrypt", at(L.ENCRYPT), TWO, {"requiretls": True},
     ("refused", "permanent", "5.7.30")),
    ("REQUIRETLS refuses dane without TLSA", at(L.DANE), TWO, {"requiretls": True},
     ("refused", "permanent", "5.7.30")),
    ("REQUIRETLS goes over verify to a DNSSEC-secure MX", at(L.VERIFY),
     RouteFacts((SECURE_MX2,), mx_secure=True), {"requiretls": True},
     [("mx2.example.org", "192.0.2.2", "verify", True, "pkix", "mx2.example.org", False)]),
    ("REQUIRETLS refuses verify to an insecure MX: a forged answer picks the host", at(L.VERIFY),
     RouteFacts((MX2,)), {"requiretls": True}, ("refused", "permanent", "5.7.30")),
    ("REQUIRETLS goes over verify to an explicit next hop, no MX involved",
     at(L.VERIFY, kind="smarthost", next_hop=NextHop("relay.example", 587, False, False)),
     RouteFacts((HostFacts("relay.example", ("192.0.2.9",)),)), {"requiretls": True},
     [("relay.example", "192.0.2.9", "verify", True, "pkix", "relay.example", False)]),
    ("REQUIRETLS over DANE", at(L.DANE), RouteFacts((SECURE_MX1,), mx_secure=True),
     {"tlsa": {"mx1.example.org": TlsaFacts("secure", (EE,))}, "requiretls": True},
     [("mx1.example.org", "192.0.2.1", "dane", True, "dane", "mx1.example.org", False)]),
    ("REQUIRETLS: a host left out for a passing fault defers instead of bouncing", at(L.DANE),
     RouteFacts((SECURE_MX1, MX2), mx_secure=True),
     {"tlsa": {"mx1.example.org": TlsaFacts("bogus")}, "requiretls": True},
     ("refused", "temporary", "4.7.5")),
    ("REQUIRETLS encrypt mode: TLS made mandatory, not authenticated", at(L.DANE, requiretls="encrypt"),
     RouteFacts((MX2,)), {"requiretls": True},
     [("mx2.example.org", "192.0.2.2", "encrypt", True, "none", None, False)]),
    ("REQUIRETLS encrypt mode still needs TLS", at(L.NONE, requiretls="encrypt"), RouteFacts((MX2,)),
     {"requiretls": True}, ("refused", "permanent", "5.7.30")),
    ("REQUIRETLS opportunistic mode: planned like any message", at(L.MAY, requiretls="opportunistic"),
     RouteFacts((MX2,)), {"requiretls": True}, [("mx2.example.org", "192.0.2.2", *MAY_ROW)]),
    # TLS-Required: No (RFC 8689 §5): the destination's DANE and MTA-STS are not enforced.
    ("TLS-Required: No relaxes DANE to opportunistic", at(L.DANE), RouteFacts((SECURE_MX1,), mx_secure=True),
     {"tlsa": {"mx1.example.org": TlsaFacts("secure", (EE,))}, "tls_optional": True},
     [("mx1.example.org", "192.0.2.1", *MAY_ROW)]),
    ("TLS-Required: No uses a host whose TLSA lookup failed", at(L.DANE),
     RouteFacts((SECURE_MX1,), mx_secure=True), {"tlsa": {"mx1.example.org": TlsaFacts("bogus")},
                                                 "tls_optional": True},
     [("mx1.example.org", "192.0.2.1", *MAY_ROW)]),
    ("TLS-Required: No ignores an enforced MTA-STS policy", at(L.DANE), TWO,
     {"sts": StsFacts("enforce", ("*.other.example",)), "tls_optional": True},
     [("mx1.example.org", "2001:db8::1", *MAY_ROW), ("mx1.example.org", "192.0.2.1", *MAY_ROW),
      ("mx2.example.org", "192.0.2.2", *MAY_ROW)]),
    ("TLS-Required: No leaves the operator's own levels alone", at(L.VERIFY), RouteFacts((MX2,)),
     {"tls_optional": True}, [("mx2.example.org", "192.0.2.2", "verify", True, "pkix", "mx2.example.org",
                               False)]),
    ("TLS-Required: No leaves dane-only alone", at(L.DANE_ONLY), TWO, {"tls_optional": True},
     ("refused", "temporary", "4.7.5")),
    ("REQUIRETLS outranks TLS-Required: No", at(L.DANE), TWO, {"tls_optional": True, "requiretls": True},
     ("refused", "permanent", "5.7.30")),
    # DANE hook (RFC 7672 §2.2): secure usable TLSA -> dane; secure unusable -> encrypt; bogus -> unusable.
    ("dane: secure usable TLSA requires DANE authentication", at(L.DANE),
     RouteFacts((SECURE_MX1,), mx_secure=True),
     {"tlsa": {"mx1.example.org": TlsaFacts("secure", (EE,), "mx1.example.org")}},
     [("mx1.example.org", "192.0.2.1", "dane", True, "dane", "mx1.example.org", False)]),
    ("dane: only PKIX usages -> TLS mandatory, unauthenticated", at(L.DANE),
     RouteFacts((SECURE_MX1,), mx_secure=True),
     {"tlsa": {"mx1.example.org": TlsaFacts("secure", (PKIX_EE,))}},
     [("mx1.example.org", "192.0.2.1", "encrypt", True, "none", None, False)]),
    ("dane: bogus TLSA makes the host unusable, the next MX is used", at(L.DANE),
     RouteFacts((SECURE_MX1, SECURE_MX2), mx_secure=True),
     {"tlsa": {"mx1.example.org": TlsaFacts("bogus"), "mx2.example.org": TlsaFacts("insecure")}},
     [("mx2.example.org", "192.0.2.2", *MAY_ROW)]),
    ("dane: TLSA on an insecure MX set is not used", at(L.DANE), RouteFacts((MX1,)),
     {"tlsa": {"mx1.example.org": TlsaFacts("secure", (EE,))}},
     [("mx1.example.org", "2001:db8::1", *MAY_ROW), ("mx1.example.org", "192.0.2.1", *MAY_ROW)]),
    ("dane: a bogus TLSA for the only host defers", at(L.DANE), RouteFacts((SECURE_MX1,), mx_secure=True),
     {"tlsa": {"mx1.example.org": TlsaFacts("bogus")}}, ("refused", "temporary", "4.7.5")),
    # RFC 7672 §2.2.1: preference order stands; a worse MX with TLSA never pre-empts a better one.
    ("dane: a better MX without TLSA comes first, opportunistic; the worse one keeps DANE", at(L.DANE),
     RouteFacts((SECURE_MX1, SECURE_MX2), mx_secure=True),
     {"tlsa": {"mx1.example.org": TlsaFacts("secure", ()), "mx2.example.org": TlsaFacts("secure", (EE,))}},
     [("mx1.example.org", "192.0.2.1", *MAY_ROW),
      ("mx2.example.org", "192.0.2.2", "dane", True, "dane", "mx2.example.org", False)]),
    ("dane-only: the better MX without TLSA is left out", at(L.DANE_ONLY),
     RouteFacts((SECURE_MX1, SECURE_MX2), mx_secure=True),
     {"tlsa": {"mx1.example.org": TlsaFacts("secure", ()), "mx2.example.org": TlsaFacts("secure", (EE,))}},
     [("mx2.example.org", "192.0.2.2", "dane", True, "dane", "mx2.example.org", False)]),
    ("dane-only: secure but unusable records are as good as none", at(L.DANE_ONLY),
     RouteFacts((SECURE_MX1,), mx_secure=True),
     {"tlsa": {"mx1.example.org": TlsaFacts("secure", (PKIX_EE,))}},
     ("refused", "temporary", "4.7.5")),
    ("dane-only: an insecure MX set defers (RFC 7672 §2.2.1)", at(L.DANE_ONLY), RouteFacts((SECURE_MX1,)),
     {"tlsa": {"mx1.example.org": TlsaFacts("secure", (EE,))}}, ("refused", "temporary", "4.7.5")),
    ("dane-only: a bogus TLSA lookup defers", at(L.DANE_ONLY), RouteFacts((SECURE_MX1,), mx_secure=True),
     {"tlsa": {"mx1.example.org": TlsaFacts("bogus")}}, ("refused", "temporary", "4.7.5")),
    ("dane: TLSA of a host with insecure address records are ignored (§2.2.2)", at(L.DANE),
     RouteFacts((MX2,), mx_secure=True), {"tlsa": {"mx2.example.org": TlsaFacts("secure", (EE,))}},
     [("mx2.example.org", "192.0.2.2", *MAY_ROW)]),
    ("dane: insecure TLSA records count for nothing", at(L.DANE), RouteFacts((SECURE_MX1,), mx_secure=True),
     {"tlsa": {"mx1.example.org": TlsaFacts("insecure", (EE,))}},
     [("mx1.example.org", "192.0.2.1", *MAY_ROW)]),
    ("dane: insecure MX, but the host is the next-hop domain itself", at(L.DANE),
     RouteFacts((HostFacts("example.org", ("192.0.2.5",), 10, secure=True),)),
     {"tlsa": {"example.org": TlsaFacts("secure", (EE,))}},
     [("example.org", "192.0.2.5", "dane", True, "dane", "example.org", False)]),
    ("dane: no MX at all (implicit MX) with secure addresses", at(L.DANE),
     RouteFacts((HostFacts("example.org", ("192.0.2.5",), 0, secure=True),), implicit_mx=True),
     {"tlsa": {"example.org": TlsaFacts("secure", (EE,))}},
     [("example.org", "192.0.2.5", "dane", True, "dane", "example.org", False)]),
    ("dane to an explicit next hop needs no MX, only secure addresses",
     at(L.DANE, kind="route", next_hop=NextHop("relay.example", 25, False, False)),
     RouteFacts((HostFacts("relay.example", ("192.0.2.9",), secure=True),)),
     {"tlsa": {"relay.example": TlsaFacts("secure", (EE,), "relay.example")}},
     [("relay.example", "192.0.2.9", "dane", True, "dane", "relay.example", False)]),
    ("secure to an insecure MX set is refused before any host is judged", at(L.SECURE),
     RouteFacts((SECURE_MX1,)), {}, ("refused", "temporary", "4.7.5")),
    # MTA-STS hook (RFC 8461): enforce keeps matching hosts, verified; testing changes nothing.
    ("sts enforce: only listed hosts, PKIX against the MX name", at(L.DANE), TWO,
     {"sts": StsFacts("enforce", ("mx2.example.org",))},
     [("mx2.example.org", "192.0.2.2", "verify", True, "pkix", "mx2.example.org", False)]),
    ("sts enforce with no matching host defers", at(L.DANE), TWO,
     {"sts": StsFacts("enforce", ("*.other.example",))},
     ("refused", "temporary", "4.7.5")),
    ("sts testing is opportunistic", at(L.DANE), RouteFacts((MX2,)),
     {"sts": StsFacts("testing", ("x.example",))},
     [("mx2.example.org", "192.0.2.2", *MAY_ROW)]),
    ("sts enforce satisfies REQUIRETLS", at(L.DANE), RouteFacts((MX2,)),
     {"sts": StsFacts("enforce", ("*.example.org",)), "requiretls": True},
     [("mx2.example.org", "192.0.2.2", "verify", True, "pkix", "mx2.example.org", False)]),
    ("an MTA-STS policy announced but not fetched: delivered as without one", at(L.DANE),
     RouteFacts((MX2,)), {"sts": StsFacts("none", unavailable=True)},
     [("mx2.example.org", "192.0.2.2", *MAY_ROW)]),
    ("... but REQUIRETLS waits for it instead of bouncing", at(L.DANE), TWO,
     {"sts": StsFacts("none", unavailable=True), "requiretls": True}, ("refused", "temporary", "4.7.5")),
    ("... and goes over DANE where DANE applies", at(L.DANE), RouteFacts((SECURE_MX1,), mx_secure=True),
     {"tlsa": {"mx1.example.org": TlsaFacts("secure", (EE,))}, "sts": StsFacts("none", unavailable=True),
      "requiretls": True},
     [("mx1.example.org", "192.0.2.1", "dane", True, "dane", "mx1.example.org", False)]),
    ("DANE outranks MTA-STS", at(L.DANE), RouteFacts((SECURE_MX1,), mx_secure=True),
     {"tlsa": {"mx1.example.org": TlsaFacts("secure", (EE,))},
      "sts": StsFacts("enforce", ("other.example",))},
     [("mx1.example.org", "192.0.2.1", "dane", True, "dane", "mx1.example.org", False)]),
    ("an explicit verify level ignores STS facts", at(L.VERIFY), RouteFacts((MX2,)),
     {"sts": StsFacts("enforce", ("other.example",))},
     [("mx2.example.org", "192.0.2.2", "verify", True, "pkix", "mx2.example.org", False)]),
])
def test_plan(name: str, dest: Destination, facts: RouteFacts, kw: dict[str, Any], expected: Any) -> None:
    assert summary(plan(dest, facts, **kw)) == expected, name


def test_plan_uses_destination_port_and_ca() -> None:
    dest = at(L.VERIFY, port=2526, ca_file=Path("/etc/ca.pem"))
    (cand,) = plan(dest, RouteFacts((MX2,))).candidates
    assert (cand.port, cand.tls.ca_file) == (2526, Path("/etc/ca.pem"))
    assert cand.relay == "mx2.example.org[192.0.2.2]:2526"


def test_smarthost_plan_is_verified_implicit_tls() -> None:
    cfg = config(smarthost={"host": "[127.0.0.1]", "ca_file": "/etc/ca.pem"})
    dest = destination_for("example.org", cfg)
    (cand,) = plan(dest, literal_facts(dest)).candidates
    assert (cand.address, cand.port) == ("127.0.0.1", 465)
    assert cand.tls.implicit and cand.tls.required and cand.tls.verify == "pkix"
    assert cand.tls.verify_name == "127.0.0.1" and cand.tls.ca_file == Path("/etc/ca.pem")
    assert not cand.tls.plaintext_after_failed_handshake


def test_dane_reference_names_follow_rfc7672_3_2_2() -> None:
    tlsa = {"mx1.example.org": TlsaFacts("secure", (EE,), "mx.provider.example")}
    secure = RouteFacts((SECURE_MX1,), mx_secure=True, canonical_domain="mail.example.net")
    (cand,) = plan(at(L.DANE), secure, tlsa=tlsa).candidates
    # SNI and the first name are the TLSA base domain (the CNAME-expanded host), then the MX host as
    # named, then the next-hop domain and its CNAME expansion, trusted because the MX set is secure.
    assert cand.tls.verify_name == "mx.provider.example"
    assert cand.tls.dane_names == (
        "mx.provider.example", "mx1.example.org", "example.org", "mail.example.net")
    host_itself = RouteFacts((HostFacts("example.org", ("192.0.2.5",), secure=True),),
                             canonical_domain="ignored.example")
    (cand,) = plan(at(L.DANE), host_itself, tlsa={"example.org": TlsaFacts("secure", (EE,))}).candidates
    assert cand.tls.dane_names == ("example.org",)  # an insecure MX answer vouches for no other name


def test_next_hops_name_the_secure_cname_target() -> None:
    hop = HostAddresses("mx.example.net", ("192.0.2.1",), "secure")
    aliased = ("example.org", "mail.example.net")
    assert NextHops("example.org", (MailHost(10, hop),), "secure", cname_chain=aliased).facts() \
        .canonical_domain == "mail.example.net"
    # An insecure answer vouches for nothing, its CNAME target included.
    assert NextHops("example.org", (MailHost(10, hop),), "insecure", cname_chain=aliased).facts() \
        .canonical_domain is None


def test_dane_keeps_implicit_tls() -> None:
    dest = at(L.DANE, kind="smarthost", implicit_tls=True, next_hop=NextHop("192.0.2.9", 465, True, False))
    facts = RouteFacts((HostFacts("relay.example", ("192.0.2.9",), secure=True),))
    for records in ((EE,), (PKIX_EE,)):
        (cand,) = plan(dest, facts, tlsa={"relay.example": TlsaFacts("secure", records)}).candidates
        assert cand.tls.implicit and cand.tls.required


@pytest.mark.parametrize(("dest", "facts", "expected"), [
    (at(L.DANE), RouteFacts((SECURE_MX1, MX2), mx_secure=True), ("mx1.example.org",)),
    (at(L.DANE_ONLY), RouteFacts((SECURE_MX1, SECURE_MX2), mx_secure=True),
     ("mx1.example.org", "mx2.example.org")),
    (at(L.DANE), RouteFacts((SECURE_MX1,)), ()),  # insecure MX set
    (at(L.DANE), RouteFacts((HostFacts("example.org", ("192.0.2.5",), secure=True),)), ("example.org",)),
    (at(L.VERIFY), RouteFacts((SECURE_MX1,), mx_secure=True), ()),  # the level never looks at TLSA
    (at(L.DANE, kind="route", next_hop=NextHop("relay.example", 25, False, False)),
     RouteFacts((HostFacts("relay.example", ("192.0.2.9",), secure=True),)), ("relay.example",)),
])
def test_tlsa_hosts(dest: Destination, facts: RouteFacts, expected: tuple[str, ...]) -> None:
    assert tlsa_hosts(dest, facts) == expected


def test_reasons_say_where_the_level_came_from() -> None:
    cfg = config(policy=[{"destination": ".example.org", "level": "dane-only"}])
    dest = destination_for("a.example.org", cfg)
    p = plan(dest, RouteFacts((SECURE_MX1,), mx_secure=True),
             tlsa={"mx1.example.org": TlsaFacts("secure", ())})
    assert p.refusal is not None and p.refusal.status == "4.7.5"
    assert p.skipped == ("mx1.example.org: dane-only, and it has no TLSA records (DNSSEC-secure denial)",)
    (cand,) = plan(destination_for("a.example.com", cfg), RouteFacts((MX2,))).candidates
    assert cand.tls.reason == ("dane from delivery.security, the default: the MX records are not "
                               "DNSSEC-secure, so opportunistic TLS")
    refused = plan(at(L.SECURE), TWO).refusal
    assert refused is not None and refused.reason == (
        "level secure (delivery.security, the default) needs DNSSEC-secure MX records, and those of "
        "example.org are not")


def test_requiretls_connections_are_marked_only_under_enforce() -> None:
    secure = RouteFacts((SECURE_MX2,), mx_secure=True)
    (enforced,) = plan(at(L.VERIFY), secure, requiretls=True).candidates
    (plain,) = plan(at(L.VERIFY), secure).candidates
    (relaxed,) = plan(at(L.VERIFY, requiretls="opportunistic"), secure, requiretls=True).candidates
    # A REQUIRETLS connection checks the server offers REQUIRETLS and is never parked with others.
    assert enforced.tls.requiretls and not plain.tls.requiretls and not relaxed.tls.requiretls
    assert enforced != plain and relaxed == plain


def test_requiretls_modes_come_from_routes_and_policy_rows() -> None:
    cfg = config(route=[{"domain": "filtered.example", "next_hop": "[127.0.0.1]:10025"},
                        {"domain": "partner.example", "next_hop": "[192.0.2.25]:25"},
                        {"domain": "lan.example", "next_hop": "[192.0.2.26]", "requiretls": "encrypt"}],
                 policy=[{"destination": "legacy.example", "level": "may", "requiretls": "opportunistic"}])
    modes = {d: destination_for(d, cfg).requiretls for d in (
        "filtered.example", "partner.example", "lan.example", "legacy.example", "example.org")}
    # A loopback next hop (a content filter) defaults to opportunistic, as Postfix's does.
    assert modes == {"filtered.example": "opportunistic", "partner.example": "enforce",
                     "lan.example": "encrypt", "legacy.example": "opportunistic", "example.org": "enforce"}


def test_tls_required_no_says_so_in_the_reason() -> None:
    (cand,) = plan(at(L.DANE), RouteFacts((MX2,)), tls_optional=True).candidates
    assert cand.tls.reason.startswith("may from TLS-Required: No in the message")


def test_refusal_reasons_name_what_was_skipped() -> None:
    p = plan(at(L.MAY), TWO, requiretls=True)
    assert p.refusal is not None
    assert p.refusal.reply.startswith("5.7.30 REQUIRETLS support required")
    assert "mx1.example.org" in p.refusal.reason and "mx2.example.org" in p.refusal.reason
    assert len(p.skipped) == 2


@pytest.mark.parametrize(("pattern", "host", "ok"), [
    ("mx.example.org", "mx.example.org", True),
    ("mx.example.org", "MX.Example.org.", True),
    ("*.example.org", "mx.example.org", True),
    ("*.example.org", "a.mx.example.org", False),
    ("*.example.org", "example.org", False),
    ("*.example.org", ".example.org", False),
    ("mx.example.org", "mx2.example.org", False),
])
def test_sts_patterns(pattern: str, host: str, ok: bool) -> None:
    assert sts_matches(pattern, host) is ok


def test_tlsa_usability() -> None:
    sha256, sha512 = b"\x01" * 32, b"\x01" * 64
    assert TlsaRecord(2, 0, 1, sha256).usable and TlsaRecord(3, 1, 2, sha512).usable
    assert TlsaRecord(3, 0, 0, b"\x30").usable
    assert not TlsaRecord(0, 0, 1, sha256).usable and not TlsaRecord(1, 1, 1, sha256).usable
    assert not TlsaRecord(3, 2, 1, sha256).usable and not TlsaRecord(3, 1, 3, sha256).usable
    # Malformed association data (RFC 7672 §2.2.3): wrong digest length, empty full data.
    assert not TlsaRecord(3, 1, 1, sha512).usable and not TlsaRecord(3, 1, 2, sha256).usable
    assert not TlsaRecord(3, 1, 0, b"").usable
